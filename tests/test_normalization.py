"""normalization="image": features scaled per image, Euclidean distance to
prototypes; image_score="projection" / "cosine": the image score read from the
same conv as |x| (1 - max cosine) / 1 - max cosine."""

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skprotoad import ProtoADDetector, export, persistence
from skprotoad._cache import feature_key
from skprotoad._images import ImageSequence
from skprotoad.backbones import create_feature_extractor
from skprotoad.clustering import finch_n_clusters, kmeans, learn_prototypes
from skprotoad.network import PatchEmbedding, ProtoADNetwork, upsample

from .conftest import TINY
from .test_export import _jit_load

IMAGE = {**TINY, "normalization": "image", "image_score": "map"}


@pytest.fixture(scope="module")
def backbone():
    return create_feature_extractor("resnet18", (1, 2), weights=None)


# the default image_score: maps of distances, image scores from projections
SPLIT = {**TINY, "normalization": "image"}
COSINE = {**SPLIT, "image_score": "cosine"}


@pytest.fixture(scope="module")
def image_detector(normal_images):
    return ProtoADDetector(**IMAGE).fit(normal_images)


@pytest.fixture(scope="module")
def split_detector(normal_images):
    return ProtoADDetector(**SPLIT).fit(normal_images)


@pytest.fixture(scope="module")
def cosine_detector(normal_images):
    return ProtoADDetector(**COSINE).fit(normal_images)


# ------------------------------------------------------------------ network


def test_image_features_have_mean_patch_norm_one(backbone):
    x = torch.rand(3, 3, 64, 64)
    x[1] *= 0.2  # a low-contrast image: smaller raw features
    image = PatchEmbedding(backbone, normalization="image")(x)
    patch = PatchEmbedding(backbone, normalization="patch")(x)
    norms = image.norm(dim=1)
    torch.testing.assert_close(norms.mean(dim=(1, 2)), torch.ones(3))
    assert float(norms.std()) > 0.01  # the patches' relative magnitudes stay
    # the directions are the paper's unit features
    torch.testing.assert_close(F.normalize(image, dim=1), patch, atol=1e-5, rtol=0)


