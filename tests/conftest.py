"""Shared fixtures: tiny images and detectors fitted once per session."""

import os
from pathlib import Path

import numpy as np
import pytest

from skprotoad import ProtoADDetector

DATA_ROOT = Path(
    os.environ.get("SKPROTOAD_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data")
)
MAGNETIC_TILE = DATA_ROOT / "magnetic_tile"

# A backbone whose weights do not matter: random resnet18, two stages, 64 px.
TINY = dict(
    backbone="resnet18",
    weights=None,
    layers=(1, 2),
    image_size=64,
    crop_size=64,
    clustering="kmeans",
    n_clusters=16,
    batch_size=8,
    random_state=0,
)


def textured_images(n, size=64, random_state=0, defect=False):
    """Grey wood-grain-like texture; with ``defect`` a bright square at a random place.

    Returns images (n, size, size, 3) uint8 and masks (n, size, size) bool.
    """
    rng = np.random.default_rng(random_state)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        phase = rng.uniform(0, 2 * np.pi)
        angle = rng.uniform(-0.2, 0.2)
        grain = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 0.6 + phase)
        noise = rng.normal(0, 0.15, (size, size))
        img = 120 + 30 * grain + 20 * noise
        if defect:
            side = size // 6
            top, left = rng.integers(4, size - side - 4, size=2)
            img[top : top + side, left : left + side] = 250
            masks[i, top : top + side, left : left + side] = True
        images[i] = np.clip(img, 0, 255).astype(np.uint8)[..., None]
    return images, masks


@pytest.fixture(scope="session")
def normal_images():
    return textured_images(12, random_state=1)[0]


@pytest.fixture(scope="session")
def test_set():
    """Six normal and six defective images with labels (1 anomalous) and masks."""
    good, good_masks = textured_images(6, random_state=2)
    bad, bad_masks = textured_images(6, random_state=3, defect=True)
    X = np.concatenate([good, bad])
    y = np.r_[np.zeros(6, int), np.ones(6, int)]
    return X, y, np.concatenate([good_masks, bad_masks])


@pytest.fixture(scope="session")
def tiny_detector(normal_images):
    return ProtoADDetector(**TINY).fit(normal_images)


@pytest.fixture(scope="session")
def lite0_detector(normal_images):
    """The offline ImageNet backbone on 64 px images: real features, small cost."""
    return ProtoADDetector(
        backbone="efficientnet_lite0",
        image_size=64,
        crop_size=64,
        clustering="kmeans",
        n_clusters=32,
        random_state=0,
    ).fit(normal_images)
