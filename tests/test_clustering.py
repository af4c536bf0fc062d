"""Tests of skprotoad.clustering against brute-force dense references."""

import numpy as np
import pytest
import torch
from scipy.sparse.csgraph import connected_components
from sklearn.metrics import adjusted_rand_score

from skprotoad import clustering
from skprotoad.clustering import (
    add_farthest_rows,
    finch,
    finch_n_clusters,
    first_neighbors,
    kmeans,
    learn_prototypes,
    neighbors_without,
)


# --------------------------------------------------------------------------
# Data and dense references
# --------------------------------------------------------------------------
def _unit(X):
    X = np.asarray(X, dtype=np.float64)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def _blobs(n_samples, n_features, n_blobs, spread, seed):
    rng = np.random.default_rng(seed)
    centers = _unit(rng.normal(size=(n_blobs, n_features)))
    assign = rng.integers(n_blobs, size=n_samples)
    X = centers[assign] + spread * rng.normal(size=(n_samples, n_features))
    return _unit(X).astype(np.float32), assign


def _noise(n_samples, n_features, seed):
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(n_samples, n_features))).astype(np.float32)


def _canonical(labels):
    """Relabel so that clusters are numbered by first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse]


def _dense_first_neighbors(M):
    """First neighbours by the full cosine-distance matrix (float64)."""
    U = _unit(M)
    dist = 1.0 - U @ U.T
    np.fill_diagonal(dist, np.inf)
    return np.argmin(dist, axis=1)


def _dense_partition(M):
    """One FINCH step with the paper's adjacency, on a dense matrix."""
    kappa = _dense_first_neighbors(M)
    n = len(kappa)
    idx = np.arange(n)
    A = np.zeros((n, n), dtype=bool)
    A[idx, kappa] = True  # j == kappa_i
    A[kappa, idx] = True  # kappa_j == i
    A |= kappa[:, None] == kappa[None, :]  # kappa_i == kappa_j
    np.fill_diagonal(A, False)
    n_comp, labels = connected_components(A, directed=False)
    return n_comp, labels


def _dense_finch(X):
    """FINCH hierarchy recursing on the plain (unnormalised) cluster means,
    as the reference implementation does."""
    X = np.asarray(X, dtype=np.float64)
    n_comp, labels = _dense_partition(X)
    partitions = [labels]
    while n_comp > 1:
        means = np.stack([X[labels == k].mean(axis=0) for k in range(n_comp)])
        n_next, u = _dense_partition(means)
        if n_next == 1 or n_next >= n_comp:
            break
        labels = u[labels]
        partitions.append(labels)
        n_comp = n_next
    return partitions


def _dense_merge(X, labels, n_clusters):
    """Reference req_clust merging: merge the globally closest pair of plain
    cluster means, one pair at a time."""
    X = np.asarray(X, dtype=np.float64)
    labels = _canonical(labels)
    while labels.max() + 1 > n_clusters:
        k = labels.max() + 1
        means = np.stack([X[labels == c].mean(axis=0) for c in range(k)])
        U = _unit(means)
        dist = 1.0 - U @ U.T
        np.fill_diagonal(dist, np.inf)
        a, b = np.unravel_index(np.argmin(dist), dist.shape)
        a, b = min(a, b), max(a, b)
        labels = np.where(labels == b, a, labels)
        labels = np.unique(labels, return_inverse=True)[1]
    return labels


DATASETS = {
    "blobs": lambda: _blobs(400, 16, 12, 0.15, seed=0)[0],
    "noise": lambda: _noise(300, 8, seed=1),
    "blobs_wide": lambda: _blobs(500, 64, 30, 0.3, seed=2)[0],
}


# --------------------------------------------------------------------------
# FINCH
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_first_neighbors_exact_match_dense(name):
    X = DATASETS[name]()
    # a tiny batch_size exercises the blocked running argmax
    nn, sim = clustering._first_neighbors_exact(
        X, device=clustering._resolve_device("cpu"), batch_size=7
    )
    np.testing.assert_array_equal(nn, _dense_first_neighbors(X))
    np.testing.assert_allclose(sim, np.sum(X * X[nn], axis=1), atol=1e-5)


def test_first_neighbors_column_blocks(monkeypatch):
    # shrink the block budget so the columns are split into several blocks
    monkeypatch.setattr(clustering, "_BLOCK_ENTRIES", 64 * 50)
    X = DATASETS["noise"]()
    nn, _ = clustering._first_neighbors_exact(
        X, device=clustering._resolve_device("cpu")
    )
    np.testing.assert_array_equal(nn, _dense_first_neighbors(X))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_finch_first_partition_matches_dense(name):
    X = DATASETS[name]()
    got = finch(X, neighbors="exact")[0]
    _, expected = _dense_partition(X)
    np.testing.assert_array_equal(_canonical(got), _canonical(expected))


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_finch_hierarchy_matches_dense(name):
    X = DATASETS[name]()
    got = finch(X, neighbors="exact")
    expected = _dense_finch(X)
    assert len(got) == len(expected) >= 2
    for g, e in zip(got, expected):
        assert g.dtype == np.int64
        assert g.shape == (X.shape[0],)
        # labels are 0..K-1 with no gaps
        np.testing.assert_array_equal(np.unique(g), np.arange(g.max() + 1))
        np.testing.assert_array_equal(_canonical(g), _canonical(e))
    counts = [p.max() + 1 for p in got]
    assert all(a > b for a, b in zip(counts, counts[1:]))
    assert counts[-1] > 1


