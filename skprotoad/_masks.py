"""Defect masks that agree with the image verdicts.

The image score and the anomaly map are two readouts with two thresholds
(``offset_`` and ``pixel_threshold_``), so thresholding the map alone can
outline a defect on an image passed as normal, or nothing on an image flagged
as anomalous. An inspector acts on both: :func:`verdict_mask` makes them
agree. An image passed as normal has an empty mask; an image flagged as
anomalous has the pixels above the pixel threshold or, when there are none,
its most anomalous region (:func:`peak_region`); :func:`predict_masks` does
so for a batch of maps.
"""

import numpy as np
from scipy import ndimage


def defect_pixels(image):
    """A mask image as bool: pixels where any colour channel exceeds half the
    mask's own maximum, so that 0/255, 0/1, 16-bit, float, coloured and
    palette masks all read as drawn (8-bit grey above 127 reads a 0/1 or a
    red mask as empty). Alpha is ignored; an all-zero mask is empty."""
    if image.mode not in ("1", "L", "I", "I;16", "F", "RGB"):
        image = image.convert("L" if image.mode in ("LA", "La") else "RGB")
    values = np.asarray(image)
    if values.ndim == 3:
        values = values.max(axis=2)
    top = values.max(initial=0)
    return values > top / 2 if top > 0 else np.zeros(values.shape, dtype=bool)


def peak_region(anomaly_map):
    """The connected region around a map's maximum, at half its prominence.

    The pixels at or above ``peak - (peak - median) / 2`` that are connected
    (4-neighbourhood) to the peak: the half-maximum width of the most
    anomalous spot, measured above the image's typical level so that it does
    not depend on the map's offset. Never empty for a map with a finite value;
    NaN pixels (outside a crop) are never in it.

    Parameters
    ----------
    anomaly_map : ndarray of shape (height, width)

    Returns
    -------
    region : ndarray of bool, same shape

    Examples
    --------
    >>> import numpy as np
    >>> m = np.zeros((5, 5)); m[1, 1] = 1.0; m[1, 2] = 0.6; m[4, 4] = 0.9
    >>> np.argwhere(peak_region(m)).tolist()
    [[1, 1], [1, 2]]
    """
    values = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float64), nan=-np.inf)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, dtype=bool)
    peak = values.max()
    level = peak - 0.5 * (peak - np.median(values[finite]))
    labels, _ = ndimage.label(values >= level)
    return labels == labels[np.unravel_index(np.argmax(values), values.shape)]


def verdict_mask(anomaly_map, anomalous, threshold):
    """One image's defect mask, consistent with its verdict.

    Parameters
    ----------
    anomaly_map : ndarray of shape (height, width)
        NaN where the image has no score (cut away by a crop).
    anomalous : bool
        The image's verdict (``predict`` gives -1).
    threshold : float
        Map value above which a pixel is defective (``pixel_threshold_``).

    Returns
    -------
    mask : ndarray of bool, same shape
        Empty for a normal verdict; for an anomalous one, ``map > threshold``,
        or :func:`peak_region` where no pixel exceeds the threshold.

    Examples
    --------
    >>> import numpy as np
    >>> m = np.array([[0.1, 0.9], [0.2, 0.3]])
    >>> verdict_mask(m, False, 0.5).any()
    np.False_
    >>> verdict_mask(m, True, 0.5).astype(int).tolist()
    [[0, 1], [0, 0]]
    >>> verdict_mask(m, True, 2.0).astype(int).tolist()  # nothing above: the peak
    [[0, 1], [0, 0]]
    """
    values = np.asarray(anomaly_map)
    if not anomalous:
        return np.zeros(values.shape, dtype=bool)
    mask = np.nan_to_num(values, nan=-np.inf) > threshold
    return mask if mask.any() else peak_region(values)


def predict_masks(maps, decision, pixel_threshold, threshold=None):
    """The masks of :meth:`~skprotoad.ProtoADDetector.predict_masks`.

    Parameters
    ----------
    maps : ndarray of shape (n_images, height, width) or list of 2-D arrays
    decision : ndarray of shape (n_images,)
        ``decision_function``: negative for an anomalous verdict.
    pixel_threshold : float
        ``pixel_threshold_``, for :func:`verdict_mask`.
    threshold : float, default=None
        A number: ``maps > threshold`` for every image, whatever its verdict.

    Returns
    -------
    masks : ndarray of bool or list
        Of the form of ``maps``.
    """
    if threshold is None:
        masks = [verdict_mask(m, a, pixel_threshold) for m, a in zip(maps, decision < 0)]
    else:
        masks = [np.nan_to_num(m, nan=-np.inf) > threshold for m in maps]
    if isinstance(maps, np.ndarray):
        return np.stack(masks) if masks else np.zeros(maps.shape, dtype=bool)
    return masks
