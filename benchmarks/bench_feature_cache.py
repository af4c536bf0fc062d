"""GridSearchCV with and without the feature cache (``ProtoADDetector(memory=...)``).

Run from the repository root, niced so that it does not disturb timings::

    PYTHONPATH=. nice -n 10 python benchmarks/bench_feature_cache.py

Two 3 x 2 grids, 3 stratified folds, on generated defect images
(``make_defect_dataset``) with the bundled efficientnet_lite0 weights:

* ``kmeans``: ``n_clusters`` x ``sigma`` (2, 4) with k-means, where feature
  extraction is a large part of each fit;
* ``kmeans_finch``: ``n_clusters`` x ``clustering`` (k-means, FINCH), where
  FINCH's clustering dominates.

Each search runs three times in one process: without a cache, with an empty
cache, and again with the now filled cache (as a second search over other
non-feature parameters would), after a warm-up fit. Every fit of a search is
logged by a subclass (``LoggedDetector``, public API only): it extracted
features if it had no cache or added an entry to the cache folder; the
extraction seconds are the ``fit_seconds_["features"]`` of those fits (backbone
load included). Writes ``benchmarks/results/feature_cache.json`` and
``feature_cache.md``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.model_selection import GridSearchCV, StratifiedKFold  # noqa: E402

from skprotoad import ProtoADDetector, __version__  # noqa: E402
from skprotoad.datasets import make_defect_dataset  # noqa: E402

RESULTS = _common.RESULTS
COMMAND = "PYTHONPATH=. nice -n 10 python benchmarks/bench_feature_cache.py"


GRIDS = {
    "kmeans": lambda n_clusters: {"n_clusters": n_clusters, "sigma": [2.0, 4.0],
                                  "clustering": ["kmeans"]},
    "kmeans_finch": lambda n_clusters: {"n_clusters": n_clusters,
                                        "clustering": ["kmeans", "finch"]},
}


FITS = []  # (extracted features?, features stage seconds) of each logged fit


def _cache_entries(memory):
    """Feature arrays stored in the cache folder ``memory`` (joblib's layout)."""
    return 0 if memory is None else sum(1 for _ in Path(memory).rglob("output.pkl"))


class LoggedDetector(ProtoADDetector):
    """ProtoADDetector that logs each fit in ``FITS``: whether it extracted
    features (no cache, or a new cache entry) and ``fit_seconds_["features"]``."""

    def fit(self, X, y=None):
        before = _cache_entries(self.memory)
        super().fit(X, y)
        extracted = self.memory is None or _cache_entries(self.memory) > before
        FITS.append((extracted, self.fit_seconds_["features"]))
        return self


def _search(memory, grid, args):
    return GridSearchCV(
        LoggedDetector(
            image_size=args.size, crop_size=args.size, random_state=0, memory=memory,
        ),
        param_grid=GRIDS[grid](args.n_clusters),
        scoring="roc_auc",
        cv=StratifiedKFold(args.folds, shuffle=True, random_state=0),
        error_score="raise",
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=60)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--n-clusters", type=int, nargs=3, default=[50, 100, 200])
    parser.add_argument("--grids", nargs="+", choices=list(GRIDS), default=list(GRIDS))
    parser.add_argument("--notes", default="", help="a paragraph added to the .md")
    parser.add_argument("--markdown-only", action="store_true",
                        help="rewrite the .md from the .json (after editing its notes)")
    args = parser.parse_args(argv)
    if args.markdown_only:
        result = _common.read_json(RESULTS / "feature_cache.json")
        _common.write_markdown(RESULTS / "feature_cache.md", _markdown(result))
        print(_markdown(result))
        return

    data = make_defect_dataset(
        n_train=args.n_train, n_test=args.n_test, image_size=args.size, random_state=0
    )
    X = np.concatenate([data.X_train, data.X_test])
    y = np.r_[np.ones(len(data.X_train), int), np.where(data.y_test == 1, -1, 1)]

    # one-time costs (lazy imports, first model build, kernel set-up) out of the timings
    ProtoADDetector(image_size=args.size, crop_size=args.size, clustering="kmeans",
                    n_clusters=8, random_state=0).fit(X[:4])

    rows, cache_mb = [], {}
    for grid in args.grids:
        cache = Path(tempfile.mkdtemp(prefix="skprotoad_feature_cache_"))
        try:
            rows += _runs(grid, cache, X, y, args)
            cache_mb[grid] = sum(
                p.stat().st_size for p in cache.rglob("*") if p.is_file()
            ) / 1e6
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    result = {
        "meta": {
            "command": COMMAND,
            "machine": _common.machine(torch=False),
            # what extraction_wall_s counts (earlier results: time in _extract_features)
            "extraction_timing": "fit_seconds_features",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "skprotoad": __version__,
        },
        "config": {
            "n_train": args.n_train, "n_test": args.n_test, "size": args.size,
            "folds": args.folds, "n_clusters": args.n_clusters,
            "grids": {g: {k: list(v) for k, v in GRIDS[g](args.n_clusters).items()}
                      for g in args.grids},
            "backbone": "efficientnet_lite0",
            "n_images": int(len(X)), "n_normal": int((y == 1).sum()),
        },
        "rows": rows,
        "cache_mb": cache_mb,
        "notes": args.notes,
    }
    for grid in args.grids:
        runs = [r for r in rows if r["grid"] == grid]
        result[f"identical_scores_{grid}"] = all(
            r["mean_test_score"] == runs[0]["mean_test_score"] for r in runs
        )
    _common.write_json(RESULTS / "feature_cache.json", result)
    md = _markdown(result)
    _common.write_markdown(RESULTS / "feature_cache.md", md)
    print(md)


def _runs(grid, cache, X, y, args):
    rows = []
    for label, memory in (("no cache", None), ("cache, empty", cache),
                          ("cache, filled", cache)):
        FITS.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        search = _search(memory, grid, args).fit(X, y)
        extractions = [sum(e for e, _ in FITS), sum(s for e, s in FITS if e)]
        rows.append({
            "grid": grid,
            "run": label,
            "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu,
            "extractions": extractions[0],
            "extraction_wall_s": extractions[1],
            "fits": len(search.cv_results_["params"]) * args.folds + 1,
            "best_params": search.best_params_,
            "mean_test_score": search.cv_results_["mean_test_score"].tolist(),
            "load_average": os.getloadavg(),
        })
        print(f"{grid:12s} {label:14s} {rows[-1]['wall_s']:7.1f} s wall "
              f"{rows[-1]['cpu_s']:7.1f} s CPU {extractions[0]:3d} extractions",
              file=sys.stderr, flush=True)
    return rows


def _markdown(result):
    c, meta = result["config"], result["meta"]
    timing = ("of which features stage (`fit_seconds_`), wall s"
              if meta.get("extraction_timing") == "fit_seconds_features"
              else "of which extraction, wall s")
    lines = [
        "# Grid search with the feature cache",
        "",
        f"`{COMMAND}`; {meta['machine']}, torch {meta['torch']} "
        f"({meta['torch_threads']} threads), skprotoad {meta['skprotoad']}.",
        "",
        f"`GridSearchCV`, {c['folds']} stratified folds, `scoring='roc_auc'`, "
        f"{c['n_images']} generated {c['size']} px images ({c['n_normal']} normal), "
        f"{c['backbone']} (bundled weights), crop {c['size']}, `random_state=0`, "
        f"`contamination='auto'` (two clusterings per fit); 6 candidates x "
        f"{c['folds']} folds + refit = {6 * c['folds'] + 1} fits per search. The three "
        f"runs of a grid follow each other in one process. CPU s is this process's "
        f"CPU time, less sensitive than wall time to the other jobs on the machine.",
        "",
        f"| grid | run | feature extractions | {timing} | wall s | CPU s "
        "| speed-up (wall) | speed-up (CPU) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for grid, params in c["grids"].items():
        runs = [r for r in result["rows"] if r["grid"] == grid]
        label = " x ".join(f"`{k}` {v}" for k, v in params.items() if len(v) > 1)
        if len(params.get("clustering", [])) == 1:
            label += f" ({params['clustering'][0]})"
        for r in runs:
            lines.append(
                f"| {label} | {r['run']} | {r['extractions']} | "
                f"{r['extraction_wall_s']:.0f} | {r['wall_s']:.0f} | "
                f"{r['cpu_s']:.0f} | {runs[0]['wall_s'] / r['wall_s']:.2f} | "
                f"{runs[0]['cpu_s'] / r['cpu_s']:.2f} |"
            )
    lines += [""]
    for grid in c["grids"]:
        lines.append(
            f"- {grid}: cache on disk after the search {result['cache_mb'][grid]:.0f} MB; "
            f"cross-validation scores identical with and without the cache: "
            f"{result[f'identical_scores_{grid}']}."
        )
    if result.get("notes"):
        lines += ["", result["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
