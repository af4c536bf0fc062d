"""Evaluation metrics for image anomaly detection and localization.

Image-level metrics take one score per image (higher means more anomalous)
and binary labels (1 anomalous, 0 normal). Pixel-level metrics take ground
truth masks and anomaly maps, either as arrays of shape ``(n_images, height,
width)`` or as lists of 2-D arrays whose sizes may differ between images (but
each map must have the shape of its mask).

All metrics are exact: they are computed from sorted scores, with ties
handled, rather than from a fixed grid of thresholds. The pixel metrics never
build a full ROC curve over every pixel: they sort the normal and the
anomalous pixel scores separately and count with binary searches, which keeps
the extra memory to about one copy of the scores.

The AU-PRO follows the semantics of the official MVTec AD evaluation code:
8-connected ground truth regions, the per-region overlap averaged over all
regions of all images, the false positive rate over all normal pixels of all
images, trapezoidal integration up to ``fpr_limit`` with linear interpolation
at the limit, normalised by ``fpr_limit``.
"""

import numbers
import warnings

import numpy as np
from scipy import ndimage

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "aupro",
    "f1_max",
    "pixel_f1_max",
    "evaluate_maps",
]

# 8-connectivity, as in the official MVTec AD evaluation.
_STRUCTURE_8 = np.ones((3, 3), dtype=bool)


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _as_float_array(values, name):
    """Return ``values`` as a real floating array, keeping float32 to save memory."""
    values = np.asarray(values)
    if values.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be real-valued numbers, got dtype {values.dtype}.")
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    return values


def _check_finite(values, name):
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{name} contains NaN or infinite values.")


