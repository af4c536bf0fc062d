"""contamination="auto": the folds held out in turn, and the in-place moves of
the feature array that let each clustering see the other images only."""

import copy

import numpy as np
import pytest
import torch

from skprotoad import ProtoADDetector, _calibration, _features, clustering
from skprotoad._features import PatchFeatures, _swap_blocks
from skprotoad.datasets import make_defect_dataset
from skprotoad.preprocessing import model_inputs
from skprotoad.thresholds import calibration_folds, expected_false_alarm_rate

from .conftest import TINY


@pytest.mark.parametrize("clustering", ["finch", "kmeans"])
def test_each_fold_is_scored_by_prototypes_learned_without_it(
    normal_images, monkeypatch, clustering
):
    fits = []
    fit_network = _features.fit_network

    def recording(detector, embedding, patches, random_state, device, shared=None):
        same_draws = copy.deepcopy(random_state)
        network = fit_network(detector, embedding, patches, random_state, device, shared)
        # the clustering started from the first search's neighbours is the
        # one that searching this fold's patches afresh would give
        afresh = fit_network(detector, embedding, patches.copy(), same_draws, device)
        torch.testing.assert_close(network.prototypes, afresh.prototypes, rtol=0, atol=0)
        fits.append((patches.copy(), network, shared))
        return network

    monkeypatch.setattr(_features, "fit_network", recording)
    det = ProtoADDetector(**{**TINY, "random_state": 3, "clustering": clustering}).fit(
        normal_images
    )
    folds = calibration_folds(len(normal_images), random_state=3)
    assert len(folds) > 1 and len(fits) == 1 + len(folds)
    # the first clustering is the final one, on every image in fit's order:
    # the first fold's images last
    all_patches = fits[0][0]
    # FINCH: one search of all patches' neighbours; each fold's clustering
    # keeps them but for the patches whose neighbour lay in the fold, and
    # starts its second level from the final clustering's (equal to a search
    # afresh: asserted above)
    if clustering == "finch":
        assert all(shared is not None for *_, shared in fits)
        searched_again = [(shared.indices < 0).sum() / len(shared.indices)
                          for *_, shared in fits[1:]]
        assert max(searched_again) < 0.1 and any(searched_again)
        assert all(len(shared.second_level.labels) == len(patches)
                   for patches, _, shared in fits)
    else:
        assert all(neighbors is None for *_, neighbors in fits)
    per_image = len(all_patches) // len(normal_images)
    order = [*folds[0][0], *folds[0][1]]
    rows = {image: all_patches[k * per_image : (k + 1) * per_image] for k, image in enumerate(order)}
    start = 0
    for (fit_part, held_out), (patches, network, _) in zip(folds, fits[1:]):
        assert not set(fit_part) & set(held_out)
        np.testing.assert_array_equal(patches, np.concatenate([rows[i] for i in fit_part]))
        x = torch.cat([b for _, b in model_inputs(normal_images[held_out], 64, 64, 8)])
        with torch.inference_mode():
            scores = network(x)[1].numpy()
        # the held-out features went through the joined head, the images
        # through the network's stage-wise products: equal to float rounding
        np.testing.assert_allclose(det.calibration_scores_[start : start + len(held_out)], scores,
                                   rtol=1e-5, atol=1e-6)
        start += len(held_out)
    assert start == len(det.calibration_scores_)


def test_the_shared_search_leaves_the_final_prototypes_as_a_search_of_their_own(
    normal_images, monkeypatch
):
    # the drawn (approximate) search at every level, so that the draws count
    monkeypatch.setattr(clustering, "EXACT_NEIGHBORS_MAX_SAMPLES", 50)
    params = {**TINY, "clustering": "finch"}
    shared = ProtoADDetector(**params).fit(normal_images)
    monkeypatch.setattr(_features, "shared_first_neighbors", lambda *args: None)
    alone = ProtoADDetector(**params).fit(normal_images)
    torch.testing.assert_close(shared.network_.prototypes, alone.network_.prototypes,
                               rtol=0, atol=0)
    # the calibration clusterings did use the shared search
    assert not np.array_equal(shared.calibration_scores_, alone.calibration_scores_)


