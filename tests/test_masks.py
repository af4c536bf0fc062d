"""Masks that agree with the verdicts: the rule, and on the shared real sets."""

import numpy as np
import pytest

from skprotoad import ProtoADDetector
from skprotoad._masks import peak_region, verdict_mask
from skprotoad.datasets import load_mvtec

from .conftest import DATA_ROOT, LITE0

SHARED_SETS = ("magnetic_tile", "bsdata_pitting", "tire")


def test_peak_region_is_the_connected_half_maximum_spot_around_the_peak():
    m = np.full((9, 9), 0.2)
    m[2:4, 2:4] = [[1.0, 0.7], [0.65, 0.4]]  # the peak's spot; 0.4 is below half height
    m[7, 7] = 0.95                           # as high, but not connected to the peak
    region = peak_region(m)
    assert np.argwhere(region).tolist() == [[2, 2], [2, 3], [3, 2]]
    # the level is measured from the image's median, not from zero
    np.testing.assert_array_equal(peak_region(m + 10.0), region)


def test_peak_region_ignores_nan_and_is_never_empty():
    m = np.full((4, 6), np.nan)
    m[1:3, 1:4] = 0.5  # a flat scored area inside an unscored border
    region = peak_region(m)
    assert region[1:3, 1:4].all() and region.sum() == 6
    assert not peak_region(np.full((3, 3), np.nan)).any()


def test_verdict_mask_follows_the_verdict_first():
    m = np.array([[0.0, 0.2, 0.9], [0.0, 0.1, 0.8]])
    assert not verdict_mask(m, False, -1.0).any()       # passed: nothing, whatever the map
    np.testing.assert_array_equal(verdict_mask(m, True, 0.5), m > 0.5)
    high = verdict_mask(m, True, 5.0)                    # flagged, nothing above: the peak
    assert high[0, 2] and high.sum() == 2
    with_nan = np.where(m > 0.85, np.nan, m)
    assert not verdict_mask(with_nan, True, 0.5)[0, 2]


@pytest.mark.parametrize("name", SHARED_SETS)
def test_masks_agree_with_verdicts_on_real_data(name):
    folder = DATA_ROOT / name
    if not (folder / "train" / "good").is_dir():
        pytest.skip(f"{folder} not available")
    data = load_mvtec(folder)
    rng = np.random.default_rng(0)
    train = [data.train_paths[i] for i in rng.choice(len(data.train_paths), 16, replace=False)]
    labels = np.asarray(data.test_labels)
    picked = np.r_[rng.choice(np.flatnonzero(labels == 0), 8, replace=False),
                   rng.choice(np.flatnonzero(labels == 1), 12, replace=False)]
    test = [data.test_paths[i] for i in picked]
    det = ProtoADDetector(**{**LITE0, "image_size": 128, "crop_size": 112,
                             "neighborhood_size": 3, "n_clusters": 32}).fit(train)
    flagged = det.predict(test) == -1
    for output in ("crop", "input"):
        masks = det.predict_masks(test, output=output)
        np.testing.assert_array_equal([m.any() for m in masks], flagged)
