"""What ``fit`` tells a user while it runs: its stages in plain words, timed.

``verbose=1`` (or True) names each stage as it starts, with a progress bar
for the long loops over images, and closes with a summary; ``verbose=2``
adds the clustering's own progress detail. The stage times are kept either
way (``ProtoADDetector.fit_seconds_``).
"""

from __future__ import annotations

import contextlib
import numbers
import sys
import time

from .clustering import estimated_multiply_adds

#: The stages of ``fit``, in order, as they are named to users.
FIT_STAGES = {
    "features": "reading the images and extracting their patch features",
    "prototypes": "learning the prototypes",
    "calibration": "calibrating the thresholds",
}


def verbosity(verbose):
    """``verbose`` as a level: 0 quiet, 1 stages and bars, 2 clustering detail."""
    if isinstance(verbose, numbers.Real) and not isinstance(verbose, bool):
        return max(0, int(verbose))
    return int(bool(verbose))


class StageClock:
    """Times named stages; prints ``[i/n] what`` as each starts when verbose.

    Examples
    --------
    >>> clock = StageClock(verbose=0)
    >>> with clock.stage("features"):
    ...     pass
    >>> sorted(clock.seconds)
    ['features']
    """

    def __init__(self, verbose, stages=FIT_STAGES, stream=None):
        self.level = verbosity(verbose)
        self.stages = dict(stages)
        self.stream = stream
        self.seconds = {}

    def say(self, text):
        if self.level:
            print(f"skprotoad: {text}", file=self.stream or sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name, detail=""):
        position = list(self.stages).index(name) + 1
        self.say(f"[{position}/{len(self.stages)}] {self.stages[name]}"
                 + (f" ({detail})" if detail else ""))
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def peak_memory_bytes():
    """The process's peak resident memory, or None where it cannot be read cheaply."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


# The clustering's searches run at about this share of the speed of a plain
# matrix product of the same width, ``@`` as multiply_add_rate times it (on
# the CPU they run as convolutions, faster than ``@``, with argmax, top-k and
# gathers around each product); estimated against the fit's stages in
# benchmarks/results/speed.md.
_SEARCH_EFFICIENCY = 0.75


def multiply_add_rate(n_features, device="cpu"):
    """Multiply-adds per second of a similarity block on ``device``, measured now.

    Measured rather than assumed, so that an estimate follows the machine
    and its current load (a fraction of a second).
    """
    import torch

    a = torch.randn(2048, int(n_features), device=device)
    b = torch.randn(int(n_features), 4096, device=device)
    (a @ b).amax(dim=1)  # warm up the kernels
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        (a @ b).amax(dim=1).cpu()
        best = min(best, time.perf_counter() - start)
    return a.shape[0] * b.shape[1] * a.shape[1] / max(best, 1e-9)


def clustering_seconds(n_samples, n_features, rate, **kwargs):
    """A rough estimate of the seconds :func:`~skprotoad.clustering.learn_prototypes`
    takes at ``rate`` (:func:`multiply_add_rate`); ``kwargs``: those of
    :func:`~skprotoad.clustering.estimated_multiply_adds`."""
    work = estimated_multiply_adds(n_samples, n_features, **kwargs)
    return work / (rate * _SEARCH_EFFICIENCY)


def prototypes_detail(detector, n_patches, n_features, held_out_share, n_folds, device,
                      estimate):
    """'N patches, method' and, when ``estimate``, '; about ...': the first
    clustering of ``detector.fit`` on ``n_patches`` and, with ``n_folds``
    more for the calibration (each without ``held_out_share`` of the
    patches), the time to the end of all."""
    from ._features import farthest_count

    text = f"{n_patches:,} patches, {detector.clustering}"
    if not estimate:
        return text
    rate = multiply_add_rate(n_features, device)  # measured once for both estimates

    def seconds(n, first_search=True):
        return clustering_seconds(
            n, n_features, rate, method=detector.clustering, n_clusters=detector.n_clusters,
            n_farthest=farthest_count(detector.n_farthest, n), first_search=first_search,
        )

    first = seconds(n_patches)
    text += f"; {about(first)}"
    if n_folds:
        # FINCH's clusterings without a fold reuse the first one's first search
        rest = first + n_folds * seconds(
            int(n_patches * (1 - held_out_share)), first_search=detector.clustering != "finch"
        )
        text += f", the whole fit in {about(rest)}"
    return text


def fit_summary(detector, n_patches, n_held_out):
    """The closing line of a verbose fit, from ``detector``'s fitted attributes."""
    seconds = detector.fit_seconds_
    stages = ", ".join(f"{name} {seconds[name]:.1f} s" for name in FIT_STAGES)
    peak = peak_memory_bytes()
    memory = "" if peak is None else f"; peak memory {peak / 2**30:.1f} GiB"
    held = f" from {n_held_out} held-out images" if n_held_out else ""
    return (f"fitted on {detector.n_train_images_} images: {n_patches:,} patches, "
            f"{detector.prototypes_.shape[0]:,} prototypes; threshold {-detector.offset_:.4g} "
            f"(pixels {detector.pixel_threshold_:.4g}){held}; {seconds['total']:.1f} s "
            f"({stages}){memory}")


def about(seconds):
    """``seconds`` in the round words of an estimate.

    Examples
    --------
    >>> about(42.0), about(400), about(8000)
    ('about 40 s', 'about 7 min', 'about 2.2 h')
    """
    if seconds < 90:
        return f"about {max(10, round(seconds, -1)):.0f} s"
    if seconds < 5400:
        return f"about {seconds / 60:.0f} min"
    return f"about {seconds / 3600:.1f} h"
