"""What a real-data fit and a prediction on files cost, stage by stage.

    python benchmarks/bench_real_cost.py [--data DIR] [--max-train 200]

Fits the defaults (seed 0) on a seeded subset of a real set's training
images and reports ``fit_seconds_`` per stage, the durations ``fit``
announced before its first clustering, and the process's peak memory;
then scores the set's test images three ways, one after the other: the
estimator on images already in memory (decoded beforehand), the estimator on
the files (decoding included), and the command line's ``predict`` loop
(:func:`skprotoad.batch_scoring.score_and_write`: decoding, scoring, overlays
and masks written). Quiet machine only. Results:
``benchmarks/results/real_cost.{json,md}``.
"""

import argparse
import contextlib
import io
import re
import tempfile
import time
from pathlib import Path

import _common
import numpy as np
from PIL import Image

from skprotoad import ProtoADDetector
from skprotoad.batch_scoring import score_and_write
from skprotoad.datasets import load_mvtec


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=_common.SHARED_DATA / "magnetic_tile")
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    data = load_mvtec(args.data)
    train = list(data.train_paths)
    if args.max_train and args.max_train < len(train):
        keep = np.sort(np.random.default_rng(0).permutation(len(train))[:args.max_train])
        train = [train[i] for i in keep]
    said = io.StringIO()
    with contextlib.redirect_stderr(said):  # the estimates fit announces (verbose)
        det = ProtoADDetector(random_state=0, verbose=1).fit(train)
    row = {"data": args.data.name, "n_train": len(train),
           "announced": _announced(said.getvalue()),
           "fit_seconds": {k: round(v, 1) for k, v in det.fit_seconds_.items()},
           "peak_memory_after_fit_gib": round(_common.peak_rss_bytes() / 2**30, 2),
           "n_prototypes": int(det.prototypes_.shape[0])}
    test = list(data.test_paths)
    arrays = []
    for p in test:
        with Image.open(p) as img:
            arrays.append(np.asarray(img.convert("RGB")))
    timings = {}
    start = time.perf_counter()
    det.score_samples(arrays)
    timings["in_memory"] = time.perf_counter() - start
    start = time.perf_counter()
    det.score_samples(test)
    timings["files"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        names = [f"{i:04d}" for i in range(len(test))]
        start = time.perf_counter()
        score_and_write(det, test, names=names, out_dir=tmp)
        timings["predict_with_outputs"] = time.perf_counter() - start
    row["n_test"] = len(test)
    row["test_images_per_second"] = {k: round(len(test) / v, 1) for k, v in timings.items()}
    print(row, flush=True)
    _common.write_json(args.out / "real_cost.json", {"machine": _common.machine(), "row": row})
    f, r = row["fit_seconds"], row["test_images_per_second"]
    lines = ["# What a real-data fit and a prediction on files cost", "",
             f"Command: `python benchmarks/bench_real_cost.py --max-train {args.max_train}`", "",
             f"Machine: {_common.machine()}. Defaults, seed 0, {row['data']}: {row['n_train']} "
             f"training images, {row['n_test']} test images.", "",
             "| measure | value |", "|---|---|",
             f"| fit, total (s) | {f['total']} |",
             f"| reading + features / prototypes / calibration (s) | {f['features']} / "
             f"{f['prototypes']} / {f['calibration']} |",
             f"| prototypes | {row['n_prototypes']} |",
             f"| announced before clustering: prototypes / the rest of the fit | "
             f"{' / '.join(row['announced'])} |",
             f"| peak memory of the process after fit (GiB) | {row['peak_memory_after_fit_gib']} |",
             f"| scoring, images already in memory (img/s) | {r['in_memory']} |",
             f"| scoring, files (decoding included; img/s) | {r['files']} |",
             f"| predict's loop, files, overlays and masks written (img/s) | "
             f"{r['predict_with_outputs']} |"]
    _common.write_markdown(args.out / "real_cost.md", lines)


def _announced(text):
    """The durations fit's verbose output estimated before the first clustering."""
    line = next(li for li in text.splitlines() if "[2/3]" in li)
    return re.findall(r"about [0-9.]+ (?:s|min|h)", line)


if __name__ == "__main__":
    main()
