"""The ProtoAD network: a plain ``torch.nn.Module`` with no training phase.

backbone -> join stages at the finest stride -> L2 normalisation -> 1x1 conv whose
kernels are the unit prototypes -> max over channels -> ``1 - max cosine`` ->
bilinear upsampling to the input size -> Gaussian smoothing -> image score = max.

With ``normalization="image"`` each image's features are divided by their mean
patch norm instead, and the patch score is the Euclidean distance to the
nearest prototype, ``sqrt(|x|^2 - max_k (2 x.p_k - |p_k|^2))``: the same 1x1
conv and max, with a bias. With ``image_score="cosine"`` the image score is then
read from the same conv's output as ``1 - max cosine`` (a second max), while the
map stays the distance. With a ``map_whitening`` ``W`` of the finest stage's
channels, the map measures that distance in the metric ``W`` gives those
channels, ``|W x_0 - W p_0|^2 + |x_r - p_r|^2``: the same products plus one
of the finest stage's channels with ``(W^2 - I) p_0``, while the image score
reads the products in the metric ``(1 - s) I + s W^2`` (``score_whitening``
``s``; 0: the plain metric), the same blend of the plain and the whitened
products.

On the CPU (not while traced or exported), :meth:`ProtoADNetwork.forward`
multiplies the coarser stages by the prototypes at their own stride and
interpolates the products instead of the features (the same sums, both being
linear); everywhere, the upsampling and the smoothing are one matrix per axis.
The same outputs to float rounding, for fewer operations.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._choices import ALIGNMENTS, IMAGE_SCORES, MAP_METRICS, NORMALIZATIONS, PADDINGS
from ._threads import tracing
from ._validation import Integer, OneOf, RealInterval, validate
from ._version import __version__
from .backbones import FeatureExtractor, create_feature_extractor

__all__ = [
    "ProtoADNetwork", "PatchEmbedding", "GaussianSmoothing", "IMAGENET_MEAN", "IMAGENET_STD",
    "FORMAT_VERSION",
    "ALIGNMENTS", "NORMALIZATIONS", "IMAGE_SCORES", "MAP_METRICS",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Version of what :meth:`ProtoADNetwork.describe` returns, shared by the
#: detector's pickles and :mod:`skprotoad.persistence`; bumped when it changes.
#: 2 added ``map_whitening_shape``, 3 ``score_whitening``.
FORMAT_VERSION = 3
#: The versions this one reads: a version-1 network has no map whitening, a
#: version-2 one scores images in the plain metric.
READABLE_FORMAT_VERSIONS = (1, 2, 3)


class GaussianSmoothing(nn.Module):
    """Separable Gaussian filter matching ``scipy.ndimage.gaussian_filter``.

    Same kernel (truncated at ``truncate * sigma``) and same border rule (scipy's
    default ``mode="reflect"``: the edge pixel is repeated, ``d c b a | a b c d``),
    which torch's own padding modes do not offer, so the padding is an index
    gather, precomputed for ``size`` and computed per call for maps of any
    other size.

    Parameters
    ----------
    sigma : float
        Standard deviation in pixels; 0 disables smoothing.
    size : tuple of int or None
        (height, width) of the maps that will usually be smoothed, whose
        gather indices are precomputed; ``None`` when sizes vary.
    truncate : float, default=4.0
        Kernel radius in standard deviations, as in scipy.

    Examples
    --------
    >>> import numpy as np, torch
    >>> from scipy.ndimage import gaussian_filter
    >>> from skprotoad.network import GaussianSmoothing
    >>> maps = torch.rand(2, 32, 32)
    >>> ours = GaussianSmoothing(4.0, (32, 32))(maps).numpy()
    >>> bool(np.allclose(ours[0], gaussian_filter(maps[0].numpy(), 4.0), atol=1e-5))
    True
    """

    def __init__(self, sigma: float, size: tuple[int, int] | None, truncate: float = 4.0):
        super().__init__()
        self.sigma = float(sigma)
        radius = int(truncate * self.sigma + 0.5) if self.sigma > 0 else 0
        self.radius = radius
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        kernel = torch.exp(-0.5 * (x / self.sigma) ** 2) if radius else torch.ones(1)
        kernel = (kernel / kernel.sum()).float()
        self.register_buffer("kernel", kernel, persistent=False)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        if self.size is not None:
            self.register_buffer("rows", _symmetric_index(self.size[0], radius), persistent=False)
            self.register_buffer("cols", _symmetric_index(self.size[1], radius), persistent=False)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """Smooth ``maps`` of shape (N, H, W)."""
        if self.radius == 0:
            return maps
        k = self.kernel.to(maps.dtype)
        height, width = maps.shape[-2], maps.shape[-1]
        if self.size is not None and (height, width) == self.size:
            rows, cols = self.rows, self.cols
        else:
            rows = _symmetric_index(height, self.radius).to(maps.device)
            cols = _symmetric_index(width, self.radius).to(maps.device)
        if maps.shape[0] > 1 and _split_for_cache(maps):
            # the maps as the channels of one image, filtered by a depthwise
            # conv: oneDNN runs that many times faster on the CPU than a
            # one-channel conv over a batch (docs/benchmarks.md, "Speed").
            # Not while traced: the group count would fix the batch size.
            groups, x = maps.shape[0], maps[None]
        else:
            groups, x = 1, maps[:, None]
        x = F.conv2d(x.index_select(2, rows), k.view(1, 1, -1, 1).expand(groups, 1, -1, 1),
                     groups=groups)
        x = F.conv2d(x.index_select(3, cols), k.view(1, 1, 1, -1).expand(groups, 1, 1, -1),
                     groups=groups)
        return x[0] if groups > 1 else x[:, 0]


def upsample(x: torch.Tensor, factor: int, size, alignment: str) -> torch.Tensor:
    """Upsample maps (N, C, h, w) of stride ``factor`` to ``size`` at stride 1.

    ``alignment="center"`` puts grid point ``i`` where its receptive field is
    centred, at pixel ``factor * i`` (true of CNNs with symmetric padding):
    bilinear interpolation through exactly those points, edge values repeated
    past the last one. ``alignment="paper"`` is the reference implementation's
    ``cv2.resize``-style corner alignment, which places point ``i`` at pixel
    ``factor * i + (factor - 1) / 2`` and so shifts maps by up to half a stride.
    """
    if alignment == "paper":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    x = F.interpolate(
        x, size=((h - 1) * factor + 1, (w - 1) * factor + 1), mode="bilinear", align_corners=True
    )
    pad_h = max(0, size[0] - x.shape[-2])
    pad_w = max(0, size[1] - x.shape[-1])
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return x[..., : size[0], : size[1]]


def on_grid(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A 2-D map of patch values resampled (bilinearly, over the same image
    extent) to a patch grid of ``height`` x ``width``; itself if it is one."""
    if values.shape[-2] == height and values.shape[-1] == width:
        return values
    return F.interpolate(values[None, None], size=(height, width), mode="bilinear",
                         align_corners=False)[0, 0]


