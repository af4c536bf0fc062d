"""Does a set's image label show in global statistics? An acquisition-bias check.

    python benchmarks/bench_global_shift.py [--sets NAME ...] [--max-train 200]

For each real set of the suite (``bench_suite.find_sets``), the image AUROC
(defective vs normal test images) of statistics that cannot localise a defect:
the image's mean grey level and its grey-level standard deviation, and, for
the default detector (seed 0), the mean of its anomaly map; next to the
detector's own image score and the maximum of its map. A global statistic that
separates the labels well means the defective images differ from the normal
ones as a whole (lighting, camera, session), and an image score can rank them
without finding any defect: a method's image AUROC on that set then says
little about detection. Results: ``benchmarks/results/global_shift.{json,md}``.
"""

import argparse
import json
from pathlib import Path

import _common  # first: this checkout's skprotoad

import numpy as np  # noqa: E402

from bench_suite import COMMON, _Set, find_sets  # noqa: E402

from skprotoad import ProtoADDetector  # noqa: E402
from skprotoad.metrics import image_auroc  # noqa: E402
# the detector's own reader, so that the statistics see what the detector sees
from skprotoad.preprocessing import load_image  # noqa: E402


def _grey_statistics(items):
    means, stds = [], []
    for item in items:
        pixels = np.asarray(load_image(item), dtype=np.float32)
        grey = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
        means.append(grey.mean())
        stds.append(grey.std())
    return np.array(means), np.array(stds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=None)
    parser.add_argument("--max-train", type=int, default=200)
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for name, folder in find_sets(args.sets).items():
        if folder is None:  # generated sets: no acquisition to be biased
            continue
        data = _Set(name, folder, args.max_train)
        labels = data.labels
        means, stds = _grey_statistics(data.test)
        det = ProtoADDetector(**COMMON, random_state=0).fit(data.train)
        maps, neg_scores = det.anomaly_maps(data.test, return_scores=True)
        flat = maps.reshape(len(maps), -1)
        row = {"set": name, "n_train": data.n_train, "n_test": len(labels),
               "n_defective": int(labels.sum())}
        for key, values in (("grey_mean", means), ("grey_std", stds),
                            ("map_mean", flat.mean(axis=1)), ("map_max", flat.max(axis=1)),
                            ("image_score", -neg_scores)):
            auroc = float(image_auroc(labels, values))
            # a statistic can separate in either direction: report the larger side
            row[key] = round(max(auroc, 1 - auroc), 4) if key.startswith("grey") else round(
                auroc, 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    _common.write_json(args.out / "global_shift.json", rows, indent=1)
    lines = ["# Global statistics vs image labels (acquisition-bias check)", "",
             f"Command: `python benchmarks/bench_global_shift.py --max-train {args.max_train}`",
             "", "Image AUROC, defective vs normal test images. Grey mean / std: of the "
             "image itself, either direction (max(a, 1 - a)). Map mean: the mean of the "
             "default detector's anomaly map (seed 0); map max and image score: its "
             "localising readouts.", "",
             "| set | train | test (defective) | grey mean | grey std | map mean | map max "
             "| image score |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['n_train']} | {r['n_test']} ({r['n_defective']}) | "
                     f"{r['grey_mean']:.3f} | {r['grey_std']:.3f} | {r['map_mean']:.3f} | "
                     f"{r['map_max']:.3f} | {r['image_score']:.3f} |")
    _common.write_markdown(args.out / "global_shift.md", lines)


if __name__ == "__main__":
    main()
