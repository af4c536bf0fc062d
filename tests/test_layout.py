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


# ------------------------------------------------------------- benchmarks
BENCHMARKS = PACKAGE.parent / "benchmarks"


def _is_package(module):
    return module == "skprotoad" or module.startswith("skprotoad.")


def _benchmark_offences(path):
    """What ``path`` does that a benchmark must not: import a private name or
    module of skprotoad, read a private attribute of a skprotoad module, or
    assign to an attribute of ProtoADDetector (monkeypatching the estimator)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules, detectors, found = set(), {"ProtoADDetector"}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_package(alias.name):
                    if any(_private(part) for part in alias.name.split(".")):
                        found.append((node.lineno, f"import {alias.name}"))
                    modules.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and _is_package(node.module or ""):
            if any(_private(part) for part in node.module.split(".")):
                found.append((node.lineno, f"from {node.module} import ..."))
            for alias in node.names:
                if _private(alias.name):
                    found.append((node.lineno, f"from {node.module} import {alias.name}"))
                elif alias.name == "ProtoADDetector":
                    detectors.add(alias.asname or alias.name)
                elif alias.name[:1].islower():  # a module or a function: both fine to read
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in modules:
                found.append((node.lineno, f"reads {ast.unparse(node)}"))
        targets = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and node.args and (
            (isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"))
            or (isinstance(node.func, ast.Attribute) and node.func.attr in ("setattr", "delattr"))
        ):
            targets = [ast.Attribute(value=node.args[0], attr="?", ctx=ast.Store())]
        for target in targets:
            if isinstance(target, ast.Attribute):
                owner = ast.unparse(target.value)
                if owner in detectors or owner.endswith(".ProtoADDetector"):
                    found.append((node.lineno, f"patches {owner}"))
    return sorted(found)


def test_benchmarks_use_only_public_names_and_leave_the_estimator_alone():
    if not BENCHMARKS.is_dir():
        return  # an installed package without its repository
    offenders = [
        f"{path.name}:{line}: {what}"
        for path in sorted(BENCHMARKS.glob("*.py"))
        for line, what in _benchmark_offences(path)
    ]
    assert not offenders, "benchmarks reach into skprotoad:\n" + "\n".join(offenders)


def test_the_benchmark_check_finds_private_names_and_patches(tmp_path):
    source = tmp_path / "bench_x.py"
    source.write_text(
        "import skprotoad._images\n"
        "import skprotoad.clustering as cl\n"
        "from skprotoad._calibration import conformal_threshold\n"
        "from skprotoad.network import _symmetric_index, upsample\n"
        "from skprotoad import _images, ProtoADDetector as Det, datasets\n"
        "from skprotoad.preprocessing import model_inputs\n"
        "cl._first_neighbors_ivf(X)\n"
        "Det._extract_features = counting\n"
        "setattr(Det, 'fit', fit)\n"
        "monkeypatch.setattr(ProtoADDetector, 'predict', predict)\n"
        "skprotoad.ProtoADDetector.n_jobs = 2\n"
        "# fine:\n"
        "det = Det(); det.offset_ = 0.0; self._done = True; cl.finch(X); upsample(x)\n"
        "datasets.load_mvtec(path)\n"
        "model_inputs(X).batch._private_of_torch\n"
    )
    assert [what for _, what in _benchmark_offences(source)] == [
        "import skprotoad._images",
        "from skprotoad._calibration import ...",
        "from skprotoad.network import _symmetric_index",
        "from skprotoad import _images",
        "reads cl._first_neighbors_ivf",
        "patches Det",
        "patches Det",
        "patches ProtoADDetector",
        "patches skprotoad.ProtoADDetector",
    ]


# ------------------------------------------- private attributes of objects
# Private attributes a module reads or writes on an object that is not its
# own ``self``, with the reason; anything else is another module's business.
PRIVATE_ATTRIBUTES_ALLOWED = {
    # scikit-learn's name for an estimator's table of rules, read where they are checked
    ("_validation.py", "_parameter_constraints"),
    # the record that record_fitted_settings writes and check_unchanged_since_fit reads
    ("_validation.py", "_fitted_settings"),
    # torch's count of a tensor's in-place changes (no public equivalent): how
    # the folded backbone sees that a weight changed (load_state_dict writes
    # in place)
    ("backbones.py", "_version"),
}


def _private_attribute_uses(path):
    """``(line, expression)`` of each private attribute ``path`` reads or
    writes on an object other than ``self`` or ``cls``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append((node.lineno, ast.unparse(node)))
    return sorted(found)


def test_no_module_uses_private_attributes_of_another_modules_objects():
    offenders = [
        f"{path.name}:{line}: {expression}"
        for path in sorted(PACKAGE.glob("*.py"))
        for line, expression in _private_attribute_uses(path)
        if (path.name, expression.rsplit(".", 1)[-1]) not in PRIVATE_ATTRIBUTES_ALLOWED
    ]
    assert not offenders, "private attributes used across modules:\n" + "\n".join(offenders)


def test_the_detectors_former_private_seams_are_not_reached_into():
    # what persistence, export and the CLI once called on the detector: the
    # functions of _validation now own these rules
    seams = ("._check_unchanged_since_fit", "._validate_params", "._fitted_settings")
    offenders = [
        f"{path.name}: {seam}"
        for path in sorted(PACKAGE.glob("*.py"))
        if path.name not in ("detector.py", "_validation.py")
        for seam in seams
        if seam in path.read_text()
    ]
    assert not offenders, "\n".join(offenders)


def test_the_check_finds_private_attribute_uses(tmp_path):
    source = tmp_path / "m.py"
    source.write_text(
        "model._check_unchanged_since_fit()\n"
        "ProtoADDetector(**params)._validate_params()\n"
        "model._fitted_settings = settings\n"
        "type(model)._parameter_constraints\n"
        "# fine:\n"
        "self._network = network; cls._cache = {}; model.offset_; x.__class__\n"
    )
    assert [expression for _, expression in _private_attribute_uses(source)] == [
        "model._check_unchanged_since_fit",
        "ProtoADDetector(**params)._validate_params",
        "model._fitted_settings",
        "type(model)._parameter_constraints",
    ]