def test_finch_tiny_two_groups():
    X = np.array(
        [[1, 0], [0.99, 0.1], [0.98, -0.1], [0, 1], [0.1, 0.99], [-0.1, 0.98]],
        dtype=np.float32,
    )
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    partitions = finch(X)
    assert len(partitions) == 1
    np.testing.assert_array_equal(partitions[0], [0, 0, 0, 1, 1, 1])


def test_finch_single_and_two_points():
    assert [p.tolist() for p in finch(np.array([[1.0, 0.0]]))] == [[0]]
    assert [p.tolist() for p in finch(np.array([[1.0, 0.0], [0.0, 1.0]]))] == [
        [0, 0]
    ]


def test_finch_normalises_rows():
    X = DATASETS["blobs"]()
    scale = np.random.default_rng(0).uniform(0.5, 3.0, size=(X.shape[0], 1))
    for a, b in zip(finch(X), finch((X * scale).astype(np.float32))):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Approximate neighbours
# --------------------------------------------------------------------------
def test_approx_neighbors_agree_with_exact_on_blobs():
    X, _ = _blobs(6000, 32, 60, 0.2, seed=3)
    device = clustering._resolve_device("cpu")
    exact, exact_sim = clustering._first_neighbors_exact(X, device=device)
    approx, approx_sim = clustering._first_neighbors_ivf(
        X, device=device, random_state=0
    )
    assert np.all(approx != np.arange(len(X)))
    # an approximate neighbour is never closer than the exact one
    assert np.all(approx_sim <= exact_sim + 1e-6)
    assert np.mean(approx == exact) > 0.95
    ari = adjusted_rand_score(
        finch(X, neighbors="exact")[0],
        finch(X, neighbors="approx", random_state=0)[0],
    )
    assert ari > 0.9


def test_approx_neighbors_same_with_own_or_batched_products(monkeypatch):
    """On the CPU large lists get a product of their own, small ones share a
    padded batched one: both must find the same neighbours, their own row
    excluded, with the stored rows' candidates from the same products."""
    X, _ = _blobs(6000, 32, 60, 0.2, seed=3)
    device = clustering._resolve_device("cpu")
    found = {}
    for name, entries in [("own", 0), ("batched", 2**62)]:
        monkeypatch.setattr(clustering, "_IVF_OWN_PRODUCT_ENTRIES", entries)
        found[name] = clustering._first_neighbors_ivf(X, device=device, random_state=0)
    np.testing.assert_array_equal(found["own"][0], found["batched"][0])
    np.testing.assert_allclose(found["own"][1], found["batched"][1], atol=1e-6)
    assert np.all(found["own"][0] != np.arange(len(X)))


def _best_in_lists(X, rows, lists):
    """Dense reference: each of ``rows``' most similar other row among the
    rows stored (``lists[:, 0]``) in the lists it probes."""
    U = _unit(X)
    best = []
    for i in rows:
        candidates = np.flatnonzero(np.isin(lists[:, 0], lists[i]) & (np.arange(len(X)) != i))
        best.append(candidates[np.argmax(U[candidates] @ U[i])])
    return np.asarray(best)


def test_first_neighbors_return_their_search_lists():
    X, _ = _blobs(3000, 16, 30, 0.2, seed=4)
    nn, sim, lists = first_neighbors(X, neighbors="approx", random_state=0, return_lists=True)
    np.testing.assert_array_equal(nn, first_neighbors(X, neighbors="approx", random_state=0)[0])
    assert lists.shape == (len(X), clustering.IVF_N_PROBE)
    assert all(len(set(row)) == len(row) for row in lists)
    # each row's neighbour is at least the best of the rows stored in its lists
    # (rows that probed its own list offer more)
    in_lists = _best_in_lists(X, np.arange(len(X)), lists)
    U = _unit(X)
    assert np.all(sim >= np.sum(U * U[in_lists], axis=1) - 1e-6)
    exact = first_neighbors(X, neighbors="exact", return_lists=True)
    np.testing.assert_array_equal(exact[2], np.zeros((len(X), 1)))