def test_image_network_computes_the_distance_to_the_nearest_prototype(backbone):
    embedding = PatchEmbedding(backbone, normalization="image")
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    prototypes = 0.3 * torch.randn(9, 192)
    net = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=0).eval()
    maps, scores = net(x)

    feats = embedding(x).permute(0, 2, 3, 1)  # (N, h, w, C)
    distance = torch.cdist(feats.reshape(-1, 192), prototypes).min(dim=1).values
    expected = upsample(distance.view(2, 1, 16, 16), 4, (64, 64), "center")[:, 0]
    torch.testing.assert_close(maps, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    # stored as given, not normalised
    torch.testing.assert_close(net.prototypes, prototypes)


def test_image_scale_is_per_image_not_per_batch(backbone):
    embedding = PatchEmbedding(backbone, normalization="image")
    net = ProtoADNetwork(embedding, torch.randn(5, 192), None, sigma=4.0).eval()
    x = torch.rand(3, 3, 64, 96)
    x[0] *= 0.1
    with torch.inference_mode():
        together = net(x)[0]
        alone = torch.cat([net(x[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_a_patch_equal_to_a_prototype_is_at_distance_zero(backbone):
    embedding = PatchEmbedding(backbone, normalization="image")
    x = torch.rand(1, 3, 64, 64)
    prototypes = embedding(x)[0].flatten(1).T
    net = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=0)
    # sqrt of a rounding error of |x|^2 - 2 x.p + |p|^2 (|x| ~ 1)
    assert net(x)[1].item() < 1e-2
    assert net(torch.rand(1, 3, 64, 64))[1].item() > 0.1


def test_bad_normalization_is_named(backbone, normal_images):
    with pytest.raises(ValueError, match="normalization must be 'image' or 'patch'"):
        PatchEmbedding(backbone, normalization="layer")
    with pytest.raises(ValueError, match="normalization must be 'image' or 'patch'"):
        ProtoADDetector(**{**TINY, "normalization": "l2"}).fit(normal_images[:4])


# --------------------------------------------------------------- prototypes


def _raw_rows(n=600, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(6, 12))
    X = centers[rng.integers(6, size=n)] + 0.2 * rng.normal(size=(n, 12))
    X *= rng.uniform(0.5, 2.0, size=(n, 1))  # magnitudes the directions ignore
    return X.astype(np.float32)


def _means(X, labels):
    return np.stack([X[labels == k].mean(axis=0) for k in range(labels.max() + 1)])


def test_finch_raw_prototypes_are_means_of_the_directions_clusters():
    X = _raw_rows()
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    labels = finch_n_clusters(unit, 8, random_state=0)
    protos = learn_prototypes(X, n_clusters=8, normalize=False, random_state=0)
    np.testing.assert_allclose(protos, _means(X, labels), atol=1e-5)
    # the same clusters as the unit prototypes
    np.testing.assert_allclose(
        learn_prototypes(X, n_clusters=8, random_state=0),
        F.normalize(torch.from_numpy(_means(unit, labels)), dim=1).numpy(),
        atol=1e-5,
    )


def test_kmeans_raw_prototypes_are_means_of_the_assigned_rows():
    X = _raw_rows()
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    centers = kmeans(unit, 6, random_state=0)
    labels = (unit @ centers.T).argmax(axis=1)
    protos = learn_prototypes(X, method="kmeans", n_clusters=6, normalize=False, random_state=0)
    np.testing.assert_allclose(protos, _means(X, labels), atol=1e-5)
    assert not np.allclose(np.linalg.norm(protos, axis=1), 1.0, atol=1e-3)


# ----------------------------------------------------------------- detector


def test_image_detector_finds_and_localises_defects(image_detector, synthetic):
    scores = -image_detector.score_samples(synthetic.X_test)
    y = synthetic.y_test
    assert scores[y == 1].mean() > scores[y == 0].mean()
    maps = image_detector.anomaly_maps(synthetic.X_test)
    defect = synthetic.masks_test.astype(bool)
    hits = [m[d].mean() > m[~d].mean() for m, d in zip(maps, defect) if d.any()]
    assert np.mean(hits) >= 0.75


def test_image_detector_differs_from_the_patch_detector(image_detector, tiny_detector, synthetic):
    assert image_detector.network_.embedding.normalization == "image"
    image = -image_detector.score_samples(synthetic.X_test)
    patch = -tiny_detector.score_samples(synthetic.X_test)
    assert not np.allclose(image, patch)
    # distances, not 1 - cosine: prototypes keep their magnitude
    norms = np.linalg.norm(image_detector.prototypes_, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)


def test_image_detector_round_trips_and_exports(image_detector, synthetic, tmp_path):
    X = synthetic.X_test[:4]
    expected = image_detector.score_samples(X)
    loaded = persistence.load(persistence.save(image_detector, tmp_path / "m.safetensors"))
    assert loaded.normalization == "image"
    np.testing.assert_allclose(loaded.score_samples(X), expected, atol=1e-6)
    meta = _check_torchscript(image_detector, X, tmp_path)
    assert meta["normalization"] == "image" and "distance" in meta["outputs"]["maps"]


def _check_torchscript(detector, X, tmp_path):
    """Export ``detector`` to TorchScript, check its outputs on ``X`` and
    return the file's metadata."""
    extra = {"skprotoad.json": ""}
    module = _jit_load(export.to_torchscript(detector, tmp_path / "m.pt"), _extra_files=extra)
    with torch.inference_mode():
        maps, scores = module(torch.from_numpy(export.preprocess(detector, X)))
    np.testing.assert_allclose(-scores.numpy(), detector.score_samples(X), atol=1e-4)
    np.testing.assert_allclose(maps.numpy(), detector.anomaly_maps(X), atol=1e-4)
    return json.loads(extra["skprotoad.json"])


@pytest.mark.parametrize("fixture", ["image_detector", "split_detector", "cosine_detector"])
def test_image_normalization_exports_to_onnx(fixture, request, synthetic, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    detector = request.getfixturevalue(fixture)
    X = synthetic.X_test[:3]
    session = ort.InferenceSession(str(export.to_onnx(detector, tmp_path / "m.onnx")))
    name = session.get_inputs()[0].name
    maps, scores = session.run(None, {name: export.preprocess(detector, X)})
    np.testing.assert_allclose(-scores, detector.score_samples(X), atol=1e-4)
    np.testing.assert_allclose(maps, detector.anomaly_maps(X), atol=1e-4)


def test_feature_cache_keys_differ_by_normalization(normal_images):
    images = ImageSequence(normal_images[:2])
    keys = [
        feature_key(ProtoADDetector(**{**TINY, "normalization": n}), images, seed=0)
        for n in ("patch", "image")
    ]
    assert keys[0] != keys[1]


# ------------------------------------- image_score="projection" / "cosine"


def _readout(features, prototypes, image_score):
    """Brute force: per-patch |x| - max_k x.p_k / |p_k|, or 1 - max cosine."""
    projection = torch.einsum("nchw,kc->nkhw", features, F.normalize(prototypes, dim=1)).amax(1)
    norms = features.norm(dim=1)
    return norms - projection if image_score == "projection" else 1 - projection / norms


@pytest.mark.parametrize("image_score", ["projection", "cosine"])
def test_split_image_score_is_the_max_of_its_smoothed_readout(image_score, backbone):
    embedding = PatchEmbedding(backbone, normalization="image")
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64)
    prototypes = 0.3 * torch.randn(9, 192)
    split = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=2.0, image_score=image_score)
    distance = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=2.0)
    maps, scores = split(x)
    torch.testing.assert_close(maps, distance(x)[0])  # the map is unchanged

    patch_scores = _readout(embedding(x), prototypes, image_score)
    score_maps = split.smoothing(upsample(patch_scores[:, None], 4, (64, 64), "center")[:, 0])
    torch.testing.assert_close(scores, score_maps.flatten(1).amax(1), atol=1e-5, rtol=0)
    assert not torch.allclose(scores, maps.flatten(1).amax(1))
    assert not split.score_is_map_max and distance.score_is_map_max


def test_projection_weights_the_cosine_distance_by_the_patch_norm(backbone):
    embedding = PatchEmbedding(backbone, normalization="image")
    torch.manual_seed(2)
    x = torch.rand(2, 3, 64, 64)
    features = embedding(x)
    prototypes = 0.3 * torch.randn(9, 192)
    norms = features.norm(dim=1)
    projection = _readout(features, prototypes, "projection")
    cosine = _readout(features, prototypes, "cosine")
    torch.testing.assert_close(projection, norms * cosine, atol=1e-5, rtol=1e-5)
    # so the two rank patches differently unless every norm is the same
    assert not torch.equal(projection.flatten().argsort(), cosine.flatten().argsort())
    # the paper's network with the same prototypes scores images by cosine alone
    paper = ProtoADNetwork(PatchEmbedding(backbone), prototypes, (64, 64), sigma=2.0)
    split = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=2.0, image_score="cosine")
    torch.testing.assert_close(split(x)[1], paper(x)[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("image_score", ["projection", "cosine"])
def test_split_image_score_with_unit_features_is_the_map_maximum(image_score, normal_images):
    patch = ProtoADDetector(**{**TINY, "image_score": "map"}).fit(normal_images)
    split = ProtoADDetector(**{**TINY, "image_score": image_score}).fit(normal_images)
    assert split.network_.image_score == "map"  # no second readout needed
    np.testing.assert_array_equal(
        split.score_samples(normal_images), patch.score_samples(normal_images)
    )
    assert split.pixel_threshold_ == -split.offset_


def test_split_detector_maps_are_the_distance_maps(split_detector, image_detector, synthetic):
    X = synthetic.X_test
    np.testing.assert_allclose(
        split_detector.anomaly_maps(X), image_detector.anomaly_maps(X), atol=1e-6
    )
    maxima = split_detector.anomaly_maps(X).max(axis=(1, 2))
    assert not np.allclose(-split_detector.score_samples(X), maxima)


def test_split_detector_calibrates_its_pixel_threshold_on_map_maxima(normal_images):
    det = ProtoADDetector(**{**SPLIT, "contamination": 0.25}).fit(normal_images)
    maxima = det.anomaly_maps(normal_images).max(axis=(1, 2))
    scores = -det.score_samples(normal_images)
    assert det.pixel_threshold_ == pytest.approx(np.quantile(maxima, 0.75), abs=2e-5 * maxima.max())  # up to the tie margin
    assert -det.offset_ == pytest.approx(np.quantile(scores, 0.75), abs=2e-5 * maxima.max())
    assert det.pixel_threshold_ != pytest.approx(-det.offset_)
    # the raw masks at the pixel threshold, and the ones that follow the verdicts
    raw = det.predict_masks(normal_images, threshold=det.pixel_threshold_)
    np.testing.assert_array_equal(raw.any(axis=(1, 2)), maxima > det.pixel_threshold_)
    masks = det.predict_masks(normal_images)
    np.testing.assert_array_equal(masks.any(axis=(1, 2)), det.predict(normal_images) == -1)


def test_split_detector_with_auto_contamination_holds_out_images(split_detector):
    # 12 images: five folds of 2 held out in turn, both thresholds from
    # their 10 scores (with so few, the conformal threshold is their maximum)
    assert len(split_detector.calibration_scores_) == 10
    # up to the tie margin, a fraction of the larger of the scores and the
    # map maxima (whose largest is about the pixel threshold here)
    margin = 2e-5 * max(split_detector.pixel_threshold_, split_detector.calibration_scores_.max())
    assert -split_detector.offset_ == pytest.approx(split_detector.calibration_scores_.max(),
                                                    abs=margin)
    assert split_detector.pixel_threshold_ > 0


@pytest.mark.parametrize(
    "fixture, meaning",
    [("split_detector", "|x| (1 - max cosine)"), ("cosine_detector", "smoothed 1 - max cosine")],
)
def test_split_detector_round_trips_and_exports(fixture, meaning, request, synthetic, tmp_path):
    detector = request.getfixturevalue(fixture)
    X = synthetic.X_test[:4]
    expected = detector.score_samples(X)
    for loaded in (
        persistence.load(persistence.save(detector, tmp_path / "m.safetensors")),
        pickle.loads(pickle.dumps(detector)),
    ):
        assert loaded.image_score == detector.image_score
        assert loaded.network_.image_score == detector.image_score
        assert loaded.pixel_threshold_ == detector.pixel_threshold_
        np.testing.assert_allclose(loaded.score_samples(X), expected, atol=1e-6)
    meta = _check_torchscript(detector, X, tmp_path)
    assert meta["image_score"] == detector.image_score and meaning in meta["outputs"]["scores"]
    assert meta["threshold"] == -detector.offset_
    assert meta["pixel_threshold"] == detector.pixel_threshold_


def test_saved_split_detector_without_its_pixel_threshold_is_refused(split_detector, tmp_path):
    from .test_persistence import _rewrite

    saved = persistence.save(split_detector, tmp_path / "m.safetensors")
    path = _rewrite(saved, tmp_path / "edited.safetensors",
                    config=lambda c: c["fitted"].pop("pixel_threshold_"))
    with pytest.raises(ValueError, match="pixel_threshold_' must be set exactly"):
        persistence.load(path)


def test_image_score_is_not_part_of_the_feature_cache_key(normal_images):
    images = ImageSequence(normal_images[:2])
    keys = [
        feature_key(ProtoADDetector(**{**SPLIT, "image_score": s}), images, seed=0)
        for s in ("map", "cosine", "projection")
    ]
    assert keys[0] == keys[1] == keys[2]  # a grid search over it extracts the features once


@pytest.mark.parametrize("bad", ["max", None, 1])
def test_bad_image_score_is_refused(bad, normal_images):
    with pytest.raises(ValueError, match="image_score must be 'projection', 'cosine' or 'map'"):
        ProtoADDetector(**{**TINY, "image_score": bad}).fit(normal_images[:4])
