"""The package's layout: no module reaches into another module's private names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "skprotoad"
EXCLUDED = set()


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_imports(path):
    """``(line, module, name)`` of each private name ``path`` imports from a
    module of the package (importing a private *module* is fine)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] != "skprotoad":
            continue
        for alias in node.names:
            if not _private(alias.name):
                continue
            # ``from . import _images``: a private module, not a private name
            target = f"{module}.{alias.name}".lstrip(".") if module else alias.name
            if (PACKAGE / f"{target.split('.')[-1]}.py").exists() and not module.strip("."):
                continue
            found.append((node.lineno, "." * node.level + module, alias.name))
    return found


def test_no_module_imports_another_modules_private_names():
    offenders = [
        f"{path.name}:{line}: from {module} import {name}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name not in EXCLUDED
        for line, module, name in _private_imports(path)
    ]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_the_check_finds_private_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "from .detector import _plain, ProtoADDetector\n"
        "from skprotoad.network import _symmetric_index\n"
        "from . import _images\n"
        "from ._choices import IMAGE_SCORES\n"
        "from ._version import __version__\n"
        "from os import _exit\n"
    )
    assert [name for _, _, name in _private_imports(source)] == ["_plain", "_symmetric_index"]
