"""What the benchmark scripts share: paths, the machine, peak memory, writers.

Imported first by every ``benchmarks/*.py`` script (``import _common``): on
import it puts this checkout's package and the benchmarks folder at the front
of ``sys.path``, so that a script measures the ``skprotoad`` next to it rather
than whichever one is installed, and can import its sibling modules
(``anchors``, ``bench_suite``).

Data sets are looked up in ``../shared/data`` next to the repository, then in
the folders named in ``SKPROTOAD_DATA`` (separated by ``os.pathsep``; a folder
that holds data sets is searched one level down).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent  # benchmarks/
REPO = HERE.parent
RESULTS = HERE / "results"
SHARED_DATA = REPO.parent / "shared" / "data"

for _path in (str(HERE), str(REPO)):  # REPO ends up first
    if _path in sys.path:
        sys.path.remove(_path)
    sys.path.insert(0, _path)


# -------------------------------------------------------------------- data
def is_mvtec_set(folder):
    """Whether ``folder`` has the MVTec AD layout (``train/good``)."""
    return (Path(folder) / "train" / "good").is_dir()


def env_data_sets():
    """{name: folder} of the MVTec-layout sets named by ``SKPROTOAD_DATA``."""
    found = {}
    for entry in filter(None, os.environ.get("SKPROTOAD_DATA", "").split(os.pathsep)):
        entry = Path(entry)
        candidates = [entry] if is_mvtec_set(entry) else sorted(entry.glob("*"))
        for folder in candidates:
            if is_mvtec_set(folder):
                found.setdefault(folder.name, folder)
    return found


def data_dir(name):
    """Folder of the data set ``name``: ``../shared/data/<name>`` if it is one,
    else the set of that name in ``SKPROTOAD_DATA``, else the shared path
    anyway (so that the error comes from the reader and names the path)."""
    shared = SHARED_DATA / name
    return shared if is_mvtec_set(shared) else env_data_sets().get(name, shared)


# ----------------------------------------------------------------- machine
def machine_info():
    """The machine as a dict: platform, architecture, cores, Python, torch."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # the metrics benchmark needs no torch
        info["torch"] = None
    return info


def machine(torch=True):
    """The machine line written into results: ``"x86_64, 2 cores (shared), torch 2.x"``.

    The cores are shared with whatever else runs: timings are indicative.
    """
    info = machine_info()
    text = f"{info['machine']}, {info['cpus']} cores (shared)"
    if torch and info["torch"]:
        text += f", torch {info['torch']}"
    return text


# ------------------------------------------------------------------ memory
def peak_rss_bytes(children=False):
    """Peak resident set size of this process (or of its waited-for children,
    the largest of them), bytes: ``getrusage().ru_maxrss`` (KiB on Linux)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss * 1024


def peak_rss_mb(children=False):
    """:func:`peak_rss_bytes` in MiB."""
    return peak_rss_bytes(children) / 2**20


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(field)


def rss_bytes():
    """Current resident set size of this process, bytes (``VmRSS``, Linux)."""
    return _proc_status_bytes("VmRSS")


def vm_hwm_bytes():
    """Peak resident set size of this process's own memory map, bytes
    (``VmHWM``, Linux): unlike ``ru_maxrss``, never what a forked parent held."""
    return _proc_status_bytes("VmHWM")


# ----------------------------------------------------------------- results
def read_json(path, default=None):
    """The JSON in ``path``, or ``default`` when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path, data, indent=2):
    """Write ``data`` as JSON (creating the folder), ending with a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent) + "\n")


def write_markdown(path, lines):
    """Write ``lines`` (str or list of lines) as a file ending with a newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = lines if isinstance(lines, str) else "\n".join(lines)
    path.write_text(text.rstrip("\n") + "\n")


def markdown_table(header, rows):
    """A markdown table's lines: ``header`` names, ``rows`` lists of cells."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines


def chosen_variants(parser, args, names):
    """The variants ``args.variants`` asks for (all when none), after ``--list``
    (prints ``names``, returns None) and a usage error for unknown ones."""
    if args.list:
        print("\n".join(names))
        return None
    unknown = sorted(set(args.variants) - set(names))
    if unknown:
        parser.error(f"unknown variants {unknown}; see --list")
    return list(args.variants or names)
