"""Fit seconds of the defaults on each shared data set, by stage, and what the
calibration clusterings' shared neighbour search saves there.

For each shared set found (Magnetic Tile, BSData, tire), the same number of
training images (evenly spaced over the set's training list):

- ``ProtoADDetector(random_state=0).fit``: seconds by stage (features, the
  clustering of all images, calibration: the clusterings without each
  held-out fold and the held-out images' scores);
- the fit's clusterings (all images, then without each fold; no farthest
  rows) by the public clustering functions on the fitted network's patch
  features, the folds those of the fit, two ways, alternating, the fastest
  of ``--rounds`` rounds of each: one shared first-neighbour search with
  the rows that lost their neighbour to a fold searched in the shared
  search's lists and FINCH's second level started from the first
  clustering's (``clustering.SharedSearch``, the fit's way; results
  written before this script used it leave the second level out), and the fit's way
  before those lists (those rows searched exactly when few, else every
  row searched again, no second level shared);
- the share of patches whose first neighbour lies in their own image, and
  of each fold clustering's patches whose neighbour lay in the fold;
- with ``--against REF``: the same fit with this checkout and with the
  package at git revision REF (a temporary worktree), each in a fresh
  process, alternating, the fastest of ``--rounds`` rounds of each, by
  stage: a change's effect on the fit, side by side in one run (runs on
  different days differ by the machine's load more than by most changes).

On aligned parts (BSData's spindles, tire) a patch's most similar other
patch often lies at the same place of another image, so a fold takes many
patches' neighbours; on Magnetic Tile it nearly always lies in the same
image.

    python benchmarks/bench_fit.py [--n-train 160] [--rounds 2] [--sets NAME ...]
        [--against REF] [--out DIR]

Writes DIR/fit.{json,md} (default benchmarks/results). Run it alone on the
machine: it measures time.
"""
import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_speed import _clustering_seconds, _patch_rows  # noqa: E402
from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.datasets import load_mvtec  # noqa: E402
from skprotoad.thresholds import calibration_folds  # noqa: E402

SETS = ("magnetic_tile", "bsdata_pitting", "tire")
WAYS = ("one shared search", "shared, all again when many")
# a fit in a fresh process with the skprotoad of the checkout argv[1]
_FIT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from skprotoad import ProtoADDetector
det = ProtoADDetector(random_state=0).fit(json.loads(sys.stdin.read()))
print(json.dumps({**det.fit_seconds_, "offset": float(det.offset_)}))
"""


@contextlib.contextmanager
def _checkout(ref):
    """A temporary git worktree of revision ``ref`` of this repository."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkout"
        subprocess.run(["git", "-C", str(_common.REPO), "worktree", "add", "--detach", "-q",
                        str(path), ref], check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(_common.REPO), "worktree", "remove", "--force",
                            str(path)], check=True)