#: Input pixels per backbone pass of :meth:`PatchEmbedding.join` on the CPU
#: (two 256 x 256 images): a larger batch's activations leave the cache and
#: the backbone runs slower per image (docs/benchmarks.md, "Speed").
CPU_CHUNK_PIXELS = 2 * 256 * 256

#: Patches per band of :meth:`ProtoADNetwork.patch_scores` on the CPU: small
#: enough for a band's conv output (patches x prototypes floats) to stay in
#: the cache at the defaults' prototype counts, large enough for the conv to
#: run at full speed (docs/benchmarks.md, "Speed").
BAND_PATCHES = 512


#: Multiply-adds per patch and prototype that taking a coarser stage's
#: product with the prototypes at its own stride must save for
#: :meth:`ProtoADNetwork.forward` to do so on the CPU: the product is then
#: interpolated to the finest stride (one or two passes over patches x
#: prototypes) instead of the stage's features (docs/benchmarks.md, "Speed").
STAGE_PRODUCT_MIN_SAVING = 64


def _split_for_cache(tensor: torch.Tensor) -> bool:
    """Whether work on ``tensor`` may be split into cache-sized pieces: on
    the CPU, and not while the network is traced or exported, where a split
    would fix the batch size."""
    return tensor.device.type == "cpu" and not tracing()


def _smoothed_upsampling(n_in: int, n_out: int, stride: int, alignment: str,
                         smoothing: GaussianSmoothing) -> torch.Tensor:
    """The (n_out, n_in) matrix of :func:`upsample` along one axis followed
    by ``smoothing`` along it (its kernel and mirrored border); built in
    float64, returned in float32."""
    eye = torch.eye(n_in, dtype=torch.float64)[None, :, :, None]
    operator = upsample(eye, stride, (n_out, 1), alignment)[0, :, :, 0].T
    if smoothing.radius:
        kernel = smoothing.kernel.to(torch.float64)
        padded = operator.index_select(0, _symmetric_index(n_out, smoothing.radius))
        operator = sum(kernel[t] * padded[t : t + n_out] for t in range(len(kernel)))
    return operator.float()


