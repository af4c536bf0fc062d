"""Prototype learning for ProtoAD: FINCH clustering and k-means in torch.

ProtoAD (Huang, Kang and Wu, 2023) summarises the patch features of normal
training images by a small set of prototypes, the L2-normalised means of the
clusters found by FINCH (Sarfraz, Sharma and Stiefelhagen, CVPR 2019).  This
module implements

* :func:`finch`: the FINCH hierarchy of partitions,
* :func:`finch_n_clusters`: a partition with exactly ``n_clusters`` clusters,
* :func:`kmeans`: spherical k-means with memory-bounded batched assignment,
* :func:`learn_prototypes`: the entry point used by the estimator.

All functions take float arrays of shape ``(n_samples, n_features)`` whose rows
are unit vectors; the distance is the cosine distance ``1 - x @ y``.

First neighbours are found by blocked matrix products in torch (never an
``n_samples x n_samples`` matrix), exactly for small inputs and with an
inverted-file (IVF) search for large ones, see :func:`finch`.
"""

import math
import sys
import numbers
import warnings
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from sklearn.utils import check_random_state
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ._choices import CLUSTERING_METHODS

__all__ = [
    "CLUSTERING_METHODS",
    "MAX_DEFAULT_PROTOTYPES",
    "EXACT_NEIGHBORS_MAX_SAMPLES",
    "IVF_N_PROBE",
    "first_neighbors",
    "neighbors_without",
    "SharedSearch",
    "estimated_multiply_adds",
    "finch",
    "finch_n_clusters",
    "kmeans",
    "learn_prototypes",
    "add_farthest_rows",
]

#: Largest number of prototypes that ``learn_prototypes(method="finch")``
#: picks on its own.  The cost of the 1x1 convolution against the prototypes
#: at inference grows linearly with their number; how accuracy follows it is
#: measured in docs/user_guide/prototypes.md.
MAX_DEFAULT_PROTOTYPES = 1000

#: With ``neighbors="auto"``, inputs (or hierarchy levels) with at most this
#: many rows use the exact first-neighbour search, larger ones the IVF search.
EXACT_NEIGHBORS_MAX_SAMPLES = 20_000

#: Lists of the inverted file each row is compared with in the approximate
#: first-neighbour search (:func:`first_neighbors`).
IVF_N_PROBE = 6
# IVF search: training rows per list and Lloyd steps of the coarse quantiser
# (see _first_neighbors_ivf and docs/clustering.md).
_IVF_TRAIN_PER_LIST = 32
_IVF_TRAIN_ITER = 6
# lists batched into one padded product must fill this fraction of it
_IVF_MIN_FILL = 0.7
# on the CPU a list with at least this many (query, row) pairs is searched
# by its own 1 x 1 convolution: oneDNN's outruns the batched product, which
# wins only where per-call overhead dominates
_IVF_OWN_PRODUCT_ENTRIES = 2**18

# k-means: Lloyd iterations at most, and rows its k-means++ seeding samples at least
_KMEANS_MAX_ITER = 30
_KMEANS_MIN_INIT_SIZE = 10_000

# finch_n_clusters keeps all cluster-to-cluster similarities in memory up to
# this many entries (512 MiB of float32), else recomputes rows on demand.
_MERGE_MATRIX_ENTRIES = 2**27

# add_farthest_rows updates only the rows with the largest distances: this
# many, plus this many per row to choose, before a full refresh.
_FARTHEST_POOL_MIN = 1024
_FARTHEST_POOL_FACTOR = 8

# Blocks of the similarity matrix hold at most this many float32 entries
# (256 MiB), which bounds the memory of every search whatever ``n_samples``.
_BLOCK_ENTRIES = 2**26
# On the CPU the exact search's blocks hold at most this many (16 MiB), so
# that a block stays in the cache between the product that writes it and the
# max that reads it, which 256 MiB blocks do not.
_CPU_MATCH_ENTRIES = 2**22


# --------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------
def _check_X(X, *, min_samples=1):
    """Validate ``X`` and return it as a C-contiguous float32 array."""
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    if sp.issparse(X):
        raise TypeError("X must be a dense array, got a sparse matrix.")
    X = np.asarray(X)
    if X.dtype == object or not (
        np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)
    ):
        raise TypeError(f"X must be an array of floats, got dtype {X.dtype}.")
    if X.ndim != 2:
        raise ValueError(
            f"X must be 2-D of shape (n_samples, n_features), got {X.ndim}-D "
            f"array of shape {X.shape}."
        )
    if X.shape[0] < min_samples:
        raise ValueError(
            f"X must have at least {min_samples} sample(s), got shape {X.shape}."
        )
    if X.shape[1] < 1:
        raise ValueError(f"X must have at least 1 feature, got shape {X.shape}.")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not all(np.isfinite(X[rows]).all() for rows in _row_blocks(X)):
        raise ValueError("X contains NaN or infinity.")
    return X


# Elements per block of the element-wise passes over an input (norms,
# finiteness): their temporaries stay at 64 MiB as float32, not the size of X.
_PASS_ENTRIES = 2**24


def _row_blocks(X):
    rows = max(1, _PASS_ENTRIES // max(1, X.shape[1]))
    return (slice(start, start + rows) for start in range(0, len(X), rows))


def _check_n_clusters(n_clusters, n_samples):
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral):
        raise TypeError(
            f"n_clusters must be an int, got {type(n_clusters).__name__}."
        )
    n_clusters = int(n_clusters)
    if n_clusters < 1 or n_clusters > n_samples:
        raise ValueError(
            f"n_clusters must be in [1, n_samples={n_samples}], got {n_clusters}."
        )
    return n_clusters


def _check_neighbors(neighbors):
    if neighbors not in ("auto", "exact", "approx"):
        raise ValueError(
            f"neighbors must be 'auto', 'exact' or 'approx', got {neighbors!r}."
        )
    return neighbors


def _resolve_device(device):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available.")
    return device


def _row_norms(X):
    """L2 norms of the rows of ``X`` as a (n, 1) array, block by block, since
    ``np.linalg.norm`` squares its whole input into a temporary of the same
    size (the same numbers, row by row); ``None`` when they are all 1."""
    norms = np.empty((len(X), 1), dtype=np.result_type(X.dtype, np.float32))
    for rows in _row_blocks(X):
        norms[rows] = np.linalg.norm(X[rows], axis=1, keepdims=True)
    if X.dtype == np.float32 and np.all(np.abs(norms - 1.0) <= 1e-5):
        return None
    norms[norms == 0] = 1.0
    return norms


def _normalize_rows(X):
    """Return ``X`` with unit rows; zero rows stay zero (cosine 0 to all).

    Already unit float32 rows are returned as they are: a copy of a
    2.4-million-row input would cost 1.7 GB.
    """
    norms = _row_norms(X)
    if norms is None:
        return X
    return (X / norms).astype(np.float32, copy=False)


class _UnitRows:
    """The rows of a float32 array divided by their norms, on each read.

    FINCH reads unit rows, but only block by block, while the detector's
    means need the raw rows: this view spares a unit copy of millions of
    patches.  Division is correctly rounded, so every read equals the same
    rows of :func:`_normalize_rows`' copy bit for bit.  Indexing returns a
    tensor on the view's device, as indexing that copy's tensor would.
    """

    def __init__(self, X, device):
        norms = _row_norms(X)
        self._rows = _as_tensor(X, device)
        self._norms = None if norms is None else torch.from_numpy(norms).to(device)
        self.shape, self.dtype, self.device = self._rows.shape, self._rows.dtype, self._rows.device
        self._finest = None  # (labels, sums) of the first partition summed

    def cluster_sums(self, labels, n_clusters):
        """:func:`_cluster_sums` of these rows.

        The first partition is summed from the rows and kept; a later one
        that only merges its clusters (every upper FINCH level, the pair
        merges, the prototypes) is summed from its sums, which reads one row
        per cluster instead of millions.  The sums then differ from a sum in
        row order by rounding only.
        """
        labels = np.asarray(labels)
        if self._finest is not None:
            finest_labels, finest_sums = self._finest
            merged_into = np.zeros(len(finest_sums), dtype=np.int64)
            merged_into[finest_labels] = labels
            if np.array_equal(merged_into[finest_labels], labels):
                return _cluster_sums(finest_sums, merged_into, n_clusters)
            return _cluster_sums(self, labels, n_clusters)
        sums = _cluster_sums(self, labels, n_clusters)
        self._finest = (labels, sums)
        return sums

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, index):
        rows = self._rows[index]
        return rows if self._norms is None else rows / self._norms[index]


def _cluster_sums(X, labels, n_clusters):
    """Per-cluster sums of the rows of ``X`` (an array or :class:`_UnitRows`),
    float32; the CPU scatter-add accumulates in row order, so the sums are
    reproducible and the same whatever the blocks."""
    sums = torch.zeros((n_clusters, X.shape[1]), dtype=torch.float32)
    labels = torch.as_tensor(labels)
    for rows in _row_blocks(X):
        block = X[rows]
        block = _as_tensor(block, "cpu") if isinstance(block, np.ndarray) else block.cpu()
        sums.index_add_(0, labels[rows], block)
    return sums.numpy()