def _fit_at(checkout, paths):
    """``fit_seconds_`` (and ``offset_``) of the defaults' fit on ``paths``
    with the package in ``checkout``, in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _FIT, str(checkout)], input=json.dumps(paths),
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _against(ref, train, rounds):
    """{"this checkout": stages, ref: stages}: the fastest of ``rounds`` fits
    of each, alternating (each stage from the fastest fit as a whole)."""
    paths = [str(p) for p in train]
    best = {}
    with _checkout(ref) as other:
        ways = {"this checkout": _common.REPO, ref: other}
        for r in range(rounds):
            for name in list(ways) if r % 2 == 0 else list(ways)[::-1]:
                fit = _fit_at(ways[name], paths)
                if fit["total"] < best.get(name, {"total": np.inf})["total"]:
                    best[name] = fit
    return best


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--against", default=None,
                        help="also time the fit at this git revision, side by side")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    runs = {}
    for name in args.sets:
        folder = _common.data_dir(name)
        if not _common.is_mvtec_set(folder):
            print(f"{name}: not found at {folder}, skipped")
            continue
        paths = load_mvtec(folder).train_paths
        pick = np.linspace(0, len(paths) - 1, min(args.n_train, len(paths))).round()
        train = [paths[i] for i in pick.astype(int)]
        start = time.perf_counter()
        det = ProtoADDetector(random_state=0).fit(train)
        fit = time.perf_counter() - start
        folds = calibration_folds(len(train), 0)
        X = _patch_rows(det.network_, train, folds)
        clusterings = {}
        for r in range(args.rounds):  # the ways alternate; the fastest round of each
            for way in WAYS if r % 2 == 0 else WAYS[::-1]:
                c = _clustering_seconds(X, folds, ways=(way,))
                c[way] = min(c[way], clusterings.get(way, np.inf))
                clusterings.update(c)
        runs[name] = {"n_train": len(train), "fit_seconds": fit,
                      "by_stage": dict(det.fit_seconds_), "clusterings": clusterings}
        if args.against:
            runs[name]["against"] = _against(args.against, train, args.rounds)
        print(name, runs[name], flush=True)
    command = f"python benchmarks/bench_fit.py --n-train {args.n_train} --rounds {args.rounds}"
    if list(args.sets) != list(SETS):
        command += " --sets " + " ".join(args.sets)
    if args.against:
        command += f" --against {args.against}"
    result = {"command": command, "machine": _common.machine(),
              "threads": torch.get_num_threads(), "runs": runs}
    _common.write_json(args.out / "fit.json", result)
    rows = []
    for name, run in runs.items():
        c, stage = run["clusterings"], run["by_stage"]
        rows.append([
            name, str(run["n_train"]), f"{c['patches']:,}", f"{run['fit_seconds']:.1f}",
            f"{stage['features']:.1f} / {stage['prototypes']:.1f} / {stage['calibration']:.1f}",
            f"{c['neighbour in own image']:.2%}",
            ", ".join(f"{v:.2%}" for v in c["searched again"]),
            f"{c['one shared search']:.1f}", f"{c['shared, all again when many']:.1f}",
        ])
    lines = [
        "# Fit seconds on each shared set", "",
        f"Command: `{command}`", "",
        f"Machine: {result['machine']}, {result['threads']} threads. `ProtoADDetector("
        "random_state=0).fit` on each set's training images (evenly spaced), whole image "
        "at 256 x 256, `contamination=\"auto\"`; then the fit's clusterings (all images, "
        "then without each calibration fold, the fit's folds; no farthest rows) on the "
        f"fitted network's patch features, two ways alternating, the fastest of {args.rounds} "
        "rounds of each: one shared first-neighbour search, "
        "the rows whose neighbour lay in the fold searched in the shared search's lists "
        "(the fit's way), and the same without the lists (searched exactly when few, else "
        "all rows searched again: the fit's way before). Where few rows lose their neighbour "
        "(Magnetic Tile) both ways do the same work: their difference is the run's noise.", "",
        *_common.markdown_table(
            ["set", "images", "patches", "fit s", "features / prototypes / calibration s",
             "neighbour in own image", "lost to each fold",
             "clusterings s: shared lists", "clusterings s: all again"], rows),
    ]
    if args.against:
        lines += [
            "", f"## Against {args.against}", "",
            f"The same fit with this checkout and with the package at `{args.against}`, "
            "each in a fresh process, alternating, the fastest of "
            f"{args.rounds} of each (stages of that fit); `offset_` equal both ways where "
            "the change leaves the calibration as it was.", "",
            *_common.markdown_table(
                ["set", "way", "fit s", "features / prototypes / calibration s", "offset_"],
                [[name, way, f"{f['total']:.1f}",
                  f"{f['features']:.1f} / {f['prototypes']:.1f} / {f['calibration']:.1f}",
                  f"{f['offset']:.6f}"]
                 for name, run in runs.items() for way, f in run["against"].items()]),
        ]
    _common.write_markdown(args.out / "fit.md", lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