def _backbone_chunks(images: torch.Tensor) -> list:
    """``images`` in the backbone passes of :meth:`PatchEmbedding.join`."""
    n = images.shape[0]
    chunk = max(1, CPU_CHUNK_PIXELS // max(1, images.shape[-2] * images.shape[-1]))
    if n <= chunk or not _split_for_cache(images):
        return [images]
    return [images[s : s + chunk] for s in range(0, n, chunk)]


def _coarse_product(stage, weight, n_rows, n_columns, bias=None):
    """A stage's map (C, h, w) times ``weight`` (C, K), plus ``bias`` (K,)
    when not None, as (n_rows, n_columns, K): the last row and column
    repeated past the edge, as :func:`upsample` repeats them."""
    rows = torch.arange(n_rows, device=stage.device).clamp_max(stage.shape[-2] - 1)
    columns = torch.arange(n_columns, device=stage.device).clamp_max(stage.shape[-1] - 1)
    block = stage.permute(1, 2, 0).index_select(0, rows).index_select(1, columns)
    flat = block.reshape(n_rows * n_columns, -1)
    product = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
    return product.view(n_rows, n_columns, -1)


def _band_products(fine, fine_weight, coarse, r0, workspace):
    """The products (1, K, rows, columns), channels-last, of a band of one
    image's patches (``fine``: its finer stages, (rows, columns, C_fine),
    from row ``r0`` of the grid) with the prototypes: the finer stages'
    share by one matrix product, added by the product's own accumulation to
    the coarser stages' interpolated shares (``coarse``: ``(factor,
    product)`` pairs, see :func:`_coarse_product`)."""
    n_rows, n_columns = fine.shape[:2]
    products = None
    for j, (factor, product) in enumerate(coarse):
        share = _interpolated(product[r0 // factor : (r0 + n_rows) // factor + 1], factor,
                              workspace, str(j))
        products = share if products is None else products.add_(share)
    products.addmm_(fine.reshape(n_rows * n_columns, -1), fine_weight)
    return products.view(1, n_rows, n_columns, -1).permute(0, 3, 1, 2)


def _interpolated(product, factor, workspace, name=""):
    """Products at a coarse stride (rows + 1, columns + 1, K) brought to the
    finest stride, ``factor`` times finer, as :func:`upsample` brings maps
    there: (rows x factor x columns x factor, K).

    Bilinear through the grid points: every fine patch lies between two
    coarse ones in each direction, at a fraction ``q / factor`` of the way,
    ``q`` its phase (past the edge the coarse rows and columns repeat, see
    :func:`_coarse_product`, so the edges come out repeated). The result
    and the intermediate live in ``workspace`` (a dict, reused from call to
    call under ``name``): fresh memory of that size costs page faults on
    every band.
    """
    n_rows, n_columns, k = product.shape[0] - 1, product.shape[1] - 1, product.shape[2]
    across = _work(workspace, name + "across", (n_rows + 1, n_columns, factor, k), product)
    for q in range(factor):
        torch.lerp(product[:, :-1], product[:, 1:], q / factor, out=across[:, :, q])
    across = across.view(n_rows + 1, n_columns * factor, k)
    down = _work(workspace, name + "down", (n_rows, factor, n_columns * factor, k), product)
    for q in range(factor):
        torch.lerp(across[:-1], across[1:], q / factor, out=down[:, q])
    return down.view(n_rows * factor * n_columns * factor, k)


def _work(workspace, name, shape, like):
    """A tensor of ``shape`` from ``workspace[name]``, grown when too small."""
    size = int(np.prod(shape))
    buffer = workspace.get(name)
    if buffer is None or buffer.numel() < size:
        buffer = workspace[name] = like.new_empty(size)
    return buffer[:size].view(shape)


def _symmetric_index(n: int, radius: int) -> torch.Tensor:
    idx = torch.arange(-radius, n + radius) % (2 * n)
    return torch.where(idx >= n, 2 * n - 1 - idx, idx)


#: The rules of the network's options, which the detector's parameters of the
#: same names follow too (see :mod:`skprotoad._validation`).
NETWORK_CONSTRAINTS = {
    "alignment": OneOf(ALIGNMENTS),
    "neighborhood_size": Integer(1, odd=True),
    "normalization": OneOf(NORMALIZATIONS),
    "padding": OneOf(PADDINGS),
    "image_score": OneOf(IMAGE_SCORES),
    "score_whitening": RealInterval(0.0, 1.0),
}


def all_finite(t: torch.Tensor) -> bool:
    """Whether a CPU tensor holds no NaN or infinity."""
    if t.dtype in (torch.float16, torch.float32, torch.float64):
        # numpy's vectorised check is many times faster than torch.isfinite
        # here, which matters for the 100 MB of a wide_resnet50_2.
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


class PatchEmbedding(nn.Module):
    """Normalised images in, normalised patch features out.

    Parameters
    ----------
    backbone : FeatureExtractor
        Frozen feature extractor returning the maps of the chosen stages.
    mean, std : sequence of 3 floats
        Per-channel normalisation applied to the [0, 1] RGB input.
    alignment : {"center", "paper"}, default="center"
        How coarser stages are brought to the finest stride: bilinearly at
        their receptive-field centres (see :func:`upsample`), or by repeating
        each coarse feature over the finer patches it covers, as the reference
        implementation's unfold/fold join does.
    neighborhood_size : int, default=1
        Each stage's features are averaged over this square neighbourhood of
        patches (odd; stride 1, zero padding not counted) before the join,
        PatchCore's local aggregation; 1 leaves them as they are, as the paper.
    normalization : {"patch", "image"}, default="patch"
        ``"patch"``: every patch feature to unit L2 norm (the paper).
        ``"image"``: every image's features divided by their mean L2 norm, so
        that the image's overall contrast goes but the relative magnitude of
        its patches stays.
    padding : {"zeros", "reflect"}, default="zeros"
        What the backbone sees past the image border. ``"zeros"``: its
        convolutions' own zero padding, so that border patches see a dark
        frame that no image has. ``"reflect"``: the image is mirrored by the
        coarsest stride used (16 pixels for stages up to 3) on each side
        before the backbone, and the features are cut back to the image,
        so that border patches look like the interior; it costs that much
        more input.

    Examples
    --------
    >>> import torch
    >>> from skprotoad.backbones import create_feature_extractor
    >>> from skprotoad.network import PatchEmbedding
    >>> emb = PatchEmbedding(create_feature_extractor("resnet18", (1, 2), weights=None))
    >>> f = emb(torch.rand(2, 3, 64, 64))
    >>> tuple(f.shape), bool(torch.allclose(f.norm(dim=1), torch.ones(2, 16, 16)))
    ((2, 192, 16, 16), True)
    >>> per_image = PatchEmbedding(emb.backbone, normalization="image")
    >>> f = per_image(torch.rand(2, 3, 64, 64))
    >>> [round(float(m), 4) for m in f.norm(dim=1).mean(dim=(1, 2))]  # mean patch norm
    [1.0, 1.0]
    >>> x = torch.rand(2, 3, 64, 64)
    >>> maps = emb.stage_maps(x)  # each stage at its own stride
    >>> [tuple(m.shape) for m in maps]
    [(2, 64, 16, 16), (2, 128, 8, 8)]
    >>> joined = torch.cat(emb.at_finest_stride(maps), dim=1)
    >>> bool(torch.allclose(joined / emb.divisors(joined), emb(x)))
    True
    """

    def __init__(
        self,
        backbone: FeatureExtractor,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        alignment="center",
        neighborhood_size=1,
        normalization="patch",
        padding="zeros",
    ):
        super().__init__()
        validate(
            NETWORK_CONSTRAINTS,
            {"alignment": alignment, "neighborhood_size": neighborhood_size,
             "normalization": normalization, "padding": padding},
        )
        self.backbone = backbone
        self.alignment = alignment
        self.neighborhood_size = int(neighborhood_size)
        self.normalization = normalization
        self.padding = padding
        self.n_channels = sum(backbone.channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features (N, C, h, w) at the finest chosen stride, normalised."""
        features = self.join(images)
        if self.normalization == "image":
            return features / self.divisors(features)
        return F.normalize(features, dim=1)

    def divisors(self, features: torch.Tensor) -> torch.Tensor:
        """What :meth:`forward` divides the joined ``features`` by: each
        patch's norm (N, 1, h, w) with ``"patch"``, each image's mean patch
        norm (N, 1, 1, 1) with ``"image"``."""
        norms = torch.linalg.vector_norm(features, dim=1, keepdim=True)
        if self.normalization == "image":
            norms = norms.mean(dim=(2, 3), keepdim=True)
        return norms.clamp_min(1e-12)

    def join(self, images: torch.Tensor) -> torch.Tensor:
        """The stages' features joined at the finest stride, not normalised.

        On the CPU a batch goes through the backbone a few images at a time
        (about :data:`CPU_CHUNK_PIXELS` input pixels), whose activations stay
        in the cache; elsewhere, and while traced or exported, at once.
        """
        chunks = _backbone_chunks(images)
        if len(chunks) == 1:
            return self._join(images)
        return torch.cat([self._join(chunk) for chunk in chunks])

    def _join(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.at_finest_stride(self.stage_maps(images)), dim=1)

    def stage_maps(self, images: torch.Tensor) -> list:
        """Each stage's features (N, C_s, h_s, w_s) at its own stride, as the
        join takes them: averaged over the neighbourhood, cut back to the
        image; one backbone pass."""
        # channels-last: oneDNN's CPU convolutions run faster on it; results
        # differ from NCHW only by float rounding (which can still move FINCH's
        # clusters: docs/user_guide/normalization.md)
        x = (images - self.mean) / self.std
        margin = self.backbone.strides[-1] if self.padding == "reflect" else 0
        if margin:
            x = F.pad(x, (margin, margin, margin, margin), mode="reflect")
        maps = self.backbone(x.contiguous(memory_format=torch.channels_last))
        if self.neighborhood_size > 1:
            k = self.neighborhood_size
            maps = [
                F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)
                for m in maps
            ]
        if margin:
            # cut back to the image, after the aggregation saw the mirrored context
            cuts = [margin // s for s in self.backbone.strides]
            maps = [m[..., c : m.shape[-2] - c, c : m.shape[-1] - c] for m, c in zip(maps, cuts)]
        return list(maps)

    def at_finest_stride(self, maps: list) -> list:
        """:meth:`stage_maps` brought to the finest stride: the parts that
        :meth:`join` concatenates."""
        size = tuple(maps[0].shape[-2:])
        finest = self.backbone.strides[0]
        joined = [maps[0]]
        for m, stride in zip(maps[1:], self.backbone.strides[1:]):
            if self.alignment == "paper":
                joined.append(F.interpolate(m, size=size, mode="nearest"))
            else:
                joined.append(upsample(m, stride // finest, size, "center"))
        return joined


def _joins_as_defined(embedding) -> bool:
    """Whether ``embedding`` makes its features as :class:`PatchEmbedding`
    does, which the network's stage-wise products assume: a subclass that
    changes ``forward`` or the join is scored through its own features."""
    return all(getattr(type(embedding), name) is getattr(PatchEmbedding, name)
               for name in ("forward", "join", "_join"))


def effective_image_score(normalization, image_score):
    """The network's ``image_score`` for the detector's two parameters.

    With unit features (``normalization="patch"``) every readout is the map's
    maximum, so the network is built with ``"map"``: one network, whatever
    ``image_score`` says.
    """
    return image_score if normalization == "image" else "map"


def effective_map_metric(normalization, map_metric):
    """The metric the network's map measures in for the detector's two
    parameters: ``map_metric`` with distances (``normalization="image"``);
    with unit features the map is ``1 - max cosine``, recorded as
    ``"euclidean"`` (no whitening)."""
    return map_metric if normalization == "image" else "euclidean"


def effective_score_whitening(normalization, image_score, map_metric, score_whitening):
    """The network's ``score_whitening`` for the detector's parameters: 0
    where the image score has no whitened metric to move towards (a plain
    map, unit features) or is the map itself (``image_score="map"``)."""
    if (effective_map_metric(normalization, map_metric) != "whitened"
            or effective_image_score(normalization, image_score) == "map"):
        return 0.0
    return float(score_whitening)


class ProtoADNetwork(nn.Module):
    """Backbone plus prototype head: images in, anomaly maps and scores out.

    Parameters
    ----------
    embedding : PatchEmbedding
        The backbone and feature join.
    prototypes : torch.Tensor of shape (n_prototypes, n_channels)
        Prototypes of normal patch features; rows are normalised here when
        the embedding's ``normalization`` is ``"patch"``.
    input_size : tuple of int or None
        (height, width) of the images the network receives (the crop); the
        maps are upsampled to it. ``None``: inputs of any size, each batch's
        maps at that batch's own size (the detector's scale geometry). A fixed
        size is what :mod:`skprotoad.export` needs.
    sigma : float, default=4.0
        Gaussian smoothing of the upsampled map; 0 disables it.
    image_score : {"map", "projection", "cosine"}, default="map"
        ``"map"``: an image's score is the maximum of its map. With
        ``normalization="image"`` the map shows distances, and the other two
        read the score from the same conv's output instead, as the maximum of
        a second smoothed map: ``"projection"``, of ``|x| - max_k x.p_k / |p_k|``
        (the part of a patch's norm that no prototype direction explains,
        ``|x| (1 - max cosine)``); ``"cosine"``, of ``1 - max cosine``. With
        ``normalization="patch"`` (unit ``x``) all three are the same.
    score_baseline : torch.Tensor of shape (h, w) or None, default=None
        The normal level of the image-score map at each patch position,
        subtracted from it before its maximum is taken (see
        :meth:`image_scores`); set by the detector's ``position_baseline``.
        None: the score is the map's maximum, as in the paper.
    map_whitening : torch.Tensor of shape (c_0, c_0) or None, default=None
        A symmetric matrix ``W`` over the finest stage's ``c_0`` channels
        (the first of the features); only with ``normalization="image"``.
        The anomaly map is then the distance to the nearest prototype with
        those channels mapped by ``W``, ``min_k |W x_0 - W p_k0|^2 + |x_r -
        p_kr|^2`` under the root, which the same prototypes serve because
        ``W`` is linear; the ``"projection"`` and ``"cosine"`` image scores
        measure in the metric ``score_whitening`` says. Set by the
        detector's ``map_metric`` (``skprotoad._whitening.stage_whitening``).
        None: the plain Euclidean distance.
    score_whitening : float in [0, 1], default=0.0
        With ``map_whitening`` and an ``image_score`` other than ``"map"``:
        the image score measures the finest stage's channels in the metric
        ``(1 - s) I + s W^2``, from the plain one (0) to the map's own (1);
        the products it needs are the same blend of the plain and the
        map's products, the metric being linear in them. Ignored otherwise.

    Notes
    -----
    Input: a float tensor (N, 3, H, W) of RGB values in [0, 1], already resized
    and cropped to ``input_size``. Output: ``(maps, scores)``, maps of shape
    (N, H, W) with ``1 - max cosine`` (``normalization="patch"``) or the distance
    to the nearest prototype (``"image"``; in the metric of ``map_whitening``
    when there is one), higher = more anomalous; scores (N,)
    the maximum of each map (of the ``image_score`` map when that is not
    ``"map"``).

    Examples
    --------
    >>> import torch
    >>> from skprotoad.backbones import create_feature_extractor
    >>> from skprotoad.network import PatchEmbedding, ProtoADNetwork
    >>> backbone = create_feature_extractor("resnet18", (1, 2), weights=None)
    >>> net = ProtoADNetwork(PatchEmbedding(backbone), torch.randn(5, 192), (64, 64))
    >>> maps, scores = net(torch.rand(2, 3, 64, 64))
    >>> tuple(maps.shape), tuple(scores.shape)
    ((2, 64, 64), (2,))
    """

    def __init__(
        self,
        embedding: PatchEmbedding,
        prototypes: torch.Tensor,
        input_size: tuple[int, int] | None,
        sigma: float = 4.0,
        image_score: str = "map",
        score_baseline: torch.Tensor | None = None,
        map_whitening: torch.Tensor | None = None,
        score_whitening: float = 0.0,
    ):
        super().__init__()
        validate(NETWORK_CONSTRAINTS, {"image_score": image_score,
                                       "score_whitening": score_whitening})
        self.image_score = image_score
        # a plain float: traced and exported graphs hold it as a constant
        self.score_whitening = float(score_whitening)
        prototypes = torch.as_tensor(prototypes, dtype=torch.float32)
        n_channels = embedding.n_channels
        if prototypes.ndim != 2 or prototypes.shape[1] != n_channels:
            raise ValueError(
                f"prototypes must have shape (n_prototypes, {n_channels}), "
                f"got {tuple(prototypes.shape)}."
            )
        self.embedding = embedding
        self.input_size = (
            None if input_size is None else (int(input_size[0]), int(input_size[1]))
        )
        self.prototype_conv = nn.Conv2d(n_channels, prototypes.shape[0], 1, bias=False)
        if embedding.normalization == "patch":
            prototypes = F.normalize(prototypes, dim=1)
        self.prototype_conv.weight.data.copy_(prototypes[:, :, None, None])
        self.prototype_conv.requires_grad_(False)
        # holds sigma and the kernel; the maps are smoothed by _smooth_up's matrices
        self.smoothing = GaussianSmoothing(sigma, None)
        self._line_operators = {}  # (sizes, stride, device, dtype) -> matrix
        # always registered, empty when absent, so that every network's state
        # dict names the same tensors
        baseline = torch.zeros(0, 0) if score_baseline is None else score_baseline
        self.register_buffer("score_baseline", torch.as_tensor(baseline, dtype=torch.float32))
        whitening = torch.zeros(0, 0) if map_whitening is None else map_whitening
        whitening = torch.as_tensor(whitening, dtype=torch.float32)
        if whitening.numel():
            c0 = embedding.backbone.channels[0]
            if tuple(whitening.shape) != (c0, c0):
                raise ValueError(
                    f"map_whitening must have shape ({c0}, {c0}) (the finest stage's "
                    f"channels), got {tuple(whitening.shape)}."
                )
            if embedding.normalization != "image":
                raise ValueError("map_whitening needs normalization='image' (distances).")
        self.register_buffer("map_whitening", whitening)
        # a plain int (fixed with the buffer's shape): a traced or exported
        # graph branches on it without reading a tensor
        self.whitened_channels = int(whitening.shape[0]) if whitening.numel() else 0

    @property
    def reads_score_from_map(self) -> bool:
        """Whether the image-score map is the anomaly map itself (not so only
        for ``normalization="image"`` with ``image_score`` other than ``"map"``)."""
        return self.image_score == "map" or self.embedding.normalization == "patch"

    @property
    def score_is_map_max(self) -> bool:
        """Whether an image's score is the maximum of its anomaly map: the
        score map is the anomaly map and no baseline is subtracted."""
        return self.reads_score_from_map and self.score_baseline.numel() == 0

    @property
    def prototypes(self) -> torch.Tensor:
        """Prototypes (n_prototypes, n_channels); unit norm with ``"patch"``."""
        return self.prototype_conv.weight[:, :, 0, 0]

    def head(
        self, features: torch.Tensor, size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and scores from the embedding's features.

        ``size`` is the (height, width) of the images the features come from,
        needed when ``input_size`` is None; otherwise ``input_size`` is used.
        """
        map_patches, score_patches = self.patch_scores(features)
        return self.readout(map_patches, score_patches, size)

    def readout(
        self, map_patches: torch.Tensor, score_patches: torch.Tensor,
        size: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps and scores from :meth:`patch_scores`' output; ``size``
        as in :meth:`head`."""
        size = self._output_size(size)
        maps = self._smooth_up(map_patches, self.embedding.backbone.strides[0], size)
        if self.score_is_map_max:
            return maps, maps.flatten(1).amax(dim=1)
        baseline: torch.Tensor | None = None
        if self.score_baseline.numel() > 0:
            baseline = self.score_baseline
        return maps, self.image_scores(score_patches, size, baseline)

    def _output_size(self, size: tuple[int, int] | None) -> tuple[int, int]:
        if self.input_size is not None:
            return self.input_size
        if size is None:
            raise ValueError("this network has no fixed input_size: pass the images' size.")
        return size

    def image_patch_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`patch_scores` of the images' features, as :meth:`forward`
        computes them.

        On the CPU (not while traced or exported) the coarser stages that
        :meth:`_interpolated_stages` names are multiplied by the prototypes
        at their own stride and the products interpolated to the finest
        stride, instead of the stages themselves: the same values to float
        rounding (the join and the products are linear), at a fraction of
        the multiply-adds. Elsewhere ``patch_scores(embedding(images))``.

        Examples
        --------
        >>> import torch
        >>> from skprotoad.backbones import create_feature_extractor
        >>> from skprotoad.network import PatchEmbedding, ProtoADNetwork
        >>> emb = PatchEmbedding(create_feature_extractor("resnet18", (1, 2), weights=None))
        >>> net = ProtoADNetwork(emb, torch.randn(5, 192), (64, 64))
        >>> x = torch.rand(2, 3, 64, 64)
        >>> staged, _ = net.image_patch_scores(x)  # stage 2's products interpolated
        >>> joined, _ = net.patch_scores(emb(x))  # the stages joined first
        >>> tuple(staged.shape), bool(torch.allclose(staged, joined, atol=1e-5))
        ((2, 1, 16, 16), True)
        """
        if images.shape[0] and _split_for_cache(images):
            stages = self._interpolated_stages()
            if stages:
                return self._patch_scores_by_stage(images, stages)
        return self.patch_scores(self.embedding(images))

    def patch_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch values of the anomaly map and of the image-score map.

        On the CPU the patches go through the head in bands of about
        :data:`BAND_PATCHES`, so that the conv's (patches x prototypes) output
        stays in the cache between the passes that read it; on other devices,
        and while the network is traced or exported, in one piece (one graph
        for any batch size). Both give the same values.

        Returns
        -------
        map_patches, score_patches : torch.Tensor of shape (N, 1, h, w)
            At the features' resolution, before upsampling and smoothing;
            the same tensor when the score is read from the map.
        """
        # channels-last makes the 1x1 conv a plain matrix product for oneDNN
        # (faster on CPU than on NCHW) and its max over prototypes contiguous
        features = features.contiguous(memory_format=torch.channels_last)
        n, channels, height, width = features.shape
        if features.numel() == 0 or not _split_for_cache(features):
            return self._patch_scores(features)
        # channels-last memory is (N, h, w, C): the images' rows stacked into
        # one tall map is a view, and a band of its rows one block of memory
        rows = features.permute(0, 2, 3, 1).reshape(1, n * height, width, channels)
        rows = rows.permute(0, 3, 1, 2)
        step = max(1, BAND_PATCHES // width)
        bands = [self._patch_scores(rows[:, :, r : r + step]) for r in range(0, n * height, step)]
        map_patches = torch.cat([band[0] for band in bands], dim=2).view(n, 1, height, width)
        if bands[0][0] is bands[0][1]:
            return map_patches, map_patches
        score_patches = torch.cat([band[1] for band in bands], dim=2).view(n, 1, height, width)
        return map_patches, score_patches

    def _patch_scores(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`patch_scores` of channels-last ``features`` in one piece."""
        if self.embedding.normalization == "patch":
            return self._scores_of_products(self.prototype_conv(features))
        # |x - p|^2 = |x|^2 - 2 (x.p - |p|^2 / 2): the same 1x1 conv with a bias
        # of -|p|^2 / 2, derived here, not stored, so that the state dict is the
        # same in every mode
        half_sq = self._half_squares()
        products = F.conv2d(features, self.prototype_conv.weight, -half_sq)
        feature_sq = (features * features).sum(dim=1, keepdim=True)
        if not self.whitened_channels:
            return self._scores_of_products(products, feature_sq, half_sq)
        finest = features[:, : self.whitened_channels]
        weight, bias = self._whitening_correction()
        map_products = products + F.conv2d(finest, weight[:, :, None, None], bias)
        map_feature_sq = feature_sq + self._whitening_square_gain(finest)
        return self._scores_of_products(products, feature_sq, half_sq, map_products=map_products,
                                        map_feature_sq=map_feature_sq, map_half_sq=half_sq - bias)

    def _half_squares(self) -> torch.Tensor:
        return 0.5 * (self.prototypes * self.prototypes).sum(dim=1)

    def _whitening_correction(self) -> tuple[torch.Tensor, torch.Tensor]:
        """What turns the products ``x.p - |p|^2 / 2`` into those of the
        whitened metric, ``x.p + x_0 (M - I) p_0 - |p|_M^2 / 2`` with ``M =
        W^2``: a (K, c_0) weight on the finest stage's channels ``x_0`` and a
        (K,) bias, ``(|p_0|^2 - p_0 M p_0) / 2``."""
        w = self.map_whitening
        p0 = self.prototypes[:, : w.shape[0]]
        whitened = p0 @ w  # W is symmetric: the rows W p_0
        weight = whitened @ w - p0
        bias = 0.5 * ((p0 * p0).sum(dim=1) - (whitened * whitened).sum(dim=1))
        return weight, bias

    def _whitening_square_gain(self, finest: torch.Tensor) -> torch.Tensor:
        """``|W x_0|^2 - |x_0|^2`` of the finest stage's channels (N, c_0, h,
        w), (N, 1, h, w): what ``|x|^2`` gains in the whitened metric."""
        whitened = F.conv2d(finest, self.map_whitening[:, :, None, None])
        return (whitened * whitened - finest * finest).sum(dim=1, keepdim=True)

    def _scores_of_products(self, products, feature_sq=None, half_sq=None, scale=None,
                            map_products=None, map_feature_sq=None, map_half_sq=None):
        """Patch scores (two (N, 1, h, w) maps) from the products of the
        patches with the prototypes.

        ``products`` (N, K, h, w), overwritten, hold ``scale`` times
        ``x.p_k`` (``"patch"``) or ``scale`` times ``x.p_k - |p_k|^2 / 2``
        (``"image"``), for the normalised features ``x`` (``scale`` None: 1;
        else a tensor that broadcasts to (N, 1, h, w)); ``feature_sq`` is
        ``|x|^2`` and ``half_sq`` ``|p_k|^2 / 2``. ``map_products``,
        ``map_feature_sq`` and ``map_half_sq``, when given, are the same in
        the metric of ``map_whitening``, which the map's distances are read
        from, and the score's as far as ``score_whitening`` says.
        """
        if map_products is None:
            map_products, map_feature_sq = products, feature_sq
        best = map_products.amax(dim=1, keepdim=True)
        if scale is not None:
            best = best / scale
        if self.embedding.normalization == "patch":
            patches = 1.0 - best
            return patches, patches
        distances = (map_feature_sq - 2.0 * best).clamp_min(0.0).sqrt()
        if self.image_score == "map":
            return distances, distances
        if self.score_whitening and map_products is not products:
            # every term is linear in the metric, so the score's metric
            # (1 - s) I + s W^2 has the same blend of the two metrics' terms
            s = self.score_whitening
            if tracing():
                products = products + s * (map_products - products)
            else:
                products = products.lerp_(map_products, s)
            feature_sq = feature_sq + s * (map_feature_sq - feature_sq)
            half_sq = half_sq + s * (map_half_sq - half_sq)
        # the same products read as projections onto the prototype
        # directions, x.p / |p|: one more max. In place, since the (N, K, h, w)
        # products are the largest tensor here and each extra copy of them
        # costs as much time as a tenth of the conv.
        inverse_norms = (2.0 * half_sq).clamp_min(1e-24).rsqrt()
        offsets = half_sq * inverse_norms  # (products + |p|^2 / 2) / |p|, in one pass
        offsets = offsets[None, :, None, None]
        if scale is not None:
            offsets = offsets * scale
        if tracing():
            # a new tensor: the legacy ONNX exporter has no symbolic for out=
            projection = torch.addcmul(offsets, products, inverse_norms[None, :, None, None])
        else:
            projection = torch.addcmul(offsets, products, inverse_norms[None, :, None, None],
                                       out=products)
        projection = projection.amax(dim=1, keepdim=True)
        if scale is not None:
            projection = projection / scale
        if self.image_score == "cosine":
            return distances, 1.0 - projection * feature_sq.clamp_min(1e-24).rsqrt()
        # |x| (1 - cos): the cosine distance weighted by the patch's norm
        # relative to its image's, so that weak patches (flat texture,
        # whose direction is mostly noise) count less than strong ones
        return distances, feature_sq.sqrt() - projection

    def _interpolated_stages(self) -> list:
        """The coarser stages whose products with the prototypes
        :meth:`forward` takes at their own stride on the CPU: (stage, factor
        to the finest stride) for those that save at least
        :data:`STAGE_PRODUCT_MIN_SAVING` multiply-adds per patch and prototype."""
        if self.embedding.alignment != "center" or not _joins_as_defined(self.embedding):
            return []
        strides, channels = self.embedding.backbone.strides, self.embedding.backbone.channels
        chosen = []
        for k in range(1, len(strides)):
            factor = strides[k] // strides[0]
            saving = channels[k] * (1 - factor**-2)
            if strides[k] % strides[0] == 0 and saving >= STAGE_PRODUCT_MIN_SAVING:
                chosen.append((k, factor))
        return chosen

    def _patch_scores_by_stage(self, images: torch.Tensor, stages: list):
        """:meth:`patch_scores` of ``images``' features, with the products of
        ``stages`` (from :meth:`_interpolated_stages`) taken at their own
        stride and interpolated like the join (bilinearly through the
        receptive-field centres, edges repeated), which is the same sum:
        the join and the products are linear. In bands of about
        :data:`BAND_PATCHES` patches of one image; CPU only."""
        emb = self.embedding
        offsets = np.cumsum((0,) + tuple(emb.backbone.channels))
        by_stage = [self.prototypes[:, a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        coarse = dict(stages)
        fine_stages = [k for k in range(len(by_stage)) if k not in coarse]
        fine_weight = torch.cat([by_stage[k] for k in fine_stages], dim=1).T.contiguous()
        coarse_weights = [(k, factor, by_stage[k].T.contiguous()) for k, factor in stages]
        half_sq = self._half_squares()
        by_image = emb.normalization == "image"
        whitened = self.whitened_channels > 0
        if whitened:  # stage 0 is never coarse: its channels lead the fine ones
            c0 = self.whitened_channels
            correction_weight, correction_bias = self._whitening_correction()
            correction_weight = correction_weight.T.contiguous()
            map_half_sq = half_sq - correction_bias
        multiple = int(np.lcm.reduce(list(coarse.values())))
        map_parts, score_parts, workspace = [], [], {}
        for chunk in _backbone_chunks(images):
            maps = emb.stage_maps(chunk)
            parts = emb.at_finest_stride(maps)
            joined = torch.cat(parts, dim=1)
            divisors = emb.divisors(joined)
            height, width = joined.shape[-2:]
            # the grid padded to whole coarse steps; the pad's scores are cut off
            pad = (0, -width % multiple, 0, -height % multiple)
            fine = F.pad(torch.cat([parts[k] for k in fine_stages], dim=1), pad)
            fine = fine.permute(0, 2, 3, 1).contiguous()
            grid_h, grid_w = fine.shape[1:3]
            feature_sq = map_feature_sq = None
            if by_image:
                feature_sq = (joined * joined).sum(dim=1, keepdim=True) / divisors.square()
                if whitened:
                    map_feature_sq = F.pad(
                        feature_sq + self._whitening_square_gain(parts[0]) / divisors.square(),
                        pad)
                feature_sq = F.pad(feature_sq, pad)
            else:
                divisors = F.pad(divisors, pad, value=1.0)
            rows = max(multiple, BAND_PATCHES // grid_w // multiple * multiple)
            for i in range(len(chunk)):
                scale = divisors[i : i + 1]
                bias = -scale.flatten() * half_sq if by_image else None
                coarse_products = []
                for k, factor, w in coarse_weights:
                    coarse_products.append((factor, _coarse_product(
                        maps[k][i], w, grid_h // factor + 1, grid_w // factor + 1,
                        bias if not coarse_products else None)))
                bands = []
                for r0 in range(0, grid_h, rows):
                    r1 = min(grid_h, r0 + rows)
                    products = _band_products(fine[i, r0:r1], fine_weight, coarse_products, r0,
                                              workspace)
                    whitening = {}
                    if whitened:
                        # before _scores_of_products overwrites the products
                        flat = products.permute(0, 2, 3, 1).reshape(-1, products.shape[1])
                        map_products = _work(workspace, "whitened", flat.shape, flat)
                        torch.addmm(scale.flatten() * correction_bias,
                                    fine[i, r0:r1, :, :c0].reshape(-1, c0), correction_weight,
                                    out=map_products).add_(flat)
                        whitening = dict(
                            map_products=map_products.view(1, r1 - r0, grid_w, -1).permute(
                                0, 3, 1, 2),
                            map_feature_sq=map_feature_sq[i : i + 1, :, r0:r1],
                            map_half_sq=map_half_sq,
                        )
                    bands.append(self._scores_of_products(
                        products,
                        None if feature_sq is None else feature_sq[i : i + 1, :, r0:r1],
                        half_sq,
                        scale if by_image else scale[:, :, r0:r1],
                        **whitening,
                    ))
                cut = (..., slice(0, height), slice(0, width))
                map_parts.append(torch.cat([b[0] for b in bands], dim=2)[cut])
                if bands[0][0] is not bands[0][1]:
                    score_parts.append(torch.cat([b[1] for b in bands], dim=2)[cut])
        map_patches = torch.cat(map_parts)
        return map_patches, (torch.cat(score_parts) if score_parts else map_patches)

    def image_scores(
        self, score_patches: torch.Tensor, size: tuple[int, int],
        baseline: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Each image's score: the maximum of its smoothed score map.

        Parameters
        ----------
        score_patches : torch.Tensor of shape (N, 1, h, w)
            From :meth:`patch_scores`.
        size : tuple of int
            (height, width) of the images.
        baseline : torch.Tensor of shape (h', w') or None, default=None
            Subtracted from every map at the patches' resolution (resampled
            bilinearly when its grid is another), that is, its smoothed and
            upsampled version from the smoothed map, as both are linear.

        Returns
        -------
        scores : torch.Tensor of shape (N,)
        """
        if baseline is not None:
            height, width = score_patches.shape[-2:]
            score_patches = score_patches - on_grid(baseline, int(height), int(width))
        stride = self.embedding.backbone.strides[0]
        return self._smooth_up(score_patches, stride, size).flatten(1).amax(dim=1)

    def _smooth_up(self, patch_scores, stride: int, size: tuple[int, int]) -> torch.Tensor:
        """(N, 1, h, w) patch scores -> smoothed (N, H, W) maps at ``size``.

        The upsampling and the smoothing are both linear and act on rows and
        columns apart, so they are one matrix per axis, ``A @ scores @ B.T``:
        two small matrix products instead of passes over the large maps.
        """
        height, width = patch_scores.shape[-2:]
        rows = self._line_operator(int(height), int(size[0]), stride, patch_scores)
        columns = self._line_operator(int(width), int(size[1]), stride, patch_scores)
        return rows @ patch_scores[:, 0] @ columns.T

    def _line_operator(self, n_in: int, n_out: int, stride: int, like: torch.Tensor):
        """:func:`_smoothed_upsampling` for this network, cached per size
        (not while traced or exported: there it is a constant of the graph,
        and a module attribute written during an export draws a warning)."""
        key = (n_in, n_out, stride, like.device, like.dtype)
        operators = self._line_operators
        if tracing():
            return _smoothed_upsampling(
                n_in, n_out, stride, self.embedding.alignment, self.smoothing
            ).to(like.device, like.dtype)
        if key not in operators:
            if len(operators) >= 64:  # inputs of ever new sizes
                operators.clear()
            operators[key] = _smoothed_upsampling(
                n_in, n_out, stride, self.embedding.alignment, self.smoothing
            ).to(like.device, like.dtype)
        return operators[key]

    def non_finite_tensors(self) -> list:
        """Names of the floating-point tensors that hold a NaN or an infinity."""
        return [
            name
            for name, t in self.state_dict().items()
            if t.is_floating_point() and not all_finite(t.detach().cpu())
        ]

    def describe(self) -> dict:
        """The plain values that, with its tensors, rebuild this network.

        Shared by the detector's pickles and :mod:`skprotoad.persistence`, so
        that both formats describe a network alike and :data:`FORMAT_VERSION`
        covers both.

        Returns
        -------
        description : dict
            JSON-compatible values; see :meth:`from_description`.
        """
        embedding = self.embedding
        return {
            "backbone": embedding.backbone.name,
            "layers": embedding.backbone.layers,
            "mean": embedding.mean.flatten().tolist(),
            "std": embedding.std.flatten().tolist(),
            "alignment": embedding.alignment,
            "neighborhood_size": embedding.neighborhood_size,
            "normalization": embedding.normalization,
            "padding": embedding.padding,
            "image_score": self.image_score,
            "score_baseline_shape": list(self.score_baseline.shape),
            "map_whitening_shape": list(self.map_whitening.shape),
            "score_whitening": self.score_whitening,
            "input_size": self.input_size,
            "sigma": self.smoothing.sigma,
            "n_prototypes": int(self.prototype_conv.out_channels),
        }

    @classmethod
    def from_description(cls, description, state_dict=None) -> "ProtoADNetwork":
        """The network ``description`` names, in eval mode.

        The backbone is created with ``weights=None``: its weights come from
        ``state_dict``, so the file or download the model was fitted with is
        not needed.

        Parameters
        ----------
        description : dict
            What :meth:`describe` returned; other keys are ignored. Without
            ``map_whitening_shape`` (format 1), a network without whitening;
            without ``score_whitening`` (formats 1 and 2), a score in the
            plain metric.
        state_dict : dict of tensors, default=None
            Loaded strictly into the network, which takes an empty
            ``map_whitening`` when it has none (format 1); ``None`` leaves
            placeholder weights (to compare a file's tensors with before
            loading them).

        Returns
        -------
        network : ProtoADNetwork
        """
        backbone = create_feature_extractor(
            description["backbone"], description["layers"], weights=None
        )
        embedding = PatchEmbedding(
            backbone,
            mean=description["mean"],
            std=description["std"],
            alignment=description["alignment"],
            neighborhood_size=description["neighborhood_size"],
            normalization=description["normalization"],
            padding=description["padding"],
        )
        network = cls(
            embedding,
            torch.zeros(description["n_prototypes"], embedding.n_channels),
            description["input_size"],
            description["sigma"],
            image_score=description["image_score"],
            score_baseline=torch.zeros(description["score_baseline_shape"]),
            map_whitening=torch.zeros(description.get("map_whitening_shape", (0, 0))),
            # formats 1 and 2: the score in the plain metric
            score_whitening=description.get("score_whitening", 0.0),
        )
        if state_dict is not None:
            network.load_described_state(state_dict, description)
        return network.eval()

    def load_described_state(self, state_dict, description) -> None:
        """Load ``state_dict`` strictly, as :meth:`describe` gave
        ``description`` with it: one of format 1 (no ``map_whitening_shape``)
        has no ``map_whitening`` tensor, and takes this network's empty one."""
        if "map_whitening_shape" not in description:
            state_dict = {**state_dict, "map_whitening": self.map_whitening}
        self.load_state_dict(state_dict, strict=True)

    def to_state(self) -> dict:
        """What a pickle of the detector holds: :meth:`describe`, the format
        and package versions, and CPU copies of the tensors (only the
        truncated backbone's and the head's)."""
        return {
            "format_version": FORMAT_VERSION,
            "skprotoad_version": __version__,
            **self.describe(),
            "tensors": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
        }

    @classmethod
    def from_state(cls, state) -> "ProtoADNetwork":
        """The network :meth:`to_state` described.

        Raises
        ------
        ValueError
            When ``state`` is of another format version.
        KeyError
            When a key of the description is missing (a pre-release state).
        """
        version = state.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS:
            raise ValueError(
                f"This model was saved by skprotoad {state.get('skprotoad_version', '?')} "
                f"(format {version}); this is skprotoad {__version__} (format "
                f"{FORMAT_VERSION}). Install that version to load it, or refit."
            )
        return cls.from_description(state, state["tensors"])

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = tuple(images.shape[-2:]) if self.input_size is None else None
        return self.readout(*self.image_patch_scores(images), size)
