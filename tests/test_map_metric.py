"""``map_metric``: the anomaly map in a whitened metric of the finest stage,
the image score as it was."""

import copy
import pickle

import numpy as np
import pytest
import torch

from skprotoad import ProtoADDetector
from skprotoad._whitening import stage_whitening

from .conftest import LITE0


@pytest.fixture(scope="module")
def euclidean_detector(normal_images):
    return ProtoADDetector(**LITE0, map_metric="euclidean").fit(normal_images)


def test_whitening_changes_the_maps_not_the_image_scores(lite0_detector, euclidean_detector,
                                                          synthetic):
    X = synthetic.X_test
    assert lite0_detector.map_metric == "whitened"
    assert lite0_detector.network_.whitened_channels == 24  # efficientnet_lite0's stage 1
    assert euclidean_detector.network_.map_whitening.numel() == 0
    # the image score reads the plain metric (score_whitening=0), so the
    # threshold is the same too
    # (to its tie margin, a fraction of the larger of scores and map maxima)
    np.testing.assert_allclose(lite0_detector.score_samples(X),
                               euclidean_detector.score_samples(X), rtol=1e-5, atol=1e-6)
    assert lite0_detector.offset_ == pytest.approx(euclidean_detector.offset_, rel=1e-3)
    whitened, plain = lite0_detector.anomaly_maps(X), euclidean_detector.anomaly_maps(X)
    assert np.abs(whitened - plain).max() > 0.05 * np.abs(plain).max()
    # the pixel threshold is set on the held-out images' maps of each metric
    assert lite0_detector.pixel_threshold_ != pytest.approx(euclidean_detector.pixel_threshold_)


def test_whitening_is_that_of_the_training_patches(lite0_detector, normal_images):
    # the final network's whitening comes from every training image's
    # finest-stage channels, as the network scores them
    from skprotoad.preprocessing import model_inputs

    embedding = lite0_detector.network_.embedding
    with torch.inference_mode():
        features = torch.cat([embedding(batch) for _, batch in model_inputs(
            normal_images, lite0_detector.image_size, lite0_detector.crop_size, 8)])
    patches = features[:, :24].permute(0, 2, 3, 1).reshape(-1, 24).numpy()
    np.testing.assert_allclose(lite0_detector.network_.map_whitening.numpy(),
                               stage_whitening(patches), rtol=1e-3, atol=1e-3)


def test_changing_map_metric_after_fit_is_refused(lite0_detector, tiny_detector, synthetic):
    changed = copy.deepcopy(lite0_detector).set_params(map_metric="euclidean")
    with pytest.raises(ValueError, match="map_metric='euclidean' \\(fitted with 'whitened'\\)"):
        changed.score_samples(synthetic.X_test[:1])
    # unit features (normalization="patch") have no distances to whiten: the
    # parameter is unused there, and changing it changes nothing
    assert tiny_detector.network_.whitened_channels == 0
    patch = copy.deepcopy(tiny_detector).set_params(map_metric="euclidean")
    np.testing.assert_array_equal(patch.score_samples(synthetic.X_test),
                                  tiny_detector.score_samples(synthetic.X_test))


def test_bad_map_metric_is_named(normal_images):
    with pytest.raises(ValueError, match="map_metric"):
        ProtoADDetector(**LITE0, map_metric="mahalanobis").fit(normal_images)


def test_a_pickle_of_format_1_loads_with_the_euclidean_map(euclidean_detector, synthetic):
    # pickled before map_metric existed: no parameter, no whitening buffer
    state = euclidean_detector.__getstate__()
    del state["map_metric"], state["score_whitening"]
    network = dict(state["_network_state"], format_version=1)
    del network["map_whitening_shape"], network["score_whitening"]
    network["tensors"] = {k: v for k, v in network["tensors"].items() if k != "map_whitening"}
    state["_network_state"] = network
    old = ProtoADDetector.__new__(ProtoADDetector)
    old.__setstate__(pickle.loads(pickle.dumps(state)))
    assert old.map_metric == "euclidean"
    X = synthetic.X_test
    np.testing.assert_array_equal(old.anomaly_maps(X), euclidean_detector.anomaly_maps(X))
    np.testing.assert_array_equal(old.score_samples(X), euclidean_detector.score_samples(X))
