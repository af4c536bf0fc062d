"""From images to patch features to the fitted network, and the one batch loop.

:class:`~skprotoad.ProtoADDetector` runs images through torch modules in two
places: the embedding when :meth:`~skprotoad.ProtoADDetector.fit` extracts
the training features, and the whole network when it scores. Both go through
:func:`run_batches`, which groups the images by input size (see
:meth:`skprotoad._images.ImageSequence.plan`) and runs each batch without
autograd. The training features of all images are held once, in one
:class:`PatchFeatures` array, which clustering and calibration read from.

The functions that take a ``detector`` read its parameters (never its
fitted attributes): they build what those parameters describe.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from . import _images, _progress
from ._whitening import stage_whitening
from .backbones import create_feature_extractor
from .clustering import SharedSearch, add_farthest_rows, learn_prototypes
from .network import (
    PatchEmbedding, ProtoADNetwork, effective_image_score, effective_map_metric,
    effective_score_whitening, on_grid,
)

#: ``n_farthest=None``: this many farthest patches, at most ``MAX_FARTHEST_SHARE``
#: of the training patches (so that a small training set is not memorised whole).
DEFAULT_FARTHEST = 1000
MAX_FARTHEST_SHARE = 0.1


#: Of the ``count`` patches an image keeps under ``max_patches``, at most this
#: many (and at most an eighth) are not drawn at random but chosen to cover
#: those left out: a patch unlike the rest of its image, which the
#: farthest-patch prototypes exist for, is rarely drawn.
MAX_COVERING_ROWS = 16
#: The left-out rows' distances are measured to at most this many of the drawn
#: ones (a random subset: they are drawn in random order), which bounds the cost.
COVERING_REFERENCE_ROWS = 512


def draw_rows(rows, count, seed, k):
    """``count`` of the ``rows`` of image ``k`` (all if as many), in their order.

    Most are drawn at random, with a generator seeded by ``seed`` and ``k``
    alone; the last ``min(MAX_COVERING_ROWS, count // 8)`` are the rows left
    out that are farthest (Euclidean) from those drawn (from the first
    :data:`COVERING_REFERENCE_ROWS` of them), chosen greedily so that each is
    also far from the ones chosen before it
    (:func:`~skprotoad.clustering.add_farthest_rows`).
    """
    if count >= len(rows):
        return rows
    n_cover = min(MAX_COVERING_ROWS, count // 8)
    drawn = np.random.default_rng([seed, k]).choice(len(rows), count - n_cover, replace=False)
    if n_cover:
        left = np.setdiff1d(np.arange(len(rows)), drawn)
        reference = rows[drawn[:COVERING_REFERENCE_ROWS]]
        chosen = add_farthest_rows(rows[left], reference, n_cover, return_indices=True)
        drawn = np.concatenate([drawn, left[chosen]])
    return rows[np.sort(drawn)]


def size_multiple(embedding):
    """Multiple of which scale-mode input sides are: every stride divides it."""
    return math.lcm(*embedding.backbone.strides)


def progress(iterable, total, desc, verbose):
    """``iterable`` with a tqdm bar when ``verbose``, else as it is."""
    if not verbose:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


def run_batches(module, images, device, batch_size, image_size, crop_size, multiple,
                indices=None, sizes=None, verbose=False, desc=""):
    """Run ``module`` on batches of ``images``, without autograd.

    Parameters
    ----------
    module : torch.nn.Module
        Takes a (B, 3, height, width) tensor on ``device``.
    images : skprotoad._images.ImageSequence
    device : torch.device
    batch_size : int
    image_size, crop_size
        The model geometry, as the detector's parameters take it.
    multiple : int
        See :func:`size_multiple`.
    indices : sequence of int, default=None
        The images to run, in this order; all by default.
    sizes : list of (height, width), default=None
        Input sizes of ``indices`` when the caller has them already.
    verbose : bool, default=False
        Show a progress bar named ``desc``.

    Yields
    ------
    chunk : list of int
        The indices of the batch's images.
    batch : torch.Tensor
        The batch's input, (B, 3, height, width), on the CPU.
    output
        ``module(batch)``.
    """
    plan = images.plan(batch_size, image_size, crop_size, indices, multiple, sizes=sizes)
    batches = images.batches(batch_size, image_size, crop_size, multiple=multiple, plan=plan)
    with torch.inference_mode():
        for chunk, batch in progress(batches, len(plan), desc, verbose):
            yield chunk, batch, module(batch.to(device))


class PatchFeatures:
    """Patch features of images of possibly different sizes, in one array.

    Parameters
    ----------
    sizes : list of (height, width)
        Model input size of each image.
    grids : list of (height, width)
        Patch grid of each image's features.
    n_channels : int
    max_patches : int or None, default=None
        Most patches held. When the images have more, each keeps the same
        number of its patches (at least one), drawn at random.
    seed : int, default=0
        Seeds the draw of image ``k``'s patches, with ``k``: the same patches
        whatever order the images are extracted in.

    Attributes
    ----------
    features : ndarray of shape (n_patches, n_channels), float32
        Image ``k``'s patches (all, row-major over its grid, or its drawn
        ones in that order) at rows ``offsets[k]:offsets[k + 1]``.
    complete : bool
        Whether every patch of every image is held.
    """

    def __init__(self, sizes, grids, n_channels, max_patches=None, seed=0):
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.grids = [tuple(int(v) for v in g) for g in grids]
        counts = np.array([h * w for h, w in self.grids], dtype=np.int64)
        if max_patches is not None and counts.sum() > max_patches:
            counts = np.minimum(counts, max(1, int(max_patches) // len(counts)))
        self.complete = all(c == h * w for c, (h, w) in zip(counts, self.grids))
        self.seed = int(seed)
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.features = np.empty((int(self.offsets[-1]), int(n_channels)), dtype=np.float32)

    def __len__(self):
        return len(self.grids)

    @property
    def shape(self):
        """(height, width, channels) of a grid; height and width None if they vary."""
        grids = set(self.grids)
        (height, width) = grids.pop() if len(grids) == 1 else (None, None)
        return (height, width, self.features.shape[1])

    def put(self, k, patches):
        """Store image ``k``'s features, an (h, w, C) array."""
        if tuple(patches.shape[:2]) != self.grids[k]:
            raise RuntimeError(
                f"the backbone gave a {patches.shape[0]} x {patches.shape[1]} feature "
                f"grid for an input of {self.sizes[k]}, expected {self.grids[k]}."
            )
        self.features[self.offsets[k] : self.offsets[k + 1]] = draw_rows(
            patches.reshape(-1, patches.shape[-1]), self.count(k), self.seed, k
        )

    def count(self, k):
        """How many of image ``k``'s patches are held."""
        return int(self.offsets[k + 1] - self.offsets[k])

    def patches(self, stop=None):
        """All patches of the first ``stop`` images (all by default): a view."""
        end = self.offsets[-1 if stop is None else stop]
        return self.features[:end]

    @contextlib.contextmanager
    def images_last(self, positions):
        """Within the block, the images at ``positions`` (a range) come last,
        so that the others' patches are a prefix (:meth:`patches`).

        Their rows are moved in place and back afterwards, holding one copy
        of the fewer rows at a time, not a copy of the others; an array that
        may not be written (a read-only or memory-mapped feature cache) is
        first copied once.
        """
        start, stop = positions.start, positions.stop
        if stop == len(self):
            yield
            return
        if isinstance(self.features, np.memmap) or not self.features.flags.writeable:
            self.features = np.array(self.features)
        saved = self.offsets, self.sizes, self.grids
        first, mid, end = (int(self.offsets[i]) for i in (start, stop, len(self)))
        _swap_blocks(self.features, first, mid, end)
        rest = [*range(start), *range(stop, len(self)), *range(start, stop)]
        counts = np.diff(self.offsets)[rest]
        self.offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.sizes = [saved[1][k] for k in rest]
        self.grids = [saved[2][k] for k in rest]
        try:
            yield
        finally:
            _swap_blocks(self.features, first, end - (mid - first), end)
            self.offsets, self.sizes, self.grids = saved

    def rows(self, positions):
        """(start, stop): the rows of the images at ``positions`` (a range)."""
        return int(self.offsets[positions.start]), int(self.offsets[positions.stop])

    def image(self, k):
        """Image ``k``'s features, (h, w, C): a view (only when ``complete``)."""
        if not self.complete:
            raise RuntimeError("only a sample of each image's patches is held.")
        return self.features[self.offsets[k] : self.offsets[k + 1]].reshape(
            *self.grids[k], -1
        )