def _aligned_parts(n_images, n_places, n_features, seed):
    """Rows of images of one aligned part: row k of every image is near the
    same place k, so a row's first neighbour lies in another image."""
    rng = np.random.default_rng(seed)
    places = rng.normal(size=(n_places, n_features))
    X = places[None] + 0.3 * rng.normal(size=(n_images, n_places, n_features))
    return _unit(X.reshape(-1, n_features)).astype(np.float32)


@pytest.mark.parametrize("own_product", [0, 2**62])
def test_rows_whose_neighbours_left_are_searched_in_their_lists(monkeypatch, own_product):
    """Without a block of images, many rows of aligned parts lose their
    neighbour: they are searched in the lists they probed, by either kind of
    product, and no new search of all rows runs."""
    monkeypatch.setattr(clustering, "_IVF_OWN_PRODUCT_ENTRIES", own_product)
    X = _aligned_parts(10, 400, 16, seed=0)
    start, stop = 3200, 4000  # the last two images
    nn, _, lists = first_neighbors(X, neighbors="approx", random_state=0, return_lists=True)
    kept = neighbors_without(nn, start, stop)
    kept_lists = np.delete(lists, np.s_[start:stop], axis=0)
    rest = np.delete(X, np.s_[start:stop], axis=0)
    missing = np.flatnonzero(kept < 0)
    assert len(missing) > 2 * np.sqrt(clustering.IVF_N_PROBE * len(rest))  # beyond an exact search
    completed, searched = [], []
    complete, ivf = clustering._complete_first_neighbors, clustering._first_neighbors_ivf
    monkeypatch.setattr(clustering, "_complete_first_neighbors",
                        lambda *a, **k: completed.append(complete(*a, **k)) or completed[-1])
    monkeypatch.setattr(clustering, "_first_neighbors_ivf",
                        lambda X, **k: searched.append(X.shape[0]) or ivf(X, **k))
    learn_prototypes(rest, neighbors="approx", random_state=0, first_neighbors=kept,
                     neighbor_lists=kept_lists)
    assert len(rest) not in searched
    found = completed[0]
    np.testing.assert_array_equal(found[kept >= 0], kept[kept >= 0])
    np.testing.assert_array_equal(found[missing], _best_in_lists(rest, missing, kept_lists))
    # the lists find what an exact search of the rest finds, for nearly all
    assert np.mean(found[missing] == _dense_first_neighbors(rest)[missing]) > 0.9


