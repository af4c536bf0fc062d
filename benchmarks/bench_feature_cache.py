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
non-feature parameters would), after a warm-up fit. Feature extractions are counted by wrapping
``_extract_features``. Writes ``benchmarks/results/feature_cache.json`` and
``feature_cache.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skprotoad import ProtoADDetector, __version__
from skprotoad.datasets import make_defect_dataset

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = "PYTHONPATH=. nice -n 10 python benchmarks/bench_feature_cache.py"


GRIDS = {
    "kmeans": lambda n_clusters: {"n_clusters": n_clusters, "sigma": [2.0, 4.0],
                                  "clustering": ["kmeans"]},
    "kmeans_finch": lambda n_clusters: {"n_clusters": n_clusters,
                                        "clustering": ["kmeans", "finch"]},
}


def _search(memory, grid, args):
    return GridSearchCV(
        ProtoADDetector(
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
        result = json.loads((RESULTS / "feature_cache.json").read_text())
        (RESULTS / "feature_cache.md").write_text(_markdown(result))
        print(_markdown(result))
        return

    data = make_defect_dataset(
        n_train=args.n_train, n_test=args.n_test, image_size=args.size, random_state=0
    )
    X = np.concatenate([data.X_train, data.X_test])
    y = np.r_[np.ones(len(data.X_train), int), np.where(data.y_test == 1, -1, 1)]

    extractions = [0, 0.0]  # count, wall seconds
    extract = ProtoADDetector._extract_features

    def counting(self, *a, **k):
        start = time.perf_counter()
        try:
            return extract(self, *a, **k)
        finally:
            extractions[0] += 1
            extractions[1] += time.perf_counter() - start

    ProtoADDetector._extract_features = counting
    # one-time costs (lazy imports, first model build, kernel set-up) out of the timings
    ProtoADDetector(image_size=args.size, crop_size=args.size, clustering="kmeans",
                    n_clusters=8, random_state=0).fit(X[:4])

    rows, cache_mb = [], {}
    for grid in args.grids:
        cache = Path(tempfile.mkdtemp(prefix="skprotoad_feature_cache_"))
        try:
            rows += _runs(grid, cache, X, y, args, extractions)
            cache_mb[grid] = sum(
                p.stat().st_size for p in cache.rglob("*") if p.is_file()
            ) / 1e6
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    result = {
        "meta": {
            "command": COMMAND,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
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
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _markdown(result)
    (RESULTS / "feature_cache.md").write_text(md)
    print(md)


def _runs(grid, cache, X, y, args, extractions):
    rows = []
    for label, memory in (("no cache", None), ("cache, empty", cache),
                          ("cache, filled", cache)):
        extractions[:] = [0, 0.0]
        wall, cpu = time.perf_counter(), time.process_time()
        search = _search(memory, grid, args).fit(X, y)
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
        "| grid | run | feature extractions | of which extraction, wall s | wall s | CPU s "
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
