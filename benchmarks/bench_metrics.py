"""Time and peak memory of the pixel-level metrics.

Run from the repository root::

    PYTHONPATH=. python benchmarks/bench_metrics.py

Writes ``benchmarks/results/metrics.json`` and ``metrics.md``. Peak memory
is measured with :mod:`tracemalloc` (NumPy reports its buffers to it), as
the extra memory allocated by the call on top of its inputs.

Two baselines put the numbers in context: ``sklearn.metrics.roc_auc_score``
on the flattened arrays, and an AU-PRO computed the textbook way (argsort of
all pixels, cumulative sums of false positives and per-region weights),
written here for comparison only.
"""

import argparse
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402
import scipy  # noqa: E402
import sklearn  # noqa: E402
from scipy import ndimage  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from skprotoad.metrics import aupro, evaluate_maps, pixel_auroc, pixel_f1_max, pro_curve  # noqa: E402

COMMAND = "PYTHONPATH=. python benchmarks/bench_metrics.py"


def make_data(n_images, size, seed=0):
    """Half the images get 1-3 disc-shaped defects; maps are noisy blobs."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size]
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images // 2):
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, size, size=2)
            radius = rng.uniform(3, size / 10)
            masks[i] |= (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
    noise = ndimage.gaussian_filter(rng.standard_normal(masks.shape), (0, 4, 4))
    maps = (noise / noise.std() + 1.5 * ndimage.gaussian_filter(masks.astype(float), (0, 3, 3)))
    maps = maps.astype(np.float32)
    y = masks.any(axis=(1, 2)).astype(int)
    scores = maps.reshape(n_images, -1).max(axis=1)
    return y, scores, masks, maps


def argsort_aupro(masks, maps, fpr_limit=0.3):
    """Baseline: one argsort of all pixels, cumulative sums, tie groups."""
    weights = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        if n:
            sizes = np.bincount(lab.ravel())
            weights[i][lab > 0] = 1.0 / sizes[lab[lab > 0]]
        n_regions += n
    scores = maps.ravel()
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    fp = np.cumsum(~masks.ravel()[order]) / np.count_nonzero(~masks)
    pro = np.cumsum(weights.ravel()[order]) / n_regions
    last_of_group = np.append(np.diff(sorted_scores) != 0, True)
    fpr = np.concatenate(([0.0], fp[last_of_group]))
    pro = np.concatenate(([0.0], pro[last_of_group]))
    keep = np.searchsorted(fpr, fpr_limit, side="right")
    x, yv = fpr[: keep + 1], pro[: keep + 1]
    y_lim = yv[-2] + (yv[-1] - yv[-2]) * (fpr_limit - x[-2]) / (x[-1] - x[-2])
    x = np.append(x[:-1], fpr_limit)
    yv = np.append(yv[:-1], y_lim)
    return float(np.sum(0.5 * (yv[1:] + yv[:-1]) * np.diff(x)) / fpr_limit)


def measure(func, repeat):
    """Best wall time over ``repeat`` runs and peak traced memory of one run."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    value = func()
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return value, min(times), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=120)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)

    y, scores, masks, maps = make_data(args.n_images, args.size)
    flat_masks, flat_maps = masks.ravel(), maps.ravel()
    cases = {
        "pixel_auroc": lambda: pixel_auroc(masks, maps),
        "pixel_f1_max": lambda: pixel_f1_max(masks, maps),
        "aupro": lambda: aupro(masks, maps),
        "pro_curve (full curve; value = n points)": lambda: len(pro_curve(masks, maps)[0]),
        "evaluate_maps (all five)": lambda: evaluate_maps(y, scores, masks, maps)["aupro"],
        "baseline: sklearn roc_auc_score": lambda: roc_auc_score(flat_masks, flat_maps),
        "baseline: argsort AU-PRO": lambda: argsort_aupro(masks, maps),
    }
    rows = []
    for name, func in cases.items():
        value, seconds, peak = measure(func, args.repeat)
        rows.append({"metric": name, "value": float(value), "seconds": seconds,
                     "peak_mib": peak / 2**20})
        print(f"{name:42s} value={float(value):.6f} time={seconds:.3f}s "
              f"peak={peak / 2**20:.1f} MiB", flush=True)

    n_pixels = masks.size
    setup = {
        "command": COMMAND + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "n_images": args.n_images,
        "size": args.size,
        "n_pixels": n_pixels,
        "anomalous_pixel_fraction": float(masks.mean()),
        "maps_dtype": str(maps.dtype),
        "input_mib": (maps.nbytes + masks.nbytes) / 2**20,
        "repeat": args.repeat,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "machine": _common.machine(torch=False),
    }
    out = Path(args.out_dir)
    _common.write_json(out / "metrics.json", {"setup": setup, "results": rows})
    lines = [
        "# Pixel-metric benchmark",
        "",
        "```",
        setup["command"],
        "```",
        "",
        f"{args.n_images} maps of {args.size}x{args.size} ({n_pixels:,} pixels, "
        f"{100 * setup['anomalous_pixel_fraction']:.1f} % anomalous), {maps.dtype} maps, "
        f"inputs {setup['input_mib']:.1f} MiB. Time: best of {args.repeat}; peak: extra memory "
        "traced by tracemalloc during one call. Noisy 2-core machine: treat times as rough.",
        "",
        "| metric | value | time (s) | peak extra memory (MiB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['metric']} | {r['value']:.6f} | {r['seconds']:.3f} | {r['peak_mib']:.1f} |"
              for r in rows]
    lines += ["", f"Python {setup['python']}, NumPy {setup['numpy']}, SciPy {setup['scipy']}, "
              f"scikit-learn {setup['sklearn']}.", ""]
    _common.write_markdown(out / "metrics.md", lines)


if __name__ == "__main__":
    main()
