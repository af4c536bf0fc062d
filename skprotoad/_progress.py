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
