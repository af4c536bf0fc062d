"""How :meth:`skprotoad.ProtoADDetector.fit` sets its two thresholds.

With ``contamination="auto"`` a random share of the normal training images is
held out, prototypes are learned once more without them, and the thresholds
are split-conformal order statistics of the held-out images' scores (see
:doc:`/user_guide/thresholds`). With a float ``contamination``, or too few
images to hold any out, they are quantiles of the training images' own scores.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import numpy as np
from scipy import stats
from sklearn.utils import check_random_state

#: Share of the normal training images held out to calibrate contamination="auto".
CALIBRATION_FRACTION = 0.2
#: False-alarm rate on unseen normal images that the "auto" threshold aims at.
TARGET_FALSE_ALARM_RATE = 0.01
#: Fewer normal images than this: none is held out (too few to learn from).
MIN_IMAGES_FOR_HOLDOUT = 5


class CalibrationWarning(UserWarning):
    """The held-out calibration images are too few for the threshold's target."""


class Calibration(NamedTuple):
    """What calibration sets on the detector."""

    #: ``offset_``: minus the image anomaly score above which an image is anomalous.
    offset: float
    #: ``pixel_threshold_``: anomaly-map value above which a pixel is defective.
    pixel_threshold: float
    #: ``calibration_scores_``: the held-out images' anomaly scores (empty without).
    scores: np.ndarray


def is_contamination(value):
    """Whether ``value`` is a ``contamination``: "auto" or a float in (0, 0.5]."""
    if isinstance(value, str):
        return value == "auto"
    return isinstance(value, numbers.Real) and 0 < value <= 0.5


def n_held_out(contamination, n_images):
    """How many of ``n_images`` normal images calibration holds out (the last ones)."""
    if contamination == "auto" and n_images >= MIN_IMAGES_FOR_HOLDOUT:
        return max(1, int(round(CALIBRATION_FRACTION * n_images)))
    return 0


def split(normal, contamination, random_state):
    """The random draws of one fit: a seed, and the order of the training images.

    Parameters
    ----------
    normal : ndarray of int
        Indices of the normal training images.
    contamination : "auto" or float
        The detector's parameter.
    random_state : int, RandomState or None
        The detector's parameter.

    Returns
    -------
    seed : int
        Seeds the clustering and, without weights, the backbone.
    order : ndarray of int
        ``normal`` shuffled, the held-out images last: the patches to learn
        from are then a prefix of the feature array, used without a copy.
    n_held_out : int
        From :func:`n_held_out`.
    """
    rng = check_random_state(random_state)
    seed = int(rng.randint(np.iinfo(np.int32).max))
    order = rng.permutation(normal)
    return seed, order, n_held_out(contamination, len(order))


def held_out_split(n_images, random_state=None):
    """The images that ``contamination="auto"`` learns from and holds out.

    The split :meth:`ProtoADDetector(random_state=random_state).fit
    <skprotoad.ProtoADDetector.fit>` makes of ``n_images`` normal training
    images: the thresholds are set on the held-out images' scores, by
    :func:`conformal_threshold`, with prototypes learned from the others. So
    another method can be fitted and thresholded on the very same images.

    Parameters
    ----------
    n_images : int
        Number of normal training images.
    random_state : int, RandomState or None, default=None
        The detector's ``random_state``.

    Returns
    -------
    fit_indices : ndarray of int
        The images prototypes are first learned from.
    held_out_indices : ndarray of int
        The images the thresholds are calibrated on; empty for fewer than 5
        images, where the training images' own scores set them.

    Examples
    --------
    >>> from skprotoad.thresholds import held_out_split
    >>> fit_part, held_out = held_out_split(10, random_state=0)
    >>> len(fit_part), len(held_out)
    (8, 2)
    >>> sorted([*fit_part, *held_out]) == list(range(10))
    True
    """
    _, order, n_held = split(np.arange(int(n_images)), "auto", random_state)
    return order[: len(order) - n_held], order[len(order) - n_held :]


def stage_detail(n_held_out, n_images, prototype_seconds):
    """What calibration is about to do, for ``fit``'s progress (``verbose``)."""
    if not n_held_out:
        return "the training images' own scores"
    # the second clustering sees the patches of the other images: about that
    # share of the first one's time
    seconds = prototype_seconds * (1 - n_held_out / n_images)
    return (f"{n_held_out} held-out images, a second clustering without them: "
            f"about {seconds:.0f} s")


