"""position_baseline: the image score read against normal images' mean score map."""

import joblib
import numpy as np
import pytest
import torch

from skprotoad import ProtoADDetector
from skprotoad import _features, persistence
from skprotoad.preprocessing import model_inputs

from .conftest import LITE0

# no held-out images (a float contamination): the baseline is the training
# images' mean, computed by the final network itself, which the tests can redo
FLOAT = dict(LITE0, contamination=0.25)


@pytest.fixture(scope="module")
def pair(normal_images):
    """The same fit with and without the baseline."""
    return (ProtoADDetector(**FLOAT).fit(normal_images),
            ProtoADDetector(**FLOAT, position_baseline=False).fit(normal_images))


def _score_patches(network, images, image_size, crop_size):
    out = []
    with torch.inference_mode():
        for _, batch in model_inputs(images, image_size, crop_size, 8):
            out.append(network.patch_scores(network.embedding(batch))[1][:, 0])
    return torch.cat(out)


def test_baseline_is_the_training_images_mean_score_map(pair, normal_images):
    with_baseline, _ = pair
    network = with_baseline.network_
    patches = _score_patches(network, normal_images, 64, 64)
    assert tuple(network.score_baseline.shape) == tuple(patches.shape[1:])
    np.testing.assert_allclose(network.score_baseline.numpy(), patches.double().mean(0).numpy(),
                               rtol=1e-5, atol=1e-7)


def test_maps_stay_and_scores_are_the_maximum_less_the_baseline(pair, synthetic):
    with_baseline, without = pair
    X = synthetic.X_test
    np.testing.assert_array_equal(with_baseline.prototypes_, without.prototypes_)
    maps, scores = with_baseline.anomaly_maps(X, return_scores=True)
    np.testing.assert_array_equal(maps, without.anomaly_maps(X))
    # subtracting at the patches' resolution is subtracting the smoothed,
    # upsampled baseline from the smoothed map (both steps are linear)
    network = without.network_
    patches = _score_patches(network, X, 64, 64)[:, None]
    score_maps = network.readout(patches, patches)[0]
    level = network.readout(with_baseline.network_.score_baseline[None, None],
                            with_baseline.network_.score_baseline[None, None])[0]
    expected = (score_maps - level).flatten(1).amax(dim=1).numpy()
    np.testing.assert_allclose(-scores, expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(-scores, -without.score_samples(X))
    # the pixel threshold is the maps' own, as the score is not their maximum
    assert with_baseline.pixel_threshold_ == pytest.approx(without.pixel_threshold_)
    assert with_baseline.pixel_threshold_ != -with_baseline.offset_


def test_calibration_scores_leave_each_image_out_of_its_baseline(tiny_detector):
    network = tiny_detector.network_
    rng = np.random.default_rng(0)
    patches = [torch.from_numpy(rng.uniform(0, 1, (16, 16)).astype(np.float32)) for _ in range(7)]
    baseline, scores = _features.baseline_and_scores(network, patches, [(64, 64)] * 7)
    np.testing.assert_allclose(baseline.numpy(), torch.stack(patches).double().mean(0).numpy(),
                               rtol=1e-6)
    # with its own map in the baseline, an image's map less the baseline is
    # (n - 1) / n of its map less the others' mean: left out, the score is the larger
    for p, score in zip(patches, scores):
        in_sample = float(network.image_scores(p[None, None], (64, 64), baseline)[0])
        assert score * 6 / 7 == pytest.approx(in_sample, rel=1e-5)


def test_held_out_images_set_the_default_detectors_baseline(lite0_detector):
    # the shared LITE0 detector (contamination="auto", 12 images, five folds
    # of 2 held out) has a baseline: the export and persistence tests that
    # use it cover it
    network = lite0_detector.network_
    assert network.score_baseline.shape == (16, 16)
    assert not network.score_is_map_max
    assert len(lite0_detector.calibration_scores_) == 10


def test_one_image_is_too_few_for_a_baseline(normal_images, synthetic):
    params = {**FLOAT, "n_clusters": 8}
    det = ProtoADDetector(**params).fit(normal_images[:1])
    assert det.network_.score_baseline.numel() == 0
    plain = ProtoADDetector(**params, position_baseline=False).fit(normal_images[:1])
    X = synthetic.X_test[:3]
    np.testing.assert_array_equal(det.score_samples(X), plain.score_samples(X))


def test_baseline_survives_joblib_and_safetensors(pair, synthetic, tmp_path):
    with_baseline, _ = pair
    X = synthetic.X_test[:4]
    expected = with_baseline.score_samples(X)
    joblib.dump(with_baseline, tmp_path / "m.joblib")
    np.testing.assert_array_equal(joblib.load(tmp_path / "m.joblib").score_samples(X), expected)
    persistence.save(with_baseline, tmp_path / "m.safetensors")
    loaded = persistence.load(tmp_path / "m.safetensors")
    np.testing.assert_array_equal(loaded.network_.score_baseline, with_baseline.network_.score_baseline)
    np.testing.assert_allclose(loaded.score_samples(X), expected, rtol=1e-6)


def test_scale_geometry_baseline_is_resampled_to_each_image(synthetic):
    # images of two sizes, scored whole at a scale factor: the baseline sits on
    # the median grid and is resampled to each image's own
    small = [img[:48, :56] for img in synthetic.X_train[:6]]
    images = list(synthetic.X_train[6:]) + small
    det = ProtoADDetector(**{**FLOAT, "image_size": 1.0, "crop_size": None}).fit(images)
    assert det.network_.score_baseline.numel() > 0
    scores = det.score_samples([synthetic.X_test[0], synthetic.X_test[0][:40, :40]])
    assert np.isfinite(scores).all()


def test_position_baseline_must_be_a_bool(normal_images):
    with pytest.raises(ValueError, match="position_baseline must be True or False"):
        ProtoADDetector(**FLOAT, position_baseline="yes").fit(normal_images)
