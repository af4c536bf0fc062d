"""ProtoADDetector(memory=...): patch features cached across fits."""

import json
import os
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.model_selection import GridSearchCV, StratifiedKFold

from skprotoad import ProtoADDetector
from skprotoad.backbones import FeatureExtractor

from .conftest import TINY


@pytest.fixture
def images(normal_images):
    """Six images: enough for the held-out calibration split, quick to fit."""
    return normal_images[:6]


@pytest.fixture
def backbone_calls(monkeypatch):
    """Counts forward passes of any backbone."""
    calls = []
    forward = FeatureExtractor.forward

    def counting(self, x):
        calls.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(FeatureExtractor, "forward", counting)
    return calls


@pytest.fixture
def extractions(monkeypatch):
    """Counts feature extractions (one per fit that misses the cache)."""
    calls = []
    extract = ProtoADDetector._extract_features

    def counting(self, *args, **kwargs):
        calls.append(1)
        return extract(self, *args, **kwargs)

    monkeypatch.setattr(ProtoADDetector, "_extract_features", counting)
    return calls


def _assert_same_fit(a, b):
    np.testing.assert_array_equal(a.prototypes_, b.prototypes_)
    np.testing.assert_array_equal(a.calibration_scores_, b.calibration_scores_)
    assert a.offset_ == b.offset_
    assert a.feature_shape_ == b.feature_shape_


def test_second_fit_reads_the_cache_and_fits_identically(images, tmp_path, backbone_calls):
    ProtoADDetector(**TINY, memory=str(tmp_path)).fit(images)
    assert backbone_calls  # the first fit ran the backbone
    backbone_calls.clear()
    cached = ProtoADDetector(**{**TINY, "n_clusters": 8}, memory=tmp_path).fit(images)
    assert backbone_calls == []
    backbone_calls.clear()
    plain = ProtoADDetector(**{**TINY, "n_clusters": 8}).fit(images)
    _assert_same_fit(cached, plain)


@pytest.mark.parametrize(
    "change",
    [
        {"neighborhood_size": 1},
        {"alignment": "paper"},
        {"layers": (1,)},
        {"image_size": 72},
        {"crop_size": 56},
        {"mean": (0.5, 0.5, 0.5)},
        {"std": (0.25, 0.25, 0.25)},
        {"random_state": 1},  # image order (calibration split) and weights=None init
        {"batch_size": 4},  # the backbone's outputs differ by float rounding
        {"contamination": 0.1},  # not feature-shaping: the same images, same order
    ],
    ids=lambda c: next(iter(c)),
)
def test_feature_shaping_changes_miss_the_cache(images, tmp_path, extractions, change):
    ProtoADDetector(**TINY, memory=tmp_path).fit(images)
    ProtoADDetector(**{**TINY, **change}, memory=tmp_path).fit(images)
    expected_hit = change == {"contamination": 0.1}
    assert len(extractions) == (1 if expected_hit else 2)


def test_the_patches_kept_under_the_cap_are_keyed_by_their_seed(images, tmp_path, extractions):
    # ImageNet weights do not depend on the seed, but the patches max_patches
    # keeps are drawn with it; two images keep their order at both seeds
    params = dict(backbone="efficientnet_lite0", image_size=40, clustering="kmeans",
                  n_clusters=4, n_farthest=0, contamination=0.5, position_baseline=False)
    capped = {**params, "max_patches": 60}
    ProtoADDetector(**capped, random_state=0, memory=tmp_path).fit(images[:2])
    cached = ProtoADDetector(**capped, random_state=1, memory=tmp_path).fit(images[:2])
    _assert_same_fit(cached, ProtoADDetector(**capped, random_state=1).fit(images[:2]))
    assert len(extractions) == 3
    # under the cap the seed shapes nothing: the cache serves other seeds
    ProtoADDetector(**params, random_state=0, memory=tmp_path).fit(images[:2])
    ProtoADDetector(**params, random_state=1, memory=tmp_path).fit(images[:2])
    assert len(extractions) == 4


def test_other_images_miss_the_cache(images, tmp_path, extractions):
    ProtoADDetector(**TINY, memory=tmp_path).fit(images)
    changed = images.copy()
    changed[3, 10, 10, 0] ^= 1  # one pixel
    ProtoADDetector(**TINY, memory=tmp_path).fit(changed)
    ProtoADDetector(**TINY, memory=tmp_path).fit(images[:-1])
    assert len(extractions) == 3
    # the same pixels as PIL images in a list: a key of their own, then a hit
    pil = [Image.fromarray(x) for x in images]
    ProtoADDetector(**TINY, memory=tmp_path).fit(pil)
    ProtoADDetector(**TINY, memory=tmp_path).fit([Image.fromarray(x) for x in images])
    assert len(extractions) == 4


