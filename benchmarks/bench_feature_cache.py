"""GridSearchCV with and without the feature cache (``ProtoADDetector(memory=...)``).

Run from the repository root, niced so that it does not disturb timings::

    PYTHONPATH=. nice -n 10 python benchmarks/bench_feature_cache.py

A 3 x 2 grid, ``n_clusters`` x ``clustering`` (k-means, FINCH), 3 stratified
folds, on generated defect images (``make_defect_dataset``) with the bundled
efficientnet_lite0 weights. The same search runs three times in one process:
without a cache, with an empty cache, and again with the now filled cache (a
second search over other non-feature parameters would see that). The number
of feature extractions is counted by wrapping ``_extract_features``. Writes
``benchmarks/results/feature_cache.json`` and ``feature_cache.md``.
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


def _search(memory, args):
    return GridSearchCV(
        ProtoADDetector(
            image_size=args.size, crop_size=args.size, random_state=0, memory=memory,
        ),
        param_grid={"n_clusters": args.n_clusters, "clustering": ["kmeans", "finch"]},
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
    args = parser.parse_args(argv)

    data = make_defect_dataset(
        n_train=args.n_train, n_test=args.n_test, image_size=args.size, random_state=0
    )
    X = np.concatenate([data.X_train, data.X_test])
    y = np.r_[np.ones(len(data.X_train), int), np.where(data.y_test == 1, -1, 1)]

    extractions = [0]
    extract = ProtoADDetector._extract_features

    def counting(self, *a, **k):
        extractions[0] += 1
        return extract(self, *a, **k)

    ProtoADDetector._extract_features = counting

    cache = Path(tempfile.mkdtemp(prefix="skprotoad_feature_cache_"))
    rows = []
    try:
        for label, memory in (("no cache", None), ("cache, empty", cache),
                              ("cache, filled", cache)):
            extractions[0] = 0
            wall, cpu = time.perf_counter(), time.process_time()
            search = _search(memory, args).fit(X, y)
            rows.append({
                "run": label,
                "wall_s": time.perf_counter() - wall,
                "cpu_s": time.process_time() - cpu,
                "extractions": extractions[0],
                "fits": len(search.cv_results_["params"]) * args.folds + 1,
                "best_params": search.best_params_,
                "mean_test_score": search.cv_results_["mean_test_score"].tolist(),
                "load_average": os.getloadavg(),
            })
            print(f"{label:14s} {rows[-1]['wall_s']:7.1f} s wall {rows[-1]['cpu_s']:7.1f} s CPU "
                  f"{extractions[0]:3d} extractions", file=sys.stderr, flush=True)
        cache_mb = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) / 1e6
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    same = all(r["mean_test_score"] == rows[0]["mean_test_score"] for r in rows)
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
            "clustering": ["kmeans", "finch"], "backbone": "efficientnet_lite0",
            "n_images": int(len(X)), "n_normal": int((y == 1).sum()),
        },
        "rows": rows,
        "cache_mb": cache_mb,
        "identical_scores": same,
        "speedup_empty_cache": rows[0]["wall_s"] / rows[1]["wall_s"],
        "speedup_filled_cache": rows[0]["wall_s"] / rows[2]["wall_s"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feature_cache.json").write_text(json.dumps(result, indent=2) + "\n")
    md = _markdown(result)
    (RESULTS / "feature_cache.md").write_text(md)
    print(md)


def _markdown(result):
    c, meta = result["config"], result["meta"]
    lines = [
        "# Grid search with the feature cache",
        "",
        f"`{COMMAND}`; {meta['machine']}, torch {meta['torch']} "
        f"({meta['torch_threads']} threads), skprotoad {meta['skprotoad']}.",
        "",
        f"`GridSearchCV` over `n_clusters` {c['n_clusters']} x `clustering` "
        f"{c['clustering']}, {c['folds']} stratified folds, `scoring='roc_auc'`, "
        f"{c['n_images']} generated {c['size']} px images ({c['n_normal']} normal), "
        f"{c['backbone']} (bundled weights), crop {c['size']}, `random_state=0`; "
        f"{result['rows'][0]['fits']} fits per search (6 candidates x {c['folds']} folds "
        f"+ refit). One process, searches run one after the other.",
        "",
        "| run | feature extractions | wall s | CPU s | speed-up (wall) |",
        "|---|---:|---:|---:|---:|",
    ]
    base = result["rows"][0]["wall_s"]
    for r in result["rows"]:
        lines.append(
            f"| {r['run']} | {r['extractions']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{base / r['wall_s']:.2f} |"
        )
    lines += [
        "",
        f"Cache on disk after the search: {result['cache_mb']:.0f} MB. Cross-validation "
        f"scores identical with and without the cache: {result['identical_scores']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
