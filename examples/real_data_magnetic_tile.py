"""Real data: the Magnetic Tile Defect data set, in MVTec AD layout.

Fits on ``train/good`` and evaluates on ``test/`` (image AUROC, pixel
AUROC, AU-PRO, F1-max), then saves heat overlays of a few defective test
images, at each image's own size (``anomaly_maps(output="input")``).

The data set (Y. Huang, C. Qiu, K. Yuan, "Surface defect saliency of
magnetic tile", The Visual Computer 36, 85-96, 2020) is looked for in
``--data``, else ``$SKPROTOAD_DATA/magnetic_tile``, else
``../shared/data/magnetic_tile`` next to the repository. Without it the
script says so and exits cleanly.

    python examples/real_data_magnetic_tile.py                   # full data set
    python examples/real_data_magnetic_tile.py --max-images 8    # a quick look

The full run uses the package defaults (resize 256, crop 224, FINCH); on a
CPU it takes minutes. ``--max-images N`` keeps N training images and N test
images (half of them defective) and uses k-means, for a run of seconds.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from skprotoad import ProtoADDetector
from skprotoad.datasets import load_masks, load_mvtec
from skprotoad.metrics import evaluate_maps
from skprotoad.plotting import overlay, save_png

REPO = Path(__file__).resolve().parents[1]


def default_data_dir():
    if os.environ.get("SKPROTOAD_DATA"):
        return Path(os.environ["SKPROTOAD_DATA"]) / "magnetic_tile"
    return REPO.parent / "shared" / "data" / "magnetic_tile"


def subset(data, n, rng):
    """n training images; n test images, half of them defective."""
    train = sorted(rng.choice(len(data.train_paths), min(n, len(data.train_paths)), False))
    bad = np.flatnonzero(data.test_labels == 1)
    good = np.flatnonzero(data.test_labels == 0)
    n_bad = min(len(bad), max(1, n // 2))
    test = np.concatenate([rng.choice(good, min(len(good), n - n_bad), False),
                           rng.choice(bad, n_bad, False)])
    return [data.train_paths[i] for i in train], test


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="magnetic_tile folder")
    parser.add_argument("--max-images", type=int, default=None,
                        help="use N train and N test images (quick run)")
    parser.add_argument("--output", type=Path, default=Path("magnetic_tile_output"))
    args = parser.parse_args(argv)

    root = args.data or default_data_dir()
    if not (root / "train" / "good").is_dir():
        print(f"Magnetic Tile data not found in {root}: skipping this example. "
              f"Pass --data DIR or set SKPROTOAD_DATA.")
        return None

    data = load_mvtec(root)
    test = np.arange(len(data.test_paths))
    train = data.train_paths
    params = dict(random_state=0)  # the defaults: efficientnet_lite0, FINCH, 256 -> 224
    if args.max_images:
        train, test = subset(data, args.max_images, np.random.default_rng(0))
        params.update(clustering="kmeans", n_clusters=min(100, 50 * len(train)))
    test_paths = [data.test_paths[i] for i in test]
    y_true = data.test_labels[test]
    print(f"fitting on {len(train)} normal images, testing on {len(test)} "
          f"({int(y_true.sum())} defective)")

    det = ProtoADDetector(**params).fit(train)  # file paths: images load lazily
    maps = det.anomaly_maps(test_paths)  # (n, 224, 224), the model's crop
    scores = -det.score_samples(test_paths)
    masks = load_masks([data.test_mask_paths[i] for i in test], det.image_size, det.crop_size)
    results = evaluate_maps(y_true, scores, masks, maps)
    for name, value in results.items():
        print(f"{name:>13s}: {value:.3f}")

    # overlays at each image's own size (NaN outside the centre crop is shown
    # unblended), true defect outlined in green
    defective = [i for i in range(len(test)) if y_true[i] == 1][:3]
    t = det.pixel_threshold_
    input_maps = det.anomaly_maps([test_paths[i] for i in defective], output="input")
    for i, amap in zip(defective, input_maps):
        out = args.output / (Path(test_paths[i]).stem + "_overlay.png")
        mask = data.test_mask_paths[test[i]]
        save_png(overlay(test_paths[i], amap, vmin=0.5 * t, vmax=1.5 * t, mask=mask), out)
        print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
