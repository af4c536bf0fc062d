"""Quick start: detect and localise defects on synthetic images.

Fits a :class:`~skprotoad.ProtoADDetector` on defect-free images only, then,
for a labelled test set, predicts which images are anomalous, computes
anomaly maps and defect masks, reports the standard metrics and saves a
figure ``quickstart_overlay.png``: for a few test images, the image, the
anomaly map as a heat overlay, the predicted mask and the true mask.

Runs in a few seconds on a CPU: 64 x 64 images, the offline
``efficientnet_lite0`` backbone and k-means prototypes.

    python examples/plot_quickstart.py [OUTPUT_DIR]
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from skprotoad import ProtoADDetector
from skprotoad.datasets import make_defect_dataset
from skprotoad.metrics import evaluate_maps

# 1. data: 30 normal training images, 20 test images (half with defects)
data = make_defect_dataset(n_train=30, n_test=20, image_size=(64, 64), random_state=0)

# 2. fit on normal images only. image_size/crop_size: no resize, no crop here.
det = ProtoADDetector(
    image_size=64, crop_size=64, clustering="kmeans", n_clusters=50, random_state=0
)
det.fit(data.X_train)

# 3. image level: +1 normal, -1 anomaly; anomaly score = -score_samples
labels = det.predict(data.X_test)
anomaly_scores = -det.score_samples(data.X_test)
print(f"threshold (anomaly score): {det.pixel_threshold_:.4f}")
print(f"flagged {np.sum(labels == -1)} of {len(labels)} test images; "
      f"{int(data.y_test.sum())} have defects")

# 4. pixel level: maps (n, 64, 64), higher = more anomalous; boolean masks
maps = det.anomaly_maps(data.X_test)
masks = det.predict_masks(data.X_test)

# 5. metrics: y_true uses 1 = anomalous, scores are anomaly scores
results = evaluate_maps(data.y_test, anomaly_scores, data.masks_test, maps)
for name, value in results.items():
    print(f"{name:>13s}: {value:.3f}")


# 6. figure: image | heat overlay | predicted mask | true mask, one row per image
def heat_overlay(image, amap, vmin, vmax, alpha=0.5):
    """Blend a blue-to-red rendering of ``amap`` over an RGB uint8 ``image``."""
    t = np.clip((amap - vmin) / (vmax - vmin), 0.0, 1.0)[..., None]
    heat = (255 * np.concatenate([t, 1 - np.abs(2 * t - 1), 1 - t], axis=-1))
    return (alpha * heat + (1 - alpha) * image).astype(np.uint8)


def mask_rgb(mask):
    return np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=-1)


threshold = det.pixel_threshold_
rows = []
for i in np.argsort(-anomaly_scores)[:4]:  # the four most anomalous test images
    rows.append(np.concatenate([
        data.X_test[i],
        heat_overlay(data.X_test[i], maps[i], 0.5 * threshold, 1.5 * threshold),
        mask_rgb(masks[i]),
        mask_rgb(data.masks_test[i]),
    ], axis=1))
out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
out_dir.mkdir(parents=True, exist_ok=True)
figure = Image.fromarray(np.concatenate(rows, axis=0)).resize((4 * 128, len(rows) * 128),
                                                             Image.NEAREST)
figure.save(out_dir / "quickstart_overlay.png")
print(f"wrote {out_dir / 'quickstart_overlay.png'}")
