import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from skprotoad.metrics import (
    aupro,
    evaluate_maps,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
    pro_curve,
)

# --------------------------------------------------------------------------
# Slow, obviously-correct references: one Python iteration per threshold.
# --------------------------------------------------------------------------


def _ref_pro_curve(masks, maps):
    """PRO curve by brute force, with the MVTec AD definitions."""
    regions = []
    n_neg = 0
    for mask in masks:
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.extend((lab == k + 1) for k in range(n))
        n_neg += np.sum(~mask.astype(bool))
    all_scores = np.concatenate([m.ravel() for m in maps])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(all_scores)[::-1]:
        fp, overlaps = 0, []
        for mask, amap in zip(masks, maps):
            fp += np.sum((amap >= t) & ~mask.astype(bool))
        for i, mask in enumerate(masks):
            lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
            for k in range(n):
                region = lab == k + 1
                overlaps.append(np.sum(maps[i][region] >= t) / region.sum())
        fprs.append(fp / n_neg)
        pros.append(np.mean(overlaps))
    return np.array(fprs), np.array(pros)


def _ref_trapezoid(x, y, x_max):
    """Trapezoid with a cut-off, interpolating at x_max when it is not a sample."""
    x, y = np.asarray(x), np.asarray(y)
    correction = 0.0
    if x_max not in x:
        ins = np.searchsorted(x, x_max, side="right")
        y_mid = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_mid + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def _ref_f1_max(y, s):
    y = np.asarray(y).astype(bool)
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        tp = np.sum(pred & y)
        fp = np.sum(pred & ~y)
        fn = np.sum(~pred & y)
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def _random_case(seed, n=3, shape=(12, 10), n_levels=7):
    """Masks with a few blobs, maps with many ties and some signal."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n,) + shape, dtype=bool)
    for i in range(n - 1):  # last image stays normal
        for _ in range(rng.integers(1, 4)):
            r, c = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
            h, w = rng.integers(1, 4, size=2)
            masks[i, r:r + h, c:c + w] = True
    maps = rng.integers(0, n_levels, size=masks.shape).astype(float)
    maps += 2.0 * masks * rng.integers(0, 2, size=masks.shape)
    return masks, maps


# --------------------------------------------------------------------------
# Image level
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 50)
    y[:2] = [0, 1]
    s = rng.integers(0, 5, 50).astype(float)  # many ties
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_image_auroc_simple_values():
    assert image_auroc([0, 1], [0.0, 1.0]) == 1.0
    assert image_auroc([0, 1], [1.0, 0.0]) == 0.0
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5
    assert image_auroc(np.array([False, True]), [1, 2]) == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_reference(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    y[0] = 1
    s = rng.integers(0, 6, 40).astype(float)
    assert f1_max(y, s) == pytest.approx(_ref_f1_max(y, s), abs=1e-12)


def test_f1_max_hand_case():
    # threshold 0.35 -> tp=2, fp=1, fn=0 -> F1 = 4 / 5
    assert f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8)
    assert f1_max([1, 1], [0.3, 0.2]) == 1.0  # no normal samples is fine for F1


@pytest.mark.parametrize(
    "y, s, match",
    [
        ([0, 0], [0.1, 0.2], "no anomalous"),
        ([1, 1], [0.1, 0.2], "no normal"),
        ([0, 2], [0.1, 0.2], "binary"),
        ([0, 1], [0.1, np.nan], "NaN"),
        ([0, 1], [0.1, np.inf], "infinite"),
        ([0, 1, 1], [0.1, 0.2], "same length"),
        ([[0, 1]], [[0.1, 0.2]], "1-D"),
        ([0, 1], ["a", "b"], "real-valued"),
    ],
)
def test_image_auroc_validation(y, s, match):
    with pytest.raises(ValueError, match=match):
        image_auroc(y, s)


def test_f1_max_validation():
    with pytest.raises(ValueError, match="no anomalous"):
        f1_max([0, 0], [0.1, 0.2])


# --------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_pixel_auroc_matches_sklearn(seed):
    masks, maps = _random_case(seed)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)
    # int masks and float32 maps give the same answer
    assert pixel_auroc(masks.astype(np.uint8), maps.astype(np.float32)) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize("seed", range(5))
def test_pixel_f1_max_matches_flattened_f1_max(seed):
    masks, maps = _random_case(seed)
    expected = _ref_f1_max(masks.ravel(), maps.ravel())
    assert pixel_f1_max(masks, maps) == pytest.approx(expected, abs=1e-12)
    assert f1_max(masks.ravel(), maps.ravel()) == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_accept_lists_of_different_sizes():
    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), bool), np.zeros((9, 4), bool)]
    masks[0][1:3, 2:4] = True
    masks[1][6, 1] = True
    maps = [rng.random(m.shape) + m for m in masks]
    flat_m = np.concatenate([m.ravel() for m in masks])
    flat_s = np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(flat_m, flat_s))
    fpr, pro = _ref_pro_curve(masks, maps)
    assert aupro(masks, maps) == pytest.approx(_ref_trapezoid(fpr, pro, 0.3) / 0.3)


# --------------------------------------------------------------------------
# PRO curve and AU-PRO
# --------------------------------------------------------------------------


def _hand_case():
    """Two 4x4 images; image 0 has one 2x2 region, image 1 is normal.

    Region scores 0.9, 0.8, 0.5, 0.2; normal pixels are 0 except 0.7 (image
    0), 0.6 and 0.3 (image 1). 28 normal pixels in total.
    """
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True
    maps = np.zeros((2, 4, 4))
    maps[0, :2, :2] = [[0.9, 0.8], [0.5, 0.2]]
    maps[0, 3, 3] = 0.7
    maps[1, 0, 0] = 0.6
    maps[1, 2, 1] = 0.3
    return masks, maps


def test_pro_curve_hand_case():
    masks, maps = _hand_case()
    fpr, pro, thr = pro_curve(masks, maps)
    # threshold:       inf  0.9  0.8   0.7   0.6   0.5   0.3   0.2  0.0
    expected_fpr = np.array([0, 0, 0, 1, 2, 2, 3, 3, 28]) / 28
    expected_pro = [0, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75, 1.0, 1.0]
    np.testing.assert_allclose(thr, [np.inf, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3, 0.2, 0.0])
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(pro, expected_pro)


def test_aupro_hand_case():
    masks, maps = _hand_case()
    # Area up to 0.3: 0.5 * 2/28 + 0.75 * 1/28 + 1.0 * (0.3 - 3/28)
    expected = (1.0 / 28 + 0.75 / 28 + 0.3 - 3 / 28) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)
    # With the whole curve the last segment spans [3/28, 1] at PRO 1.
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1 - 1.25 / 28, abs=1e-12)


def test_aupro_interpolates_on_a_diagonal_segment():
    # A tie between the only region pixel and a normal pixel makes the curve
    # jump diagonally from (0, 0) to (1/3, 1); at FPR 0.3 the PRO is 0.9.
    masks = np.array([[[1, 0, 0, 0]]])
    maps = np.array([[[0.5, 0.5, 0.2, 0.1]]])
    assert aupro(masks, maps) == pytest.approx(0.5 * 0.9 * 0.3 / 0.3)


def test_aupro_uses_8_connectivity_and_averages_over_regions():
    # Diagonal neighbours form one region (8-connectivity): 3 pixels, and a
    # separate single-pixel region. The detector finds the big region fully
    # and misses the small one; PRO = mean(1, 0) = 0.5 at low FPR.
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 2, 2] = True
    masks[0, 5, 5] = True
    maps = np.zeros((1, 6, 6))
    maps[0, 0, 0] = maps[0, 1, 1] = maps[0, 2, 2] = 1.0
    fpr, pro, _ = pro_curve(masks, maps)
    np.testing.assert_allclose(pro, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    # Area: 0.5 up to FPR 0.3, plus nothing; after normalisation 0.5 + the
    # rising part of the segment (0, 0.5) -> (1, 1) up to 0.3.
    expected = (0.5 * 0.3 + 0.5 * 0.5 * 0.3 * 0.3) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(seed, limit):
    masks, maps = _random_case(seed)
    fpr_ref, pro_ref = _ref_pro_curve(masks, maps)
    fpr, pro, _ = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, fpr_ref, atol=1e-12)
    np.testing.assert_allclose(pro, pro_ref, atol=1e-12)
    expected = _ref_trapezoid(fpr_ref, pro_ref, limit) / limit
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_aupro_continuous_scores(seed):
    rng = np.random.default_rng(seed)
    masks, _ = _random_case(seed)
    maps = rng.random(masks.shape) + 0.5 * masks
    fpr_ref, pro_ref = _ref_pro_curve(masks, maps)
    expected = _ref_trapezoid(fpr_ref, pro_ref, 0.3) / 0.3
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    masks=arrays(bool, (2, 4, 5)),
    maps=arrays(np.int8, (2, 4, 5), elements=st.integers(0, 3)),
    limit=st.sampled_from([0.3, 0.1, 0.25, 0.5, 1.0, 1 / 3]),
)
def test_aupro_property_against_reference(masks, maps, limit):
    if masks.all() or not masks.any():
        return
    fpr_ref, pro_ref = _ref_pro_curve(masks, maps)
    expected = _ref_trapezoid(fpr_ref, pro_ref, limit) / limit
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(expected, abs=1e-12)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_aupro_constant_maps():
    masks, _ = _hand_case()
    # One threshold: the curve is the diagonal (0, 0) -> (1, 1).
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)


def test_aupro_perfect_and_inverted():
    masks, _ = _random_case(0)
    assert aupro(masks, masks.astype(float)) == 1.0
    assert aupro(masks, -masks.astype(float)) == 0.0


def test_aupro_is_invariant_to_monotone_transforms():
    masks, maps = _random_case(3)
    assert aupro(masks, maps) == pytest.approx(aupro(masks, np.exp(maps) * 3 - 1))


@pytest.mark.parametrize(
    "masks, maps, match",
    [
        (np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), "no anomalous"),
        (np.ones((2, 3, 3)), np.zeros((2, 3, 3)), "no normal"),
        (np.zeros((2, 3, 3)), np.zeros((2, 3, 4)), "does not match"),
        (np.zeros((2, 3, 3)), np.zeros((3, 3, 3)), "same number"),
        (np.full((1, 3, 3), 2), np.zeros((1, 3, 3)), "binary"),
        (np.eye(3)[None], np.full((1, 3, 3), np.nan), "NaN"),
        (np.zeros((3, 3)), np.zeros((3, 3)), "n_images, height, width"),
        ([np.zeros(3)], [np.zeros(3)], "2-D"),
        ([], [], "empty"),
    ],
)
def test_pixel_validation(masks, maps, match):
    for func in (aupro, pixel_auroc):
        with pytest.raises(ValueError, match=match):
            func(masks, maps)


@pytest.mark.parametrize("limit", [0, -0.1, 1.5, "0.3", True])
def test_aupro_rejects_bad_limit(limit):
    masks, maps = _hand_case()
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=limit)


# --------------------------------------------------------------------------
# evaluate_maps
# --------------------------------------------------------------------------


def test_evaluate_maps_consistent_with_individual_metrics():
    masks, maps = _random_case(4)
    y = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    scores[-1] = -1.0  # keep both classes distinguishable
    res = evaluate_maps(y, scores, masks, maps)
    assert res == {
        "image_auroc": image_auroc(y, scores),
        "image_f1_max": f1_max(y, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_f1_max": pixel_f1_max(masks, maps),
        "aupro": aupro(masks, maps),
    }
    assert all(type(v) is float for v in res.values())


def test_evaluate_maps_image_only_and_errors():
    res = evaluate_maps([0, 1], [0.1, 0.9])
    assert res == {"image_auroc": 1.0, "image_f1_max": 1.0}
    masks, maps = _hand_case()
    with pytest.raises(ValueError, match="without maps"):
        evaluate_maps([0, 1], [0.1, 0.9], masks=masks)
    with pytest.raises(ValueError, match="without masks"):
        evaluate_maps([0, 1], [0.1, 0.9], maps=maps)
    with pytest.raises(ValueError, match="y_true has 3"):
        evaluate_maps([0, 1, 1], [0.1, 0.9, 0.5], masks, maps)


def test_evaluate_maps_checks_labels_against_masks():
    masks, maps = _random_case(4)
    y = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    assert y.any() and not y.all()
    scores = np.linspace(0, 1, len(y))
    wrong = y.copy()
    wrong[np.flatnonzero(y)[0]] = 0  # a defect image labelled normal
    with pytest.raises(ValueError, match="labelled normal.*masks mark defects"):
        evaluate_maps(wrong, scores, masks, maps)
    empty = masks.copy()
    empty[np.flatnonzero(y)[0]] = False  # a mask read as empty, say
    with pytest.warns(UserWarning, match="labelled anomalous.*empty masks"):
        evaluate_maps(y, scores, empty, maps)