def test_aligned_images_search_lost_neighbours_in_the_shared_lists(monkeypatch):
    """Patches of aligned parts resemble the same place in other images, so
    each fold takes many patches' neighbours: they are searched again in
    the shared search's lists, never by a new search of all patches."""
    monkeypatch.setattr(clustering, "EXACT_NEIGHBORS_MAX_SAMPLES", 50)
    rng = np.random.default_rng(0)
    part = rng.uniform(0, 1, size=(64, 64, 3))
    images = np.clip(part + 0.02 * rng.standard_normal((20, 64, 64, 3)), 0, 1)
    searched, in_lists = [], []
    ivf, lists_search = clustering._first_neighbors_ivf, clustering._first_neighbors_in_lists

    def recording_ivf(X, **kwargs):
        searched.append(X.shape[0])
        return ivf(X, **kwargs)

    def recording_lists(X, rows, lists, **kwargs):
        in_lists.append((X.shape[0], len(rows)))
        return lists_search(X, rows, lists, **kwargs)

    monkeypatch.setattr(clustering, "_first_neighbors_ivf", recording_ivf)
    monkeypatch.setattr(clustering, "_first_neighbors_in_lists", recording_lists)
    det = ProtoADDetector(**{**TINY, "clustering": "finch", "random_state": 0}).fit(images)
    n_patches = 20 * 16 * 16
    folds = calibration_folds(20, random_state=0)
    fold_patches = [n_patches - len(held_out) * 16 * 16 for _, held_out in folds]
    assert searched.count(n_patches) == 1
    assert not set(searched) & set(fold_patches)
    assert [n for n, _ in in_lists] == fold_patches
    # a fifth of the patches had their neighbour in the fold
    assert all(0.05 < missing / n < 0.5 for n, missing in in_lists)
    assert np.isfinite(det.calibration_scores_).all() and len(det.calibration_scores_) == 20