def calibrate(network, n_images, n_held_out, contamination, fit_network, score,
              baseline=None):
    """The detector's thresholds and calibration scores; sets ``network``'s
    score baseline when ``baseline`` is given.

    Parameters
    ----------
    network : ProtoADNetwork
        The network learned from all ``n_images`` training images.
    n_images : int
        Number of training images; the last ``n_held_out`` of them are the
        held-out ones.
    n_held_out : int
        From :func:`n_held_out`.
    contamination : "auto" or float
        The detector's parameter.
    fit_network : callable
        ``fit_network(n)``: a network learned from the first ``n`` images only.
    score : callable
        ``score(network, positions)``: the anomaly scores, anomaly-map maxima,
        image-score patch maps (a list of (h, w) tensors, see
        :meth:`ProtoADNetwork.patch_scores`) and input sizes of the training
        images at ``positions``.
    baseline : callable or None, default=None
        ``baseline(network, score_patches, sizes)``: the score baseline and
        the images' scores against it (see
        :func:`skprotoad._features.baseline_and_scores`); None: no baseline.

    Returns
    -------
    calibration : Calibration
    """
    if n_held_out:
        scorer = fit_network(n_images - n_held_out)
        positions = range(n_images - n_held_out, n_images)
        _warn_if_too_few(n_held_out, n_images)
    else:
        scorer, positions = network, range(n_images)
    scores, map_maxima, score_patches, sizes = score(scorer, positions)
    if baseline is not None and len(score_patches) >= 2:
        network.score_baseline, scores = baseline(scorer, score_patches, sizes)
    if n_held_out:
        calibration_scores = scores
        threshold = conformal_threshold
    else:
        # the training images' scores, which are optimistic (the prototypes
        # were learned from them); "auto" then takes the worst image
        calibration_scores = np.empty(0)
        quantile = 1.0 if contamination == "auto" else 1.0 - contamination

        def threshold(values):
            return float(np.quantile(values, quantile))

    offset = -threshold(scores)
    # the map's own threshold only when the image score is read elsewhere
    pixel_threshold = -offset if network.score_is_map_max else threshold(map_maxima)
    return Calibration(offset, pixel_threshold, calibration_scores)


def expected_false_alarm_rate(n_held_out, target=TARGET_FALSE_ALARM_RATE, level=0.9):
    """The false-alarm rate that :func:`conformal_threshold` of ``n_held_out``
    scores gives on new normal images: its mean over fits, and the rate that
    one fit in ``1 / (1 - level)`` exceeds.

    The threshold is the ``k``-th smallest of ``n`` exchangeable scores; the
    share of new normal images above it then follows Beta(n + 1 - k, k) over
    the draws of the held-out images, with mean ``(n + 1 - k) / (n + 1)``.

    Parameters
    ----------
    n_held_out : int
        Number of held-out normal images the threshold is set on.
    target : float, default=0.01
        The ``false_alarm_rate`` asked of :func:`conformal_threshold`.
    level : float, default=0.9
        The quantile, over fits, of the second value returned.

    Returns
    -------
    mean : float
        The false-alarm rate on new normal images, on average over fits.
    high : float
        The rate that a share ``1 - level`` of fits exceeds.

    Examples
    --------
    >>> from skprotoad.thresholds import expected_false_alarm_rate
    >>> mean, high = expected_false_alarm_rate(40)  # 200 training images, 20 % held out
    >>> round(mean, 4), round(high, 3)
    (0.0244, 0.056)
    >>> expected_false_alarm_rate(99)[0]  # 495 training images: the 1 % target
    0.01
    """
    n = int(n_held_out)
    k = min(math.ceil((n + 1) * (1.0 - target)), n)
    return (n + 1 - k) / (n + 1), float(stats.beta.ppf(level, n + 1 - k, k))


def _warn_if_too_few(n_held_out, n_images):
    mean, high = expected_false_alarm_rate(n_held_out)
    if mean <= TARGET_FALSE_ALARM_RATE:
        return
    needed = math.ceil((1 / TARGET_FALSE_ALARM_RATE - 1) / CALIBRATION_FRACTION)
    warnings.warn(
        f"contamination='auto' held out {n_held_out} of {n_images} training images to set "
        f"the threshold: too few for its {TARGET_FALSE_ALARM_RATE:.0%} target. Expect "
        f"{mean:.1%} false alarms on new normal images on average, and more than "
        f"{high:.1%} after one fit in ten. Fit on at least {needed} images, or set "
        f"contamination to the rate you accept (see the user guide's Thresholds page).",
        CalibrationWarning, stacklevel=5,
    )


def conformal_threshold(held_out_scores, false_alarm_rate=TARGET_FALSE_ALARM_RATE):
    """The split-conformal threshold of held-out normal scores.

    The ``ceil((n + 1) (1 - rate))``-th smallest of the ``n`` scores: a new
    normal image exchangeable with the held-out ones exceeds it with
    probability at most ``rate`` (Vovk et al., "Algorithmic Learning in a
    Random World", 2005). A plain percentile of ``n`` scores falls below that
    order statistic, and so under-estimates the threshold, for small ``n``.
    With fewer than ``1 / rate - 1`` scores no order statistic reaches the
    target, and the largest score is used: the false-alarm rate is then at
    most ``1 / (n + 1)``.

    Parameters
    ----------
    held_out_scores : array-like of shape (n,)
        Anomaly scores (higher = more anomalous) of normal images that the
        model did not learn from.
    false_alarm_rate : float, default=0.01
        The share of new normal images allowed above the threshold.

    Returns
    -------
    threshold : float
        One of ``held_out_scores``: scores above it are anomalous.

    Examples
    --------
    >>> from skprotoad.thresholds import conformal_threshold
    >>> conformal_threshold(range(1, 200))  # the 198th smallest of 199
    198.0
    >>> conformal_threshold([0.1, 0.3, 0.2])  # too few for 1 %: the largest
    0.3
    """
    ordered = np.sort(np.asarray(held_out_scores, dtype=np.float64))
    rank = math.ceil((len(ordered) + 1) * (1.0 - false_alarm_rate))
    return float(ordered[min(rank, len(ordered)) - 1])