def _as_tensor(X, device):
    """``X`` as a tensor on ``device``, sharing its memory on the CPU.

    Nothing here writes to it, so a read-only array (the detector's
    memory-mapped feature cache) is shared as it is; torch warns about every
    non-writable array, hence the filter.  A :class:`_UnitRows` is returned
    as it is.
    """
    if isinstance(X, _UnitRows):
        return X
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="The given NumPy array is not writable", category=UserWarning
        )
        return torch.from_numpy(X).to(device)


def _cluster_means(X, labels, n_clusters):
    """Per-cluster means of the rows of ``X``; an empty cluster's mean is 0."""
    counts = np.bincount(labels, minlength=n_clusters).astype(np.float32)
    return _cluster_sums(X, labels, n_clusters) / np.maximum(counts, 1.0)[:, None]


# --------------------------------------------------------------------------
# First-neighbour search
# --------------------------------------------------------------------------
def _row_block(n_cols, batch_size, entries=None):
    if batch_size is not None:
        return max(1, int(batch_size))
    entries = _BLOCK_ENTRIES if entries is None else entries
    return int(min(8192, max(64, entries // max(n_cols, 1))))


def _products(A, B, bias=None):
    """``A @ B.T (+ bias)`` of float tensors ``A`` (n, C), ``B`` (k, C) and
    ``bias`` (k,), as an (n, k) tensor.

    On the CPU a 1 x 1 convolution of a channels-last view of ``A``: oneDNN
    runs it faster than the sgemm behind ``@`` on the CPUs we measured
    (``benchmarks/bench_speed.py`` times both); the values agree to
    rounding.
    """
    if A.device.type != "cpu" or not A.is_contiguous() or A.dtype != torch.float32:
        return A @ B.T if bias is None else torch.addmm(bias, A, B.T)
    n, c = A.shape
    out = torch.nn.functional.conv2d(
        A.view(1, n, 1, c).permute(0, 3, 1, 2), B.reshape(B.shape[0], c, 1, 1), bias
    )
    return out.permute(0, 2, 3, 1).reshape(n, B.shape[0])


def _best_match(Q, D, *, q_ids=None, d_ids=None, self_offset=None, batch_size=None):
    """Most similar row of ``D`` for every row of ``Q`` by blocked matmuls.

    Pairs with ``q_ids[i] == d_ids[j]`` (the same point) are excluded, or,
    cheaper, pairs ``j == i + self_offset`` when ``Q`` is a slice of ``D``
    starting at row ``self_offset``.  Returns
    ``(sim, idx)`` tensors; ``idx`` indexes the rows of ``D``.  Ties go to the
    lowest index, as with ``np.argmax``.
    """
    n_q, n_d = Q.shape[0], D.shape[0]
    entries = min(_BLOCK_ENTRIES, _CPU_MATCH_ENTRIES) if Q.device.type == "cpu" else _BLOCK_ENTRIES
    # columns are split only where row blocks would otherwise fall below
    # ~1k rows, too few for efficient matrix products
    col_block = max(1, min(n_d, entries // 1024))
    row_block = _row_block(col_block, batch_size, entries)
    best_sim = torch.full((n_q,), -math.inf, dtype=Q.dtype, device=Q.device)
    best_idx = torch.zeros(n_q, dtype=torch.int64, device=Q.device)
    for c0 in range(0, n_d, col_block):
        Dc = D[c0 : c0 + col_block]
        dc_ids = None if d_ids is None else d_ids[c0 : c0 + col_block]
        for r0 in range(0, n_q, row_block):
            sim = _products(Q[r0 : r0 + row_block], Dc)
            if self_offset is not None:
                sim.diagonal(r0 + self_offset - c0).fill_(-math.inf)
            elif q_ids is not None:
                sim.masked_fill_(q_ids[r0 : r0 + row_block, None] == dc_ids[None, :], -math.inf)
            val, arg = sim.max(dim=1)
            cur = best_sim[r0 : r0 + row_block]
            # strict '>' keeps the earlier (lower-index) column block on ties
            better = val > cur
            best_sim[r0 : r0 + row_block] = torch.where(better, val, cur)
            best_idx[r0 : r0 + row_block] = torch.where(
                better, arg + c0, best_idx[r0 : r0 + row_block]
            )
    return best_sim, best_idx


def _first_neighbors_exact(X, *, device, batch_size=None, verbose=False):
    """Exact first neighbour (highest cosine, itself excluded) of every row."""
    n = X.shape[0]
    Xt = _as_tensor(X, device)
    # outer chunks only pace the progress bar; _best_match does the blocking
    row_block = max(_row_block(n, batch_size), 8192)
    sims = np.empty(n, dtype=np.float32)
    nn = np.empty(n, dtype=np.int64)
    for r0 in tqdm(
        range(0, n, row_block),
        desc="first neighbours (exact)",
        disable=not verbose,
        leave=False,
    ):
        s, i = _best_match(
            Xt[r0 : r0 + row_block],
            Xt,
            self_offset=r0,
            batch_size=batch_size,
        )
        sims[r0 : r0 + row_block] = s.cpu().numpy()
        nn[r0 : r0 + row_block] = i.cpu().numpy()
    return nn, sims


def first_neighbors(X, *, neighbors="auto", n_probe=None, device="cpu", batch_size=None,
                    random_state=None, return_lists=False):
    """Each row's first neighbour: the other row of highest cosine similarity.

    The search FINCH's first level runs (:func:`finch`), for measuring it.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    neighbors : {"auto", "exact", "approx"}, default="auto"
        Exact search, the inverted-file search, or exact up to
        :data:`EXACT_NEIGHBORS_MAX_SAMPLES` rows.
    n_probe : int, default=None
        Lists probed by the approximate search; None: :data:`IVF_N_PROBE`.
    device : str or torch.device, default="cpu"
    batch_size : int, default=None
        Rows per block of the similarity computations.
    random_state : int, RandomState instance or None, default=None
        Seeds the approximate search's quantiser.
    return_lists : bool, default=False
        Also return the lists of the inverted file each row was compared
        with. Pass them, without the same rows, to :func:`learn_prototypes`
        as ``neighbor_lists`` with :func:`neighbors_without`'s neighbours:
        when many rows lost their neighbour, those rows are then searched in
        their lists instead of every row searched again.

    Returns
    -------
    indices : ndarray of shape (n_samples,), int64
    similarities : ndarray of shape (n_samples,), float32
    lists : ndarray of shape (n_samples, n_lists_probed), int32
        Only with ``return_lists``: the lists each row was compared with, the
        one it is stored in first; the exact search's are a single list (0)
        holding every row.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.clustering import first_neighbors
    >>> X = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    >>> first_neighbors(X)[0].tolist()
    [1, 0, 1]

    The clustering without a block of rows (e.g. held-out images), from one
    search of all rows:

    >>> from skprotoad.clustering import learn_prototypes, neighbors_without
    >>> Y = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> indices, _, lists = first_neighbors(Y, return_lists=True)
    >>> kept = neighbors_without(indices, 150, 200)  # without rows 150-199
    >>> P = learn_prototypes(Y[:150], n_clusters=5, first_neighbors=kept,
    ...                      neighbor_lists=lists[:150])
    >>> P.shape
    (5, 8)
    """
    X = _check_X(X, min_samples=2)
    _check_neighbors(neighbors)
    device = _resolve_device(device)
    return _first_neighbors(
        _UnitRows(X, device), neighbors=neighbors, device=device, batch_size=batch_size,
        random_state=random_state, verbose=False, n_probe=n_probe, return_lists=return_lists,
    )


def neighbors_without(indices, start, stop):
    """First neighbours of the rows outside ``start:stop``, numbered as the
    rows of the array without that block; -1 where the neighbour lay in it.

    The first neighbours of a subset are the subset's own neighbours
    wherever they lie in the subset: no other row of it is closer. Pass the
    result to :func:`learn_prototypes` as ``first_neighbors`` with the rows
    outside the block, which searches only the rows marked -1.

    Parameters
    ----------
    indices : ndarray of shape (n_samples,), int
        First neighbours of all rows, as :func:`first_neighbors` gives them.
    start, stop : int
        The block of rows left out.

    Returns
    -------
    indices : ndarray of shape (n_samples - (stop - start),), int64

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.clustering import neighbors_without
    >>> neighbors_without(np.array([1, 0, 3, 4, 3]), 1, 2).tolist()  # without row 1
    [-1, 2, 3, 2]
    """
    indices = np.asarray(indices, dtype=np.int64)
    kept = np.r_[indices[:start], indices[stop:]]
    # rows after the block move up by its length; rows in it become unknown
    return np.where(kept >= stop, kept - (stop - start), np.where(kept >= start, -1, kept))


class SharedSearch:
    """The neighbour searches that a FINCH clustering of all rows shares
    with the clusterings of the rows without a block (held-out images).

    Most of the first level's neighbours, the largest search, and of the
    second level's are the same in all of them (:func:`neighbors_without`);
    this carries them from one clustering to the next.  The first
    clustering learnt from a search without a second level records its own.

    Parameters
    ----------
    indices : ndarray of shape (n_samples,), int
        Each row's first neighbour, -1 where still to find.
    lists : ndarray of shape (n_samples, n_lists_probed), int
        The lists of the search each row was compared with
        (:func:`first_neighbors` with ``return_lists=True``).
    second_level : object, default=None
        FINCH's first partition and its clusters' neighbours, as the first
        clustering records them; set by :meth:`learn_prototypes`.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.clustering import SharedSearch
    >>> Y = np.random.default_rng(0).normal(size=(400, 8)).astype(np.float32)
    >>> search = SharedSearch.of(Y, random_state=0)
    >>> P_all = search.learn_prototypes(Y, n_clusters=5)  # all rows, first
    >>> P_rest = search.without(300, 400).learn_prototypes(Y[:300], n_clusters=5)
    >>> P_rest.shape
    (5, 8)
    """

    def __init__(self, indices, lists, second_level=None):
        self.indices, self.lists, self.second_level = indices, lists, second_level

    @classmethod
    def of(cls, X, *, neighbors="auto", device="cpu", random_state=None):
        """The search of all rows of ``X`` (:func:`first_neighbors`)."""
        indices, _, lists = first_neighbors(
            X, neighbors=neighbors, device=device, random_state=random_state, return_lists=True
        )
        return cls(indices, lists)

    def without(self, start, stop):
        """The search for the rows outside ``start:stop``, numbered as the rows
        of the array without that block."""
        return SharedSearch(
            neighbors_without(self.indices, start, stop),
            np.delete(self.lists, np.s_[start:stop], axis=0),
            None if self.second_level is None else self.second_level.without(start, stop),
        )

    def learn_prototypes(self, X, *, method="finch", n_clusters=None, neighbors="auto",
                         random_state=None, device="cpu", batch_size=None, normalize=True,
                         n_farthest=0, verbose=False):
        """:func:`learn_prototypes` of ``X``, the rows of this search, from
        it; records FINCH's second level when the search has none."""
        if self.second_level is not None and len(self.second_level.labels) != len(X):
            raise ValueError(
                f"this search is of {len(self.second_level.labels)} rows; X has {len(X)}: "
                "take .without(start, stop) for the rows outside a block."
            )
        record = [] if self.second_level is None else None
        prototypes = _learn_prototypes(
            X, method=method, n_clusters=n_clusters, neighbors=neighbors,
            random_state=random_state, device=device, batch_size=batch_size,
            normalize=normalize, n_farthest=n_farthest, first_neighbors=self.indices,
            neighbor_lists=self.lists, verbose=verbose, second_level=self.second_level,
            record=record,
        )
        if record:
            self.second_level = record[0]
        return prototypes


def _searches_exactly(neighbors, n_samples):
    """Whether the ``neighbors`` search of ``n_samples`` rows is the exact one."""
    return neighbors == "exact" or (
        neighbors == "auto" and n_samples <= EXACT_NEIGHBORS_MAX_SAMPLES
    )


def _first_neighbors(X, *, neighbors, device, batch_size, random_state, verbose, n_probe=None,
                     return_lists=False):
    if _searches_exactly(neighbors, X.shape[0]):
        found = _first_neighbors_exact(X, device=device, batch_size=batch_size, verbose=verbose)
        # one list that holds every row
        return (*found, np.zeros((X.shape[0], 1), dtype=np.int32)) if return_lists else found
    return _first_neighbors_ivf(
        X,
        device=device,
        batch_size=batch_size,
        random_state=random_state,
        n_probe=n_probe,
        verbose=verbose,
        return_lists=return_lists,
    )


# --------------------------------------------------------------------------
# Approximate first neighbours: inverted file (IVF) with several probes
# --------------------------------------------------------------------------
def _first_neighbors_ivf(
    X, *, device, batch_size=None, random_state=None, n_lists=None, n_probe=None,
    verbose=False, return_lists=False,
):
    """Approximate first neighbours by an inverted file with several probes.

    A coarse spherical k-means splits the rows into ``n_lists`` lists (each row
    is stored in the list of its closest centre); every row is then compared
    exactly with the rows of the lists of its ``n_probe`` closest centres.
    The cost is about ``n * (n_lists + n_probe * n / n_lists) * C`` multiply-
    adds, lowest for ``n_lists = sqrt(n_probe * n)``, i.e. ``O(n^1.5)``.
    With ``return_lists``, also each row's probed lists, (n, n_probe) int32,
    its own first (:func:`_first_neighbors_in_lists` searches them again).
    """
    n = X.shape[0]
    rng = check_random_state(random_state)
    n_probe = IVF_N_PROBE if n_probe is None else int(n_probe)
    if n_lists is None:
        n_lists = int(round(math.sqrt(n_probe * n)))
    n_lists = max(1, min(int(n_lists), n // 2))
    n_probe = max(1, min(n_probe, n_lists))
    Xt = _as_tensor(X, device)

    # coarse quantiser: a few Lloyd steps from random rows of a subsample
    # (a quantiser only needs to be reasonable; k-means++ would cost more)
    n_train = min(n, _IVF_TRAIN_PER_LIST * n_lists)
    train = np.sort(rng.choice(n, n_train, replace=False))
    init = train[np.sort(rng.choice(n_train, n_lists, replace=False))]
    centers = _spherical_lloyd(
        Xt[torch.from_numpy(train).to(device)],
        Xt[torch.from_numpy(init).to(device)].clone(),
        max_iter=_IVF_TRAIN_ITER,
        tol=0.0,
        batch_size=batch_size,
        verbose=verbose,
        desc="IVF quantiser",
    )

    # each row's n_probe closest centres; the first is its own list
    probes = torch.empty((n, n_probe), dtype=torch.int64, device=device)
    block = _row_block(n_lists, batch_size)
    for r0 in tqdm(
        range(0, n, block), desc="IVF assignment", disable=not verbose, leave=False
    ):
        probes[r0 : r0 + block] = torch.topk(
            _products(Xt[r0 : r0 + block], centers), n_probe, dim=1
        ).indices
    probes = probes.cpu().numpy()

    best_sim, best_idx, (db_order, db_sim, db_idx) = _search_probed_lists(
        Xt, probes, np.arange(n), batch_size=batch_size, verbose=verbose
    )
    # candidates found from the database side (rows that probed my list)
    better = db_sim > best_sim[db_order]
    best_sim[db_order[better]] = db_sim[better]
    best_idx[db_order[better]] = db_idx[better]
    found = _search_lonely(Xt, torch.arange(n, device=device), best_sim, best_idx)
    if return_lists:
        return (*found, probes.astype(np.int32))
    return found


def _search_probed_lists(Xt, probes, queries, *, batch_size, verbose):
    """Best match of each of the ``queries`` (sorted row numbers) among the
    rows stored in the lists it probes (``probes[row]``; a row is stored in
    ``probes[row, 0]``), itself excluded.

    Returns
    -------
    best_sim, best_idx : torch.Tensor of shape (len(queries),)
        -inf and 0 where the probed lists stored no other row.
    database : (order, sim, idx)
        The stored rows in list order, and for each the best match among
        the queries that probed its list (free extra candidates: the same
        products, read by column).
    """
    device = Xt.device
    n_lists = int(probes.max()) + 1
    n_probe = probes.shape[1]
    # database: rows sorted by their own list; queries: (row, probed list)
    # pairs sorted by list.  Both make each list a contiguous segment, rows
    # in increasing order within it.
    own = probes[:, 0]
    db_order = np.argsort(own, kind="stable")
    db_bounds = np.searchsorted(own[db_order], np.arange(n_lists + 1))
    q_flat = probes[queries].ravel()
    q_order = np.argsort(q_flat, kind="stable")
    q_bounds = np.searchsorted(q_flat[q_order], np.arange(n_lists + 1))
    q_points = np.asarray(queries)[q_order // n_probe]
    db_order_t = torch.from_numpy(db_order).to(device)
    # best match of every (row, probed list) pair, in q_order positions
    pair_sim, pair_idx, db_sim, db_idx = _ivf_search(
        Xt,
        db_order_t,
        db_bounds,
        torch.from_numpy(q_points).to(device),
        q_bounds,
        batch_size=batch_size,
        verbose=verbose,
    )
    sim = torch.empty(len(q_flat), dtype=Xt.dtype, device=device)
    idx = torch.empty(len(q_flat), dtype=torch.int64, device=device)
    q_order_t = torch.from_numpy(q_order).to(device)
    sim[q_order_t], idx[q_order_t] = pair_sim, pair_idx
    # the max over a row's probes; ties go to the closer list (first probe)
    best_sim, which = sim.view(-1, n_probe).max(dim=1)
    best_idx = idx.view(-1, n_probe).gather(1, which[:, None]).squeeze(1)
    return best_sim, best_idx, (db_order_t, db_sim, db_idx)


def _search_lonely(Xt, rows, best_sim, best_idx):
    """``(best_idx, best_sim)`` as arrays, the ``rows`` whose probed lists held
    nobody else (similarity -inf) searched exhaustively."""
    lonely = torch.nonzero(best_sim == -math.inf).flatten()
    if len(lonely):
        ids = torch.arange(Xt.shape[0], device=Xt.device)
        sim, arg = _best_match(Xt[rows[lonely]], Xt, q_ids=rows[lonely], d_ids=ids)
        best_sim[lonely], best_idx[lonely] = sim, arg
    return best_idx.cpu().numpy(), best_sim.cpu().numpy()


def _first_neighbors_in_lists(X, rows, lists, *, batch_size, verbose):
    """First neighbours of the sorted ``rows`` of ``X`` (a :class:`_UnitRows`)
    in the inverted-file lists of an earlier search (``lists``, as
    :func:`_first_neighbors_ivf` returns them, for the rows of ``X``): each
    row is compared with the rows now stored in the lists it probed.

    Clustering the rows outside a block, the rows whose neighbour lay in it
    need a search again; with their lists that costs a fraction of a new
    search of all rows, which trains a quantiser and assigns every row."""
    best_sim, best_idx, _ = _search_probed_lists(
        X, lists, rows, batch_size=batch_size, verbose=verbose
    )
    return _search_lonely(X, torch.from_numpy(rows).to(X.device), best_sim, best_idx)[0]


def _ivf_search(Xt, db_order, db_bounds, q_points, q_bounds, *, batch_size, verbose):
    """Best match of each query segment within the database segment of the
    same list.  Small lists of similar size are padded and handled together
    by one batched matrix product: thousands of small products would spend
    most of their time in per-call overhead, badly so when the cores are
    shared.  On the CPU a large list gets a product of its own
    (:func:`_products`), which runs faster than the batched one."""
    device = Xt.device
    own_product = _IVF_OWN_PRODUCT_ENTRIES if device.type == "cpu" else _BLOCK_ENTRIES
    d_len = np.diff(db_bounds)
    q_len = np.diff(q_bounds)
    out_sim = torch.full(
        (int(q_bounds[-1]),), -math.inf, dtype=Xt.dtype, device=device
    )
    out_idx = torch.zeros(int(q_bounds[-1]), dtype=torch.int64, device=device)
    db_sim = torch.full((len(db_order),), -math.inf, dtype=Xt.dtype, device=device)
    db_idx = torch.zeros(len(db_order), dtype=torch.int64, device=device)
    order = np.lexsort((q_len, d_len))[::-1]
    order = order[(q_len[order] > 0) & (d_len[order] > 0)]
    pbar = tqdm(total=len(order), desc="IVF search", disable=not verbose, leave=False)
    start = 0
    while start < len(order):
        # grow the group while its padded similarities and gathered rows fit
        # in one block and padding wastes at most ~30% of each list's work
        # (lists come sorted by decreasing database size)
        max_q, max_d = int(q_len[order[start]]), int(d_len[order[start]])
        stop = start + 1
        while stop < len(order) and max_q * max_d < own_product:
            lst = order[stop]
            mq, md = max(max_q, int(q_len[lst])), max(max_d, int(d_len[lst]))
            per_list = mq * md + (mq + md) * Xt.shape[1]
            if (stop - start + 1) * per_list > _BLOCK_ENTRIES or (
                q_len[lst] * d_len[lst] < _IVF_MIN_FILL * mq * md
            ) or q_len[lst] * d_len[lst] >= own_product:
                break
            max_q, max_d, stop = mq, md, stop + 1
        lists = order[start:stop]
        if stop - start == 1 and max_q * max_d >= own_product:
            lst = lists[0]
            q0, q1, d0, d1 = q_bounds[lst], q_bounds[lst + 1], db_bounds[lst], db_bounds[lst + 1]
            q_ids, d_ids = q_points[q0:q1], db_order[d0:d1]
            if max_q * max_d > _BLOCK_ENTRIES:
                s, a = _best_match(
                    Xt[q_ids], Xt[d_ids], q_ids=q_ids, d_ids=d_ids, batch_size=batch_size
                )
                out_sim[q0:q1], out_idx[q0:q1] = s, d_ids[a]
            else:
                sim = _products(Xt[q_ids], Xt[d_ids])
                # both segments list rows in increasing order: a stored row's
                # own query, if it is one, is found by search
                own = torch.searchsorted(q_ids, d_ids).clamp_(max=len(q_ids) - 1)
                hit = q_ids[own] == d_ids
                sim[own[hit], torch.arange(len(d_ids), device=device)[hit]] = -math.inf
                s, a = sim.max(dim=1)
                out_sim[q0:q1], out_idx[q0:q1] = s, d_ids[a]
                s, a = sim.max(dim=0)
                db_sim[d0:d1], db_idx[d0:d1] = s, q_ids[a]
        else:
            q_pos, q_ok = _padded_positions(q_bounds[lists], q_len[lists], max_q, device)
            d_pos, d_ok = _padded_positions(db_bounds[lists], d_len[lists], max_d, device)
            q_ids = q_points[q_pos]
            d_ids = db_order[d_pos]
            sim = torch.bmm(Xt[q_ids], Xt[d_ids].transpose(1, 2))
            # padding repeats a list's last row, so padded entries are real
            # similarities and need no mask; a row's own entry does
            sim.masked_fill_(q_ids[:, :, None] == d_ids[:, None, :], -math.inf)
            s, a = sim.max(dim=2)
            out_sim[q_pos[q_ok]] = s[q_ok]
            out_idx[q_pos[q_ok]] = d_ids.gather(1, a)[q_ok]
            # the same products, read by column, offer every stored row the
            # rows that probed its list: free extra candidates
            s, a = sim.max(dim=1)
            db_sim[d_pos[d_ok]] = s[d_ok]
            db_idx[d_pos[d_ok]] = q_ids.gather(1, a)[d_ok]
        pbar.update(stop - start)
        start = stop
    pbar.close()
    return out_sim, out_idx, db_sim, db_idx


def _padded_positions(starts, lengths, width, device):
    """``(len(starts), width)`` positions ``start + j`` of padded segments,
    clamped into range, and the mask of the real ones."""
    j = torch.arange(width, device=device)
    starts = torch.as_tensor(starts, device=device)
    lengths = torch.as_tensor(lengths, device=device)
    ok = j[None, :] < lengths[:, None]
    pos = starts[:, None] + torch.minimum(j[None, :], (lengths - 1)[:, None])
    return pos, ok


# --------------------------------------------------------------------------
# FINCH
# --------------------------------------------------------------------------
def _components(nn):
    """Labels of the weakly connected components of the graph ``i -> nn[i]``.

    The FINCH adjacency also links ``nn[j] == i`` and ``nn[i] == nn[j]``; the
    first is the same undirected edge and the second joins two points that are
    already connected through their shared neighbour, so the components are
    the same.
    """
    n = nn.shape[0]
    graph = sp.csr_matrix(
        (np.ones(n, dtype=np.int8), (np.arange(n), nn)), shape=(n, n)
    )
    n_comp, labels = connected_components(graph, directed=True, connection="weak")
    return n_comp, labels.astype(np.int64)


def finch(
    X,
    *,
    neighbors="auto",
    device="cpu",
    batch_size=None,
    random_state=None,
    verbose=False,
):
    """FINCH hierarchy of partitions, finest first.

    Each point is linked to its first neighbour (highest cosine similarity,
    itself excluded); the clusters of a partition are the connected components
    of these links.  The next partition clusters the cluster means the same
    way, until a partition would have a single cluster or nothing merges.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Unit-norm rows (the cosine distance is used; non-unit rows are
        normalised first, which does not change cosine neighbours).
    neighbors : {"auto", "exact", "approx"}, default="auto"
        First-neighbour search.  ``"exact"`` uses blocked matrix products
        (``O(n^2 C)``).  ``"approx"`` uses an inverted file: a coarse
        spherical k-means with ``sqrt(6 n)`` lists; each point is compared
        exactly with the points of its 6 closest lists, and with the points
        that probed its own list (``O(n^1.5 C)``).  ``"auto"`` uses the
        exact search at levels with at most
        :data:`EXACT_NEIGHBORS_MAX_SAMPLES` rows (the first level of a large
        input is approximate, the small upper levels exact).
    device : str or torch.device, default="cpu"
        Device of the matrix products, e.g. ``"cuda"``.
    batch_size : int, default=None
        Rows per block of the similarity matrix; ``None`` bounds a block to
        about 256 MiB.
    random_state : int, RandomState instance or None, default=None
        Seeds the coarse quantiser of the approximate search; fix it for
        reproducible results.  The exact search is deterministic.
    verbose : bool, default=False
        Show progress bars and the size of each partition.

    Returns
    -------
    partitions : list of ndarray of shape (n_samples,), dtype int64
        Cluster labels ``0..K-1`` of each partition, finest first.  As in the
        reference implementation, the final single-cluster partition is not
        included (unless the first partition already has one cluster).

    Notes
    -----
    The reference implementation computes the cosine distance between the
    plain (unnormalised) means of the points of each cluster; the cosine is
    scale invariant, so normalising the means before the dot products gives
    the same first neighbours.  The reference's optional early exit
    (``ensure_early_exit``: drop links longer than the longest link of the
    first partition) is not applied; the reference applies it only when it
    computed the full distance matrix, i.e. never above 70,000 samples,
    which is ProtoAD's regime.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.clustering import finch
    >>> X = np.array([[1, 0], [.99, .1], [.98, -.1],
    ...               [0, 1], [.1, .99], [-.1, .98]], dtype=np.float32)
    >>> X /= np.linalg.norm(X, axis=1, keepdims=True)
    >>> finch(X)[0]
    array([0, 0, 0, 1, 1, 1])
    """
    X = _check_X(X)
    _check_neighbors(neighbors)
    device = _resolve_device(device)
    return _finch(
        _UnitRows(X, device), neighbors=neighbors, device=device, batch_size=batch_size,
        random_state=random_state, verbose=verbose,
    )


def _finch(X, *, neighbors, device, batch_size, random_state, verbose, first_neighbors=None,
           neighbor_lists=None, second_level=None, record=None):
    """:func:`finch` of the checked unit rows ``X`` (a :class:`_UnitRows`),
    from the first level's neighbours when given (-1: still to search, in
    ``neighbor_lists`` when given, see :func:`_complete_first_neighbors`).

    ``second_level``: a :class:`_SecondLevel` of a run on more rows, restricted
    to these, from which the second level's neighbours are derived
    (:func:`_second_neighbors`); ``record``: a list to which this run appends
    its own :class:`_SecondLevel`, when it has a second level."""
    rng = check_random_state(random_state)
    n = X.shape[0]
    if n == 1:
        return [np.zeros(1, dtype=np.int64)]

    partitions = []
    labels = None  # point -> cluster of the current partition
    level_data = X
    n_prev = n
    level = 0
    search = dict(
        neighbors=neighbors, device=device, batch_size=batch_size, random_state=rng,
        verbose=verbose,
    )
    while True:
        if level == 0 and first_neighbors is not None:
            nn = _complete_first_neighbors(
                level_data, first_neighbors, lists=neighbor_lists, **search
            )
        elif level == 1 and second_level is not None:
            nn = _second_neighbors(level_data, labels, second_level, **search)
        else:
            nn, _ = _first_neighbors(level_data, **search)
        if level == 1 and record is not None:
            record.append(_SecondLevel(labels, np.bincount(labels), nn))
        n_clusters, u = _components(nn)
        labels = u if labels is None else u[labels]
        if level > 0 and (n_clusters == 1 or n_clusters >= n_prev):
            break
        partitions.append(labels)
        if verbose:
            # through tqdm, so the message neither breaks a bar nor mixes with stdout
            tqdm.write(f"FINCH partition {level}: {n_clusters} clusters", file=sys.stderr)
        if n_clusters == 1:
            break
        # cosine ignores scale, so unit means give the reference's neighbours;
        # read through a unit view of the sums, as the rows are: a unit copy
        # beside the sums, which the next levels are summed from, would add
        # their size to the fit's peak memory
        level_data = _UnitRows(X.cluster_sums(labels, n_clusters), device)
        n_prev = n_clusters
        level += 1
    return partitions


def _exact_rows_limit(n):
    """How many of ``n`` rows an exact search handles for less than an
    approximate search of all: it costs ``n`` per row, the approximate one
    about ``2 sqrt(n_probe n)`` per row of all ``n``."""
    return 2 * math.sqrt(IVF_N_PROBE * n)


def _complete_first_neighbors(X, nn, *, neighbors, device, batch_size, random_state, verbose,
                              lists=None):
    """``nn`` with its -1 entries replaced by the first neighbours of those
    rows: by an exact search when they are few, else in ``lists`` (the
    inverted-file lists an earlier search compared each row with) when
    given, else by a search of all rows."""
    missing = np.flatnonzero(nn < 0)
    if not len(missing):
        return nn
    n = X.shape[0]
    nn = nn.copy()
    if not _searches_exactly(neighbors, n) and len(missing) > _exact_rows_limit(n):
        if lists is None:
            return _first_neighbors(
                X, neighbors=neighbors, device=device, batch_size=batch_size,
                random_state=random_state, verbose=verbose,
            )[0]
        nn[missing] = _first_neighbors_in_lists(
            X, missing, lists, batch_size=batch_size, verbose=verbose
        )
        return nn
    rows = torch.from_numpy(missing).to(device)
    _, found = _best_match(
        X[rows], X, q_ids=rows, d_ids=torch.arange(n, device=device), batch_size=batch_size
    )
    nn[missing] = found.cpu().numpy()
    return nn


class _SecondLevel(NamedTuple):
    """FINCH's first partition of a run and its clusters' first neighbours:
    what a run on a subset of the rows needs to skip most of its second
    level's search (:func:`_second_neighbors`)."""

    labels: np.ndarray  # (n_rows,) each row's first-level cluster
    sizes: np.ndarray  # (n_clusters,) rows per cluster
    neighbors: np.ndarray  # (n_clusters,) each cluster's first neighbour

    def without(self, start, stop):
        """The same for the rows outside ``start:stop`` (the run's sizes and
        neighbours: a cluster of the subset is the run's only if it lost no
        rows)."""
        return self._replace(labels=np.delete(self.labels, np.s_[start:stop]))


def _second_neighbors(units, labels, previous, *, neighbors, device, batch_size, random_state,
                      verbose):
    """First neighbours of the first-level clusters (unit means ``units``;
    ``labels``: each row's cluster) from ``previous``, the :class:`_SecondLevel`
    of a run on more rows, restricted to these rows.

    Without a block of images most clusters are the run's: the same rows,
    so the same mean. Such a cluster keeps its neighbour if that one is
    still a cluster, unless a new cluster is closer; the new clusters and
    those whose neighbour is gone are searched exactly. Clustering without
    a fold of images this replaces the search of all clusters; where many
    clusters changed (more than an approximate search costs per cluster),
    all are searched as usual."""
    n = units.shape[0]
    first = np.full(n, len(previous.sizes), dtype=np.int64)
    last = np.full(n, -1, dtype=np.int64)
    np.minimum.at(first, labels, previous.labels)
    np.maximum.at(last, labels, previous.labels)
    same = (first == last) & (np.bincount(labels, minlength=n) == previous.sizes[first])
    renumbered = np.full(len(previous.sizes), -1, dtype=np.int64)
    renumbered[first[same]] = np.flatnonzero(same)
    nn = np.full(n, -1, dtype=np.int64)
    nn[same] = renumbered[previous.neighbors[first[same]]]
    new = np.flatnonzero(~same)
    search = dict(neighbors=neighbors, device=device, batch_size=batch_size,
                  random_state=random_state, verbose=verbose)
    # -1: the new clusters and those whose neighbour is gone
    n_missing = int((nn < 0).sum())
    if n_missing > _exact_rows_limit(n) or n_missing == n:
        return _first_neighbors(units, **search)[0]
    if len(new):
        new_t = torch.from_numpy(new).to(device)
        sim_new, best_new = _best_match(
            units, units[new_t], q_ids=torch.arange(n, device=device), d_ids=new_t,
            batch_size=batch_size,
        )
        kept = torch.from_numpy(np.flatnonzero(nn >= 0)).to(device)
        sim_kept = (units[kept] * units[torch.from_numpy(nn).to(device)[kept]]).sum(dim=1)
        closer = (sim_new[kept] > sim_kept).cpu().numpy()
        nn[kept.cpu().numpy()[closer]] = new[best_new[kept].cpu().numpy()[closer]]
    # as few as an exact search handles best: searched exactly
    return _complete_first_neighbors(units, nn, **search)


def _merge_closest_pairs(X, labels, n_clusters, *, device, verbose=False):
    """Merge the two closest clusters (cosine of their means) until
    ``n_clusters`` remain; return consecutive labels 0..n_clusters-1.

    Every cluster keeps its nearest other cluster.  After a merge only the
    merged cluster and the clusters that pointed at one of the pair need a
    new search, so a step costs ``O(K * C)`` instead of the reference's
    ``O(K^2 * C)``.
    """
    n_cur = int(labels.max()) + 1
    sums = X.cluster_sums(labels, n_cur).astype(np.float64)
    units = _normalize_rows(sums)  # float32, zero rows stay zero
    alive = np.ones(n_cur, dtype=bool)
    parent = np.arange(n_cur)

    # with K^2 similarities in memory a cluster that lost its neighbour
    # needs an O(K) argmax instead of an O(K * C) product; hubs make ~25
    # such clusters per step on typical data
    S = None
    if n_cur * n_cur <= _MERGE_MATRIX_ENTRIES:
        S = units @ units.T
        np.fill_diagonal(S, -np.inf)
        nn_idx = S.argmax(axis=1)
        nn_sim = S[np.arange(n_cur), nn_idx]
    else:
        nn_idx, nn_sim = _first_neighbors_exact(units, device=device)

    def nearest(rows):
        if S is not None:
            best = S[rows].argmax(axis=1)
            return S[rows, best], best
        # (K, C) @ (C, r) is about twice as fast as (r, C) @ (C, K) here
        sim = np.where(alive[:, None], units @ units[rows].T, -np.inf)
        sim[rows, np.arange(len(rows))] = -np.inf
        best = sim.argmax(axis=0)
        return sim[best, np.arange(len(rows))], best

    # each step is a few small products: extra BLAS threads only add
    # synchronisation, which is costly when the cores are shared
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in tqdm(
            range(n_cur - n_clusters),
            desc="merging",
            disable=not verbose,
            leave=False,
        ):
            # argmax returns the first maximum: ties go to the lowest index
            a = int(np.argmax(nn_sim))
            b = int(nn_idx[a])
            a, b = min(a, b), max(a, b)
            sums[a] += sums[b]
            units[a] = sums[a] / max(np.linalg.norm(sums[a]), 1e-30)
            units[b] = 0.0
            alive[b] = False
            nn_sim[b] = -np.inf
            parent[b] = a
            if alive.sum() == 1:
                break
            sim_a = np.where(alive, units @ units[a], -np.inf)
            sim_a[a] = -np.inf
            if S is not None:
                S[b, :] = -np.inf
                S[:, b] = -np.inf
                S[a, :] = sim_a
                S[:, a] = sim_a
            # rows that pointed at a or b lost their neighbour; a moved
            stale = np.flatnonzero(alive & ((nn_idx == a) | (nn_idx == b)))
            stale = np.union1d(stale, [a])
            nn_sim[stale], nn_idx[stale] = nearest(stale)
            # other rows may now be closer to the new a than to their own
            closer = sim_a > nn_sim
            nn_sim[closer] = sim_a[closer]
            nn_idx[closer] = a
    # follow merges to the surviving root of each cluster
    for i in range(n_cur):
        root = i
        while parent[root] != root:
            root = parent[root]
        parent[i] = root
    _, new = np.unique(parent, return_inverse=True)
    return new.astype(np.int64)[labels]


def finch_n_clusters(
    X,
    n_clusters,
    *,
    neighbors="auto",
    device="cpu",
    batch_size=None,
    random_state=None,
    partitions=None,
    verbose=False,
):
    """FINCH partition with exactly ``n_clusters`` clusters.

    Like the reference ``req_clust`` mode: take the coarsest FINCH partition
    with at least ``n_clusters`` clusters, then merge the two clusters whose
    means are closest (cosine), one pair at a time, recomputing the merged
    mean from its members, until ``n_clusters`` remain.  The reference finds
    that pair as the smallest distance among the first-neighbour adjacency
    entries, which is the globally closest pair of means; ties go to the
    lowest cluster index here.  When ``n_clusters`` exceeds the size of the
    first partition, merging starts from singletons.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Unit-norm rows.
    n_clusters : int
        Required number of clusters, ``1 <= n_clusters <= n_samples``.
    neighbors, device, batch_size, random_state, verbose
        See :func:`finch`.
    partitions : list of ndarray, default=None
        A hierarchy already returned by :func:`finch` for ``X``, to avoid
        recomputing it.

    Returns
    -------
    labels : ndarray of shape (n_samples,), dtype int64
        Labels ``0..n_clusters-1``.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.clustering import finch_n_clusters
    >>> X = np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)
    >>> X /= np.linalg.norm(X, axis=1, keepdims=True)
    >>> len(np.unique(finch_n_clusters(X, 7)))
    7
    """
    X = _check_X(X)
    n_clusters = _check_n_clusters(n_clusters, X.shape[0])
    device = _resolve_device(device)
    return _finch_n_clusters(
        _UnitRows(X, device), n_clusters, neighbors=neighbors, device=device,
        batch_size=batch_size, random_state=random_state, partitions=partitions,
        verbose=verbose,
    )


def _finch_n_clusters(
    X, n_clusters, *, neighbors, device, batch_size, random_state, partitions, verbose,
    first_neighbors=None, neighbor_lists=None, second_level=None, record=None,
):
    """:func:`finch_n_clusters` of the checked unit rows ``X`` (a :class:`_UnitRows`)."""
    if partitions is None:
        partitions = _finch(
            X,
            neighbors=neighbors,
            device=device,
            batch_size=batch_size,
            random_state=random_state,
            verbose=verbose,
            first_neighbors=first_neighbors,
            neighbor_lists=neighbor_lists,
            second_level=second_level,
            record=record,
        )
    counts = [int(p.max()) + 1 for p in partitions]
    for p, k in zip(partitions, counts):
        if k == n_clusters:
            return p.copy()
    candidates = [p for p, k in zip(partitions, counts) if k > n_clusters]
    start = candidates[-1] if candidates else np.arange(X.shape[0], dtype=np.int64)
    return _merge_closest_pairs(X, start, n_clusters, device=device, verbose=verbose)


# --------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------
def _kmeanspp(X, n_clusters, rng):
    """k-means++ seeding on the rows of ``X`` (numpy, cosine distance).

    For unit rows the squared Euclidean distance is ``2 * (1 - cos)``, so
    sampling proportionally to ``1 - cos`` is exactly k-means++.  The loop
    is sequential, so it runs on a subsample.
    """
    n = X.shape[0]
    chosen = np.empty(n_clusters, dtype=np.int64)
    chosen[0] = rng.randint(n)
    dist = np.maximum(1.0 - X @ X[chosen[0]], 0.0).astype(np.float64)
    # one BLAS thread: a multi-threaded matrix-vector product of this size
    # costs more in synchronisation than it saves (30x on shared cores)
    with threadpool_limits(limits=1, user_api="blas"):
        for k in range(1, n_clusters):
            cum = np.cumsum(dist)
            if cum[-1] <= 0:  # fewer distinct rows than clusters
                chosen[k] = rng.randint(n)
            else:
                u = rng.uniform() * cum[-1]
                chosen[k] = min(int(np.searchsorted(cum, u, side="right")), n - 1)
            np.minimum(dist, np.maximum(1.0 - X @ X[chosen[k]], 0.0), out=dist)
    return X[chosen]


def _assign(Xt, centers, batch_size):
    """Index of and cosine similarity to the closest centre, in blocks."""
    n = Xt.shape[0]
    block = _row_block(centers.shape[0], batch_size)
    labels = torch.empty(n, dtype=torch.int64, device=Xt.device)
    sims = torch.empty(n, dtype=Xt.dtype, device=Xt.device)
    for r0 in range(0, n, block):
        s, i = _products(Xt[r0 : r0 + block], centers).max(dim=1)
        sims[r0 : r0 + block], labels[r0 : r0 + block] = s, i
    return labels, sims


def _spherical_lloyd(
    Xt, centers, *, max_iter, tol, batch_size=None, verbose=False, desc="k-means"
):
    """Lloyd iterations of spherical k-means from ``centers`` (unit rows)."""
    n_clusters = centers.shape[0]
    prev = -math.inf
    pbar = tqdm(range(max_iter), desc=desc, disable=not verbose, leave=False)
    for _ in pbar:
        labels, sims = _assign(Xt, centers, batch_size)
        score = float(sims.double().mean())
        pbar.set_postfix(mean_cos=f"{score:.5f}")
        sums = _torch_cluster_sums(Xt, labels, n_clusters)
        counts = torch.bincount(labels, minlength=n_clusters)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            # the worst-served rows make new centres for empty clusters
            far = torch.argsort(sims, stable=True)[: len(empty)]
            sums[empty] = Xt[far]
        centers = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-12)
        if score - prev < tol and len(empty) == 0:
            break
        prev = score
    return centers


def _torch_cluster_sums(Xt, labels, n_clusters):
    """Per-cluster sums of the rows of ``Xt``, deterministic on every device."""
    if Xt.device.type == "cpu":
        # the CPU scatter-add accumulates in row order, hence reproducibly
        return torch.zeros(
            (n_clusters, Xt.shape[1]), dtype=Xt.dtype, device=Xt.device
        ).index_add_(0, labels, Xt)
    # GPU scatter-adds use atomics (run-to-run rounding noise): sort instead
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=n_clusters)
    sums = torch.zeros(
        (n_clusters, Xt.shape[1]), dtype=Xt.dtype, device=Xt.device
    )
    nonempty = counts > 0
    sums[nonempty] = torch.segment_reduce(
        Xt[order], "sum", lengths=counts[nonempty]
    )
    return sums


def kmeans(
    X,
    n_clusters,
    *,
    random_state=None,
    device="cpu",
    max_iter=_KMEANS_MAX_ITER,
    tol=1e-4,
    init_size=None,
    batch_size=None,
    verbose=False,
):
    """Spherical k-means: unit centres maximising the summed cosine similarity.

    Seeding is k-means++ (cosine distance) on a random subsample of
    ``init_size`` rows; Lloyd iterations then use every row, assigned in
    blocks so that memory stays bounded.  Empty clusters are re-seeded with
    the rows farthest from their centre.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Unit-norm rows.
    n_clusters : int
        Number of centres, ``1 <= n_clusters <= n_samples``.
    random_state : int, RandomState instance or None, default=None
        Seeds the subsample and the k-means++ seeding.
    device : str or torch.device, default="cpu"
    max_iter : int, default=30
        Maximum number of Lloyd iterations.
    tol : float, default=1e-4
        Stop when the mean cosine similarity improves by less than ``tol``.
    init_size : int, default=None
        Rows used for seeding; ``None`` means
        ``min(n_samples, max(10_000, 10 * n_clusters))``.
    batch_size : int, default=None
        Rows per assignment block; ``None`` bounds a block to about 256 MiB.
    verbose : bool, default=False
        Show a progress bar of the iterations.

    Returns
    -------
    centers : ndarray of shape (n_clusters, n_features), dtype float32
        Unit-norm centres.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.clustering import kmeans
    >>> X = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    >>> X /= np.linalg.norm(X, axis=1, keepdims=True)
    >>> kmeans(X, 5, random_state=0).shape
    (5, 8)
    """
    X = _check_X(X)
    n_clusters = _check_n_clusters(n_clusters, X.shape[0])
    device = _resolve_device(device)
    rng = check_random_state(random_state)
    X = _normalize_rows(X)
    n = X.shape[0]

    if init_size is None:
        init_size = min(n, max(_KMEANS_MIN_INIT_SIZE, 10 * n_clusters))
    init_size = min(n, max(int(init_size), n_clusters))
    sample = (
        np.sort(rng.choice(n, init_size, replace=False))
        if init_size < n
        else np.arange(n)
    )
    centers = torch.from_numpy(_kmeanspp(X[sample], n_clusters, rng)).to(device)

    centers = _spherical_lloyd(
        _as_tensor(X, device),
        centers,
        max_iter=max_iter,
        tol=tol,
        batch_size=batch_size,
        verbose=verbose,
    )
    return centers.cpu().numpy().astype(np.float32)


# --------------------------------------------------------------------------
# Prototypes
# --------------------------------------------------------------------------
def estimated_multiply_adds(n_samples, n_features, *, method="finch", n_clusters=None,
                            n_farthest=0, first_search=True):
    """Rough count of the multiply-adds :func:`learn_prototypes` will spend;
    ``first_search=False``: FINCH's first-level neighbours are given
    (``first_neighbors``), their search not counted.

    For a time estimate before the work starts: the searches are matrix
    products, so their time follows this count closely enough to tell a
    user whether to wait seconds or an hour. FINCH's later levels are
    assumed to shrink the rows threefold each (about what the hierarchy
    does on patch features); k-means counts every allowed iteration, so its
    count is an upper bound.

    Examples
    --------
    >>> from skprotoad.clustering import estimated_multiply_adds
    >>> small = estimated_multiply_adds(10_000, 176)
    >>> large = estimated_multiply_adds(1_000_000, 176, n_farthest=1000)
    >>> 10 < large / small < 10_000
    True
    """
    n, d = int(n_samples), int(n_features)
    if method == "kmeans":
        k = int(n_clusters)
        seeding = min(n, max(_KMEANS_MIN_INIT_SIZE, 10 * k))
        return ((_KMEANS_MAX_ITER * n + seeding) * k + n * int(n_farthest)) * d

    def first_neighbours(rows):
        if rows <= EXACT_NEIGHBORS_MAX_SAMPLES:
            return rows * rows * d
        n_lists = math.sqrt(IVF_N_PROBE * rows)
        quantiser = min(rows, _IVF_TRAIN_PER_LIST * n_lists) * n_lists * _IVF_TRAIN_ITER
        search = rows * (n_lists + IVF_N_PROBE * rows / n_lists)
        return (quantiser + search) * d

    work, rows = 0.0, float(n)
    if not first_search:
        rows /= 3
    while rows >= 2:
        work += first_neighbours(rows)
        rows /= 3
    n_prototypes = MAX_DEFAULT_PROTOTYPES if n_clusters is None else int(n_clusters)
    # the first pass of add_farthest_rows against the means, then its refreshes
    return work + n * (n_prototypes + int(n_farthest)) * d * (n_farthest > 0)


def add_farthest_rows(X, prototypes, n_rows, *, device="cpu", batch_size=None, verbose=False,
                      return_indices=False):
    """Greedy k-center completion: append the rows of ``X`` farthest from the prototypes.

    ``n_rows`` times, the row of ``X`` with the largest Euclidean distance to
    its nearest prototype (those given and those added so far) is appended
    as a prototype (Gonzalez's farthest-point rule, as PatchCore's coreset).
    Cluster means describe typical rows and leave rare ones far from every
    prototype; an image's anomaly score is its worst patch, so a rare but
    normal patch (an edge of a part at an unusual pose) would otherwise
    decide it.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    prototypes : array-like of shape (n_prototypes, n_features)
    n_rows : int
        Rows to append; at most ``n_samples``.
    device : str or torch.device, default="cpu"
    batch_size : int, default=None
        Rows of ``X`` per block when measuring the first distances.
    verbose : bool, default=False
        Show progress.
    return_indices : bool, default=False
        Return the positions in ``X`` of the chosen rows instead.

    Returns
    -------
    prototypes : ndarray of shape (n_prototypes + n_rows, n_features), float32
        The given prototypes, then the appended rows in the order they were
        chosen; with ``return_indices``, their positions in ``X``, an int64
        array of shape (n_rows,).

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.clustering import add_farthest_rows
    >>> X = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [0.0, 3.0]], dtype=np.float32)
    >>> add_farthest_rows(X, X[:1], 2)[1:].tolist()
    [[5.0, 5.0], [0.0, 3.0]]
    """
    X = _check_X(X)
    P = np.asarray(prototypes, dtype=np.float32)
    if P.ndim != 2 or P.shape[1] != X.shape[1]:
        raise ValueError(
            f"prototypes must have shape (n_prototypes, {X.shape[1]}), got {P.shape}."
        )
    if not isinstance(n_rows, numbers.Integral) or isinstance(n_rows, bool) or not (
        0 <= n_rows <= X.shape[0]
    ):
        raise ValueError(f"n_rows must be an int in [0, {X.shape[0]}], got {n_rows!r}.")
    if n_rows == 0:
        return np.empty(0, dtype=np.int64) if return_indices else P.copy()
    device = _resolve_device(device)
    Xt = _as_tensor(X, device)
    Pt = torch.from_numpy(P).to(device)
    block = _row_block(max(len(P), n_rows), batch_size)
    x_sq = torch.empty(X.shape[0], dtype=torch.float32, device=device)
    for r0 in range(0, X.shape[0], block):
        rows = Xt[r0 : r0 + block]
        x_sq[r0 : r0 + block] = (rows * rows).sum(dim=1)

    def lower_to(nearest, C):
        # |x - c|^2 = |x|^2 + min over c of (|c|^2 - 2 x.c), by blocks of rows
        c_sq = (C * C).sum(dim=1)
        for r0 in range(0, X.shape[0], block):
            d = x_sq[r0 : r0 + block] + _products(Xt[r0 : r0 + block], -2.0 * C, c_sq).amin(dim=1)
            nearest[r0 : r0 + block] = torch.minimum(nearest[r0 : r0 + block], d.clamp_min(0.0))

    nearest = torch.full((X.shape[0],), math.inf, dtype=torch.float32, device=device)
    if len(P):
        lower_to(nearest, Pt)
    # Distances only shrink as rows are chosen, so a row outside the pool of
    # the largest distances cannot beat the pool's best while that best is at
    # least the pool's floor: the pool alone is updated (exact, and cheap:
    # a full pass per chosen row over millions of patches costs minutes).
    # with no prototype every row is infinitely far: the first row starts
    chosen = [] if len(P) else [0]
    steps = tqdm(total=n_rows, initial=len(chosen), desc="farthest rows", unit="row",
                 file=sys.stderr, disable=not verbose)
    seen = 0  # chosen rows that every row's distance already accounts for
    while len(chosen) < n_rows:
        if len(chosen) > seen:  # bring every row up to date with the new ones
            lower_to(nearest, Xt[chosen[seen:]])
            # never again, even where every distance left is 0 (identical rows)
            nearest[chosen[seen:]] = -math.inf
            seen = len(chosen)
        size = min(X.shape[0], _FARTHEST_POOL_MIN + _FARTHEST_POOL_FACTOR * n_rows)
        pool_d, pool = torch.topk(nearest, size)
        floor = pool_d[-1] if size < X.shape[0] else -math.inf
        pool_x, pool_sq = Xt[pool], x_sq[pool]
        while len(chosen) < n_rows:
            j = int(torch.argmax(pool_d))
            if pool_d[j] < floor:
                break  # a row outside the pool may now be farther: refresh
            i = int(pool[j])
            chosen.append(i)
            steps.update()
            pool_d = torch.minimum(
                pool_d, (pool_sq - 2.0 * (pool_x @ Xt[i]) + x_sq[i]).clamp_min(0.0)
            )
            pool_d[j] = -math.inf
    steps.close()
    if return_indices:
        return np.array(chosen, dtype=np.int64)
    return np.concatenate([P, X[chosen].astype(np.float32)])


def learn_prototypes(
    X,
    *,
    method="finch",
    n_clusters=None,
    neighbors="auto",
    random_state=None,
    device="cpu",
    batch_size=None,
    normalize=True,
    n_farthest=0,
    first_neighbors=None,
    neighbor_lists=None,
    verbose=False,
):
    """Learn ProtoAD prototypes: L2-normalised cluster means of ``X``.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Patch features. Clusters are always found on their directions
        (cosine similarity).
    method : {"finch", "kmeans"}, default="finch"
        Clustering method.
    n_clusters : int, default=None
        Number of prototypes.  Required for ``"kmeans"``.  For ``"finch"``,
        ``None`` gives :data:`MAX_DEFAULT_PROTOTYPES` prototypes, the FINCH
        hierarchy merged down to that many (:func:`finch_n_clusters`), or the
        first partition when it has fewer clusters; an int gives exactly that
        many clusters.  Choose more prototypes for more varied normal
        images, at a proportional cost in scoring time; see
        :doc:`/user_guide/prototypes`.
    neighbors : {"auto", "exact", "approx"}, default="auto"
        First-neighbour search of FINCH, see :func:`finch`.
    random_state : int, RandomState instance or None, default=None
        Seeds k-means and the approximate neighbour search.
    device : str or torch.device, default="cpu"
    batch_size : int, default=None
        Rows per block of the similarity computations.
    normalize : bool, default=True
        Return the L2-normalised means of the unit rows (cosine prototypes,
        the paper's). ``False`` returns the plain means of the rows of ``X``
        in each cluster, keeping their magnitude, for Euclidean distances
        (``ProtoADDetector(normalization="image")``).
    n_farthest : int, default=0
        Rows of ``X`` appended to the cluster means by
        :func:`add_farthest_rows` (unit rows unless ``normalize=False``), so
        that rare rows have a prototype near them too.
    first_neighbors : array-like of shape (n_samples,), default=None
        FINCH only: each row's first neighbour, as :func:`first_neighbors`
        gives it, or -1 where it is still to be found; the first level of
        FINCH, its largest search, then searches only those rows. Pass
        :func:`neighbors_without` of all rows' neighbours to cluster the
        rows outside a block at a fraction of the cost.
    neighbor_lists : array-like of shape (n_samples, n_lists_probed), default=None
        With ``first_neighbors``: the lists :func:`first_neighbors` (with
        ``return_lists=True``) compared each row with, for the same rows.
        When many rows are marked -1 (rows outside a block whose neighbours
        often lay in it: aligned parts, whose patches resemble the same
        place in other images), they are searched in their lists, at a
        fraction of the cost of searching all rows again.
        :class:`SharedSearch` carries both, and FINCH's second level too.
    verbose : bool, default=False
        Show progress.

    Returns
    -------
    prototypes : ndarray of shape (n_prototypes, n_features), dtype float32
        Cluster means, unit-norm unless ``normalize=False``, then the
        ``n_farthest`` appended rows.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad.clustering import learn_prototypes
    >>> X = np.random.default_rng(0).normal(size=(300, 16)).astype(np.float32)
    >>> X /= np.linalg.norm(X, axis=1, keepdims=True)
    >>> P = learn_prototypes(X, n_clusters=10)
    >>> P.shape, bool(np.allclose(np.linalg.norm(P, axis=1), 1, atol=1e-5))
    ((10, 16), True)
    >>> P_raw = learn_prototypes(3 * X, n_clusters=10, normalize=False)  # plain means
    >>> bool(np.allclose(np.linalg.norm(P_raw, axis=1), 1, atol=1e-5))
    False
    """
    return _learn_prototypes(
        X, method=method, n_clusters=n_clusters, neighbors=neighbors,
        random_state=random_state, device=device, batch_size=batch_size, normalize=normalize,
        n_farthest=n_farthest, first_neighbors=first_neighbors, neighbor_lists=neighbor_lists,
        verbose=verbose,
    )


def _learn_prototypes(X, *, method, n_clusters, neighbors, random_state, device, batch_size,
                      normalize, n_farthest, first_neighbors, neighbor_lists, verbose,
                      second_level=None, record=None):
    """:func:`learn_prototypes`, FINCH's second level read from ``second_level``
    and recorded to ``record`` as :func:`_finch` takes them."""
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"method must be 'finch' or 'kmeans', got {method!r}.")
    X = _check_X(X)
    if n_clusters is not None:
        n_clusters = _check_n_clusters(n_clusters, X.shape[0])
    _check_neighbors(neighbors)
    if not isinstance(n_farthest, numbers.Integral) or isinstance(n_farthest, bool) or not (
        0 <= n_farthest <= X.shape[0]
    ):
        raise ValueError(f"n_farthest must be an int in [0, {X.shape[0]}], got {n_farthest!r}.")
    if first_neighbors is not None:
        first_neighbors = _check_first_neighbors(first_neighbors, method, X.shape[0])
    if neighbor_lists is not None:
        neighbor_lists = _check_neighbor_lists(neighbor_lists, first_neighbors, X.shape[0])
    prototypes = _cluster_means_of(
        X, method, n_clusters, neighbors, random_state, device, batch_size, normalize, verbose,
        first_neighbors, neighbor_lists, second_level, record,
    )
    if not n_farthest:
        return prototypes
    return add_farthest_rows(
        _normalize_rows(X) if normalize else X, prototypes, int(n_farthest), device=device,
        batch_size=batch_size, verbose=verbose,
    )


def _check_first_neighbors(first_neighbors, method, n_samples):
    if method != "finch":
        raise ValueError(f"first_neighbors is FINCH's; method={method!r} takes None.")
    nn = np.asarray(first_neighbors)
    if nn.shape != (n_samples,) or not np.issubdtype(nn.dtype, np.integer):
        raise ValueError(
            f"first_neighbors must be {n_samples} ints, one per row of X; got an array "
            f"of shape {nn.shape} and dtype {nn.dtype}."
        )
    nn = nn.astype(np.int64)
    bad = (nn < -1) | (nn >= n_samples) | (nn == np.arange(n_samples))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"first_neighbors must index another row of X or be -1; row {row} has "
            f"{int(nn[row])}."
        )
    return nn


def _check_neighbor_lists(neighbor_lists, first_neighbors, n_samples):
    if first_neighbors is None:
        raise ValueError("neighbor_lists needs first_neighbors: the lists of their search.")
    lists = np.asarray(neighbor_lists)
    if lists.ndim != 2 or len(lists) != n_samples or not lists.shape[1] or not (
        np.issubdtype(lists.dtype, np.integer)
    ):
        raise ValueError(
            f"neighbor_lists must be ints of shape ({n_samples}, n_lists_probed), one row "
            f"per row of X; got an array of shape {lists.shape} and dtype {lists.dtype}."
        )
    if lists.min() < 0:
        raise ValueError(
            "neighbor_lists must be list numbers >= 0, as first_neighbors gives them."
        )
    return lists


def _cluster_means_of(
    raw, method, n_clusters, neighbors, random_state, device, batch_size, normalize, verbose,
    first_neighbors=None, neighbor_lists=None, second_level=None, record=None,
):
    """The prototypes of :func:`learn_prototypes` before any farthest rows:
    clusters found on the unit rows of ``raw``, means of those or of ``raw``."""

    if method == "kmeans":
        if n_clusters is None:
            raise ValueError("method='kmeans' requires an int n_clusters, got None.")
        X = _normalize_rows(raw)
        centers = kmeans(
            X,
            n_clusters,
            random_state=random_state,
            device=device,
            batch_size=batch_size,
            verbose=verbose,
        )
        if normalize:
            return centers
        device = _resolve_device(device)
        labels = _assign(
            _as_tensor(X, device), torch.from_numpy(centers).to(device), batch_size
        )[0].cpu().numpy()
        return _cluster_means(raw, labels, n_clusters)

    device = _resolve_device(device)
    X = _UnitRows(raw, device)
    kwargs = dict(
        neighbors=neighbors,
        device=device,
        batch_size=batch_size,
        random_state=random_state,
        verbose=verbose,
    )
    if n_clusters is None:
        partitions = _finch(
            X, first_neighbors=first_neighbors, neighbor_lists=neighbor_lists,
            second_level=second_level, record=record, **kwargs
        )
        if int(partitions[0].max()) + 1 <= MAX_DEFAULT_PROTOTYPES:
            labels = partitions[0]
        else:
            labels = _finch_n_clusters(
                X, MAX_DEFAULT_PROTOTYPES, partitions=partitions, **kwargs
            )
    else:
        labels = _finch_n_clusters(
            X, n_clusters, partitions=None, first_neighbors=first_neighbors,
            neighbor_lists=neighbor_lists, second_level=second_level, record=record, **kwargs
        )
    k = int(labels.max()) + 1
    if not normalize:
        return _cluster_means(raw, labels, k)
    return _normalize_rows(X.cluster_sums(labels, k))
