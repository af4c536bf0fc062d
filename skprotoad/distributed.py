"""Scoring many images on a Dask cluster.

:func:`score_and_write` spreads :func:`skprotoad.batch_scoring.score_and_write`
over Dask: the images are cut into partitions, each partition is scored (and
its overlays and masks written) by one task, and the partial results are put
back in input order, so the result is the one the single-process loop returns.
The fitted detector travels to each worker once, not once per task.

It runs on whatever Dask scheduler is active: a ``distributed.Client``'s
cluster when one is connected (pass it as ``client`` for a progress bar and
partial results on interruption), else Dask's local threads. Files are
written by the workers, so ``out_dir`` must be a folder every worker can
write (a shared file system on a multi-machine cluster), and ``items`` paths
every worker can read.
"""

from __future__ import annotations

import uuid

from .batch_scoring import check_scoring_inputs, finish_result, new_result
from .batch_scoring import score_and_write as _score_and_write_locally

__all__ = ["score_and_write"]

#: Images per task when ``partition_size`` is not given, in batches of the
#: detector: large enough that a task outweighs Dask's per-task overhead,
#: small enough to spread a few thousand images over many workers.
PARTITION_BATCHES = 16


def score_and_write(detector, items, *, names=None, out_dir=None, partition_size=None,
                    client=None, progress=None, result=None, **kwargs):
    """Score images, and write their overlays and masks, on a Dask cluster.

    Parameters
    ----------
    detector : fitted ProtoADDetector
    items : list of paths or of image arrays
        Paths are read by the workers: use paths they can reach.
    names : list of str, default=None
        Output names, one per item; needed with ``out_dir``.
    out_dir : path, default=None
        Where the workers write ``overlays/`` and ``masks/``, as the
        single-process loop.
    partition_size : int, default=None
        Images per task; ``None``: :data:`PARTITION_BATCHES` times the
        detector's ``batch_size``. Smaller partitions spread a small set over
        more workers; larger ones cost less scheduling. A multiple of
        ``batch_size`` scores the same batches as the single-process loop,
        hence the same scores bit for bit; other sizes differ by float
        rounding.
    client : distributed.Client, default=None
        Run on this client's cluster, advancing ``progress`` as partitions
        finish and filling ``result`` with every finished partition, so that
        an interrupted run still returns what was done. ``None``: Dask's
        current scheduler (a client made current, else local threads).
    progress : tqdm bar, default=None
        Advanced by the partition's images as each finishes.
    result : dict, default=None
        An empty :func:`~skprotoad.batch_scoring.new_result`, filled as
        partitions finish.
    **kwargs
        The other arguments of :func:`skprotoad.batch_scoring.score_and_write`
        (``threshold``, ``vmin``, ``vmax``, ``alpha``, ``write``, ``truth_masks``,
        ``keep_maps``, ``strict``).

    Returns
    -------
    result : dict
        As :func:`skprotoad.batch_scoring.score_and_write`, indices into
        ``items``.

    Examples
    --------
    >>> from distributed import Client, LocalCluster  # doctest: +SKIP
    >>> from skprotoad.distributed import score_and_write  # doctest: +SKIP
    >>> with Client(LocalCluster(n_workers=4, threads_per_worker=1)) as client:
    ...     result = score_and_write(det, paths, names=names, out_dir="out",
    ...                              client=client)  # doctest: +SKIP
    """
    import dask

    n = len(items)
    if partition_size is None:
        partition_size = PARTITION_BATCHES * int(detector.batch_size)
    if not isinstance(partition_size, int) or isinstance(partition_size, bool) \
            or partition_size < 1:
        raise ValueError(f"partition_size must be a positive int, got {partition_size!r}.")
    check_scoring_inputs(detector, n, names, out_dir, kwargs.get("threshold"),
                         kwargs.get("write"), kwargs.get("truth_masks"))
    # one task holds the model; every partition depends on it, so each worker
    # fetches it once (traverse=False: the estimator is not a collection)
    model = dask.delayed(detector, name=f"skprotoad-model-{uuid.uuid4().hex}",
                         traverse=False)
    starts = range(0, n, partition_size)
    parts = [
        dask.delayed(_score_partition)(
            model, start, items[start:start + partition_size],
            None if names is None else names[start:start + partition_size],
            out_dir, _slice_kwargs(kwargs, start, partition_size),
        )
        for start in starts
    ]
    result = new_result() if result is None else result
    if client is None:
        for part in dask.compute(*parts):
            _append(result, part, progress)
    else:
        from distributed import as_completed

        futures = client.compute(parts)
        position = {future.key: i for i, future in enumerate(futures)}
        finished, appended = {}, 0
        try:
            # appended in input order, each once every earlier partition is in
            for future in as_completed(futures):
                finished[position[future.key]] = future.result()
                while appended in finished:
                    _append(result, finished.pop(appended), progress)
                    appended += 1
        finally:
            client.cancel(futures)
    crop = detector.network_.input_size
    return finish_result(result, kwargs.get("keep_maps", False), crop)


def _slice_kwargs(kwargs, start, size):
    """``kwargs`` with its per-item sequences cut to one partition."""
    return {k: (v[start:start + size] if k in ("write", "truth_masks") and v is not None
                else v) for k, v in kwargs.items()}


def _score_partition(detector, start, items, names, out_dir, kwargs):
    """One task: the single-process loop on a partition, indices made global."""
    part = _score_and_write_locally(detector, list(items), names=names, out_dir=out_dir,
                                    **kwargs)
    part["index"] = part["index"] + start
    part["skipped"] = [(index + start, reason) for index, reason in part["skipped"]]
    part["n_items"] = len(items)
    return part


def _append(result, part, progress):
    """Add a partition's finished result to the lists of ``result``."""
    for key in ("index", "score", "anomaly", "size", "overlay", "mask"):
        result[key].extend(part[key].tolist() if hasattr(part[key], "tolist") else part[key])
    if part["maps"] is not None:
        result["maps"].extend(list(part["maps"]))
    result["skipped"].extend(part["skipped"])
    if progress is not None:
        progress.update(part["n_items"])
