"""Torch's process-wide settings for one estimator call: threads, precision;
and whether torch is tracing or exporting (:func:`tracing`).

``ProtoADDetector(n_jobs=...)`` sets torch's intra-op threads, and every call
turns off TF32 convolutions on CUDA, for the duration of the call only.

torch's thread count is global to the process (and to the calling thread's
OpenMP state), so the detector sets it only for the duration of a call and
restores the previous value afterwards, exceptions included.

With ``n_jobs=None`` nothing is changed. That is also what avoids
oversubscription in parallel searches: joblib's loky workers start with
``OMP_NUM_THREADS`` (and MKL's, OpenBLAS's) set to ``cpu_count // n_workers``,
and torch, imported fresh in each worker, takes its default thread count
from it, so ``GridSearchCV(n_jobs=2)`` on 8 cores runs 2 fits of 4 threads
each. Dask's process workers (the nanny) set ``OMP_NUM_THREADS=1`` likewise.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import threading

import torch


def effective_n_threads(n_jobs):
    """Threads for ``n_jobs``: None (unchanged), a positive count, or -1, -2, ...

    Negative values follow scikit-learn: -1 is every CPU (``joblib.cpu_count()``,
    which respects CPU affinity and container quotas), -2 all but one, ...
    """
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral):
        raise TypeError(f"n_jobs must be an int or None, got {n_jobs!r}.")
    n_jobs = int(n_jobs)
    if n_jobs == 0:
        raise ValueError("n_jobs == 0 has no meaning; use None, a positive int or -1.")
    if n_jobs > 0:
        return n_jobs
    import joblib

    return max(joblib.cpu_count() + 1 + n_jobs, 1)


# torch_threads calls running now (in any thread), and the count before the first
_lock = threading.Lock()
_calls_setting = 0
_count_before = None


@contextlib.contextmanager
def torch_threads(n_jobs):
    """Run the block with ``effective_n_threads(n_jobs)`` torch threads.

    Examples
    --------
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with torch_threads(1):
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    global _calls_setting, _count_before
    n_threads = effective_n_threads(n_jobs)
    if n_threads is None:
        yield
        return
    with _lock:
        if _calls_setting == 0:
            _count_before = torch.get_num_threads()
        _calls_setting += 1
        previous = torch.get_num_threads()
        if n_threads != previous:
            torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        # Calls overlapping in several threads each restoring what it saw
        # would leave the count of whichever started second; the last one
        # out restores the count from before the first.
        with _lock:
            _calls_setting -= 1
            restore = _count_before if _calls_setting == 0 else previous
            if torch.get_num_threads() != restore:
                torch.set_num_threads(restore)


@contextlib.contextmanager
def fp32_convolutions():
    """Run the block with CUDA convolutions in full float32 (no TF32).

    cuDNN's default TF32 convolutions round inputs to 10 mantissa bits: the
    cosine similarities then move by about 1e-4, enough to flip a verdict at
    the threshold between a model scored on a CPU and on a GPU. The network
    is small, so full precision costs little. No effect on the CPU.

    Examples
    --------
    >>> import torch
    >>> with fp32_convolutions():
    ...     torch.backends.cudnn.allow_tf32
    False
    """
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def with_torch_threads(method):
    """Decorate an estimator method to run under ``torch_threads(self.n_jobs)``
    and :func:`fp32_convolutions`."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch_threads(self.n_jobs), fp32_convolutions():
            return method(self, *args, **kwargs)

    return wrapper


def tracing() -> bool:
    """Whether the call runs inside a trace or an export (TorchScript, ONNX,
    torch.export), which must record the model as it is stored and for any
    batch size: the CPU-only shortcuts of the backbone and the head step
    aside there."""
    return (torch.jit.is_scripting() or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling())
