"""Fit time and peak memory of ProtoADDetector as the training set grows.

magnetic_tile, efficientnet_lite0 package defaults, 100 / 209 / 761 training
images, FINCH (default, 1,000 prototypes) and k-means (K = 1,000). Each case
runs in its own process, so that its peak RSS is its own; the time of feature
extraction and of clustering is read from ``fit_seconds_``. ``contamination="auto"``
(the default) clusters twice (80 % of the images for calibration, then all);
the clustering column is the sum of both (the calibration stage includes
scoring the held-out images).

    python benchmarks/bench_fit_scaling.py [--sizes 100 209 761] [--methods finch kmeans]

Writes benchmarks/results/fit_scaling.{json,md}. Data: Y. Huang, C. Qiu, K. Yuan,
"Surface defect saliency of magnetic tile", The Visual Computer 36, 85-96 (2020).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import _common  # first: this checkout's skprotoad


def one_case(n_images, method):
    from skprotoad import ProtoADDetector
    from skprotoad.datasets import load_mvtec

    paths = load_mvtec(_common.data_dir("magnetic_tile")).train_paths
    # evenly spread over the sorted file names
    step = len(paths) / n_images
    paths = [paths[int(i * step)] for i in range(n_images)]
    kwargs = {"clustering": "kmeans", "n_clusters": 1000} if method == "kmeans" else {}
    t, cpu = time.perf_counter(), time.process_time()
    det = ProtoADDetector(random_state=0, **kwargs).fit(paths)
    wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    seconds = det.fit_seconds_
    # rows clustered: the calibration model's (without the held-out images),
    # then the final model's (all training images)
    h, w, _ = det.feature_shape_
    n_held_out = len(det.calibration_scores_) if det.contamination == "auto" else 0
    per_image = h * w if h is not None else None
    n_patches = [] if per_image is None else (
        ([per_image * (det.n_train_images_ - n_held_out)] if n_held_out else [])
        + [per_image * det.n_train_images_])
    per_call = ([round(seconds["calibration"], 1)] if n_held_out else []) + [
        round(seconds["prototypes"], 1)]
    return {
        "n_images": n_images, "method": method, "n_patches": n_patches,
        "fit_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "features_s": round(seconds["features"], 1),
        "clustering_s": round(seconds["prototypes"] + seconds["calibration"], 1),
        "clustering_s_per_call": per_call,
        "peak_rss_mb": round(_common.peak_rss_mb()),
        "load_after": round(os.getloadavg()[0], 1),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 209, 761])
    parser.add_argument("--methods", nargs="+", default=["finch", "kmeans"])
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(one_case(int(args.case[0]), args.case[1])))
        return
    rows = _common.read_json(_common.RESULTS / "fit_scaling.json", [])
    for method in args.methods:
        for n in args.sizes:
            load = round(os.getloadavg()[0], 1)
            proc = subprocess.run([sys.executable, __file__, "--case", str(n), method],
                                  capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                continue
            row = {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load}
            print(json.dumps(row), flush=True)
            rows = [r for r in rows if (r["n_images"], r["method"]) != (n, method)] + [row]
            write(rows)


def write(rows):
    out = _common.RESULTS
    _common.write_json(out / "fit_scaling.json", rows)
    cols = ["method", "n_images", "n_patches", "fit_s", "features_s", "clustering_s",
            "clustering_s_per_call", "cpu_s",
            "peak_rss_mb", "load_before", "load_after"]
    lines = ["# Fit time and memory vs training-set size (magnetic_tile, efficientnet_lite0)", "",
             "Command: `python benchmarks/bench_fit_scaling.py`", "",
             f"Machine: {_common.machine(torch=False)}; torch CPU. "
             "n_patches: rows clustered (calibration model, then final model); 209 images = 655k patches, a typical MVTec AD category. "
             "Stage times from `fit_seconds_`: features_s = backbone load + extraction; "
             "clustering_s_per_call = calibration stage (hold-out clustering + scoring the "
             "held-out images), then final clustering.", ""]
    rows = sorted(rows, key=lambda r: (r["method"], r["n_images"]))
    lines += _common.markdown_table(cols, [[r.get(c, "") for c in cols] for r in rows])
    _common.write_markdown(out / "fit_scaling.md", lines)

if __name__ == "__main__":
    main()