@pytest.mark.parametrize("n_images", [5, 8, 10, 13, 37, 100, 104, 119, 200, 494, 495, 761])
def test_folds_are_disjoint_and_enough_for_the_target_when_possible(n_images):
    folds = calibration_folds(n_images, random_state=0)
    held = [i for _, held_out in folds for i in held_out]
    assert len(held) == len(set(held))
    for fit_part, held_out in folds:
        assert sorted([*fit_part, *held_out]) == list(range(n_images))
        assert len(held_out) == len(folds[0][1])
    assert 1 <= len(folds) <= _calibration.MAX_FOLDS
    if n_images >= _calibration.images_needed():
        assert expected_false_alarm_rate(len(held))[0] <= _calibration.TARGET_FALSE_ALARM_RATE
        # no more folds than the target needs: one fewer would not reach it
        fewer = len(held) - len(folds[0][1])
        assert len(folds) == 1 or fewer < _calibration.CALIBRATION_IMAGES_NEEDED
    else:
        assert len(folds) == min(_calibration.MAX_FOLDS, n_images // len(folds[0][1]))


def test_every_set_from_the_count_needed_on_holds_enough_images_out():
    """A fifth rounded up left room for four folds only: 104 images held out
    84, and fit warned to use at least 100 images."""
    needed = _calibration.images_needed()
    short = [n for n in range(needed, 1200)
             if sum(map(len, _calibration.folds("auto", n))) < _calibration.CALIBRATION_IMAGES_NEEDED]
    assert short == []


def test_too_few_images_for_the_target_are_named_with_the_count_needed(normal_images):
    with pytest.warns(_calibration.CalibrationWarning,
                      match=f"at least {_calibration.images_needed()} images"):
        ProtoADDetector(**TINY).fit(normal_images[:6])


@pytest.mark.parametrize("first, mid, end", [(0, 3, 10), (2, 9, 10), (1, 5, 8), (4, 4, 9),
                                             (0, 10, 10), (3, 6, 9)])
def test_swap_blocks_trades_the_two_blocks_in_place(first, mid, end):
    array = np.arange(24).reshape(12, 2)
    expected = np.concatenate([array[:first], array[mid:end], array[first:mid], array[end:]])
    before = array.__array_interface__["data"][0]
    _swap_blocks(array, first, mid, end)
    np.testing.assert_array_equal(array, expected)
    assert array.__array_interface__["data"][0] == before


@pytest.mark.parametrize("writeable", [True, False])
def test_images_last_puts_a_fold_last_and_restores_the_order(writeable):
    grids = [(2, 2), (1, 3), (2, 1), (3, 1), (1, 1)]
    features = PatchFeatures([(8, 8)] * 5, grids, n_channels=2)
    for k, (h, w) in enumerate(grids):
        features.put(k, np.full((h, w, 2), k, dtype=np.float32))
    original = features.features.copy()
    features.features.flags.writeable = writeable
    with features.images_last(range(1, 3)):
        # images 0, 3, 4 first, then 1, 2
        np.testing.assert_array_equal(features.patches(3)[:, 0], [0] * 4 + [3] * 3 + [4])
        np.testing.assert_array_equal(features.patches()[8:, 0], [1] * 3 + [2] * 2)
        assert features.image(3).shape == (1, 3, 2)
    np.testing.assert_array_equal(features.features, original)
    assert features.image(1).shape == (1, 3, 2)


def test_a_training_image_on_the_threshold_counts_as_normal():
    # Thresholds set on the training images' own scores (a float
    # contamination, or "auto" below five images) are one image's score;
    # predict scores it through the whole network, which rounds differently
    # from the head on the held features, and it must not land above.
    X = make_defect_dataset(n_train=11, n_test=2, image_size=(40, 40), random_state=1).X_train
    params = dict(image_size=40, n_clusters=4, n_farthest=0, random_state=0)
    for image in X[:3]:
        det = ProtoADDetector(**params).fit(image[None])  # "auto": the worst (only) image
        assert det.predict(image[None]).tolist() == [1]
    # the 0.9 quantile of 11 scores is the 10th: exactly one image above it
    det = ProtoADDetector(
        **{**params, "random_state": 2}, position_baseline=False, contamination=0.1
    ).fit(X)
    decision = det.decision_function(X)
    assert (det.predict(X) == -1).sum() == 1
    # and the margin is far below the scores' spread
    assert np.sort(decision)[1] < 1e-3 * np.ptp(decision)


def test_identical_training_images_are_normal():
    # their held-out scores are all 0 and the final network's ~1e-8 above
    X = np.zeros((5, 32, 32, 3), np.uint8)
    det = ProtoADDetector(image_size=32, layers=(1, 2), random_state=0).fit(X)
    assert len(det.calibration_scores_) == 5
    assert det.predict(X).tolist() == [1] * 5


def test_too_few_patches_for_a_fold_of_images_of_several_sizes_is_named_first(monkeypatch):
    # four small images and a large one: the fold without the large one has
    # too few patches, which the clustering only found after the final fit
    d = make_defect_dataset(n_train=5, n_test=2, image_size=96, random_state=0)
    images = [x[:32, :32] for x in d.X_train[:4]] + [d.X_train[4]]
    monkeypatch.setattr(_features, "fit_network", lambda *a, **k: pytest.fail("fitted"))
    with pytest.raises(ValueError, match=r"n_clusters=500 is more than the 256 training "
                                         r"patches \(4 images of varying sizes, after holding "
                                         r"out 1"):
        ProtoADDetector(image_size=1.0, layers=(1, 2), n_clusters=500, random_state=0).fit(images)