def _swap_blocks(array, first, mid, end):
    """Rows ``[first, mid)`` and ``[mid, end)`` of ``array`` trade places, in
    place, with a copy of the smaller block only: the larger one moves in
    steps of the smaller's length, which never overlap their destination."""
    step_rows = min(mid - first, end - mid)
    if step_rows == 0:
        return
    if mid - first <= end - mid:
        moved = array[first:mid].copy()
        for start in range(mid, end, step_rows):
            stop = min(start + step_rows, end)
            array[start - step_rows : stop - step_rows] = array[start:stop]
        array[end - step_rows : end] = moved
    else:
        moved = array[mid:end].copy()
        for stop in range(mid, first, -step_rows):
            start = max(stop - step_rows, first)
            array[start + step_rows : stop + step_rows] = array[start:stop]
        array[first : first + step_rows] = moved


def patch_embedding(detector, seed, device):
    """The patch embedding of ``detector``'s parameters, on ``device``;
    ``seed`` initialises a backbone without weights."""
    backbone = create_feature_extractor(
        detector.backbone, detector.layers, detector.weights, seed=seed, verbose=detector.verbose
    )
    return PatchEmbedding(
        backbone, mean=detector.mean, std=detector.std, alignment=detector.alignment,
        padding=detector.padding,
        neighborhood_size=detector.neighborhood_size, normalization=detector.normalization,
    ).to(device)


