"""Fit time and peak memory of ProtoADDetector as the training set grows.

magnetic_tile, efficientnet_lite0 package defaults, 100 / 209 / 761 training
images, FINCH (default, 1,000 prototypes) and k-means (K = 1,000). Each case
runs in its own process, so that its peak RSS is its own; the time of feature
extraction and of clustering is recorded separately. ``contamination="auto"``
(the default) clusters twice (80 % of the images for calibration, then all);
the clustering column is the sum of both.

    python benchmarks/bench_fit_scaling.py [--sizes 100 209 761] [--methods finch kmeans]

Writes benchmarks/results/fit_scaling.{json,md}. Data: Y. Huang, C. Qiu, K. Yuan,
"Surface defect saliency of magnetic tile", The Visual Computer 36, 85-96 (2020).
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "magnetic_tile"


def one_case(n_images, method):
    import skprotoad.detector as det_module
    from skprotoad import ProtoADDetector
    from skprotoad.datasets import load_mvtec

    paths = load_mvtec(DATA).train_paths
    # evenly spread over the sorted file names
    step = len(paths) / n_images
    paths = [paths[int(i * step)] for i in range(n_images)]
    timings = {"features": 0.0, "clustering": 0.0, "n_patches": [], "per_call": []}
    extract, learn = det_module.ProtoADDetector._extract_features, det_module.learn_prototypes

    def timed_extract(*args, **kwargs):
        t = time.perf_counter()
        out = extract(*args, **kwargs)
        timings["features"] += time.perf_counter() - t
        return out

    def timed_learn(X, **kwargs):
        t = time.perf_counter()
        out = learn(X, **kwargs)
        timings["clustering"] += time.perf_counter() - t
        timings["per_call"].append(round(time.perf_counter() - t, 1))
        timings["n_patches"].append(len(X))
        return out

    det_module.ProtoADDetector._extract_features = timed_extract
    det_module.learn_prototypes = timed_learn
    kwargs = {"clustering": "kmeans", "n_clusters": 1000} if method == "kmeans" else {}
    t, cpu = time.perf_counter(), time.process_time()
    ProtoADDetector(random_state=0, **kwargs).fit(paths)
    return {
        "n_images": n_images, "method": method, "n_patches": timings["n_patches"],
        "fit_s": round(time.perf_counter() - t, 1), "cpu_s": round(time.process_time() - cpu, 1),
        "features_s": round(timings["features"], 1), "clustering_s": round(timings["clustering"], 1),
        "clustering_s_per_call": timings["per_call"],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
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
    out = HERE / "results" / "fit_scaling.json"
    rows = json.loads(out.read_text()) if out.exists() else []
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
    out = HERE / "results"
    (out / "fit_scaling.json").write_text(json.dumps(rows, indent=2))
    cols = ["method", "n_images", "n_patches", "fit_s", "features_s", "clustering_s",
            "clustering_s_per_call", "cpu_s",
            "peak_rss_mb", "load_before", "load_after"]
    lines = ["# Fit time and memory vs training-set size (magnetic_tile, efficientnet_lite0)", "",
             "Command: `python benchmarks/bench_fit_scaling.py`", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores, shared; torch CPU. "
             "n_patches: rows clustered (calibration model, then final model); 209 images = 655k patches, a typical MVTec AD category.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    rows = sorted(rows, key=lambda r: (r["method"], r["n_images"]))
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    (out / "fit_scaling.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
