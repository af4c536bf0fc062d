"""``score_whitening``: the image score's metric moved towards the whitened
map's, the maps as they were."""

import copy
import pickle

import numpy as np
import pytest
import torch

from skprotoad import ProtoADDetector, export
from skprotoad.cli import main

from .conftest import LITE0
from .test_export import _importable, _jit_load, _run_onnx


@pytest.fixture(scope="module")
def half_detector(normal_images):
    return ProtoADDetector(**LITE0, score_whitening=0.5).fit(normal_images)


@pytest.fixture(scope="module")
def plain_score_detector(lite0_detector):
    assert lite0_detector.score_whitening == 0.0  # the default
    return lite0_detector


def test_the_score_moves_the_maps_do_not(half_detector, plain_score_detector, synthetic):
    X = synthetic.X_test
    assert half_detector.network_.score_whitening == 0.5
    assert plain_score_detector.network_.score_whitening == 0.0
    # the same prototypes and whitening: the maps are the same
    np.testing.assert_array_equal(half_detector.anomaly_maps(X),
                                  plain_score_detector.anomaly_maps(X))
    half, plain = half_detector.score_samples(X), plain_score_detector.score_samples(X)
    assert np.abs(half - plain).max() > 0.01 * np.abs(plain).max()
    # its threshold is set on its own held-out scores, which moved with it
    assert half_detector.offset_ != pytest.approx(plain_score_detector.offset_, rel=1e-3)


def test_unused_where_there_is_no_whitened_metric(normal_images, synthetic):
    # a plain map leaves nothing to move towards: the network scores as with 0
    plain = ProtoADDetector(**LITE0, map_metric="euclidean").fit(normal_images)
    moved = ProtoADDetector(**LITE0, map_metric="euclidean", score_whitening=1.0)
    moved.fit(normal_images)
    assert moved.network_.score_whitening == 0.0
    np.testing.assert_array_equal(moved.score_samples(synthetic.X_test),
                                  plain.score_samples(synthetic.X_test))
    # and changing it after the fit changes nothing, so it is not refused
    np.testing.assert_array_equal(
        copy.deepcopy(plain).set_params(score_whitening=0.7).score_samples(synthetic.X_test),
        plain.score_samples(synthetic.X_test))


def test_changing_score_whitening_after_fit_is_refused(half_detector, synthetic):
    changed = copy.deepcopy(half_detector).set_params(score_whitening=1.0)
    with pytest.raises(ValueError, match=r"score_whitening=1.0 \(fitted with 0.5\)"):
        changed.score_samples(synthetic.X_test[:1])


@pytest.mark.parametrize("value, error", [(1.5, ValueError), (-0.1, ValueError),
                                          ("half", ValueError), (True, ValueError)])
def test_bad_score_whitening_is_named(normal_images, value, error):
    with pytest.raises(error, match="score_whitening"):
        ProtoADDetector(**LITE0, score_whitening=value).fit(normal_images)


def test_a_pickle_of_format_2_loads_with_the_plain_score(plain_score_detector, synthetic):
    # pickled before score_whitening existed: no parameter, no description key
    state = plain_score_detector.__getstate__()
    del state["score_whitening"]
    network = dict(state["_network_state"], format_version=2)
    del network["score_whitening"]
    state["_network_state"] = network
    old = ProtoADDetector.__new__(ProtoADDetector)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert old.score_whitening == 0.0 == old.network_.score_whitening
    X = synthetic.X_test
    np.testing.assert_array_equal(old.score_samples(X), plain_score_detector.score_samples(X))


def test_exports_score_as_the_estimator(half_detector, synthetic, tmp_path):
    X = synthetic.X_test[:3]
    x = torch.from_numpy(export.preprocess(half_detector, X))
    expected = -half_detector.score_samples(X)
    with torch.inference_mode():
        scores = _jit_load(export.to_torchscript(half_detector, tmp_path / "m.pt"))(x)[1]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=0, atol=1e-4)
    if all(_importable(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        scores = _run_onnx(export.to_onnx(half_detector, tmp_path / "m.onnx"), x.numpy())[1]
        np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-4)


def test_cli_passes_score_whitening(normal_images, tmp_path):
    from PIL import Image

    folder = tmp_path / "good"
    folder.mkdir()
    for i, image in enumerate(normal_images[:6]):
        Image.fromarray(image).save(folder / f"{i}.png")
    model = tmp_path / "m.joblib"
    assert main(["fit", str(folder), "-o", str(model), "-q", "--backbone", "efficientnet_lite0",
                 "--image-size", "64", "--neighborhood-size", "1", "--clustering", "kmeans",
                 "--n-clusters", "8", "--score-whitening", "0.25", "--seed", "0"]) == 0
    import joblib

    assert joblib.load(model).network_.score_whitening == 0.25