def farthest_count(n_farthest, n_patches):
    """How many farthest-patch prototypes the detector's ``n_farthest`` asks
    for, with ``n_patches`` training patches."""
    if n_farthest is None:
        return min(DEFAULT_FARTHEST, int(MAX_FARTHEST_SHARE * n_patches))
    return int(n_farthest)


def fit_network(detector, embedding, patches, random_state, device, shared=None):
    """The network of ``detector``'s parameters, with prototypes learned from
    ``patches`` (an (n_patches, n_channels) array), in eval mode on ``device``;
    ``random_state`` as :func:`~skprotoad.clustering.learn_prototypes` takes
    it; ``shared``: None, or the :class:`~skprotoad.clustering.SharedSearch`
    of these patches."""
    params = dict(
        method=detector.clustering, n_clusters=detector.n_clusters, random_state=random_state,
        device=str(device), normalize=detector.normalization == "patch",
        n_farthest=farthest_count(detector.n_farthest, len(patches)),
        verbose=_progress.verbosity(detector.verbose) >= 2,
    )
    if shared is None:
        prototypes = learn_prototypes(patches, **params)
    else:
        prototypes = shared.learn_prototypes(patches, **params)
    whitening = None
    if effective_map_metric(detector.normalization, detector.map_metric) == "whitened":
        # of this fit's own patches, so that each calibration fold has its own
        whitening = torch.from_numpy(stage_whitening(patches[:, : embedding.backbone.channels[0]]))
    network = ProtoADNetwork(
        embedding, torch.from_numpy(prototypes),
        _images.fixed_input_size(detector.image_size, detector.crop_size), detector.sigma,
        effective_image_score(detector.normalization, detector.image_score),
        map_whitening=whitening,
        score_whitening=effective_score_whitening(
            detector.normalization, detector.image_score, detector.map_metric,
            detector.score_whitening),
    )
    return network.to(device).eval()


def shared_first_neighbors(detector, patches, folds, random_state, device):
    """The :class:`~skprotoad.clustering.SharedSearch` of all ``patches``,
    when the clusterings without each fold can start from it (FINCH with
    folds to hold out), else None.

    Each clustering without a fold keeps the neighbours that lie outside it
    (:func:`~skprotoad.clustering.neighbors_without`), and the final
    clustering's second level where a fold changed it little, instead of
    searching again: one search serves every clustering of a fit. Where a
    patch's nearest neighbour lies in its own image (most patches of most
    parts) nearly all are kept; where it lies at the same place in another
    image (aligned parts), a fold takes a fifth of those, and they are
    searched again in the lists the first search compared them with. The
    search draws from ``random_state`` (a ``RandomState``) what FINCH's first
    level would draw, so that the clustering of all patches, passed the same
    ``random_state`` next, learns the prototypes it would learn alone.
    """
    if not folds or detector.clustering != "finch":
        return None
    return SharedSearch.of(patches, device=str(device), random_state=random_state)


