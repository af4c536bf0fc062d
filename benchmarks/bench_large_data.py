"""Fits on thousands of images under the patch cap, and the cost of Dask.

(a) ``--part fit``: ``ProtoADDetector(random_state=0)`` with the package
    defaults (so ``max_patches=2_000_000`` and ``contamination="auto"``) fitted
    on 1,000 / 2,000 / 5,000 / 10,000 image files, each size in a fresh
    process so that its peak RSS (VmHWM) is its own. The images are the
    Magnetic Tile training tiles (the synthetic texture generator when the
    shared data are absent), each repeated with a random augmentation (flips,
    a quarter turn, a crop of 85-100 % of its side, brightness x 0.9-1.1),
    resized to 256 px and written once as PNG into ``--workdir``. Reported:
    the fit's stages (``fit_seconds_``), the patches held, peak RSS, and the
    time per added image between sizes (linear growth: a constant slope).
(b) ``--part dask``: the same fit on ``--dask-fit`` images and
    :func:`skprotoad.distributed.score_and_write` on ``--dask-score`` images,
    once in this process (torch on 2 threads) and once on a
    ``LocalCluster`` of 2 workers with 1 thread each; seconds, their ratio,
    and whether offsets and scores are equal.

Quiet machine only: it measures time. ::

    python benchmarks/bench_large_data.py [--part fit dask] [--sizes 1000 2000 5000 10000]

Writes benchmarks/results/large_data.{json,md}.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common  # first: this checkout's skprotoad

OUT = "large_data"
SIDE = 256


def _augmented(image, rng):
    from PIL import Image

    h, w = image.shape[:2]
    keep = rng.uniform(0.85, 1.0)
    ch, cw = max(1, int(h * keep)), max(1, int(w * keep))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    image = image[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.5:
        image = image[::-1]
    image = np.rot90(image, rng.integers(0, 4))
    image = np.clip(image * rng.uniform(0.9, 1.1), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(image)).resize((SIDE, SIDE), Image.BILINEAR)


def make_images(workdir, n):
    """Paths of ``n`` augmented 256 px PNG files in ``workdir`` (made once)."""
    from PIL import Image

    from skprotoad.datasets import load_mvtec, make_defect_images

    workdir.mkdir(parents=True, exist_ok=True)
    paths = [workdir / f"{i:05d}.png" for i in range(n)]
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return [str(p) for p in paths]
    folder = _common.SHARED_DATA / "magnetic_tile"
    if _common.is_mvtec_set(folder):
        sources = load_mvtec(folder).train_paths

        def source(i):
            return np.asarray(Image.open(sources[i % len(sources)]).convert("RGB"))
    else:
        images, _, _ = make_defect_images(200, image_size=SIDE, anomaly_ratio=0.0,
                                          random_state=0)

        def source(i):
            return images[i % len(images)]
    rng = np.random.default_rng(0)
    for i, path in enumerate(paths):
        image = _augmented(source(i), rng)  # drawn for every i: a file's content
        if not path.exists():  # does not depend on which files were there
            image.save(path, compress_level=1)
    return [str(p) for p in paths]


def fit_case(workdir, n):
    from skprotoad import ProtoADDetector

    paths = make_images(workdir, n)
    det = ProtoADDetector(random_state=0)
    t = time.perf_counter()
    det.fit(paths)
    wall = time.perf_counter() - t
    h, w, c = det.feature_shape_
    # PatchFeatures' rule: over the cap, each image keeps cap // n of its patches
    held = n * h * w if n * h * w <= det.max_patches else n * (det.max_patches // n)
    return {
        "n_images": n, "fit_s": round(wall, 1),
        **{f"{k}_s": round(v, 1) for k, v in det.fit_seconds_.items() if k != "total"},
        "patches_held": held, "patches_per_image": held // n,
        "feature_gib": round(held * c * 4 / 2**30, 2),
        "peak_rss_gib": round(_common.vm_hwm_bytes() / 2**30, 2),
        "n_prototypes": int(det.prototypes_.shape[0]),
    }


def dask_case(workdir, n_fit, n_score):
    import joblib
    from distributed import Client, LocalCluster

    from skprotoad import ProtoADDetector
    from skprotoad.batch_scoring import score_and_write as score_locally
    from skprotoad.distributed import score_and_write

    paths = make_images(workdir, max(n_fit, n_score))
    train, test = paths[:n_fit], paths[-n_score:]
    names = [Path(p).stem for p in test]
    row = {"n_fit": n_fit, "n_score": n_score}
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        local = ProtoADDetector(random_state=0, n_jobs=2).fit(train)
        row["fit_local_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        scores = score_locally(local, test, names=names, out_dir=f"{out}/local")["score"]
        row["score_local_s"] = round(time.perf_counter() - t, 1)
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, \
                Client(cluster) as client:
            t = time.perf_counter()
            with joblib.parallel_config(backend="dask"):
                spread = ProtoADDetector(random_state=0, n_jobs=2).fit(train)
            row["fit_dask_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            result = score_and_write(local, test, names=names, out_dir=f"{out}/dask",
                                     client=client)
            row["score_dask_s"] = round(time.perf_counter() - t, 1)
    row["fit_ratio"] = round(row["fit_dask_s"] / row["fit_local_s"], 2)
    row["score_ratio"] = round(row["score_dask_s"] / row["score_local_s"], 2)
    row["same_offset"] = bool(spread.offset_ == local.offset_)
    row["same_prototypes"] = bool(np.array_equal(spread.prototypes_, local.prototypes_))
    row["same_scores"] = bool(np.array_equal(np.asarray(result["score"]), np.asarray(scores)))
    return row


def run_case(args, part, n):
    """A case in a fresh process: its VmHWM is its own."""
    cmd = [sys.executable, __file__, "--workdir", str(args.workdir), "--case", part, str(n),
           "--dask-fit", str(args.dask_fit), "--dask-score", str(args.dask_score)]
    load = round(os.getloadavg()[0], 1)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr)
        return None
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "load_before": load}


def write(results, command):
    # rows of earlier runs stay: list every command that made one
    commands = results.setdefault("commands", [])
    if command not in commands:
        commands.append(command)
    _common.write_json(_common.RESULTS / f"{OUT}.json", results)
    lines = ["# Large training sets under the patch cap, and Dask's overhead", "",
             "Commands:", "", *[f"- `{c}`" for c in commands], "",
             f"Machine: {_common.machine()}.", ""]
    fits = sorted(results.get("fit", []), key=lambda r: r["n_images"])
    if fits:
        cols = ["n_images", "fit_s", "features_s", "prototypes_s", "calibration_s",
                "patches_held", "patches_per_image", "feature_gib", "peak_rss_gib",
                "n_prototypes", "load_before"]
        lines += ["## fit, package defaults (max_patches=2,000,000)", "",
                  "Augmented Magnetic Tile training tiles, 256 px PNG files passed as "
                  "paths; one fresh process per row (peak RSS = its VmHWM).", ""]
        lines += _common.markdown_table(cols, [[r.get(c, "") for c in cols] for r in fits])
        def per_1000(a, b, key):
            return (b[key] - a[key]) / (b["n_images"] - a["n_images"]) * 1000

        slopes = [
            f"{a['n_images']:,} -> {b['n_images']:,}: {per_1000(a, b, 'fit_s'):.1f} s "
            f"per 1,000 images (features {per_1000(a, b, 'features_s'):.1f})"
            for a, b in zip(fits, fits[1:])
        ]
        if slopes:
            lines += ["", "Added time per 1,000 more images: " + "; ".join(slopes) + "."]
    if results.get("dask"):
        cols = ["n_fit", "fit_local_s", "fit_dask_s", "fit_ratio", "n_score", "score_local_s",
                "score_dask_s", "score_ratio", "same_offset", "same_prototypes", "same_scores",
                "load_before"]
        lines += ["", "## Dask LocalCluster, 2 workers x 1 thread, against one process on "
                  "2 threads", "",
                  "fit under `joblib.parallel_config(backend='dask')`; scoring with "
                  "`skprotoad.distributed.score_and_write` against "
                  "`skprotoad.batch_scoring.score_and_write` (overlays and masks written); "
                  "the times include the cluster's start for neither (it starts between "
                  "the two).", ""]
        lines += _common.markdown_table(cols, [[r.get(c, "") for c in cols]
                                               for r in results["dask"]])
    _common.write_markdown(_common.RESULTS / f"{OUT}.md", lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=["fit", "dask"], default=["fit", "dask"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000])
    parser.add_argument("--dask-fit", type=int, default=300)
    parser.add_argument("--dask-score", type=int, default=512)
    parser.add_argument("--workdir", type=Path,
                        default=Path(tempfile.gettempdir()) / "skprotoad_large_data")
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        part, n = args.case[0], int(args.case[1])
        row = (fit_case(args.workdir, n) if part == "fit"
               else dask_case(args.workdir, args.dask_fit, args.dask_score))
        print(json.dumps(row))
        return
    command = "python benchmarks/bench_large_data.py " + " ".join(sys.argv[1:])
    results = _common.read_json(_common.RESULTS / f"{OUT}.json", {})
    make_images(args.workdir, max(args.sizes + [args.dask_fit, args.dask_score]))
    if "fit" in args.part:
        for n in args.sizes:
            row = run_case(args, "fit", n)
            if row:
                print(json.dumps(row), flush=True)
                results["fit"] = [r for r in results.get("fit", []) if r["n_images"] != n] + [row]
                write(results, command)
    if "dask" in args.part:
        row = run_case(args, "dask", 0)
        if row:
            print(json.dumps(row), flush=True)
            results["dask"] = [row]
            write(results, command)


if __name__ == "__main__":
    main()
