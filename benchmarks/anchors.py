"""Reference PatchCore and PaDiM, used only by ``bench_anchors.py``.

Both work on the per-stage feature maps of the same frozen backbone that
ProtoAD uses, and turn patch scores into pixel maps with the same geometry as
``skprotoad`` (centre-aligned bilinear upsampling, then a Gaussian matching
``scipy.ndimage.gaussian_filter``), so that the three methods differ only in
how a patch is scored.

* PatchCore (Roth et al., "Towards total recall in industrial anomaly
  detection", CVPR 2022): 3x3 local average of each stage's features, stages
  joined at the finest stride, memory bank = greedy k-center coreset chosen
  on a random projection to 128 dims, patch score = Euclidean distance to the
  nearest memory-bank feature, image score = max of the map.
* PaDiM (Defard et al., "PaDiM: a patch distribution modeling framework for
  anomaly detection and localization", ICPR 2021): stages joined at the
  finest stride, a random subset of feature dimensions, one Gaussian per patch
  position (covariance + 0.01 I), patch score = Mahalanobis distance, image
  score = max of the map.

Written from the papers; see ``docs/benchmarks_anchors.md`` for every choice
and where it deviates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from skprotoad.network import GaussianSmoothing, upsample

__all__ = [
    "join_stages",
    "local_average",
    "greedy_coreset",
    "nearest_distance",
    "PixelMaps",
    "PatchCore",
    "PaDiM",
    "gaussian_statistics",
    "mahalanobis",
]


# ---------------------------------------------------------------- features
def join_stages(maps, strides):
    """Concatenate stage maps at the finest stride, as ``skprotoad`` does.

    Parameters
    ----------
    maps : list of torch.Tensor
        Stage maps (N, C_i, h_i, w_i), finest first.
    strides : sequence of int
        Stride of each map.

    Returns
    -------
    torch.Tensor of shape (N, sum C_i, h_0, w_0)
        Not normalised: PatchCore and PaDiM use raw activations.
    """
    size = tuple(maps[0].shape[-2:])
    joined = [maps[0]]
    for m, stride in zip(maps[1:], strides[1:]):
        joined.append(upsample(m, stride // strides[0], size, "center"))
    return torch.cat(joined, dim=1)


def local_average(maps, size=3):
    """PatchCore's local neighbourhood aggregation: mean over a size x size window.

    Parameters
    ----------
    maps : list of torch.Tensor
        Stage maps (N, C, h, w).
    size : int, default=3
        Neighbourhood size ``p`` of the paper.

    Returns
    -------
    list of torch.Tensor
        Same shapes. Border windows average only the pixels inside the map,
        so that border patches are not pulled towards zero.
    """
    return [
        F.avg_pool2d(m, size, stride=1, padding=size // 2, count_include_pad=False)
        for m in maps
    ]


class PixelMaps(torch.nn.Module):
    """Patch scores (N, h, w) to smoothed pixel maps and image scores.

    Parameters
    ----------
    stride : int
        Stride of the patch grid.
    input_size : tuple of int
        (height, width) of the crop.
    sigma : float, default=4.0
        Gaussian smoothing in pixels.
    """

    def __init__(self, stride, input_size, sigma=4.0):
        super().__init__()
        self.stride = int(stride)
        self.input_size = tuple(int(s) for s in input_size)
        self.smoothing = GaussianSmoothing(sigma, self.input_size)

    def forward(self, patch_scores):
        maps = upsample(patch_scores[:, None], self.stride, self.input_size, "center")[:, 0]
        maps = self.smoothing(maps)
        return maps, maps.flatten(1).amax(dim=1)


# ---------------------------------------------------------------- PatchCore
def greedy_coreset(X, n_select, projection_dim=128, seed=0, start=None):
    """Greedy k-center (farthest-point) coreset on a random projection of ``X``.

    Each step adds the point farthest from the points chosen so far, the
    minimax-facility-location approximation of the PatchCore paper; distances
    are measured after a Gaussian random projection to ``projection_dim``
    dimensions (Johnson-Lindenstrauss), which the paper uses for speed.

    Parameters
    ----------
    X : torch.Tensor of shape (n, d)
        Features.
    n_select : int
        Coreset size.
    projection_dim : int or None, default=128
        Target dimension of the random projection; ``None`` or ``>= d`` uses
        ``X`` itself.
    seed : int, default=0
        Seeds the projection and, without ``start``, the first point.
    start : int, default=None
        Index of the first point.

    Returns
    -------
    indices : torch.Tensor of int64, shape (n_select,)
        In the order chosen.
    """
    n, d = X.shape
    n_select = int(min(n_select, n))
    gen = torch.Generator().manual_seed(int(seed))
    if projection_dim is not None and projection_dim < d:
        proj = torch.randn(d, projection_dim, generator=gen, dtype=X.dtype) / projection_dim**0.5
        Z = X @ proj
    else:
        Z = X
    sq = (Z * Z).sum(dim=1)
    if start is None:
        start = int(torch.randint(n, (1,), generator=gen))
    chosen = torch.empty(n_select, dtype=torch.int64)
    chosen[0] = start
    # squared distance of every point to its nearest chosen point; one
    # matrix-vector product per step keeps memory at O(n)
    min_d = (sq - 2 * (Z @ Z[start]) + sq[start]).clamp_min_(0)
    for k in range(1, n_select):
        idx = int(torch.argmax(min_d))
        chosen[k] = idx
        torch.minimum(min_d, (sq - 2 * (Z @ Z[idx]) + sq[idx]).clamp_min_(0), out=min_d)
    return chosen


def nearest_distance(queries, bank, bank_sq=None, block=4096):
    """Euclidean distance of each query row to its nearest row of ``bank``.

    Parameters
    ----------
    queries : torch.Tensor of shape (m, d)
    bank : torch.Tensor of shape (k, d)
    bank_sq : torch.Tensor of shape (k,), default=None
        Precomputed squared norms of ``bank``.
    block : int, default=4096
        Query rows per matrix product, to bound memory at ``block * k``.

    Returns
    -------
    torch.Tensor of shape (m,)
    """
    if bank_sq is None:
        bank_sq = (bank * bank).sum(dim=1)
    out = torch.empty(queries.shape[0], dtype=queries.dtype)
    for r0 in range(0, queries.shape[0], block):
        q = queries[r0 : r0 + block]
        # min over the bank of |b|^2 - 2 q.b, then add |q|^2: one product per block
        partial = (bank_sq[None, :] - 2 * (q @ bank.T)).amin(dim=1)
        out[r0 : r0 + block] = (partial + (q * q).sum(dim=1)).clamp_min_(0).sqrt_()
    return out


class PatchCore(torch.nn.Module):
    """PatchCore anomaly scoring on top of stage feature maps.

    Parameters
    ----------
    strides : sequence of int
        Strides of the stage maps it will receive.
    input_size : tuple of int
        Crop (height, width).
    coreset_ratio : float, default=0.01
        Memory-bank size as a share of the training patches.
    projection_dim : int, default=128
        Dimension of the random projection used by the coreset selection.
    neighbourhood : int, default=3
        Local aggregation window.
    sigma : float, default=4.0
        Gaussian smoothing of the maps.
    seed : int, default=0
    """

    def __init__(self, strides, input_size, coreset_ratio=0.01, projection_dim=128,
                 neighbourhood=3, sigma=4.0, seed=0):
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.coreset_ratio = coreset_ratio
        self.projection_dim = projection_dim
        self.neighbourhood = neighbourhood
        self.seed = seed
        self.pixel_maps = PixelMaps(self.strides[0], input_size, sigma)
        self.register_buffer("memory_bank", torch.empty(0))

    def patch_features(self, maps):
        """Aggregated, joined features (N, h, w, C)."""
        joined = join_stages(local_average(maps, self.neighbourhood), self.strides)
        return joined.permute(0, 2, 3, 1)

    def fit(self, X):
        """Select the memory bank from training patch features ``X`` (n, C)."""
        n_select = max(1, int(round(self.coreset_ratio * X.shape[0])))
        idx = greedy_coreset(X, n_select, self.projection_dim, self.seed)
        self.memory_bank = X[idx].clone()
        return self

    def patch_scores(self, features):
        """Nearest-neighbour distances (N, h, w) of features (N, h, w, C)."""
        n, h, w, c = features.shape
        bank_sq = (self.memory_bank * self.memory_bank).sum(dim=1)
        d = nearest_distance(features.reshape(-1, c), self.memory_bank, bank_sq)
        return d.view(n, h, w)

    def forward(self, maps):
        """Stage maps in, (pixel maps, image scores) out."""
        return self.pixel_maps(self.patch_scores(self.patch_features(maps)))


# ---------------------------------------------------------------- PaDiM
def gaussian_statistics(batches, eps=0.01):
    """Per-position mean and regularised covariance, accumulated in float64.

    Parameters
    ----------
    batches : iterable of torch.Tensor of shape (n_i, h, w, d)
        Patch features; streamed, so that the training set is never held.
    eps : float, default=0.01
        Added to the covariance diagonal, as in the paper.

    Returns
    -------
    mean : torch.Tensor of shape (h, w, d)
    cov : torch.Tensor of shape (h, w, d, d)
        Unbiased sample covariance (divides by n - 1) plus ``eps * I``.
    """
    n, s, ss = 0, None, None
    for x in batches:
        x = x.double()
        if s is None:
            s = torch.zeros(x.shape[1:], dtype=torch.float64)
            ss = torch.zeros((*x.shape[1:], x.shape[-1]), dtype=torch.float64)
        s += x.sum(dim=0)
        ss += torch.einsum("nhwi,nhwj->hwij", x, x)
        n += x.shape[0]
    if n < 2:
        raise ValueError("PaDiM needs at least two training images.")
    mean = s / n
    # sum of outer products minus n mu mu^T; float64 keeps the cancellation harmless
    cov = (ss - n * mean[..., :, None] * mean[..., None, :]) / (n - 1)
    cov += eps * torch.eye(cov.shape[-1], dtype=cov.dtype)
    return mean, cov


def mahalanobis(x, mean, inv_cov):
    """Mahalanobis distance per position.

    Parameters
    ----------
    x : torch.Tensor of shape (N, h, w, d)
    mean : torch.Tensor of shape (h, w, d)
    inv_cov : torch.Tensor of shape (h, w, d, d)

    Returns
    -------
    torch.Tensor of shape (N, h, w)
    """
    delta = x - mean
    quad = torch.einsum("nhwi,hwij,nhwj->nhw", delta, inv_cov, delta)
    return quad.clamp_min(0).sqrt()


class PaDiM(torch.nn.Module):
    """PaDiM anomaly scoring on top of stage feature maps.

    Parameters
    ----------
    strides : sequence of int
        Strides of the stage maps it will receive.
    n_channels : int
        Total channels of the joined stages.
    input_size : tuple of int
        Crop (height, width).
    n_features : int, default=100
        Random feature dimensions kept (the paper's ``d``).
    eps : float, default=0.01
        Covariance regularisation.
    sigma : float, default=4.0
        Gaussian smoothing of the maps.
    seed : int, default=0
        Seeds the choice of dimensions.
    """

    def __init__(self, strides, n_channels, input_size, n_features=100, eps=0.01,
                 sigma=4.0, seed=0):
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        self.eps = eps
        gen = torch.Generator().manual_seed(int(seed))
        dims = torch.randperm(n_channels, generator=gen)[:n_features].sort().values
        self.register_buffer("dims", dims)
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inv_cov", torch.empty(0))
        self.pixel_maps = PixelMaps(self.strides[0], input_size, sigma)

    def patch_features(self, maps):
        """Joined features restricted to the chosen dims, (N, h, w, d)."""
        joined = join_stages(maps, self.strides)
        return joined.index_select(1, self.dims).permute(0, 2, 3, 1)

    def fit(self, batches):
        """Fit the Gaussians from an iterable of stage-map lists."""
        mean, cov = gaussian_statistics((self.patch_features(m) for m in batches), self.eps)
        self.mean = mean.float()
        # invert once at fit time in float64 (batched over positions); scoring
        # is then one quadratic form per patch
        self.inv_cov = torch.linalg.inv(cov).float()
        return self

    def patch_scores(self, features):
        return mahalanobis(features, self.mean, self.inv_cov)

    def forward(self, maps):
        """Stage maps in, (pixel maps, image scores) out."""
        return self.pixel_maps(self.patch_scores(self.patch_features(maps)))

