"""Checks of the benchmark's reference PatchCore and PaDiM on tiny synthetic data."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from anchors import (  # noqa: E402
    PaDiM,
    PatchCore,
    gaussian_statistics,
    greedy_coreset,
    join_stages,
    local_average,
    mahalanobis,
    nearest_distance,
)

STRIDES = (4, 8)
CROP = (32, 32)


def stage_maps(rng, n, channels=(3, 5), size=8):
    """Random stage maps (finest first) as the backbone would return them."""
    sides = [size * STRIDES[0] // s for s in STRIDES]
    return [
        torch.from_numpy(rng.normal(size=(n, c, h, h)).astype(np.float32))
        for c, h in zip(channels, sides)
    ]


def test_gaussian_statistics_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 2, 3, 4))
    mean, cov = gaussian_statistics([torch.from_numpy(x[:3]), torch.from_numpy(x[3:])], eps=0.01)
    for i in range(2):
        for j in range(3):
            ref = np.cov(x[:, i, j], rowvar=False) + 0.01 * np.eye(4)
            np.testing.assert_allclose(cov[i, j].numpy(), ref, atol=1e-10)
            np.testing.assert_allclose(mean[i, j].numpy(), x[:, i, j].mean(0), atol=1e-12)


def test_mahalanobis_matches_numpy():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(20, 2, 2, 3))
    test = rng.normal(size=(4, 2, 2, 3))
    mean, cov = gaussian_statistics([torch.from_numpy(train)])
    got = mahalanobis(torch.from_numpy(test), mean, torch.linalg.inv(cov)).numpy()
    for n in range(4):
        for i in range(2):
            for j in range(2):
                c = np.cov(train[:, i, j], rowvar=False) + 0.01 * np.eye(3)
                d = test[n, i, j] - train[:, i, j].mean(0)
                assert got[n, i, j] == pytest.approx(np.sqrt(d @ np.linalg.inv(c) @ d), rel=1e-9)


def test_greedy_coreset_picks_farthest_point_each_step():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 6))
    chosen = greedy_coreset(torch.from_numpy(X), 15, projection_dim=None, start=0).numpy()
    assert chosen[0] == 0
    d = np.linalg.norm(X[:, None] - X[None], axis=-1)
    for k in range(1, len(chosen)):
        nearest = d[:, chosen[:k]].min(axis=1)
        assert chosen[k] == np.argmax(nearest)
    assert len(set(chosen.tolist())) == len(chosen)


def test_greedy_coreset_projects_to_the_requested_dimension():
    X = torch.randn(50, 300, dtype=torch.float64)
    chosen = greedy_coreset(X, 5, projection_dim=16, seed=0)
    assert chosen.shape == (5,) and len(set(chosen.tolist())) == 5


def test_nearest_distance_is_brute_force():
    rng = np.random.default_rng(3)
    q, bank = rng.normal(size=(30, 5)), rng.normal(size=(11, 5))
    got = nearest_distance(torch.from_numpy(q), torch.from_numpy(bank), block=7).numpy()
    ref = np.linalg.norm(q[:, None] - bank[None], axis=-1).min(axis=1)
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_local_average_is_the_in_map_3x3_mean():
    x = torch.arange(2 * 4 * 5, dtype=torch.float64).view(1, 2, 4, 5)
    got = local_average([x])[0]
    for i in range(4):
        for j in range(5):
            window = x[0, :, max(0, i - 1) : i + 2, max(0, j - 1) : j + 2]
            torch.testing.assert_close(got[0, :, i, j], window.mean(dim=(1, 2)))


def test_join_stages_is_the_protoad_embedding_before_normalisation():
    from skprotoad.backbones import create_feature_extractor
    from skprotoad.network import IMAGENET_MEAN, IMAGENET_STD, PatchEmbedding

    backbone = create_feature_extractor("resnet18", (1, 2), weights=None)
    images = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode():
        ours = F.normalize(join_stages(backbone((images - mean) / std), backbone.strides), dim=1)
        theirs = PatchEmbedding(backbone)(images)
    torch.testing.assert_close(ours, theirs)


def _defect(maps, rows=slice(3, 5), cols=slice(2, 4)):
    """Copy of ``maps`` with a bright blob in the finest stage."""
    out = [m.clone() for m in maps]
    out[0][:, :, rows, cols] += 6.0
    return out


@pytest.mark.parametrize("kind", ["patchcore", "padim"])
def test_methods_find_a_synthetic_defect(kind):
    rng = np.random.default_rng(4)
    train = stage_maps(rng, 40)
    test = stage_maps(rng, 4)
    test = [torch.cat([m[:2], d[2:]]) for m, d in zip(test, _defect(test))]
    if kind == "patchcore":
        model = PatchCore(STRIDES, CROP, coreset_ratio=0.25, projection_dim=4, sigma=1.0)
        feats = model.patch_features(train)
        model.fit(feats.reshape(-1, feats.shape[-1]))
        n_patches = feats.shape[0] * feats.shape[1] * feats.shape[2]
        assert model.memory_bank.shape[0] == round(0.25 * n_patches)
    else:
        model = PaDiM(STRIDES, 8, CROP, n_features=6, sigma=1.0).fit([train])
        assert model.inv_cov.shape == (8, 8, 6, 6)
    with torch.inference_mode():
        maps, scores = model(test)
    assert maps.shape == (4, *CROP)
    assert scores[2:].min() > scores[:2].max()
    # the defect spans patches 3-4 x 2-3 at stride 4: pixels ~12-16 x ~8-12
    peak = np.unravel_index(int(maps[2].argmax()), CROP)
    assert 8 <= peak[0] <= 20 and 4 <= peak[1] <= 16
    torch.testing.assert_close(scores, maps.flatten(1).amax(dim=1))