def _image_textures(n_images, n_rows, n_features, seed):
    """Rows of images whose textures come in pairs: a row's first neighbours
    lie in its own image or its pair's, as on most parts (Magnetic Tile)."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n_images // 2):
        texture = rng.normal(size=(6, n_features))
        images += [texture[rng.integers(0, 6, n_rows)] + 0.3 * rng.normal(size=(n_rows, n_features))
                   for _ in range(2)]
    return _unit(np.concatenate(images)).astype(np.float32)


def _finch_of(X, neighbors="exact", **kwargs):
    return clustering._finch(clustering._UnitRows(X, torch.device("cpu")), neighbors=neighbors,
                             device=torch.device("cpu"), batch_size=None, random_state=0,
                             verbose=False, **kwargs)


def test_second_level_of_a_run_on_more_rows_gives_the_search_s_neighbours(monkeypatch):
    """Without a block of images, the second level starts from the run on all
    rows: the clusters it kept keep their neighbour unless a new cluster is
    closer, the rest are searched; with exact searches that is the exact
    answer, without a search of all clusters."""
    X = _image_textures(40, 150, 24, seed=0)
    start, stop = 19 * 150, 27 * 150  # images 19-26: the block splits two pairs
    nn = first_neighbors(X, neighbors="exact")[0]
    recorded = []
    _finch_of(X, first_neighbors=nn, record=recorded)
    rest = np.delete(X, np.s_[start:stop], axis=0)
    kept = neighbors_without(nn, start, stop)
    searched = []
    search = clustering._first_neighbors
    monkeypatch.setattr(clustering, "_first_neighbors",
                        lambda X, **k: searched.append(X.shape[0]) or search(X, **k))
    derived = _finch_of(rest, first_neighbors=kept, second_level=recorded[0].without(start, stop))
    levels = [int(p.max()) + 1 for p in derived]
    assert levels[0] not in searched  # the second level searched no cluster set in full
    searched.clear()
    afresh = _finch_of(rest, first_neighbors=kept)
    assert levels[0] in searched
    assert len(derived) == len(afresh)
    for a, b in zip(derived, afresh):
        np.testing.assert_array_equal(a, b)
    # some clusters of the run lost rows to the block, not all: new clusters
    labels = recorded[0].labels
    assert len(np.intersect1d(labels[start:stop], np.delete(labels, np.s_[start:stop])))


def test_shared_search_of_other_rows_is_refused():
    X = _image_textures(4, 100, 8, seed=0)
    search = clustering.SharedSearch.of(X, random_state=0)
    search.learn_prototypes(X, n_clusters=5)
    with pytest.raises(ValueError, match=r"search is of 400 rows; X has 300.*without"):
        search.learn_prototypes(X[:300], n_clusters=5)
    kept = search.without(300, 400)
    assert len(kept.indices) == 300 and len(kept.second_level.labels) == 300
    assert kept.learn_prototypes(X[:300], n_clusters=5).shape == (5, 8)


def test_a_kept_cluster_takes_a_new_cluster_that_came_closer():
    """Rows at 0, 40 and -20 degrees, the last one's cluster shared before
    with a row at -100 degrees: the first cluster's neighbour was the 40
    degree one, and without the -100 degree row the -20 degree one is closer."""
    angles = np.radians([0.0, 40.0, -20.0, -100.0])
    X = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    previous = clustering._SecondLevel(np.array([0, 1, 2, 2]), np.array([1, 1, 2]),
                                       np.array([1, 0, 0]))
    units = clustering._UnitRows(X[:3], torch.device("cpu"))
    nn = clustering._second_neighbors(
        units, np.array([0, 1, 2]), previous.without(3, 4), neighbors="exact",
        device=torch.device("cpu"), batch_size=None, random_state=0, verbose=False,
    )
    np.testing.assert_array_equal(nn, _dense_first_neighbors(X[:3]))
    np.testing.assert_array_equal(nn, [2, 0, 0])


def test_second_level_with_many_changed_clusters_searches_as_usual():
    """Aligned parts: without a block of images many first-level clusters
    change, and the second level is searched as without the earlier run's,
    draws included: the approximate searches give the same partitions bit
    for bit (a derived second level would not)."""
    X = _aligned_parts(10, 400, 16, seed=0)
    start, stop = 3200, 4000
    nn = first_neighbors(X, neighbors="approx", random_state=0)[0]
    recorded = []
    _finch_of(X, "approx", first_neighbors=nn, record=recorded)
    rest = np.delete(X, np.s_[start:stop], axis=0)
    kept = neighbors_without(nn, start, stop)
    second = recorded[0].without(start, stop)
    derived = _finch_of(rest, "approx", first_neighbors=kept, second_level=second)
    afresh = _finch_of(rest, "approx", first_neighbors=kept)
    assert len(derived) == len(afresh)
    for a, b in zip(derived, afresh):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("lists, match", [
    (np.zeros((299, 1), dtype=int), r"shape \(300, n_lists_probed\).*\(299, 1\)"),
    (np.zeros(300, dtype=int), r"shape \(300,\)"),
    (np.zeros((300, 1)), "dtype float64"),
    (np.full((300, 2), -1), ">= 0"),
])
def test_bad_neighbor_lists(lists, match):
    X = DATASETS["noise"]()
    with pytest.raises(ValueError, match=match):
        learn_prototypes(X, first_neighbors=first_neighbors(X)[0], neighbor_lists=lists)


def test_neighbor_lists_need_first_neighbors():
    X = DATASETS["noise"]()
    with pytest.raises(ValueError, match="needs first_neighbors"):
        learn_prototypes(X, neighbor_lists=np.zeros((300, 1), dtype=int))


def test_approx_deterministic():
    X, _ = _blobs(3000, 16, 30, 0.2, seed=4)
    a = finch(X, neighbors="approx", random_state=7)
    b = finch(X, neighbors="approx", random_state=7)
    assert len(a) == len(b)
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)


def test_auto_is_exact_below_threshold(monkeypatch):
    X = DATASETS["blobs"]()
    expected = finch(X, neighbors="exact")
    for p, q in zip(finch(X, neighbors="auto"), expected):
        np.testing.assert_array_equal(p, q)
    # above the threshold "auto" must take the approximate path
    monkeypatch.setattr(clustering, "EXACT_NEIGHBORS_MAX_SAMPLES", 10)
    calls = []
    original = clustering._first_neighbors_ivf

    def spy(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(clustering, "_first_neighbors_ivf", spy)
    finch(X, neighbors="auto", random_state=0)
    assert calls and calls[0] == X.shape[0]


# --------------------------------------------------------------------------
# Required number of clusters
# --------------------------------------------------------------------------
@pytest.mark.parametrize("n_clusters", [1, 2, 5, 17, 40, 150, 399, 400])
def test_finch_n_clusters_exact_count(n_clusters):
    X = DATASETS["blobs"]()
    labels = finch_n_clusters(X, n_clusters)
    assert labels.dtype == np.int64 and labels.shape == (X.shape[0],)
    np.testing.assert_array_equal(np.unique(labels), np.arange(n_clusters))


@pytest.mark.parametrize("n_clusters", [3, 9, 25, 120])
def test_finch_n_clusters_matches_dense_merging(n_clusters):
    X = DATASETS["noise"]()
    partitions = finch(X)
    counts = [p.max() + 1 for p in partitions]
    above = [p for p, k in zip(partitions, counts) if k >= n_clusters]
    start = above[-1] if above else np.arange(len(X))
    expected = _dense_merge(X, start, n_clusters)
    got = finch_n_clusters(X, n_clusters, partitions=partitions)
    np.testing.assert_array_equal(_canonical(got), _canonical(expected))


@pytest.mark.parametrize("n_clusters", [3, 25])
def test_finch_n_clusters_without_similarity_matrix(monkeypatch, n_clusters):
    # the low-memory path recomputes similarities row by row
    X = DATASETS["noise"]()
    expected = finch_n_clusters(X, n_clusters)
    monkeypatch.setattr(clustering, "_MERGE_MATRIX_ENTRIES", 0)
    np.testing.assert_array_equal(finch_n_clusters(X, n_clusters), expected)


def test_finch_n_clusters_uses_partition_when_count_matches():
    X = DATASETS["blobs"]()
    partitions = finch(X)
    k = partitions[1].max() + 1
    np.testing.assert_array_equal(finch_n_clusters(X, k), partitions[1])


# --------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------
def test_kmeans_deterministic_and_unit():
    X, _ = _blobs(2000, 16, 10, 0.1, seed=5)
    a = kmeans(X, 10, random_state=0)
    b = kmeans(X, 10, random_state=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (10, 16) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_kmeans_recovers_blobs():
    X, assign = _blobs(3000, 16, 8, 0.05, seed=6)
    centers = kmeans(X, 8, random_state=0)
    labels = np.argmax(X @ centers.T, axis=1)
    assert adjusted_rand_score(assign, labels) > 0.99


def test_kmeans_subsampled_seeding_and_small_batches():
    X, assign = _blobs(3000, 16, 8, 0.05, seed=6)
    centers = kmeans(X, 8, random_state=0, init_size=200, batch_size=64)
    labels = np.argmax(X @ centers.T, axis=1)
    assert adjusted_rand_score(assign, labels) > 0.95


def test_kmeans_duplicate_points():
    X = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    centers = kmeans(X, 5, random_state=0)
    assert centers.shape == (5, 3)
    assert np.isfinite(centers).all()


# --------------------------------------------------------------------------
# learn_prototypes
# --------------------------------------------------------------------------
def test_learn_prototypes_finch_default_rule(monkeypatch):
    X = DATASETS["blobs_wide"]()
    partitions = finch(X)
    counts = [int(p.max()) + 1 for p in partitions]
    assert len(counts) >= 2
    # the first partition when it is small enough ...
    monkeypatch.setattr(clustering, "MAX_DEFAULT_PROTOTYPES", counts[0])
    P = learn_prototypes(X)
    assert P.shape == (counts[0], X.shape[1])
    expected = _unit([X[partitions[0] == k].mean(axis=0) for k in range(counts[0])])
    np.testing.assert_allclose(np.sort(P, axis=0), np.sort(expected, axis=0), atol=1e-5)
    # ... else exactly the cap, merged from the hierarchy like finch_n_clusters
    cap = (counts[0] + counts[1]) // 2
    monkeypatch.setattr(clustering, "MAX_DEFAULT_PROTOTYPES", cap)
    P = learn_prototypes(X)
    assert P.shape == (cap, X.shape[1])
    np.testing.assert_allclose(P, learn_prototypes(X, n_clusters=cap), atol=1e-6)


def test_learn_prototypes_are_normalised_means():
    X = DATASETS["blobs"]()
    labels = finch_n_clusters(X, 12)
    P = learn_prototypes(X, n_clusters=12)
    assert P.dtype == np.float32 and P.shape == (12, 16)
    np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0, atol=1e-5)
    means = _unit(np.stack([X[labels == k].mean(axis=0) for k in range(12)]))
    np.testing.assert_allclose(P, means, atol=1e-5)


@pytest.mark.parametrize("start, stop", [(0, 60), (150, 240), (400, 500)])
@pytest.mark.parametrize("n_clusters", [None, 20])
def test_clustering_without_a_block_from_all_rows_neighbours_equals_it_afresh(
    start, stop, n_clusters
):
    X = DATASETS["blobs_wide"]()
    # rows stretched: the raw means differ from the unit rows' means
    X = X * np.random.default_rng(0).uniform(0.5, 2.0, size=(len(X), 1)).astype(np.float32)
    kept = neighbors_without(first_neighbors(X)[0], start, stop)
    rest = np.concatenate([X[:start], X[stop:]])
    np.testing.assert_array_equal(kept >= 0, np.isin(_dense_first_neighbors(X)[
        np.r_[0:start, stop:len(X)]], np.r_[start:stop], invert=True))
    known = kept >= 0
    np.testing.assert_array_equal(kept[known], _dense_first_neighbors(rest)[known])
    assert 0 < (~known).sum()
    for normalize in (True, False):
        expected = learn_prototypes(rest, n_clusters=n_clusters, normalize=normalize)
        np.testing.assert_array_equal(
            learn_prototypes(rest, n_clusters=n_clusters, normalize=normalize,
                             first_neighbors=kept), expected)


def test_many_unknown_neighbours_are_searched_as_without_any():
    X, _ = _blobs(3000, 16, 40, 0.2, seed=3)
    unknown = np.full(len(X), -1)
    kwargs = dict(neighbors="approx", random_state=0)
    np.testing.assert_array_equal(learn_prototypes(X, first_neighbors=unknown, **kwargs),
                                  learn_prototypes(X, **kwargs))


@pytest.mark.parametrize("neighbors, match", [
    (np.zeros(10, dtype=int), r"300 ints.*shape \(10,\)"),
    (np.arange(1, 301) % 300 + 0.0, "dtype float64"),
    (np.r_[1, 1, np.arange(1, 299)], "row 1 has 1"),
    (np.r_[np.arange(1, 300), 300], "row 299 has 300"),
    (np.r_[np.arange(1, 300), -2], "row 299 has -2"),
])
def test_bad_first_neighbors(neighbors, match):
    X = DATASETS["noise"]()
    with pytest.raises(ValueError, match=match):
        learn_prototypes(X, first_neighbors=neighbors)


def test_first_neighbors_are_finchs_alone():
    X = DATASETS["noise"]()
    with pytest.raises(ValueError, match="FINCH"):
        learn_prototypes(X, method="kmeans", n_clusters=3, first_neighbors=first_neighbors(X)[0])


def test_learn_prototypes_kmeans():
    X = DATASETS["blobs"]()
    P = learn_prototypes(X, method="kmeans", n_clusters=12, random_state=0)
    assert P.shape == (12, 16) and P.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(P, axis=1), 1.0, atol=1e-5)
    Q = learn_prototypes(X, method="kmeans", n_clusters=12, random_state=0)
    np.testing.assert_array_equal(P, Q)


# --------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "X, exc, match",
    [
        (np.zeros((0, 4), dtype=np.float32), ValueError, "at least 1 sample"),
        (np.ones(4, dtype=np.float32), ValueError, "2-D"),
        (np.ones((2, 3, 4), dtype=np.float32), ValueError, "2-D"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError, "NaN"),
        (np.array([[1.0, np.inf], [0.0, 1.0]]), ValueError, "NaN or infinity"),
        (np.array([["a", "b"]]), TypeError, "floats"),
        (np.array([[1 + 1j, 0]]), TypeError, "floats"),
    ],
)
def test_bad_X(X, exc, match):
    for func in (finch, learn_prototypes):
        with pytest.raises(exc, match=match):
            func(X)
    with pytest.raises(exc, match=match):
        kmeans(X, 1)
    with pytest.raises(exc, match=match):
        finch_n_clusters(X, 1)


def test_bad_parameters():
    X = DATASETS["noise"]()
    n = X.shape[0]
    for bad in (0, -1, n + 1):
        with pytest.raises(ValueError, match="n_clusters"):
            finch_n_clusters(X, bad)
        with pytest.raises(ValueError, match="n_clusters"):
            kmeans(X, bad)
        with pytest.raises(ValueError, match="n_clusters"):
            learn_prototypes(X, n_clusters=bad)
    with pytest.raises(TypeError, match="n_clusters"):
        learn_prototypes(X, n_clusters=2.5)
    with pytest.raises(ValueError, match="method"):
        learn_prototypes(X, method="dbscan")
    with pytest.raises(ValueError, match="requires an int n_clusters"):
        learn_prototypes(X, method="kmeans")
    with pytest.raises(ValueError, match="neighbors"):
        finch(X, neighbors="fast")


def test_verbose_reports_progress(capsys):
    X = DATASETS["blobs"]()
    finch(X, neighbors="approx", random_state=0, verbose=True)
    learn_prototypes(X, method="kmeans", n_clusters=5, random_state=0, verbose=True)
    out = capsys.readouterr()
    assert "FINCH partition 0" in out.err  # stderr: stdout is for results
    assert "FINCH partition" not in out.out


def test_input_passes_need_no_copy_of_the_input(monkeypatch):
    """Finiteness check and norms of a unit input allocate far less than X
    (np.linalg.norm over all of X squares it into a temporary as large)."""
    import tracemalloc

    from skprotoad import clustering
    from skprotoad.clustering import _check_X, _normalize_rows

    monkeypatch.setattr(clustering, "_PASS_ENTRIES", 2**18)  # blocks of 1 MiB here
    X = np.random.default_rng(0).standard_normal((300_000, 64), dtype=np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    tracemalloc.start()
    try:
        assert _normalize_rows(_check_X(X)) is X
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.2 * X.nbytes, peak


def test_unit_row_view_reads_the_normalised_rows_bit_for_bit():
    """FINCH reads unit rows through a view that divides on each read; every
    kind of index it uses must give the rows of the unit copy exactly."""
    import torch

    from skprotoad.clustering import _cluster_sums, _normalize_rows, _UnitRows

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(500, 12)) * rng.uniform(0.1, 9.0, size=(500, 1))).astype(np.float32)
    X[7] = 0.0
    unit, view = _normalize_rows(X), _UnitRows(X, "cpu")
    rows = torch.from_numpy(rng.integers(0, 500, size=40))
    grid = torch.from_numpy(rng.integers(0, 500, size=(3, 5)))
    for index, expected in [
        (slice(5, 60), unit[5:60]), (rows, unit[rows.numpy()]), (grid, unit[grid.numpy()]),
        (7, unit[7]), ([3, 1, 3], unit[[3, 1, 3]]),
    ]:
        assert np.array_equal(view[index].numpy(), expected)
    labels = rng.integers(0, 9, size=500)
    expected = np.zeros((9, 12), dtype=np.float32)
    np.add.at(expected, labels, unit)  # row-order float32 accumulation
    assert np.array_equal(_cluster_sums(view, labels, 9), expected)
    # already unit rows are read as stored, as _normalize_rows returns them
    stored = unit[8:]
    assert _normalize_rows(stored) is stored
    assert np.array_equal(_UnitRows(stored, "cpu")[10:90].numpy(), stored[10:90])


def test_unit_rows_sum_merged_partitions_from_the_first(monkeypatch):
    """FINCH's upper levels, the pair merges and the prototypes only merge
    the clusters of its first level: their sums come from that level's sums,
    without reading the rows again, and equal the sums of the rows."""
    from skprotoad.clustering import _normalize_rows, _UnitRows

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(500, 12)) * rng.uniform(0.1, 9.0, size=(500, 1))).astype(np.float32)
    unit, view = _normalize_rows(X), _UnitRows(X, "cpu")

    def summed(labels, k):
        expected = np.zeros((k, 12), dtype=np.float64)
        np.add.at(expected, labels, unit.astype(np.float64))
        return expected

    reads = []
    read = _UnitRows.__getitem__
    monkeypatch.setattr(_UnitRows, "__getitem__", lambda self, i: reads.append(i) or read(self, i))
    first = rng.integers(0, 50, size=500)
    np.testing.assert_allclose(view.cluster_sums(first, 50), summed(first, 50), atol=1e-5)
    assert reads
    reads.clear()
    merged = rng.integers(0, 7, size=50)[first]  # every first-level cluster into one of 7
    np.testing.assert_allclose(view.cluster_sums(merged, 7), summed(merged, 7), atol=1e-5)
    assert not reads
    other = rng.integers(0, 7, size=500)  # splits first-level clusters: summed from the rows
    np.testing.assert_allclose(view.cluster_sums(other, 7), summed(other, 7), atol=1e-5)
    assert reads


def test_learn_prototypes_holds_no_unit_copy(monkeypatch):
    """The plain means need the raw rows and FINCH the unit ones: a unit copy
    of millions of patches would double a fit's memory, so none is made."""
    import tracemalloc

    monkeypatch.setattr(clustering, "_PASS_ENTRIES", 2**18)
    monkeypatch.setattr(clustering, "_MERGE_MATRIX_ENTRIES", 0)  # its own, smaller matrix
    rng = np.random.default_rng(0)
    n = clustering.EXACT_NEIGHBORS_MAX_SAMPLES + 4000  # the first level uses the IVF search
    X = rng.standard_normal((n, 256), dtype=np.float32)
    X *= rng.uniform(0.5, 2.0, size=(n, 1)).astype(np.float32)
    tracemalloc.start()
    try:
        learn_prototypes(X, normalize=False, n_farthest=20, random_state=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * X.nbytes, peak / X.nbytes


# ------------------------------------------------------------ farthest rows


def _farthest_rows_brute_force(X, P, n):
    P = list(P)
    for _ in range(n):
        d = np.full(len(X), np.inf)  # no prototype yet: every row is infinitely far
        if P:
            d = ((X[:, None, :] - np.asarray(P)[None]) ** 2).sum(-1).min(axis=1)
        P.append(X[int(np.argmax(d))])
    return np.asarray(P, dtype=np.float32)


@pytest.mark.parametrize("n_prototypes", [0, 3])
def test_add_farthest_rows_is_greedy_k_center(n_prototypes):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 8)).astype(np.float32)
    X[:5] *= 4  # a few rare, far rows
    P = 0.1 * rng.normal(size=(n_prototypes, 8)).astype(np.float32)  # near the bulk
    ours = add_farthest_rows(X, P, 12, batch_size=64)
    np.testing.assert_allclose(ours, _farthest_rows_brute_force(X, P, 12), rtol=1e-6)
    if n_prototypes:
        # with prototypes in the bulk, the rare rows are taken first
        assert {tuple(r) for r in ours[3:8]} == {tuple(r) for r in X[:5]}
    chosen = add_farthest_rows(X, P, 12, batch_size=64, return_indices=True)
    assert chosen.dtype == np.int64
    np.testing.assert_array_equal(X[chosen], ours[n_prototypes:])
    assert len(add_farthest_rows(X, P, 0, return_indices=True)) == 0


