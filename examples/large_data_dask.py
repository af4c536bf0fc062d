"""Large data on a Dask cluster: a capped fit whose features the workers
extract, then scoring whose overlays and masks the workers write.

Writes a few synthetic image files (your own run passes the paths of its
images, on a file system every worker reads), fits a detector with a patch
cap under joblib's Dask backend, checks that a fit in this process learns the
same prototypes, and scores the test images on the cluster.

    python examples/large_data_dask.py [OUTPUT_DIR]

Needs ``pip install "skprotoad[dask]"``. See docs/user_guide/large_data.md.
"""

import sys
from pathlib import Path

import joblib
import numpy as np
from distributed import Client, LocalCluster
from PIL import Image
from sklearn.base import clone
from sklearn.metrics import roc_auc_score

from skprotoad import ProtoADDetector
from skprotoad.datasets import make_defect_images
from skprotoad.distributed import score_and_write


def write_images(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i:03d}.png" for i in range(len(images))]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    return [str(p) for p in paths]


def main(out_dir):
    train, _, _ = make_defect_images(24, image_size=(64, 64), anomaly_ratio=0.0, random_state=0)
    test, labels, _ = make_defect_images(8, image_size=(64, 64), anomaly_ratio=0.5,
                                         random_state=1)
    train_paths = write_images(out_dir / "train", train)
    test_paths = write_images(out_dir / "test", test)

    # 24 images x 256 patches = 6,144: the cap keeps 128 of each image's patches.
    # (24 images are too few for contamination="auto"'s threshold: it warns.)
    det = ProtoADDetector(image_size=64, clustering="kmeans", n_clusters=30,
                          max_patches=3_072, batch_size=4, random_state=0)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        with joblib.parallel_config(backend="dask"):
            det.fit(train_paths)  # the workers extract; prototypes are learned here
        result = score_and_write(det, test_paths, names=[Path(p).stem for p in test_paths],
                                 out_dir=out_dir / "scored", client=client)

    local = clone(det).fit(train_paths)
    same = np.array_equal(local.prototypes_, det.prototypes_) and local.offset_ == det.offset_
    print("fit on the cluster == fit in this process:", same)
    # result["score"]: anomaly scores (higher = more anomalous), in input order
    auroc = roc_auc_score(labels[result["index"]], result["score"])
    print(f"image AUROC on {len(test_paths)} test images: {auroc:.2f}")
    print("overlays in", out_dir / "scored" / "overlays")
    return det, result, same, test_paths


if __name__ == "__main__":  # Dask's worker processes import this script again
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "large_data_out")
    det, result, same, test_paths = main(out_dir)
