"""Shared fixtures: tiny images and detectors fitted once per session."""

import os
from pathlib import Path

import pytest

from skprotoad import ProtoADDetector
from skprotoad.datasets import make_defect_dataset

DATA_ROOT = Path(
    os.environ.get("SKPROTOAD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
MAGNETIC_TILE = DATA_ROOT / "magnetic_tile"

# A backbone whose weights do not matter: random resnet18, two stages, 64 px.
# A random backbone on 64 px images, with the paper's per-patch normalisation:
# its image score is its map's maximum (no position baseline), which many
# tests rely on; the default normalization="image" (and its projection image
# score) is tested with real features through LITE0 and in
# test_normalization.py, the baseline in test_position_baseline.py. No farthest-patch
# prototypes: exactly the 16 k-means prototypes (n_farthest has its own tests).
# On the CPU even where a GPU is seen: tests compare its scores bit for bit and
# call its network with CPU tensors (tests/test_gpu.py covers device="cuda").
TINY = dict(
    device="cpu",
    backbone="resnet18",
    weights=None,
    layers=(1, 2),
    normalization="patch",
    image_size=64,
    crop_size=64,
    clustering="kmeans",
    n_clusters=16,
    n_farthest=0,
    position_baseline=False,
    batch_size=8,
    random_state=0,
)

# The offline ImageNet backbone on 64 px images: real features, small cost.
# No neighbourhood averaging: on a 16 x 16 patch grid a 3 x 3 neighbourhood
# spans a fifth of the image and blurs the few-pixel defects of these images.
LITE0 = dict(
    backbone="efficientnet_lite0",
    image_size=64,
    crop_size=64,
    neighborhood_size=1,
    clustering="kmeans",
    n_clusters=32,
    random_state=0,
)


@pytest.fixture(scope="session")
def synthetic():
    """12 normal training images; 16 test images (labels 1 = anomalous) with masks."""
    return make_defect_dataset(n_train=12, n_test=16, image_size=(64, 64), random_state=0)


@pytest.fixture(scope="session")
def normal_images(synthetic):
    return synthetic.X_train


@pytest.fixture(scope="session")
def tiny_detector(normal_images):
    return ProtoADDetector(**TINY).fit(normal_images)


@pytest.fixture(scope="session")
def lite0_detector(normal_images):
    """A detector with the :data:`LITE0` parameters fitted on the normal images."""
    return ProtoADDetector(**LITE0).fit(normal_images)