def test_learn_prototypes_appends_farthest_unit_rows():
    rng = np.random.default_rng(1)
    X = 3 * rng.normal(size=(400, 6)).astype(np.float32)
    base = learn_prototypes(X, method="kmeans", n_clusters=5, random_state=0)
    both = learn_prototypes(X, method="kmeans", n_clusters=5, random_state=0, n_farthest=4)
    np.testing.assert_array_equal(both[:5], base)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    np.testing.assert_allclose(both, _farthest_rows_brute_force(unit, base, 4), rtol=1e-5)
    # plain means: the appended rows are rows of X itself
    raw = learn_prototypes(X, method="kmeans", n_clusters=5, random_state=0, normalize=False,
                           n_farthest=4)
    assert all(np.isclose(X, row).all(axis=1).any() for row in raw[5:])


@pytest.mark.parametrize("n_rows", [-1, 401, 1.5, True])
def test_add_farthest_rows_bad_count(n_rows):
    X = np.ones((400, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="n_rows"):
        add_farthest_rows(X, X[:2], n_rows)
    with pytest.raises(ValueError, match="n_farthest"):
        learn_prototypes(X, method="kmeans", n_clusters=2, n_farthest=n_rows)


def test_add_farthest_rows_never_picks_a_row_twice():
    # once every distance left is 0 the same row was picked again and again
    X = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 1]], np.float32)
    picked = add_farthest_rows(X, X[:1], 5, return_indices=True)
    assert sorted(picked) == [0, 1, 2, 3, 4]
    picked = add_farthest_rows(np.ones((20, 3), np.float32), np.ones((1, 3), np.float32), 4,
                               return_indices=True)
    assert len(set(picked.tolist())) == 4


