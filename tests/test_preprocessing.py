"""The public preprocessing and threshold rules are the detector's own."""

import numpy as np
import pytest
import torch

from skprotoad.preprocessing import center_crop_box, load_image, model_inputs, resize_and_crop
from skprotoad.thresholds import conformal_threshold

from .conftest import TINY


def test_model_inputs_are_what_the_network_scores(tiny_detector, synthetic):
    X = synthetic.X_test[:12]
    # the detector's batches: the float rounding of a convolution depends on them
    batches = model_inputs(X, TINY["image_size"], TINY["crop_size"], TINY["batch_size"])
    with torch.inference_mode():
        maps = torch.cat([tiny_detector.network_(batch)[0] for _, batch in batches]).numpy()
    np.testing.assert_array_equal(maps, tiny_detector.anomaly_maps(X))


def test_model_inputs_batches_indices_and_checks_the_geometry(synthetic):
    X = list(synthetic.X_test[:5])
    batches = list(model_inputs(X, 40, (24, 32), batch_size=2, indices=[4, 0, 2]))
    assert [chunk for chunk, _ in batches] == [[4, 0], [2]]
    expected = resize_and_crop(load_image(X[2]), 40, (24, 32))
    torch.testing.assert_close(batches[1][1][0], expected, rtol=0, atol=0)
    assert center_crop_box(40, (24, 32)) == (8, 4, 24, 32)
    with pytest.raises(ValueError, match="larger than image_size"):
        model_inputs(X, 32, 48)


def test_the_threshold_is_the_conformal_rule_of_the_held_out_scores(tiny_detector):
    # TINY's image score is its map's maximum: one rule sets both thresholds
    # up to the margin that keeps an image scoring the threshold normal
    assert -tiny_detector.offset_ == pytest.approx(
        conformal_threshold(tiny_detector.calibration_scores_), rel=1e-4)
    assert tiny_detector.pixel_threshold_ == -tiny_detector.offset_
