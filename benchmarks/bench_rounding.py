"""How far float rounding alone moves the defaults' results.

Fits the defaults on the same training images several times, once as read
from their files and then as float images in [0, 1] multiplied by a factor
within a few parts in ten million of 1 (``--factors``): invisible changes
that move the patch features in their last bits, as another CPU, BLAS or
torch version can. The test images are read from their files every time, so
only the fit differs. Next to the seeds' spread in ``suite.md`` this says how
much of a difference between two settings, or between two commits, rounding
alone can make.

    python benchmarks/bench_rounding.py --sets magnetic_tile bsdata_pitting --max-train 0
    python benchmarks/bench_rounding.py --max-train 200

``--max-train 0`` uses every training image. Results go to
``benchmarks/results/rounding.json`` (merged with earlier runs, keyed by set,
seed, training-set size and factor) and ``rounding.md``.
"""

import argparse
import copy
import sys
from pathlib import Path

import _common  # first: this checkout's skprotoad, not whichever one is installed

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

import bench_suite  # noqa: E402

DEFAULT_FACTORS = (1 - 3e-7, 1 + 3e-7, 1 - 1.1e-6, 1 + 1.1e-6)
METRICS = ("whole_image_auroc", "whole_pixel_auroc", "whole_aupro", "fpr", "tpr")


def _float_images(paths, factor):
    """The images of ``paths`` as float32 arrays in [0, 1], times ``factor``
    (below 1 + 1e-5, so that no value leaves the range the detector accepts
    by more than its rounding: values are clipped to 1)."""
    out = []
    for path in paths:
        with Image.open(path) as image:
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.float32)
        out.append(np.minimum(rgb / np.float32(255) * np.float32(factor), np.float32(1)))
    return out


def run(data, seed, factor):
    """One fit of the defaults on ``data``'s training images (from their
    files when ``factor`` is None, else as :func:`_float_images`)."""
    if factor is not None:
        data = copy.copy(data)
        data.train = _float_images(data.train, factor)
    row = bench_suite.run_one(data, "defaults", seed, None)
    return {k: row[k] for k in (*METRICS, "image_auroc_by_type")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train", type=int, default=200,
                        help="a seeded subset of this many training images (0: all)")
    parser.add_argument("--factors", nargs="+", type=float, default=list(DEFAULT_FACTORS))
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    if any(not abs(f - 1) < 1e-5 for f in args.factors):
        parser.error("--factors must lie within 1e-5 of 1: this measures rounding, not contrast")
    command = "python benchmarks/bench_rounding.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    path = args.out / "rounding.json"
    results = bench_suite.results_with_command(path, command)
    for name, folder in bench_suite.find_sets(args.sets).items():
        if folder is None:
            continue  # the generated sets are arrays already: nothing is read from files
        data = bench_suite._Set(name, folder, args.max_train or None)
        for factor in [None, *args.factors]:
            label = "files" if factor is None else repr(factor)
            row = {"set": name, "seed": args.seed, "n_train": data.n_train, "factor": label,
                   **run(data, args.seed, factor)}
            bench_suite.record_run(
                results, path, f"{name}|{args.seed}|{data.n_train}|{label}", row,
                lambda results: _write_markdown(results, args.out / "rounding.md"))


def _write_markdown(results, path):
    groups = {}
    for r in results["runs"].values():
        groups.setdefault((r["set"], r["n_train"], r["seed"]), []).append(r)
    rows = []
    for (name, n_train, seed), runs in sorted(groups.items()):
        cells = [name, str(n_train), str(seed), str(len(runs))]
        for key in METRICS[:3]:
            values = [r[key] for r in runs]
            cells.append(f"{min(values):.3f}-{max(values):.3f} ({max(values) - min(values):.3f})")
        cells.append(", ".join(f"{r['factor']}: {r['whole_image_auroc']:.4f}" for r in runs))
        rows.append(cells)
    bench_suite.write_variant_markdown(
        path, "Float rounding and the defaults' results", results,
        "The defaults (whole-image protocol, as bench_suite) fitted on the same training "
        "images read from their files ('files') and as float images times a factor within "
        "a few parts in 10^7 of 1; the test images read from their files. Each metric: "
        "min-max over the fits (the range in brackets).",
        ["set", "n_train", "seed", "fits", "image AUROC", "pixel AUROC", "AUPRO",
         "image AUROC per fit"], rows)


if __name__ == "__main__":
    main()
