"""The scale geometry: a float ``image_size`` resizes every image by one factor,
keeping its aspect ratio, and scores the whole image."""

import pickle

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from skprotoad import ProtoADDetector
from skprotoad._images import (
    ImageSequence,
    crop_map_to_input,
    load_image,
    resize_and_crop,
    scaled_size,
)
from skprotoad.backbones import create_feature_extractor
from skprotoad.network import GaussianSmoothing, PatchEmbedding, ProtoADNetwork

from .conftest import TINY

# TINY in the scale geometry: resnet18 stages 1, 2 (strides 4, 8), so sizes are
# multiples of 8 and these ones are kept as they are.
SCALE = {**TINY, "image_size": 1.0, "crop_size": None}
SIZES = [(48, 80), (64, 40), (48, 80), (56, 56), (64, 40), (48, 80), (64, 40), (56, 56)]


def _textures(sizes, seed=0):
    """Uniform noisy grey-ish images of the given sizes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(90, 150, size=(*s, 3), dtype=np.uint8) for s in sizes]


@pytest.fixture(scope="module")
def mixed():
    return _textures(SIZES)


@pytest.fixture(scope="module")
def scale_detector(mixed):
    # 8 images, contamination="auto": 2 of them are held out to calibrate
    return ProtoADDetector(**SCALE).fit(mixed)


# ------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"image_size": 0.75, "crop_size": 224}, ValueError, "crop_size must be None"),
        ({"image_size": 0.75, "crop_size": 32}, ValueError, "crop_size must be None"),
        ({"image_size": 0.0, "crop_size": None}, ValueError, r"scale factor in \(0, 4\]"),
        ({"image_size": -0.5, "crop_size": None}, ValueError, "scale factor"),
        ({"image_size": 4.5, "crop_size": None}, ValueError, "scale factor"),
        ({"image_size": 256.0, "crop_size": None}, ValueError, "pass an int"),
        ({"image_size": float("nan"), "crop_size": None}, ValueError, "scale factor"),
        ({"image_size": True, "crop_size": None}, TypeError, "image_size"),
        ({"image_size": (0.5, 0.5), "crop_size": None}, TypeError, "image_size"),
    ],
)
def test_bad_scale_geometry_is_named(mixed, params, error, match):
    with pytest.raises(error, match=match):
        ProtoADDetector(**{**TINY, **params}).fit(mixed)


def test_scale_factor_accepts_numpy_floats_and_four():
    for value in (np.float64(0.5), np.float32(0.75), 4.0, 1e-3):
        ProtoADDetector(image_size=value, crop_size=None)._check_params()


def test_int_image_size_without_crop_scores_the_whole_squashed_image(mixed):
    det = ProtoADDetector(**{**TINY, "image_size": (48, 72), "crop_size": None}).fit(mixed)
    assert det.anomaly_maps(mixed[:2]).shape == (2, 48, 72)
    (full,) = det.anomaly_maps(mixed[:1], output="input")
    assert full.shape == SIZES[0] and not np.isnan(full).any()


# -------------------------------------------------------------- sizes, batches


def test_scaled_sizes_are_stride_multiples_of_at_least_32():
    assert scaled_size((300, 103), 0.75, 16) == (224, 80)  # 225 -> 224, 77.25 -> 80
    assert scaled_size((403, 632), 0.75, 16) == (304, 480)
    assert scaled_size((20, 500), 0.75, 16) == (32, 368)  # 15 -> at least 32
    assert scaled_size((20, 20), 1.0, 8) == (32, 32)
    assert scaled_size((20, 20), 1.0, 64) == (64, 64)  # at least one cell
    assert scaled_size((48, 80), 1.0, 8) == (48, 80)
    # the benchmark's own rule (benchmarks/bench_geometry.py, "native")
    for h, w in [(222, 103), (403, 632), (300, 401), (257, 129)]:
        expected = (max(32, int(round(h * 0.75 / 16)) * 16), max(32, int(round(w * 0.75 / 16)) * 16))
        assert scaled_size((h, w), 0.75, 16) == expected


def test_batches_group_images_of_one_size(mixed):
    images = ImageSequence(mixed)
    chunks = list(images.batches(2, 1.0, None, multiple=8))
    for chunk, batch in chunks:
        assert len(chunk) <= 2 and len({SIZES[i] for i in chunk}) == 1
        assert tuple(batch.shape) == (len(chunk), 3, *SIZES[chunk[0]])
        for i, tensor in zip(chunk, batch):
            torch.testing.assert_close(tensor, resize_and_crop(load_image(mixed[i]), SIZES[i], None))
    # groups in order of first appearance, each in the given order
    assert [c for c, _ in chunks] == [[0, 2], [5], [1, 4], [6], [3, 7]]
    assert sorted(i for c, _ in chunks for i in c) == list(range(len(mixed)))
    assert images.original_size(1) == (64, 40)


def test_batches_follow_a_given_order_within_each_size(mixed):
    images = ImageSequence(mixed)
    # 0.75, multiples of 8: (48, 80) -> (36, 60) -> (32, 64) (ties round to even);
    # (64, 40) -> (48, 30) -> (48, 32); (56, 56) -> (42, 42) -> (40, 40)
    plan = images.plan(4, 0.75, None, indices=[7, 1, 3, 0], multiple=8)
    assert plan == [[7, 3], [1], [0]]
    sizes = images.input_sizes(0.75, None, 8, [7, 1, 0])
    assert sizes == [(40, 40), (48, 32), (32, 64)]
    shapes = [tuple(b.shape[-2:]) for _, b in images.batches(4, 0.75, None, [7, 1, 3, 0], 8)]
    assert shapes == [(40, 40), (48, 32), (32, 64)]


def test_scale_map_back_to_the_input_covers_the_whole_image():
    # a map that is its own y coordinate, in model-input pixels
    rows = np.arange(32, dtype=np.float32)[:, None].repeat(48, axis=1)
    out = crop_map_to_input(rows, (50, 70), 0.66, None)
    assert out.shape == (50, 70) and not np.isnan(out).any()
    # original pixel centre y maps to (y + 0.5) * 32 / 50 - 0.5 (clamped at the border)
    expected = np.clip((np.arange(50) + 0.5) * 32 / 50 - 0.5, 0, 31)
    np.testing.assert_allclose(out[:, 0], expected, atol=1e-5)


# ------------------------------------------------------------------ network


@pytest.fixture(scope="module")
def embedding():
    return PatchEmbedding(create_feature_extractor("resnet18", (1, 2), weights=None))


def test_free_size_network_equals_the_fixed_one_on_its_size(embedding):
    torch.manual_seed(0)
    prototypes = torch.randn(9, 192)
    x = torch.rand(2, 3, 64, 64)
    fixed = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=4.0).eval()
    free = ProtoADNetwork(embedding, prototypes, None, sigma=4.0).eval()
    with torch.inference_mode():
        (fm, fs), (gm, gs) = fixed(x), free(x)
    assert torch.equal(fm, gm) and torch.equal(fs, gs)
    assert free.input_size is None


def test_free_size_network_takes_any_size(embedding):
    torch.manual_seed(0)
    net = ProtoADNetwork(embedding, torch.randn(9, 192), None, sigma=2.0).eval()
    with torch.inference_mode():
        for size in ((48, 80), (64, 40), (40, 40)):
            maps, scores = net(torch.rand(2, 3, *size))
            assert tuple(maps.shape) == (2, *size)
            torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    with pytest.raises(ValueError, match="input_size"):
        net.head(torch.rand(1, 192, 8, 8))


@pytest.mark.parametrize("size", [(31, 64), (12, 10), (40, 40)])
def test_smoothing_of_other_sizes_matches_scipy(size):
    maps = np.random.default_rng(1).random((2, *size)).astype(np.float32)
    for smoothing in (GaussianSmoothing(3.0, None), GaussianSmoothing(3.0, (40, 40))):
        ours = smoothing(torch.from_numpy(maps)).numpy()
        for m, o in zip(maps, ours):
            ref = gaussian_filter(m.astype(np.float64), sigma=3.0, mode="reflect")
            np.testing.assert_allclose(o, ref, atol=1e-5)


# ----------------------------------------------------------------- detector


def test_fit_on_mixed_sizes_holds_out_for_auto(scale_detector, mixed):
    det = scale_detector
    assert det.n_train_images_ == 8 and len(det.calibration_scores_) == 2
    assert det.feature_shape_ == (None, None, 192)
    assert det.network_.input_size is None
    assert -det.offset_ >= np.median(det.calibration_scores_)
    assert np.isfinite(det.calibration_scores_).all()


def test_scores_equal_scoring_each_image_alone(scale_detector, mixed):
    together = scale_detector.score_samples(mixed)
    alone = [scale_detector.score_samples([image])[0] for image in mixed]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    labels = scale_detector.predict(mixed)
    np.testing.assert_array_equal(labels == -1, scale_detector.decision_function(mixed) < 0)


def test_maps_have_each_images_size(scale_detector):
    images = _textures([(48, 80), (70, 44), (20, 33)], seed=3)
    crop = scale_detector.anomaly_maps(images)
    # multiples of 8, at least 32
    assert [m.shape for m in crop] == [(48, 80), (72, 48), (32, 32)]
    assert all(m.dtype == np.float32 for m in crop)
    np.testing.assert_allclose(
        scale_detector.score_samples(images), [-m.max() for m in crop], rtol=1e-6
    )
    full = scale_detector.anomaly_maps(images, output="input")
    assert [m.shape for m in full] == [(48, 80), (70, 44), (20, 33)]
    assert not any(np.isnan(m).any() for m in full)
    for c, f in zip(crop, full):
        assert c.min() - 1e-6 <= f.min() and f.max() <= c.max() + 1e-6
    masks = scale_detector.predict_masks(images)
    assert [m.shape for m in masks] == [(48, 80), (72, 48), (32, 32)]
    assert all(m.dtype == bool for m in masks)
    masks = scale_detector.predict_masks(images, output="input", threshold=-1.0)
    assert [m.shape for m in masks] == [(48, 80), (70, 44), (20, 33)]
    assert all(m.all() for m in masks)


def test_an_array_batch_works_in_scale_mode(scale_detector):
    X = np.stack(_textures([(48, 80)] * 3, seed=4))
    maps = scale_detector.anomaly_maps(X)
    assert isinstance(maps, list) and [m.shape for m in maps] == [(48, 80)] * 3


def test_float_contamination_and_few_images(mixed):
    det = ProtoADDetector(**{**SCALE, "contamination": 0.25}).fit(mixed)
    assert np.mean(det.predict(mixed) == -1) == pytest.approx(0.25, abs=1 / 8 + 1e-9)
    assert len(det.calibration_scores_) == 0
    few = ProtoADDetector(**SCALE).fit(mixed[:3])
    np.testing.assert_allclose(-few.offset_, -few.score_samples(mixed[:3]).min(), rtol=1e-5)


def test_too_many_clusters_names_the_varying_sizes(mixed):
    with pytest.raises(ValueError, match=r"more than the \d+ training patches \(6 images of varying sizes, after holding out 2"):
        ProtoADDetector(**{**SCALE, "n_clusters": 5000}).fit(mixed)


def test_changing_the_geometry_after_fit_is_refused(scale_detector, mixed):
    det = pickle.loads(pickle.dumps(scale_detector))
    det.set_params(image_size=64, crop_size=64)
    with pytest.raises(ValueError, match="changed after fit"):
        det.score_samples(mixed[:1])


def test_pickle_round_trip(scale_detector, mixed):
    loaded = pickle.loads(pickle.dumps(scale_detector))
    assert loaded.network_.input_size is None
    for a, b in zip(loaded.anomaly_maps(mixed[:3]), scale_detector.anomaly_maps(mixed[:3])):
        np.testing.assert_array_equal(a, b)
    assert loaded.feature_shape_ == scale_detector.feature_shape_


# ------------------------------------------------------------- localization


@pytest.fixture(scope="module")
def tile_detector():
    """ImageNet features, scale 0.5, trained on two sizes and aspects."""
    from skprotoad.datasets import make_defect_images

    wide, _, _ = make_defect_images(
        n_samples=5, image_size=(120, 240), anomaly_ratio=0.0, random_state=5
    )
    tall, _, _ = make_defect_images(
        n_samples=4, image_size=(176, 112), anomaly_ratio=0.0, random_state=6
    )
    det = ProtoADDetector(
        image_size=0.5, crop_size=None, clustering="kmeans", n_clusters=32,
        neighborhood_size=1, random_state=0,
    ).fit(list(wide[:4]) + list(tall))
    return det, wide[4]


@pytest.mark.parametrize("centre", [(60, 170), (30, 50)])
def test_a_blob_lands_where_it_is_in_input_maps(tile_detector, centre):
    det, image = tile_detector
    image = image.copy()
    rows, cols = np.mgrid[:120, :240]
    image[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 9**2] = 20
    (crop,) = det.anomaly_maps([image])
    # 0.5 x (120, 240) = (60, 120), rounded to multiples of 16: (64, 128)
    assert crop.shape == (64, 128)
    (heat,) = det.anomaly_maps([image], output="input")
    assert heat.shape == (120, 240) and not np.isnan(heat).any()
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    # tolerance: a few model-input pixels (efficientnet's deeper stages look
    # up-left of their grid point), twice that in input pixels
    assert abs(peak[0] - centre[0]) <= 10 and abs(peak[1] - centre[1]) <= 10
    (mask,) = det.predict_masks([image], output="input", threshold=heat.max() * 0.9)
    ys, xs = np.nonzero(mask)
    assert mask[peak]
    assert abs(ys.mean() - centre[0]) <= 12 and abs(xs.mean() - centre[1]) <= 12