def may_cap(detector, embedding, n_images):
    """Whether ``detector.max_patches`` may keep fewer than all patches of
    ``n_images`` images: known before extraction for one fixed input size;
    with a scale factor, assumed."""
    if detector.max_patches is None:
        return False
    crop = _images.fixed_input_size(detector.image_size, detector.crop_size)
    if crop is None:
        return True
    stride = embedding.backbone.strides[0]
    per_image = -(-crop[0] // stride) * -(-crop[1] // stride)
    return n_images * per_image > detector.max_patches


def extract_features(detector, embedding, images, order, device, seed=0):
    """Patch features of ``images[order]``, as :class:`PatchFeatures`
    (at most ``detector.max_patches``, drawn with ``seed``).

    A blank crop goes through the embedding first (:func:`check_backbone_runs`).
    All patches of all images go into one preallocated float32 array, image
    ``k`` of ``order`` at rows ``offsets[k]:offsets[k + 1]``, whatever order
    the batches (grouped by input size) come in: the full feature set is
    held once, or the sample of them that ``detector.max_patches`` allows.
    """
    image_size, crop_size = detector.image_size, detector.crop_size
    crop = _images.fixed_input_size(image_size, crop_size)
    channels, *grid = check_backbone_runs(
        embedding, device, crop, detector.backbone, detector.layers
    )
    order = list(order)
    multiple = size_multiple(embedding)
    sizes = None
    if crop is None:
        # Sizes are multiples of every stride, so each grid is size / stride;
        # known before extraction, so the array can be allocated first.
        stride = embedding.backbone.strides[0]
        sizes = images.input_sizes(image_size, None, multiple, order)
        grids = [(-(-h // stride), -(-w // stride)) for h, w in sizes]
        features = PatchFeatures(sizes, grids, channels, detector.max_patches, seed)
    else:
        # one fixed size: the probe's grid is every image's
        features = PatchFeatures([crop] * len(order), [grid] * len(order), channels,
                                 detector.max_patches, seed)
        shard = SHARD_BATCHES * int(detector.batch_size)
        if len(order) > shard and on_dask():
            _extract_on_dask(detector, images, order, features, shard, seed)
            return features
    position = {index: k for k, index in enumerate(order)}
    batches = run_batches(
        embedding, images, device, detector.batch_size, image_size, crop_size, multiple,
        indices=order, sizes=sizes, verbose=detector.verbose, desc="features",
    )
    for chunk, _, output in batches:
        for patches, index in zip(output.permute(0, 2, 3, 1).cpu().numpy(), chunk):
            features.put(position[index], patches)
    return features


#: Images per task when fit's feature extraction runs on Dask, in batches:
#: whole batches, so that the tasks run the batches a single process runs.
SHARD_BATCHES = 16


def on_dask():
    """Whether joblib's active backend is Dask's (``joblib.parallel_config(backend="dask")``)."""
    from joblib.parallel import get_active_backend

    return type(get_active_backend()[0]).__name__ == "DaskDistributedBackend"


def _extract_on_dask(detector, images, order, features, shard, seed):
    """Fill ``features`` by joblib tasks of ``shard`` images each: every task
    builds the embedding on its worker and returns only the drawn patches."""
    from joblib import Parallel, delayed

    starts = range(0, len(order), shard)
    parts = Parallel(n_jobs=-1)(
        delayed(_shard_features)(
            detector, seed, images.take(order[s:s + shard]), list(range(s, s + shard)),
            [features.count(k) for k in range(s, min(s + shard, len(order)))],
        )
        for s in starts
    )
    for s, rows in zip(starts, parts):
        for k, patches in enumerate(rows, start=s):
            features.features[features.offsets[k] : features.offsets[k + 1]] = patches


def _shard_features(detector, seed, items, positions, counts):
    """One task of :func:`_extract_on_dask`: the drawn patches of ``items``."""
    from ._validation import torch_device

    device = torch_device(detector.device)
    embedding = patch_embedding(detector, seed, device)
    sequence = _images.ImageSequence(items)
    drawn = [None] * len(items)
    batches = run_batches(
        embedding, sequence, device, detector.batch_size, detector.image_size,
        detector.crop_size, size_multiple(embedding),
    )
    for chunk, _, output in batches:
        for i, patches in zip(chunk, output.permute(0, 2, 3, 1).cpu().numpy()):
            drawn[i] = draw_rows(patches.reshape(-1, patches.shape[-1]), counts[i], seed,
                                 positions[i])
    return drawn


def score_features(network, features, positions, device, batch_size):
    """Anomaly scores, map maxima, image-score patch maps and input sizes of
    the images at ``positions`` of ``features`` (see :func:`score_images_at`).

    Images of one input size are scored together, in batches, by the
    network's head alone (the features are already extracted).
    """
    positions = list(positions)
    outputs = _ScoreOutputs(len(positions))
    sizes = [features.sizes[k] for k in positions]
    with torch.inference_mode():
        for part in _images.size_batches(range(len(positions)), sizes, batch_size):
            f = torch.from_numpy(np.stack([features.image(positions[j]) for j in part]))
            patch_scores = network.patch_scores(f.to(device).permute(0, 3, 1, 2))
            outputs.add(part, *_head_parts(network, patch_scores, sizes[part[0]]))
    return outputs.result(sizes)


def score_training_images(network, features, images, order, positions, device, batch_size,
                          image_size):
    """What :func:`score_images_at` returns, of the training images
    ``images[order[k]]`` for k in ``positions``, held at those positions of
    ``features``: by the network's head on the held features when they are
    all there, else by the whole network (the backbone runs again)."""
    if features.complete:
        return score_features(network, features, positions, device, batch_size)
    indices = [order[k] for k in positions]
    return score_images_at(network, images, indices, device, batch_size, image_size)


def score_images_at(network, images, indices, device, batch_size, image_size):
    """Scores of ``images[indices]`` by the whole network, for calibration.

    Returns
    -------
    scores, map_maxima : ndarray of shape (n,)
    score_patches : list of torch.Tensor of shape (h, w)
        The image-score maps at the patches' resolution, on the CPU.
    sizes : list of (height, width)
        The images' input sizes.
    """
    outputs = _ScoreOutputs(len(indices))
    sizes = [None] * len(indices)
    position = {index: k for k, index in enumerate(indices)}

    def parts(batch):
        return _head_parts(network, network.image_patch_scores(batch), tuple(batch.shape[-2:]))

    batches = run_batches(
        parts, images, device, batch_size, image_size, network.input_size,
        size_multiple(network.embedding), indices=list(indices),
    )
    for chunk, batch, result in batches:
        at = [position[i] for i in chunk]
        outputs.add(at, *result)
        for k in at:
            sizes[k] = tuple(batch.shape[-2:])
    return outputs.result(sizes)


def _head_parts(network, patch_scores, size):
    """The network's maps' maxima and scores, and its image-score patch
    maps, from its ``patch_scores``."""
    map_patches, score_patches = patch_scores
    maps, scores = network.readout(map_patches, score_patches, size)
    return maps.flatten(1).amax(dim=1), scores, score_patches


class _ScoreOutputs:
    """Collects :func:`_head_parts` of batches in the images' order."""

    def __init__(self, n):
        self.scores, self.map_maxima = np.empty(n), np.empty(n)
        self.score_patches = [None] * n

    def add(self, at, map_maxima, scores, score_patches):
        self.scores[at] = scores.cpu().numpy()
        self.map_maxima[at] = map_maxima.cpu().numpy()
        for k, patches in zip(at, score_patches.cpu()):
            self.score_patches[k] = patches[0]

    def result(self, sizes):
        return self.scores, self.map_maxima, self.score_patches, list(sizes)


def baseline_and_scores(network, score_patches, sizes):
    """The mean of normal images' image-score patch maps, and their scores
    against it, each left out of its own baseline.

    Parameters
    ----------
    network : ProtoADNetwork
        The network that scored the images (it smooths and upsamples here).
    score_patches : list of torch.Tensor of shape (h, w)
        At least two images' image-score maps at the patches' resolution.
    sizes : list of (height, width)
        The images' input sizes.

    Returns
    -------
    baseline : torch.Tensor of shape (h, w)
        The mean map, on the median grid when the images' grids differ.
    scores : ndarray of shape (n_images,)
        Each image's score against the mean of the *other* images' maps, as
        an unseen normal image is scored against the mean of all of them: an
        image in its own baseline would score lower than it should, and the
        threshold set on it too low.
    """
    grids = np.array([tuple(p.shape) for p in score_patches])
    height, width = (int(v) for v in np.median(grids, axis=0).round())

    def on_median_grid(patches):
        return on_grid(patches.cpu().double(), height, width)

    device = network.prototypes.device
    n = len(score_patches)
    total = sum(on_median_grid(p) for p in score_patches)
    scores = np.empty(n)
    with torch.inference_mode():
        for i, (patches, size) in enumerate(zip(score_patches, sizes)):
            others = ((total - on_median_grid(patches)) / (n - 1)).float().to(device)
            score = network.image_scores(patches.to(device)[None, None], tuple(size), others)
            scores[i] = float(score[0])
    return (total / n).float().to(device), scores


def check_backbone_runs(embedding, device, crop, name, layers):
    """Run one blank crop through the embedding before the real images;
    return the (channels, height, width) of its features.

    A backbone that cannot take this input (a vision transformer built for
    another size, say) then fails with a ValueError naming the backbone
    (``name``, ``layers``) and the crop, not with an error from deep inside
    torch or timm. ``crop`` None (a scale-factor geometry): any stride
    multiple will do as a probe.
    """
    crop = crop or (64, 64)
    try:
        with torch.inference_mode():
            return tuple(embedding(torch.zeros(1, 3, *crop, device=device)).shape[1:])
    except (RuntimeError, AssertionError, ValueError, IndexError, TypeError) as exc:
        if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
            raise
        raise ValueError(
            f"backbone {name!r} with layers {tuple(layers)} cannot "
            f"process {crop[0]} x {crop[1]} crops: {type(exc).__name__}: {exc}"
        ) from exc


def on_device(network, device):
    """``network`` on ``device``, moved only when it lies elsewhere.

    ``Module.to`` visits every tensor even when none moves, a cost that a
    station scoring one image per call would pay each time. Where the
    network lies is read from a backbone weight and the head's tensors:
    ``to`` moves them all together.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        # what .to("cuda") moves to; tensors there report "cuda:N", never "cuda"
        device = torch.device("cuda", torch.cuda.current_device())
    probes = (next(network.embedding.parameters(), None), network.prototype_conv.weight,
              network.score_baseline)
    if all(t is None or t.device == device for t in probes):
        return network
    return network.to(device)


def score_images(network, images, device, batch_size, image_size, keep_maps, verbose=False):
    """Anomaly maps and scores of ``images`` by the whole network, one pass.

    Returns
    -------
    maps : ndarray of shape (n_images, height, width), list or None
        float32 maps at the network's input size; a list of 2-D arrays when
        the input size varies (``network.input_size`` None); None unless
        ``keep_maps``.
    scores : ndarray of shape (n_images,), float64
        Anomaly scores (higher = more anomalous).
    """
    scores = np.empty(len(images), dtype=np.float64)
    size = network.input_size
    maps = None
    if keep_maps:
        maps = [None] * len(images) if size is None else np.empty((len(images), *size), np.float32)
    batches = run_batches(
        network, images, device, batch_size, image_size, size,
        size_multiple(network.embedding), verbose=verbose, desc="scoring",
    )
    for chunk, _, (batch_maps, batch_scores) in batches:
        scores[chunk] = batch_scores.cpu().numpy()
        if isinstance(maps, list):
            for i, m in zip(chunk, batch_maps.cpu().numpy()):
                maps[i] = m
        elif maps is not None:
            maps[chunk] = batch_maps.cpu().numpy()
    return maps, scores


def check_enough_patches(features, folds, n_clusters, n_farthest):
    """Raise if a clustering of ``fit`` would have fewer patches than the
    prototypes asked for (``n_clusters``, ``n_farthest``; None: no number):
    the one without the calibration fold that holds the most patches (the
    folds' images differ in size with a scale-factor ``image_size``), or
    the one of all images when there are no folds."""
    def patches_in(fold):
        return sum(features.count(k) for k in fold)

    largest = max(folds, key=patches_in, default=range(0))
    n_patches = len(features.patches()) - patches_in(largest)
    n_fit = len(features) - len(largest)
    if n_farthest is not None and n_farthest > n_patches:
        raise ValueError(
            f"n_farthest={n_farthest} is more than the {n_patches} training "
            f"patches ({n_fit} images)."
        )
    if n_clusters is not None and n_clusters > n_patches:
        held_out = len(features) - n_fit
        grids = set(features.grids)
        what = "of {} x {} patches".format(*grids.pop()) if len(grids) == 1 else "of varying sizes"
        if not features.complete:
            kept = max(features.count(k) for k in range(len(features)))
            what += f", of which max_patches keeps at most {kept} each"
        note = f", after holding out {held_out} to calibrate contamination='auto'"
        raise ValueError(
            f"n_clusters={n_clusters} is more than the {n_patches} training "
            f"patches ({n_fit} images {what}{note if held_out else ''})."
        )