def test_add_farthest_rows_refreshes_when_the_pool_runs_dry(monkeypatch):
    # a pool of 3 rows: most steps must refresh every row's distance, and
    # the result is still the exact greedy sequence
    monkeypatch.setattr(clustering, "_FARTHEST_POOL_MIN", 3)
    monkeypatch.setattr(clustering, "_FARTHEST_POOL_FACTOR", 0)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 5)).astype(np.float32)
    P = 0.1 * rng.normal(size=(2, 5)).astype(np.float32)
    np.testing.assert_allclose(
        add_farthest_rows(X, P, 15, batch_size=32), _farthest_rows_brute_force(X, P, 15),
        rtol=1e-6,
    )


@pytest.mark.parametrize("n_samples, spread, kwargs", [
    (6000, 3, {}),  # exact first neighbours at every level
    (30000, 3, {}),  # the inverted-file search at the first level
    (30000, 3, {"n_farthest": 200}),
    # the first level's neighbours given: the later levels dominate, whose
    # size the estimate takes from patch features (a third per level), which
    # plain noise follows and the blobs' levels do not
    (30000, 0, {"first_search": False}),
])
def test_estimated_multiply_adds_follow_the_counted_ones(n_samples, spread, kwargs):
    # fit's time estimate rests on this count: it must follow the matrix
    # products the clustering really runs (torch counts them), whichever search
    from torch.utils.flop_counter import FlopCounterMode

    rng = np.random.default_rng(0)
    centers = spread * rng.normal(size=(40, 16))
    X = (centers[rng.integers(0, 40, n_samples)] + rng.normal(size=(n_samples, 16)))
    X = X.astype(np.float32)
    given = {"first_neighbors": first_neighbors(X, random_state=0)[0]} if (
        kwargs.get("first_search") is False) else {}
    with FlopCounterMode(display=False) as counter:
        learn_prototypes(X, random_state=0, n_farthest=kwargs.get("n_farthest", 0), **given)
    counted = counter.get_total_flops() / 2
    estimated = clustering.estimated_multiply_adds(n_samples, 16, **kwargs)
    assert counted / 3 < estimated < 3 * counted


def test_estimated_multiply_adds_bound_kmeans():
    from torch.utils.flop_counter import FlopCounterMode

    X = np.random.default_rng(0).normal(size=(5000, 16)).astype(np.float32)
    with FlopCounterMode(display=False) as counter:
        learn_prototypes(X, method="kmeans", n_clusters=20, random_state=0)
    estimated = clustering.estimated_multiply_adds(5000, 16, method="kmeans", n_clusters=20)
    assert counter.get_total_flops() / 2 <= estimated