def _as_binary(values, name):
    """Return ``values`` as a bool array, raising if it is not 0/1-valued."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values
    if values.dtype == object or not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{name} must be binary (0/1 or bool), got dtype {values.dtype}.")
    binary = values != 0
    # Comparing against the bool view avoids np.unique on large masks.
    if not np.array_equal(values, binary):
        bad = np.unique(values[(values != 0) & (values != 1)])[:5]
        raise ValueError(
            f"{name} must be binary (0/1 or bool); found other values such as "
            f"{bad.tolist()}."
        )
    return binary


def _check_labels_scores(y_true, scores, require_negative=True):
    """Validate image-level labels and scores, return (bool 1-D, float 1-D)."""
    y_true = np.asarray(y_true)
    scores = _as_float_array(scores, "scores")
    if y_true.ndim != 1 or scores.ndim != 1:
        raise ValueError(
            "y_true and scores must be 1-D, got shapes "
            f"{y_true.shape} and {scores.shape}."
        )
    if y_true.shape != scores.shape:
        raise ValueError(
            f"y_true and scores must have the same length, got {y_true.shape[0]} "
            f"and {scores.shape[0]}."
        )
    y_true = _as_binary(y_true, "y_true")
    _check_finite(scores, "scores")
    _check_both_classes(np.count_nonzero(y_true), y_true.size, "y_true", require_negative)
    return y_true, scores


def _check_both_classes(n_pos, n_total, name, require_negative=True):
    if n_pos == 0:
        raise ValueError(f"{name} contains no anomalous (1) sample; the metric is undefined.")
    if require_negative and n_pos == n_total:
        raise ValueError(f"{name} contains no normal (0) sample; the metric is undefined.")


def _check_masks_maps(masks, maps):
    """Validate pixel-level inputs, return two lists of matching 2-D arrays.

    Arrays of shape (n, h, w) are split into views, so nothing is copied
    unless a dtype conversion is needed.
    """
    masks = _split_images(masks, "masks")
    maps = _split_images(maps, "maps")
    if len(masks) != len(maps):
        raise ValueError(
            f"masks and maps must contain the same number of images, got "
            f"{len(masks)} and {len(maps)}."
        )
    if len(masks) == 0:
        raise ValueError("masks and maps are empty.")
    out_masks, out_maps = [], []
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        if mask.ndim != 2 or amap.ndim != 2:
            raise ValueError(
                f"image {i}: masks and maps must be 2-D per image, got shapes "
                f"{mask.shape} and {amap.shape}."
            )
        if mask.shape != amap.shape:
            raise ValueError(
                f"image {i}: mask shape {mask.shape} does not match map shape "
                f"{amap.shape}."
            )
        amap = _as_float_array(amap, f"maps[{i}]")
        _check_finite(amap, f"maps[{i}]")
        out_masks.append(_as_binary(mask, f"masks[{i}]"))
        out_maps.append(amap)
    return out_masks, out_maps


def _split_images(images, name):
    if isinstance(images, np.ndarray):
        if images.ndim != 3:
            raise ValueError(
                f"{name} must have shape (n_images, height, width) or be a list "
                f"of 2-D arrays, got an array of shape {images.shape}."
            )
        return list(images)
    if isinstance(images, (list, tuple)):
        return [np.asarray(image) for image in images]
    raise ValueError(
        f"{name} must be an array of shape (n_images, height, width) or a list "
        f"of 2-D arrays, got {type(images).__name__}."
    )


def _split_pixels(masks, maps):
    """Gather the scores of normal and anomalous pixels into two 1-D arrays.

    Preallocating avoids holding both per-image pieces and their
    concatenation at the same time.
    """
    dtype = np.result_type(*[m.dtype for m in maps])
    n_pos = sum(int(np.count_nonzero(m)) for m in masks)
    n_total = sum(m.size for m in masks)
    pos = np.empty(n_pos, dtype=dtype)
    neg = np.empty(n_total - n_pos, dtype=dtype)
    i_pos = i_neg = 0
    for mask, amap in zip(masks, maps):
        k = int(np.count_nonzero(mask))
        pos[i_pos:i_pos + k] = amap[mask]
        neg[i_neg:i_neg + amap.size - k] = amap[~mask]
        i_pos += k
        i_neg += amap.size - k
    return neg, pos


# --------------------------------------------------------------------------
# Core computations on pre-split scores
# --------------------------------------------------------------------------


def _auroc_from_split(neg, pos):
    """Exact AUROC = P(pos > neg) + 0.5 P(pos == neg) (Mann-Whitney U).

    Sorting the negatives once and binary-searching the positives gives the
    number of negatives strictly below and equal to each positive score.
    Integers keep the sum exact; the factor 2 folds in the one-half for ties.
    ``neg`` must be a private copy: it is sorted in place to save memory.
    """
    neg.sort()
    neg_sorted = neg
    below = np.searchsorted(neg_sorted, pos, side="left")
    below_or_equal = np.searchsorted(neg_sorted, pos, side="right")
    twice_u = int(below.sum(dtype=np.int64)) + int(below_or_equal.sum(dtype=np.int64))
    return twice_u / (2.0 * pos.size * neg_sorted.size)


def _f1_max_from_split(neg, pos):
    """Maximum F1 over all thresholds ``score >= t``.

    The optimum is always reached at a threshold equal to an anomalous
    score: moving a threshold up to the next anomalous score keeps the true
    positives and can only drop false positives. So only those candidates
    are evaluated. ``neg`` and ``pos`` must be private copies: they are
    sorted in place to save memory.
    """
    neg.sort()
    pos.sort()
    neg_sorted, pos_sorted = neg, pos
    thresholds = np.unique(pos_sorted)
    tp = pos_sorted.size - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = neg_sorted.size - np.searchsorted(neg_sorted, thresholds, side="left")
    f1 = 2.0 * tp / (tp + fp + pos_sorted.size)
    return float(f1.max())


def _collect_regions(masks, maps):
    """Scores of normal pixels, and scores and PRO weights of region pixels.

    Each pixel of a ground truth region gets the weight
    ``1 / (region size * total number of regions)``, so that the sum of the
    weights of the pixels above a threshold is the mean per-region overlap.
    """
    neg, pos = _split_pixels(masks, maps)
    weights = np.empty(pos.size, dtype=np.float64)
    n_regions = 0
    start = 0
    for mask in masks:
        lab, n = ndimage.label(mask, structure=_STRUCTURE_8)
        if n == 0:
            continue
        # Same pixels, same row-major order as amap[mask] in _split_pixels,
        # so weights stay aligned with pos.
        region_of_pixel = lab[mask]
        sizes = np.bincount(region_of_pixel)
        weights[start:start + region_of_pixel.size] = 1.0 / sizes[region_of_pixel]
        start += region_of_pixel.size
        n_regions += n
    if n_regions == 0:
        raise ValueError("masks contain no anomalous pixel; the PRO is undefined.")
    if neg.size == 0:
        raise ValueError("masks contain no normal pixel; the FPR is undefined.")
    weights /= n_regions
    return neg, pos, weights


def _pro_curve_from_regions(neg, pos, weights, max_fpr=None):
    """PRO curve at every distinct score, descending thresholds.

    A pixel is predicted anomalous when ``score >= threshold``. The first
    point is (0, 0) at threshold +inf. When ``max_fpr`` is given, thresholds
    whose FPR exceeds it are dropped, except the first one, which is needed to
    interpolate at the limit. ``neg`` is sorted in place.
    """
    neg.sort()
    neg_sorted = neg
    order = np.argsort(pos, kind="stable")
    pos_sorted = pos[order]
    # tail[i] = weight of the region pixels with rank >= i, computed from the
    # top so that small weights are not lost next to a large running sum.
    tail = np.zeros(pos_sorted.size + 1, dtype=np.float64)
    tail[:-1] = np.cumsum(weights[order][::-1])[::-1]
    del order

    lowest = None
    if max_fpr is not None:
        # The (k+1)-th largest normal score is the first threshold whose
        # FPR exceeds max_fpr (ties only add more false positives).
        k = int(np.floor(max_fpr * neg_sorted.size))
        if k < neg_sorted.size:
            lowest = neg_sorted[neg_sorted.size - 1 - k]
    if lowest is None:
        neg_candidates, pos_candidates = neg_sorted, pos_sorted
    else:
        neg_candidates = neg_sorted[np.searchsorted(neg_sorted, lowest, side="left"):]
        pos_candidates = pos_sorted[np.searchsorted(pos_sorted, lowest, side="left"):]
    thresholds = np.union1d(neg_candidates, pos_candidates)[::-1]

    n_fp = neg_sorted.size - np.searchsorted(neg_sorted, thresholds, side="left")
    fpr = n_fp / neg_sorted.size
    pro = tail[np.searchsorted(pos_sorted, thresholds, side="left")]
    # Summation order can leave the all-pixels point a hair away from 1.
    np.clip(pro, 0.0, 1.0, out=pro)
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    thresholds = np.concatenate(([np.inf], thresholds.astype(np.float64)))
    return fpr, pro, thresholds


def _area_up_to(x, y, x_max):
    """Trapezoidal area under (x, y) for x in [0, x_max].

    ``x`` must be non-decreasing and start at 0. The value at ``x_max`` is
    linearly interpolated between its neighbours; equal x values (vertical
    steps) add no area.
    """
    n_in = int(np.searchsorted(x, x_max, side="right"))
    xs, ys = x[:n_in], y[:n_in]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if n_in < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[n_in - 1], x[n_in], y[n_in - 1], y[n_in]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float(0.5 * (y0 + y_at_max) * (x_max - x0))
    return area


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def image_auroc(y_true, scores):
    """Area under the ROC curve of image-level anomaly scores.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        1 for anomalous images, 0 for normal ones (bool also accepted). Both
        classes must be present.
    scores : array-like of shape (n_samples,)
        Anomaly scores; higher means more anomalous.

    Returns
    -------
    auroc : float
        Probability that a random anomalous image scores higher than a random
        normal one, ties counting one half. Equal to
        :func:`sklearn.metrics.roc_auc_score`.

    Examples
    --------
    >>> from skprotoad.metrics import image_auroc
    >>> image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    """
    y_true, scores = _check_labels_scores(y_true, scores)
    return _auroc_from_split(scores[~y_true], scores[y_true])


def pixel_auroc(masks, maps):
    """Area under the ROC curve of pixel-level anomaly scores.

    All pixels of all images are pooled. The computation sorts the normal
    pixel scores once and binary-searches the anomalous ones, so it is exact
    (ties count one half) and needs little more memory than one copy of the
    scores.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width) or list of 2-D arrays
        Ground truth, True (or 1) for anomalous pixels.
    maps : array-like of shape (n_images, height, width) or list of 2-D arrays
        Anomaly maps, same shapes as ``masks``.

    Returns
    -------
    auroc : float

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.metrics import pixel_auroc
    >>> masks = np.zeros((1, 2, 2), dtype=bool)
    >>> masks[0, 0, 0] = True
    >>> maps = np.array([[[0.9, 0.1], [0.2, 0.95]]])
    >>> round(pixel_auroc(masks, maps), 4)
    0.6667
    """
    masks, maps = _check_masks_maps(masks, maps)
    neg, pos = _split_pixels(masks, maps)
    _check_both_classes(pos.size, pos.size + neg.size, "masks")
    return _auroc_from_split(neg, pos)


def pro_curve(masks, maps):
    """Per-region overlap (PRO) as a function of the pixel false positive rate.

    Ground truth regions are the 8-connected components of each mask. For a
    threshold ``t`` (pixels with ``map >= t`` are predicted anomalous), the
    PRO is the fraction of each region that is predicted anomalous, averaged
    over all regions of all images; the FPR is the fraction of all normal
    pixels of all images that are predicted anomalous.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width) or list of 2-D arrays
        Ground truth, True (or 1) for anomalous pixels. Must contain at least
        one anomalous and one normal pixel.
    maps : array-like of shape (n_images, height, width) or list of 2-D arrays
        Anomaly maps, same shapes as ``masks``.

    Returns
    -------
    fpr : ndarray of shape (n_thresholds + 1,)
        Non-decreasing false positive rates, starting at 0 and ending at 1.
    pro : ndarray of shape (n_thresholds + 1,)
        Non-decreasing PRO values, starting at 0 and ending at 1.
    thresholds : ndarray of shape (n_thresholds + 1,)
        Decreasing thresholds: ``np.inf`` then every distinct score.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.metrics import pro_curve
    >>> masks = np.array([[[1, 0], [0, 0]]])
    >>> maps = np.array([[[0.8, 0.9], [0.1, 0.2]]])
    >>> fpr, pro, thr = pro_curve(masks, maps)
    >>> fpr.round(3).tolist(), pro.tolist()
    ([0.0, 0.333, 0.333, 0.667, 1.0], [0.0, 0.0, 1.0, 1.0, 1.0])
    """
    masks, maps = _check_masks_maps(masks, maps)
    neg, pos, weights = _collect_regions(masks, maps)
    return _pro_curve_from_regions(neg, pos, weights)


def aupro(masks, maps, fpr_limit=0.3):
    """Normalised area under the PRO curve up to a false positive rate limit.

    Follows the MVTec AD evaluation: the PRO curve of :func:`pro_curve` is
    integrated with the trapezoidal rule from FPR 0 to ``fpr_limit``, the
    PRO at the limit being linearly interpolated, and the area is divided by
    ``fpr_limit`` so that a perfect localisation scores 1.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width) or list of 2-D arrays
        Ground truth, True (or 1) for anomalous pixels.
    maps : array-like of shape (n_images, height, width) or list of 2-D arrays
        Anomaly maps, same shapes as ``masks``.
    fpr_limit : float, default=0.3
        Upper integration limit, in (0, 1].

    Returns
    -------
    aupro : float
        In [0, 1].

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.metrics import aupro
    >>> masks = np.zeros((2, 4, 4), dtype=bool)
    >>> masks[0, :2, :2] = True
    >>> maps = masks.astype(float)        # perfect localisation
    >>> aupro(masks, maps)
    1.0
    """
    if (
        not isinstance(fpr_limit, numbers.Real)
        or isinstance(fpr_limit, bool)
        or not 0.0 < fpr_limit <= 1.0
    ):
        raise ValueError(f"fpr_limit must be a float in (0, 1], got {fpr_limit!r}.")
    masks, maps = _check_masks_maps(masks, maps)
    neg, pos, weights = _collect_regions(masks, maps)
    fpr, pro, _ = _pro_curve_from_regions(neg, pos, weights, max_fpr=fpr_limit)
    return float(_area_up_to(fpr, pro, float(fpr_limit)) / fpr_limit)


def f1_max(y_true, scores):
    """Maximum F1 score over all decision thresholds.

    A sample is predicted anomalous when its score is ``>=`` the threshold;
    every distinct score is tried.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        1 for anomalous, 0 for normal. At least one anomalous sample is
        required.
    scores : array-like of shape (n_samples,)
        Anomaly scores; higher means more anomalous.

    Returns
    -------
    f1 : float

    Examples
    --------
    >>> from skprotoad.metrics import f1_max
    >>> round(f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)
    0.8
    """
    y_true, scores = _check_labels_scores(y_true, scores, require_negative=False)
    return _f1_max_from_split(scores[~y_true], scores[y_true])


def pixel_f1_max(masks, maps):
    """Maximum F1 score over thresholds, with all pixels pooled.

    Same as :func:`f1_max` on the flattened masks and maps, without
    building the flattened copies.

    Parameters
    ----------
    masks : array-like of shape (n_images, height, width) or list of 2-D arrays
        Ground truth, True (or 1) for anomalous pixels.
    maps : array-like of shape (n_images, height, width) or list of 2-D arrays
        Anomaly maps, same shapes as ``masks``.

    Returns
    -------
    f1 : float

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.metrics import pixel_f1_max
    >>> masks = np.array([[[1, 0], [0, 0]]])
    >>> maps = np.array([[[0.8, 0.9], [0.1, 0.2]]])
    >>> round(pixel_f1_max(masks, maps), 4)
    0.6667
    """
    masks, maps = _check_masks_maps(masks, maps)
    neg, pos = _split_pixels(masks, maps)
    _check_both_classes(pos.size, pos.size + neg.size, "masks", require_negative=False)
    return _f1_max_from_split(neg, pos)


def _check_labels_match_masks(y_true, masks):
    """Refuse normal images whose masks mark defects; warn of anomalous images
    whose masks mark none (a mask encoding read as empty, say)."""
    labels = np.asarray(y_true)
    marked = np.array([bool(np.any(m)) for m in masks])
    normal = np.flatnonzero(marked & (labels == 0))
    if normal.size:
        raise ValueError(
            f"images {normal[:5].tolist()} are labelled normal (0) in y_true but their "
            f"masks mark defects: the labels and masks disagree."
        )
    empty = np.flatnonzero(~marked & (labels == 1))
    if empty.size:
        warnings.warn(
            f"{empty.size} image(s) labelled anomalous (1) have empty masks (first: "
            f"{empty[:5].tolist()}): the pixel metrics count all their pixels as normal "
            f"(a crop that cut the defect away, or a mask encoding read as empty?).",
            UserWarning, stacklevel=3,
        )


def evaluate_maps(y_true, scores, masks=None, maps=None, fpr_limit=0.3):
    """Compute the standard image- and pixel-level anomaly detection metrics.

    Parameters
    ----------
    y_true : array-like of shape (n_images,)
        1 for anomalous images, 0 for normal ones.
    scores : array-like of shape (n_images,)
        Image anomaly scores; higher means more anomalous.
    masks : array-like of shape (n_images, height, width) or list, default=None
        Ground truth masks (all False for normal images). When None, only the
        image-level metrics are returned.
    maps : array-like of shape (n_images, height, width) or list, default=None
        Anomaly maps; required when ``masks`` is given.
    fpr_limit : float, default=0.3
        Integration limit of the AU-PRO.

    Returns
    -------
    results : dict
        ``image_auroc`` and ``image_f1_max``; with masks also
        ``pixel_auroc``, ``aupro`` and ``pixel_f1_max``. Values are floats.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.metrics import evaluate_maps
    >>> masks = np.zeros((2, 4, 4), dtype=bool)
    >>> masks[1, 1:3, 1:3] = True
    >>> maps = masks + 0.1
    >>> res = evaluate_maps([0, 1], [0.2, 0.9], masks, maps)
    >>> sorted(res)
    ['aupro', 'image_auroc', 'image_f1_max', 'pixel_auroc', 'pixel_f1_max']
    >>> res["aupro"]
    1.0
    """
    results = {
        "image_auroc": image_auroc(y_true, scores),
        "image_f1_max": f1_max(y_true, scores),
    }
    if masks is None:
        if maps is not None:
            raise ValueError("maps were given without masks; pass both or neither.")
        return results
    if maps is None:
        raise ValueError("masks were given without maps; pass both or neither.")
    masks, maps = _check_masks_maps(masks, maps)
    if len(masks) != np.asarray(y_true).shape[0]:
        raise ValueError(
            f"masks and maps have {len(masks)} images but y_true has "
            f"{np.asarray(y_true).shape[0]} entries."
        )
    _check_labels_match_masks(y_true, masks)
    neg, pos = _split_pixels(masks, maps)
    _check_both_classes(pos.size, pos.size + neg.size, "masks")
    results["pixel_auroc"] = _auroc_from_split(neg, pos)
    results["pixel_f1_max"] = _f1_max_from_split(neg, pos)
    del neg, pos
    results["aupro"] = aupro(masks, maps, fpr_limit=fpr_limit)
    return results
