"""How :meth:`skprotoad.ProtoADDetector.fit` sets its two thresholds.

With ``contamination="auto"`` random folds of the normal training images are
held out in turn (as many as the 1 % target needs, at most five), prototypes
are learned once more without each, and the thresholds are conformal order
statistics of the held-out images' scores (see :doc:`/user_guide/thresholds`). With a float ``contamination``, or too few
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

#: Share of the normal training images in each fold held out to calibrate
#: contamination="auto".
CALIBRATION_FRACTION = 0.2
#: False-alarm rate on unseen normal images that the "auto" threshold aims at.
TARGET_FALSE_ALARM_RATE = 0.01
#: Held-out scores the target needs: the conformal rank ceil((n + 1) (1 - rate))
#: is at most n only from this many on.
CALIBRATION_IMAGES_NEEDED = math.ceil(1 / TARGET_FALSE_ALARM_RATE - 1)
#: Most folds held out in turn: five disjoint folds of a fifth hold out every image once.
MAX_FOLDS = round(1 / CALIBRATION_FRACTION)
#: Fewer normal images than this: none is held out (too few to learn from).
MIN_IMAGES_FOR_HOLDOUT = 5
#: Thresholds are raised by this share of the scores' largest magnitude
#: (float32 rounds at about 1e-7 of it), or of _TIE_SCALE_FLOOR if larger.
_TIE_MARGIN = 1e-5
_TIE_SCALE_FLOOR = 0.1


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
    """How many of ``n_images`` normal images each calibration fold holds out."""
    if contamination == "auto" and n_images >= MIN_IMAGES_FOR_HOLDOUT:
        return max(1, int(round(CALIBRATION_FRACTION * n_images)))
    return 0


def folds(contamination, n_images):
    """The calibration folds of ``n_images`` training positions, the last first.

    Each fold is held out in turn from a clustering of the other images, so
    that every image of a fold is scored unseen. Folds are added, up to
    :data:`MAX_FOLDS`, until they hold :data:`CALIBRATION_IMAGES_NEEDED`
    images: with fewer held-out scores the threshold cannot reach the 1 %
    target, and extra clusterings cost little on the small sets that need
    them. From 493 images on, one fold suffices.

    Returns
    -------
    folds : list of range
        Disjoint ranges of positions, ``folds[0]`` the last ones; empty when
        nothing is held out.
    """
    size = n_held_out(contamination, n_images)
    if not size:
        return []
    wanted = min(MAX_FOLDS, -(-CALIBRATION_IMAGES_NEEDED // size))
    count = min(wanted, n_images // size)
    if count < wanted and (n_images // wanted) * wanted > count * size:
        # a fifth rounded up leaves no room for the folds wanted (104 images:
        # four of 21, 84 held out): smaller folds then hold out more
        size, count = n_images // wanted, wanted
    return [range(n_images - (j + 1) * size, n_images - j * size) for j in range(count)]


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
        ``normal`` shuffled, the held-out folds last.
    folds : list of range
        From :func:`folds`: positions in ``order``.
    """
    rng = check_random_state(random_state)
    seed = int(rng.randint(np.iinfo(np.int32).max))
    order = rng.permutation(normal)
    return seed, order, folds(contamination, len(order))


def calibration_folds(n_images, random_state=None):
    """The folds that ``contamination="auto"`` holds out, and what each is
    held out from.

    The split :meth:`ProtoADDetector(random_state=random_state).fit
    <skprotoad.ProtoADDetector.fit>` makes of ``n_images`` normal training
    images: for each fold, prototypes are learned from the other images and
    the fold's images are scored with them; the thresholds are set on all
    folds' scores together, by :func:`conformal_threshold`. So another method
    can be fitted and thresholded on the very same images.

    Parameters
    ----------
    n_images : int
        Number of normal training images.
    random_state : int, RandomState or None, default=None
        The detector's ``random_state``.

    Returns
    -------
    folds : list of (fit_indices, held_out_indices)
        Index arrays into the training images, as scikit-learn's
        cross-validation splitters give them; one fold from 493 images on,
        up to five below; empty for fewer than 5 images, where the training
        images' own scores set the thresholds.

    Examples
    --------
    >>> from skprotoad.thresholds import calibration_folds
    >>> folds = calibration_folds(10, random_state=0)
    >>> [(len(fit), len(held_out)) for fit, held_out in folds]
    [(8, 2), (8, 2), (8, 2), (8, 2), (8, 2)]
    >>> sorted(i for _, held_out in folds for i in held_out) == list(range(10))
    True
    >>> len(calibration_folds(1000, random_state=0))
    1
    """
    _, order, positions = split(np.arange(int(n_images)), "auto", random_state)
    return [
        (np.delete(order, np.arange(fold.start, fold.stop)), order[fold.start : fold.stop])
        for fold in positions
    ]