def test_files_are_keyed_by_path_size_and_mtime(images, tmp_path, extractions):
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    cache = tmp_path / "cache"
    first = ProtoADDetector(**TINY, memory=cache).fit(paths)
    again = ProtoADDetector(**TINY, memory=cache).fit([str(p) for p in paths])
    assert len(extractions) == 1
    _assert_same_fit(first, again)
    # rewritten content: another modification time (set explicitly, file
    # systems with coarse timestamps would not tell)
    Image.fromarray(images[0][::-1]).save(paths[0])
    stat = paths[0].stat()
    os.utime(paths[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = ProtoADDetector(**TINY, memory=cache).fit(paths)
    assert len(extractions) == 2
    assert not np.array_equal(changed.prototypes_, first.prototypes_)


def test_weights_file_is_keyed_by_its_size_and_mtime(images, tmp_path, extractions):
    weights = tmp_path / "w.pth"
    net = ProtoADDetector(**TINY).fit(images[:4]).network_
    torch.save(net.embedding.backbone.model.state_dict(), weights)
    params = {**TINY, "weights": str(weights), "memory": tmp_path / "cache"}
    ProtoADDetector(**params).fit(images)
    ProtoADDetector(**params).fit(images)
    assert len(extractions) == 2  # the 4-image fit above, then one for both
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    ProtoADDetector(**params).fit(images)
    assert len(extractions) == 3


def test_a_file_replaced_under_the_same_size_and_mtime_misses(images, tmp_path, extractions):
    """A weights file replaced by another of the same size with the old
    modification time restored (cp -p, rsync -a, an unpacked archive) hit the
    cache: prototypes from the old weights' features, the new backbone."""
    weights = tmp_path / "w.pth"
    state = ProtoADDetector(**TINY).fit(images[:4]).network_.embedding.backbone.model.state_dict()
    torch.save({k: v.clone() for k, v in state.items()}, weights)
    params = {**TINY, "weights": str(weights), "memory": tmp_path / "cache"}
    ProtoADDetector(**params).fit(images)
    assert len(extractions) == 2
    stat = weights.stat()
    changed = {k: v * 2 if v.is_floating_point() else v.clone() for k, v in state.items()}
    torch.save(changed, tmp_path / "x.pth")  # a name as long: torch.save records it
    os.replace(tmp_path / "x.pth", weights)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_size == stat.st_size
    refit = ProtoADDetector(**params).fit(images)
    assert len(extractions) == 3
    _assert_same_fit(refit, ProtoADDetector(**{**params, "memory": None}).fit(images))


def test_palette_images_with_transparency_are_keyed_by_their_palette(images, tmp_path,
                                                                     extractions):
    """Two "PA" images of the same indices and other palettes had one key."""
    def pa(palette):
        image = Image.fromarray(images[0]).convert("RGB").quantize(4)
        image.putpalette(palette)
        return image.convert("PA")
    first = [pa([0, 0, 0, 255, 255, 255] * 128)] * 2
    second = [pa([255, 255, 255, 0, 0, 0] * 128)] * 2
    ProtoADDetector(**TINY, memory=tmp_path).fit(first)
    ProtoADDetector(**TINY, memory=tmp_path).fit(second)
    assert len(extractions) == 2


def test_a_cache_folder_that_cannot_be_created_fits_without_it(images, tmp_path, monkeypatch):
    """An empty read-only folder failed inside joblib with its own traceback."""
    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.warns(UserWarning, match="feature cache cannot be created there"):
        cached = ProtoADDetector(**TINY, memory=tmp_path / "ro").fit(images)
    monkeypatch.undo()
    _assert_same_fit(cached, ProtoADDetector(**TINY).fit(images))


def test_read_only_memory_mapped_cache(images, tmp_path, recwarn):
    memory = joblib.Memory(tmp_path, mmap_mode="r", verbose=0)
    ProtoADDetector(**TINY, memory=memory).fit(images)
    for clustering in ("kmeans", "finch"):
        params = {**TINY, "clustering": clustering, "n_clusters": 8}
        cached = ProtoADDetector(**params, memory=memory).fit(images)
        _assert_same_fit(cached, ProtoADDetector(**params).fit(images))
    assert not [w for w in recwarn if "not writable" in str(w.message)]


def test_only_the_key_and_order_are_hashed(images, tmp_path):
    ProtoADDetector(**TINY, memory=tmp_path).fit(images)
    (entry,) = [p for p in Path(tmp_path).rglob("metadata.json")]
    assert set(json.loads(entry.read_text())["input_args"]) == {"key", "order"}
    assert entry.parent.parent.name == "cached_patch_features"


def test_grid_search_extracts_once_per_fold(normal_images, synthetic, tmp_path, extractions):
    X = np.concatenate([normal_images, synthetic.X_test])
    y = np.r_[np.ones(len(normal_images), int), np.where(synthetic.y_test == 1, -1, 1)]
    grid = dict(
        param_grid={"n_clusters": [4, 16], "sigma": [2.0, 4.0]},
        scoring="roc_auc",
        cv=StratifiedKFold(2, shuffle=True, random_state=0),
        error_score="raise",
    )
    cached = GridSearchCV(ProtoADDetector(**TINY, memory=tmp_path), **grid).fit(X, y)
    assert len(extractions) == 2 + 1  # two folds, then the refit on all of X
    assert np.isfinite(cached.cv_results_["mean_test_score"]).all()


@pytest.mark.parametrize("memory", [5, b"folder", object()])
def test_bad_memory_is_named(images, memory):
    with pytest.raises(ValueError, match="memory must be"):
        ProtoADDetector(**TINY, memory=memory).fit(images)


def test_memory_none_and_location_none_cache_nothing(images, extractions):
    for memory in (None, joblib.Memory(None)):
        ProtoADDetector(**TINY, memory=memory).fit(images)
    assert len(extractions) == 2


def test_scale_geometry_features_are_cached(tmp_path, backbone_calls):
    """A float image_size gives images of several sizes; their features cache too."""
    rng = np.random.default_rng(0)
    mixed = [rng.integers(0, 256, size, dtype=np.uint8) for size in [(48, 80), (64, 40)] * 3]
    params = {**TINY, "image_size": 0.5, "crop_size": None}
    ProtoADDetector(**params, memory=tmp_path).fit(mixed)
    assert backbone_calls
    backbone_calls.clear()
    cached = ProtoADDetector(**params, memory=tmp_path).fit(mixed)
    assert backbone_calls == []
    plain = ProtoADDetector(**params).fit(mixed)
    _assert_same_fit(cached, plain)
    np.testing.assert_array_equal(cached.score_samples(mixed), plain.score_samples(mixed))