def stage_detail(folds, n_images, prototype_seconds):
    """What calibration is about to do, for ``fit``'s progress (``verbose``);
    ``prototype_seconds``: the clustering of all images, less any work the
    clusterings without a fold reuse."""
    if not folds:
        return "the training images' own scores"
    # each clustering without a fold sees the other images' patches: about
    # that share of the first one's time
    size = len(folds[0])
    seconds = len(folds) * prototype_seconds * (1 - size / n_images)
    what = "a fold of" if len(folds) == 1 else f"{len(folds)} folds of"
    return (f"{what} {size} held-out images, prototypes learned again without each: "
            f"about {seconds:.0f} s")


def calibrate(network, n_images, folds, contamination, score_held_out, score, baseline=None):
    """The detector's thresholds and calibration scores; sets ``network``'s
    score baseline when ``baseline`` is given.

    Parameters
    ----------
    network : ProtoADNetwork
        The network learned from all ``n_images`` training images.
    n_images : int
        Number of training images.
    folds : list of range
        From :func:`folds`: the positions held out in turn; empty: none.
    contamination : "auto" or float
        The detector's parameter.
    score_held_out : callable
        ``score_held_out(fold)``: what ``score`` returns, of the images at the
        positions ``fold``, by a network learned from the other images only.
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
    if folds:
        _warn_if_too_few(sum(map(len, folds)), n_images)
        parts = [score_held_out(fold) for fold in folds]
        scores, map_maxima = (np.concatenate([part[i] for part in parts]) for i in (0, 1))
        score_patches = [p for part in parts for p in part[2]]
        sizes = [size for part in parts for size in part[3]]
    else:
        scores, map_maxima, score_patches, sizes = score(network, range(n_images))
    if baseline is not None and len(score_patches) >= 2:
        # the network only smooths and upsamples there: any of them would do
        network.score_baseline, scores = baseline(network, score_patches, sizes)
    # An image scoring what the threshold was set on counts as normal
    # (decision 0), as in IsolationForest; but predict's scores come from the
    # whole network and these from other paths (the head on the held
    # features, a fold's network), which float32 rounds apart: raise the
    # threshold by far more than that rounding, far less than the scores'
    # spread (a floor for scores all near 0: identical training images).
    scale = max(float(np.max(np.abs(np.concatenate([scores, map_maxima])))), _TIE_SCALE_FLOOR)
    margin = _TIE_MARGIN * scale
    if folds:
        calibration_scores = scores

        def threshold(values):
            return conformal_threshold(values) + margin
    else:
        # the training images' scores, which are optimistic (the prototypes
        # were learned from them); "auto" then takes the worst image
        calibration_scores = np.empty(0)
        quantile = 1.0 if contamination == "auto" else 1.0 - contamination
        if contamination == "auto":
            _warn_none_held_out(n_images)

        def threshold(values):
            return float(np.quantile(values, quantile)) + margin

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
    >>> mean, high = expected_false_alarm_rate(40)  # one fold of 40 held-out images
    >>> round(mean, 4), round(high, 3)
    (0.0244, 0.056)
    >>> expected_false_alarm_rate(99)[0]  # 99 held-out scores: the 1 % target
    0.01
    """
    n = int(n_held_out)
    k = min(math.ceil((n + 1) * (1.0 - target)), n)
    return (n + 1 - k) / (n + 1), float(stats.beta.ppf(level, n + 1 - k, k))


def _warn_if_too_few(n_held_out, n_images):
    mean, high = expected_false_alarm_rate(n_held_out)
    if mean <= TARGET_FALSE_ALARM_RATE:
        return
    warnings.warn(
        f"contamination='auto' scored {n_held_out} of {n_images} training images held out "
        f"to set the threshold: too few for its {TARGET_FALSE_ALARM_RATE:.0%} target. Expect "
        f"{mean:.1%} false alarms on new normal images on average, and more than "
        f"{high:.1%} after one fit in ten. Fit on at least {images_needed()} images, or set "
        f"contamination to the rate you accept (see the user guide's Thresholds page).",
        CalibrationWarning, stacklevel=5,
    )


def _warn_none_held_out(n_images):
    warnings.warn(
        f"contamination='auto' holds no image out below {MIN_IMAGES_FOR_HOLDOUT} training "
        f"images ({n_images} here): the threshold is the worst training image's own score, "
        f"which new normal images exceed often (the prototypes were learned from it). Fit on "
        f"at least {images_needed()} images, or set contamination to the rate you accept (see "
        f"the user guide's Thresholds page).",
        CalibrationWarning, stacklevel=5,
    )


def images_needed():
    """The fewest training images whose folds hold the held-out images the
    target needs."""
    n = MIN_IMAGES_FOR_HOLDOUT
    while sum(map(len, folds("auto", n))) < CALIBRATION_IMAGES_NEEDED:
        n += 1
    return n


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
