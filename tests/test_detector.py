import copy
import warnings
import pickle

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils import estimator_checks as checks

from skprotoad import CalibrationWarning, ProtoADDetector
from skprotoad.datasets import make_defect_images
from skprotoad.metrics import image_auroc, pixel_auroc

from .conftest import LITE0, TINY

# --------------------------------------------------------- the convention


def test_outlier_convention(tiny_detector, synthetic):
    X = synthetic.X_test
    scores = tiny_detector.score_samples(X)
    decision = tiny_detector.decision_function(X)
    np.testing.assert_allclose(decision, scores - tiny_detector.offset_)
    labels = tiny_detector.predict(X)
    assert set(np.unique(labels)) <= {-1, 1}
    np.testing.assert_array_equal(labels == -1, decision < 0)


def test_score_is_minus_the_max_of_the_map(tiny_detector, synthetic):
    X = synthetic.X_test[:5]
    maps = tiny_detector.anomaly_maps(X)
    assert maps.shape == (5, 64, 64) and maps.dtype == np.float32
    np.testing.assert_allclose(tiny_detector.score_samples(X), -maps.max(axis=(1, 2)), rtol=1e-6)


def test_all_input_forms_score_alike(tiny_detector, synthetic, tmp_path):
    from PIL import Image

    X = synthetic.X_test[:3]
    paths = []
    for i, img in enumerate(X):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).save(paths[-1])
    expected = tiny_detector.score_samples(X)
    for form in (list(X), [Image.fromarray(x) for x in X], paths, X.astype(np.float64) / 255):
        np.testing.assert_allclose(tiny_detector.score_samples(form), expected, rtol=1e-5)


def test_images_of_different_sizes_in_a_list(tiny_detector, synthetic):
    X = synthetic.X_test
    mixed = [X[0], X[1][:40], X[2][:, :50, 0]]
    assert tiny_detector.anomaly_maps(mixed).shape == (3, 64, 64)


def test_fit_is_deterministic_for_a_random_state(normal_images, synthetic):
    a = ProtoADDetector(**TINY).fit(normal_images)
    b = ProtoADDetector(**TINY).fit(normal_images)
    np.testing.assert_array_equal(a.prototypes_, b.prototypes_)
    np.testing.assert_array_equal(a.score_samples(synthetic.X_test), b.score_samples(synthetic.X_test))
    assert a.offset_ == b.offset_


def test_fitted_attributes(tiny_detector, normal_images):
    assert tiny_detector.prototypes_.shape == (16, 64 + 128)
    np.testing.assert_allclose(np.linalg.norm(tiny_detector.prototypes_, axis=1), 1, rtol=1e-5)
    assert tiny_detector.feature_shape_ == (16, 16, 192)
    # contamination="auto" holds out 2 of the 12 normal images in turn, five
    # times, to score 10 of them unseen
    assert tiny_detector.n_train_images_ == 12
    assert len(tiny_detector.calibration_scores_) == 10
    assert -tiny_detector.offset_ >= np.median(tiny_detector.calibration_scores_)


# ---------------------------------------------------------- detection works


def test_imagenet_features_find_synthetic_defects(lite0_detector, synthetic):
    """The offline backbone, 12 training images of 64 px: clearly above chance."""
    X, y, masks = synthetic.X_test, synthetic.y_test, synthetic.masks_test
    assert image_auroc(y, -lite0_detector.score_samples(X)) > 0.75
    assert pixel_auroc(masks, lite0_detector.anomaly_maps(X)) > 0.75


def test_auto_threshold_flags_defects_not_normals():
    # 40 training images, all scored unseen (five folds of 8): the threshold
    # is the largest of 40 normal scores, which an unseen normal image exceeds
    # with probability 1/41
    X_train, _, _ = make_defect_images(40, (64, 64), 0.0, random_state=1)
    X, y, _ = make_defect_images(80, (64, 64), 0.5, random_state=2)
    detector = ProtoADDetector(**LITE0).fit(X_train)
    assert len(detector.calibration_scores_) == 40
    pred = detector.predict(X)
    assert np.mean(pred[y == 0] == -1) <= 0.2  # false alarms on unseen normal images
    assert np.mean(pred[y == 1] == -1) >= 0.5


def test_auto_threshold_is_the_conformal_order_statistic():
    from skprotoad._calibration import conformal_threshold

    scores = np.random.default_rng(0).permutation(np.arange(1.0, 301.0))
    # the ceil(301 * 0.99) = 298th smallest of 300; np.quantile(0.99) gives 297.01
    assert conformal_threshold(scores, 0.01) == 298.0
    # fewer than 99 scores: no order statistic reaches 1 %, the maximum is used
    assert conformal_threshold(scores[:40], 0.01) == scores[:40].max()


def test_auto_threshold_false_alarm_rate_on_exchangeable_scores():
    # 40 held-out scores and one new normal score, all from one distribution:
    # the new one exceeds the threshold with probability 1 / 41 (the plain
    # 99th percentile: about 1.5 / 41)
    from skprotoad._calibration import conformal_threshold

    rng = np.random.default_rng(1)
    draws = rng.gamma(2.0, size=(20_000, 41))
    exceed = [new > conformal_threshold(held_out) for *held_out, new in draws]
    assert np.mean(exceed) == pytest.approx(1 / 41, abs=0.004)


def test_n_farthest_appends_the_training_patches_farthest_from_the_prototypes(normal_images):
    import torch

    params = {**TINY, "contamination": 0.1}
    base = ProtoADDetector(**params).fit(normal_images)
    det = ProtoADDetector(**{**params, "n_farthest": 5}).fit(normal_images)
    assert det.prototypes_.shape == (base.prototypes_.shape[0] + 5, base.prototypes_.shape[1])
    np.testing.assert_allclose(det.prototypes_[:-5], base.prototypes_, rtol=1e-6)
    # TINY's input is the 64 px image itself: its unit patch features, directly
    x = torch.from_numpy(normal_images).permute(0, 3, 1, 2).float() / 255
    with torch.inference_mode():
        f = det.network_.embedding(x).permute(0, 2, 3, 1).reshape(-1, 192).numpy()
    distance = ((f[:, None] - base.prototypes_[None]) ** 2).sum(-1).min(axis=1)
    np.testing.assert_allclose(det.prototypes_[-5], f[np.argmax(distance)], atol=1e-5)
    assert all(np.abs(f - p).max(axis=1).min() < 1e-5 for p in det.prototypes_[-5:])
    # the worst training patch is now a prototype: the training maps' maximum drops
    assert det.anomaly_maps(normal_images).max() < base.anomaly_maps(normal_images).max()


@pytest.mark.parametrize("value, exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_bad_n_farthest(normal_images, value, exc):
    with pytest.raises(exc, match="n_farthest"):
        ProtoADDetector(**{**TINY, "n_farthest": value}).fit(normal_images[:6])


def test_n_farthest_larger_than_the_patches(normal_images):
    with pytest.raises(ValueError, match="n_farthest=100000 is more than the"):
        ProtoADDetector(**{**TINY, "n_farthest": 100_000}).fit(normal_images[:6])


# ------------------------------------------------------ labels and contamination


def test_only_normal_labelled_images_are_learned_from(normal_images, synthetic):
    anomalous = synthetic.X_test[synthetic.y_test == 1]
    X = np.concatenate([normal_images, anomalous])
    y = np.r_[np.ones(len(normal_images), int), -np.ones(len(anomalous), int)]
    with_y = ProtoADDetector(**TINY).fit(X, y)
    normal_only = ProtoADDetector(**TINY).fit(normal_images)
    np.testing.assert_allclose(with_y.prototypes_, normal_only.prototypes_)
    assert with_y.n_train_images_ == len(normal_images)


@pytest.mark.parametrize(
    "y, match",
    [
        (np.ones(3), "one label per image"),
        (np.zeros(12), r"1 \(normal\) and -1"),
        (np.full(12, 2), r"1 \(normal\) and -1"),
        (-np.ones(12), "no image as normal"),
        (np.array(["a"] * 12), r"1 \(normal\) and -1"),
    ],
)
def test_bad_labels_are_named(normal_images, y, match):
    with pytest.raises(ValueError, match=match):
        ProtoADDetector(**TINY).fit(normal_images, y)


@pytest.mark.parametrize("contamination", [0.1, 0.25, 0.5])
def test_float_contamination_flags_that_share_of_training(normal_images, contamination):
    det = ProtoADDetector(**{**TINY, "contamination": contamination}).fit(normal_images)
    flagged = np.mean(det.predict(normal_images) == -1)
    assert abs(flagged - contamination) <= 1 / len(normal_images) + 1e-9
    assert len(det.calibration_scores_) == 0


def test_auto_contamination_with_few_images_uses_the_worst(normal_images):
    with pytest.warns(CalibrationWarning, match="holds no image out.*3 here"):
        det = ProtoADDetector(**TINY).fit(normal_images[:3])
    worst = -det.score_samples(normal_images[:3]).min()
    np.testing.assert_allclose(-det.offset_, worst, rtol=1e-4)  # up to the tie margin
    assert -det.offset_ > worst
    assert len(det.calibration_scores_) == 0


# ------------------------------------------------------------ bad parameters


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"clustering": "dbscan"}, ValueError, "clustering"),
        ({"clustering": "kmeans", "n_clusters": None}, ValueError, "needs n_clusters"),
        ({"n_clusters": 0}, ValueError, "at least 1"),
        ({"n_clusters": 2.5}, TypeError, "n_clusters"),
        ({"n_clusters": 10_000}, ValueError, r"more than the 2560 training patches \(10 images of 16 x 16 patches, after holding out 2"),
        ({"sigma": -1}, ValueError, "sigma"),
        ({"sigma": "4"}, TypeError, "sigma"),
        ({"crop_size": 80}, ValueError, "larger than image_size"),
        ({"image_size": "big"}, TypeError, "image_size"),
        ({"mean": (0.5, 0.5)}, ValueError, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, ValueError, "std must be positive"),
        ({"contamination": 0.7}, ValueError, "contamination"),
        ({"contamination": "high"}, ValueError, "contamination"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": True}, ValueError, "batch_size"),
        ({"device": "tpu"}, ValueError, "device"),
        ({"backbone": "no_such_net"}, ValueError, "Unknown backbone"),
        ({"layers": (2, 1)}, ValueError, "strictly increasing"),
        ({"layers": (1, 1)}, ValueError, "without repeats"),
        ({"layers": ()}, ValueError, "at least one stage"),
        ({"layers": (1, 9)}, ValueError, "out of range"),
        ({"layers": 2}, TypeError, "sequence of stage indices"),
        ({"backbone": "vit_tiny_patch16_224", "layers": (1,)}, ValueError,
         "cannot process 64 x 64 crops"),
        ({"weights": "/no/such/file.pth"}, OSError, "no such file"),
        ({"weights": "imagnet"}, OSError, "Pass weights='imagenet'"),
        ({"random_state": "x"}, ValueError, "random_state must be"),
        ({"random_state": 2**32}, ValueError, "random_state must be"),
        ({"random_state": np.random.default_rng(0)}, TypeError, "random_state must be"),
        ({"position_baseline": "yes"}, ValueError, "position_baseline must be"),
        ({"n_jobs": 0}, ValueError, "n_jobs"),
        ({"memory": 5}, ValueError, "memory must be"),
    ],
)
def test_bad_parameters_are_named_at_fit(normal_images, params, error, match):
    with pytest.raises(error, match=match):
        ProtoADDetector(**{**TINY, **params}).fit(normal_images)


def test_numpy_scalars_from_a_grid_are_valid_parameters():
    # GridSearchCV over numpy arrays passes numpy scalars
    params = {**TINY, "position_baseline": np.True_, "n_clusters": np.int64(8),
              "random_state": np.int64(3), "sigma": np.float32(2.0)}
    ProtoADDetector(**params)._validate_params()


@pytest.mark.parametrize("sigma", [1e300, 1e12, 257.0, float("nan"), float("inf")])
def test_sigma_is_bounded_before_any_work(normal_images, sigma, monkeypatch):
    """sigma=1e300 raised OverflowError and 1e12 asked for 64 TB, both only
    after the features were extracted."""
    from skprotoad import _features

    def no_work(*args, **kwargs):
        raise AssertionError("work started before sigma was checked")

    monkeypatch.setattr(_features, "create_feature_extractor", no_work)
    with pytest.raises(ValueError, match=r"sigma must be in \[0, 256\]"):
        ProtoADDetector(**{**TINY, "sigma": sigma}).fit(normal_images)


def test_numpy_integers_are_accepted_for_integer_parameters(normal_images, synthetic,
                                                           tiny_detector):
    """A GridSearchCV grid given as a numpy array passes numpy integers."""
    params = {**TINY, "neighborhood_size": np.int64(1), "n_clusters": np.int64(16),
              "batch_size": np.int64(8)}
    det = ProtoADDetector(**params).fit(normal_images)
    assert det.network_.embedding.neighborhood_size == 1
    assert type(det.network_.embedding.neighborhood_size) is int
    np.testing.assert_array_equal(
        det.score_samples(synthetic.X_test),
        ProtoADDetector(**{**TINY, "neighborhood_size": 1}).fit(normal_images)
        .score_samples(synthetic.X_test),
    )


def test_weights_file_that_is_not_a_state_dict_is_named(normal_images, tmp_path):
    """It said only "...: '101'" (torch's unpickler's KeyError)."""
    path = tmp_path / "weights.pth"
    path.write_text("not a checkpoint at all")
    with pytest.raises(ValueError, match=r"weights.pth: it is not a PyTorch checkpoint"):
        ProtoADDetector(**{**TINY, "weights": str(path)}).fit(normal_images)


def test_methods_before_fit_raise_not_fitted(synthetic):
    det = ProtoADDetector(**TINY)
    for method in ("score_samples", "decision_function", "predict", "anomaly_maps",
                   "predict_masks"):
        with pytest.raises(NotFittedError):
            getattr(det, method)(synthetic.X_test)
    with pytest.raises(NotFittedError):
        det.prototypes_
    # fitted attributes, set by fit as in every scikit-learn estimator
    for attribute in ("offset_", "pixel_threshold_"):
        with pytest.raises(AttributeError):
            getattr(det, attribute)


def test_images_smaller_than_the_crop_are_upsampled(tiny_detector, synthetic):
    """Every image is resized to image_size first: a tiny one is upsampled."""
    tiny = [synthetic.X_test[0][:5, :7], synthetic.X_test[1][:1, :1, 0]]
    assert tiny_detector.anomaly_maps(tiny).shape == (2, 64, 64)
    maps = tiny_detector.anomaly_maps(tiny, output="input")
    assert [m.shape for m in maps] == [(5, 7), (1, 1)]
    assert np.isfinite(tiny_detector.score_samples(tiny)).all()


# ------------------------------------------------- scikit-learn integration

_DATA_INDEPENDENT_CHECKS = [
    checks.check_no_attributes_set_in_init,
    checks.check_parameters_default_constructible,
    checks.check_get_params_invariance,
    checks.check_set_params,
    checks.check_estimator_repr,
    checks.check_mixin_order,
    checks.check_estimator_cloneable,
    checks.check_estimator_tags_renamed,
    checks.check_valid_tag_types,
    checks.check_do_not_raise_errors_in_init_or_set_params,
]


@pytest.mark.parametrize("check", _DATA_INDEPENDENT_CHECKS, ids=lambda c: c.__name__)
def test_sklearn_data_independent_checks(check):
    check("ProtoADDetector", ProtoADDetector())


def test_tags_describe_image_input():
    tags = ProtoADDetector().__sklearn_tags__()
    assert tags.estimator_type == "outlier_detector"
    assert not tags.input_tags.two_d_array and tags.input_tags.three_d_array


def test_fit_returns_self_and_leaves_params_alone(normal_images):
    det = ProtoADDetector(**TINY)
    before = det.get_params()
    X = normal_images.copy()
    X.setflags(write=False)  # read-only input, like a memmap
    assert det.fit(X) is det
    assert det.get_params() == before
    np.testing.assert_array_equal(X, normal_images)  # input not modified


def test_outliers_train_image_version(normal_images, synthetic):
    """Image version of check_outliers_train: shapes, dtypes and consistency."""
    det = ProtoADDetector(**TINY)
    labels = det.fit_predict(normal_images)
    assert labels.shape == (len(normal_images),) and labels.dtype.kind == "i"
    X = synthetic.X_test
    assert det.score_samples(X).shape == det.decision_function(X).shape == (len(X),)
    assert det.score_samples(X).dtype == np.float64
    np.testing.assert_array_equal(labels, det.predict(normal_images))


def test_clone_is_unfitted_with_equal_params(tiny_detector):
    twin = clone(tiny_detector)
    assert twin.get_params() == tiny_detector.get_params()
    assert not hasattr(twin, "network_")


def test_pipeline(normal_images, synthetic):
    as_float = FunctionTransformer(lambda X: X.astype(np.float32) / 255)
    pipe = Pipeline([("scale", as_float), ("det", ProtoADDetector(**TINY))]).fit(normal_images)
    direct = ProtoADDetector(**TINY).fit(normal_images)
    np.testing.assert_allclose(
        pipe.decision_function(synthetic.X_test), direct.decision_function(synthetic.X_test),
        rtol=1e-5,
    )
    np.testing.assert_array_equal(pipe.predict(synthetic.X_test), direct.predict(synthetic.X_test))


def test_grid_search_over_clusters_and_layers(normal_images, synthetic):
    X = np.concatenate([normal_images, synthetic.X_test])
    y = np.r_[np.ones(len(normal_images), int), np.where(synthetic.y_test == 1, -1, 1)]
    grid = GridSearchCV(
        ProtoADDetector(**{**TINY, "contamination": 0.1}),
        param_grid={"n_clusters": [4, 16], "layers": [(2,), (1, 2)]},
        scoring="roc_auc",
        cv=StratifiedKFold(2, shuffle=True, random_state=0),
        error_score="raise",
    ).fit(X, y)
    scores = grid.cv_results_["mean_test_score"]
    assert len(scores) == 4 and np.all(np.isfinite(scores))
    assert grid.best_params_["layers"] in [(2,), (1, 2)]
    assert grid.best_estimator_.prototypes_.shape[0] == grid.best_params_["n_clusters"]


# ------------------------------------------------------------- persistence


def test_joblib_round_trip_gives_identical_scores(tiny_detector, synthetic, tmp_path):
    path = tmp_path / "model.joblib"
    joblib.dump(tiny_detector, path)
    loaded = joblib.load(path)
    X = synthetic.X_test
    np.testing.assert_array_equal(loaded.score_samples(X), tiny_detector.score_samples(X))
    np.testing.assert_array_equal(loaded.anomaly_maps(X), tiny_detector.anomaly_maps(X))
    assert loaded.offset_ == tiny_detector.offset_
    assert hasattr(tiny_detector, "network_")  # saving does not strip the original


def test_pickle_holds_only_the_truncated_backbone(lite0_detector):
    import timm

    blob = pickle.dumps(lite0_detector)
    full = sum(p.numel() for p in timm.create_model("efficientnet_lite0").parameters())
    assert len(blob) < 0.5 * full * 4  # far less than the whole float32 network
    state = lite0_detector.__getstate__()["_network_state"]
    assert all(t.device.type == "cpu" for t in state["tensors"].values())
    assert not any(k.startswith(("embedding.backbone.model.conv_head", "embedding.backbone.model.classifier")) for k in state["tensors"])


def test_model_from_another_format_version_is_refused(tiny_detector):
    state = tiny_detector.__getstate__()
    state["_network_state"] = {**state["_network_state"], "format_version": 999}
    det = ProtoADDetector.__new__(ProtoADDetector)
    with pytest.raises(ValueError, match="format 999"):
        det.__setstate__(state)


def _poisoned(model, value=float("nan")):
    """A copy of ``model`` with one prototype entry set to ``value``."""
    poisoned = pickle.loads(pickle.dumps(model))
    poisoned.network_.prototype_conv.weight.data[0, 0] = value
    return poisoned


def test_a_model_with_nan_prototypes_does_not_load(tiny_detector, tmp_path):
    """Every score of such a model is NaN, and predict called every image normal."""
    joblib.dump(_poisoned(tiny_detector), tmp_path / "nan.joblib")
    with pytest.raises(ValueError, match="non-finite values.*prototype_conv.weight"):
        joblib.load(tmp_path / "nan.joblib")
    broken = pickle.loads(pickle.dumps(tiny_detector))
    broken.offset_ = float("nan")
    with pytest.raises(ValueError, match="non-finite values.*thresholds"):
        pickle.loads(pickle.dumps(broken))


def test_non_finite_scores_are_never_normal(tiny_detector, synthetic):
    X = synthetic.X_test[:3]
    broken = _poisoned(tiny_detector)
    assert np.isnan(broken.score_samples(X)).all()
    with pytest.raises(ValueError, match="not finite.*not called normal"):
        broken.predict(X)
    with pytest.raises(ValueError, match="not finite"):
        broken.predict_masks(X)
    for threshold in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold must be finite"):
            tiny_detector.predict_masks(X, threshold=threshold)
    with pytest.raises(TypeError, match="threshold must be a number"):
        tiny_detector.predict_masks(X, threshold="0.5")
    no_offset = pickle.loads(pickle.dumps(tiny_detector))
    no_offset.offset_ = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        no_offset.predict(X)


@pytest.mark.parametrize("change", [
    {"image_size": 80, "crop_size": 64},
    {"image_size": (64, 72), "crop_size": 64},
    {"crop_size": 48},
    {"sigma": 8.0},
    {"neighborhood_size": 5},
    {"mean": (0.5, 0.5, 0.5)},
    {"weights": "imagenet"},  # the network keeps its random backbone
])
def test_parameters_changed_after_fit_are_refused(tiny_detector, synthetic, change):
    """set_params(image_size=...) after fit changed the preprocessing silently
    (the network keeps its own sigma, mean ...: those were silently ignored)."""
    det = pickle.loads(pickle.dumps(tiny_detector)).set_params(**change)
    for method in ("score_samples", "predict", "anomaly_maps"):
        with pytest.raises(ValueError, match="changed after fit.*refit"):
            getattr(det, method)(synthetic.X_test[:2])
    det.set_params(**{k: tiny_detector.get_params()[k] for k in change})
    np.testing.assert_array_equal(
        det.score_samples(synthetic.X_test[:2]), tiny_detector.score_samples(synthetic.X_test[:2])
    )


def test_parameters_that_do_not_change_the_model_can_change(tiny_detector, synthetic):
    X = synthetic.X_test[:2]
    det = pickle.loads(pickle.dumps(tiny_detector))
    # with normalization="patch" every image_score is the same network
    # no crop is the whole 64 x 64 image the crop_size=64 it was fitted with took
    det.set_params(image_score="cosine", batch_size=1, n_clusters=3, image_size=(64, 64),
                   crop_size=None, position_baseline=np.False_)
    # (batch size 1: the same up to float rounding)
    np.testing.assert_allclose(det.score_samples(X), tiny_detector.score_samples(X), rtol=1e-5)


# ------------------------------------------------------------- localization


@pytest.fixture(scope="module")
def wide_images():
    from skprotoad.datasets import make_defect_images

    X, _, _ = make_defect_images(
        n_samples=10, image_size=(60, 120), anomaly_ratio=0.0, random_state=5
    )
    return X


@pytest.fixture(scope="module")
def cropping_detector(wide_images):
    # geometry under test, not aggregation: a 3 x 3 neighbourhood on this
    # 16 x 16 patch grid would spread the blob over a fifth of the image
    return ProtoADDetector(
        image_size=80, crop_size=64, clustering="kmeans", n_clusters=32,
        neighborhood_size=1, random_state=0,
    ).fit(wide_images[:8])


@pytest.mark.parametrize("centre", [(30, 85), (22, 35)])
def test_a_blob_lands_where_it_is_on_a_non_square_input(cropping_detector, wide_images, centre):
    image = wide_images[9].copy()
    rows, cols = np.mgrid[:60, :120]
    image[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 5**2] = 20
    (heat,) = cropping_detector.anomaly_maps([image], output="input")
    assert heat.shape == (60, 120)
    # Tolerance: efficientnet_lite0's deeper stages see a few pixels up-left of
    # their grid point, and x is stretched 1.5 times more than y here.
    peak = np.unravel_index(np.nanargmax(heat), heat.shape)
    assert abs(peak[0] - centre[0]) <= 5 and abs(peak[1] - centre[1]) <= 10
    # the crop keeps 64 of 80 resized pixels: 10 % of each side has no score
    scored = ~np.isnan(heat)
    assert scored[6:54, 12:108].all()
    assert not scored[:5].any() and not scored[55:].any()
    assert not scored[:, :11].any() and not scored[:, 109:].any()
    (mask,) = cropping_detector.predict_masks(
        [image], output="input", threshold=np.nanmax(heat) * 0.9
    )
    ys, xs = np.nonzero(mask)
    assert mask[peak] and not mask[~scored].any()
    assert abs(ys.mean() - centre[0]) <= 6 and abs(xs.mean() - centre[1]) <= 12


def test_input_maps_agree_with_crop_maps(cropping_detector, wide_images):
    crop = cropping_detector.anomaly_maps(wide_images[8:9])[0]
    (full,) = cropping_detector.anomaly_maps(wide_images[8:9], output="input")
    assert np.nanmax(full) <= crop.max() + 1e-6
    assert np.nanmin(full) >= crop.min() - 1e-6
    with pytest.raises(ValueError, match="output"):
        cropping_detector.anomaly_maps(wide_images[:1], output="original")


@pytest.mark.parametrize("output", ["crop", "input"])
def test_maps_with_scores_are_the_two_methods_in_one(cropping_detector, wide_images, output):
    X = wide_images[8:11]
    maps, scores = cropping_detector.anomaly_maps(X, output=output, return_scores=True)
    expected = cropping_detector.anomaly_maps(X, output=output)
    for got, want in zip(maps, expected):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(scores, cropping_detector.score_samples(X))
    # the default image score is not the map's maximum: the pair is not redundant
    assert not np.allclose(-scores, [np.nanmax(m) for m in maps])
    with pytest.raises(TypeError, match="return_scores must be True or False"):
        cropping_detector.anomaly_maps(X, return_scores="yes")


def test_masks_are_non_empty_exactly_for_predicted_anomalies(tiny_detector, synthetic):
    # the paper's readout: the image score is the map's maximum, one threshold
    masks = tiny_detector.predict_masks(synthetic.X_test)
    flagged = tiny_detector.predict(synthetic.X_test) == -1
    np.testing.assert_array_equal(masks.any(axis=(1, 2)), flagged)
    assert tiny_detector.pixel_threshold_ == -tiny_detector.offset_


def test_default_masks_agree_with_the_verdicts(lite0_detector, synthetic):
    # the default: distance maps, projection image scores, a threshold for each
    assert lite0_detector.normalization == "image"
    assert lite0_detector.network_.image_score == "projection"
    assert lite0_detector.pixel_threshold_ != pytest.approx(-lite0_detector.offset_)
    maps = lite0_detector.anomaly_maps(synthetic.X_test)
    masks = lite0_detector.predict_masks(synthetic.X_test)
    flagged = lite0_detector.predict(synthetic.X_test) == -1
    np.testing.assert_array_equal(masks.any(axis=(1, 2)), flagged)
    above = maps > lite0_detector.pixel_threshold_
    for mask, m, hit, flag in zip(masks, maps, above, flagged):
        if flag and hit.any():
            np.testing.assert_array_equal(mask, hit)
        elif flag:  # flagged, nothing above the pixel threshold: its peak region
            assert mask[np.unravel_index(np.argmax(m), m.shape)]
            assert m[mask].min() >= m.max() - 0.5 * (m.max() - np.median(m)) - 1e-7
    # an explicit threshold is the plain comparison, whatever the verdicts
    t = float(np.median(maps))
    np.testing.assert_array_equal(lite0_detector.predict_masks(synthetic.X_test, threshold=t),
                                  maps > t)
    # the defects are found at both levels with the calibrated thresholds
    y = synthetic.y_test
    assert flagged[y == 1].mean() > flagged[y == 0].mean()


def test_masks_agree_with_verdicts_whatever_the_pixel_threshold(lite0_detector, synthetic):
    # a pixel threshold above every map: flagged images still show their peak;
    # one below every map: passed images still show nothing
    X = synthetic.X_test
    flagged = lite0_detector.predict(X) == -1
    assert 0 < flagged.sum() < len(X)
    maps = lite0_detector.anomaly_maps(X)
    for level in (maps.max() + 1.0, maps.min() - 1.0):
        model = copy.deepcopy(lite0_detector)
        model.pixel_threshold_ = float(level)
        masks = model.predict_masks(X)
        np.testing.assert_array_equal(masks.any(axis=(1, 2)), flagged)
        if level > maps.max():
            assert all(mask.sum() < mask.size / 2 for mask in masks[flagged])
        else:
            assert masks[flagged].all()


def test_too_few_held_out_images_warn_with_the_expected_false_alarm_rate(normal_images):
    from skprotoad import CalibrationWarning
    from skprotoad._calibration import _warn_if_too_few, expected_false_alarm_rate

    with pytest.warns(CalibrationWarning, match=r"scored 10 of 12 .* Expect 9\.1% .* "
                                                r"at least 100 images") as record:
        ProtoADDetector(**TINY).fit(normal_images)
    assert record[0].filename == __file__  # points at the user's call
    # a float contamination holds nothing out, and says nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        ProtoADDetector(**{**TINY, "contamination": 0.1}).fit(normal_images)
        _warn_if_too_few(99, 495)  # the 1 % target reached: silent
    # the rates the warning quotes: 2 held out, the larger one is the threshold
    mean, high = expected_false_alarm_rate(2)
    assert mean == pytest.approx(1 / 3) and high == pytest.approx(1 - 0.1 ** 0.5)
    # and they are what repeated draws give: the max of 40 normal scores
    rng = np.random.default_rng(0)
    rates = [np.mean(rng.random(2000) > rng.random(40).max()) for _ in range(400)]
    mean40, high40 = expected_false_alarm_rate(40)
    assert np.mean(rates) == pytest.approx(mean40, abs=0.004)
    assert np.quantile(rates, 0.9) == pytest.approx(high40, abs=0.01)


def test_fit_names_its_stages_and_times_them(normal_images, capsys):
    params = {**TINY, "clustering": "finch", "n_clusters": 8}
    det = ProtoADDetector(**params, verbose=True).fit(normal_images)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("skprotoad: ")]
    assert [line[11:16] for line in lines[:3]] == ["[1/3]", "[2/3]", "[3/3]"]
    assert "extracting" in lines[0] and "prototypes" in lines[1] and "calibrating" in lines[2]
    assert "2 held-out images" in lines[2]
    # the first clustering's duration and the fit's, estimated before they start
    assert "; about " in lines[1] and "the whole fit in about " in lines[1]
    n_patches = 12 * 16 * 16  # TINY: 64 px at stride 4
    assert lines[3].startswith(f"skprotoad: fitted on 12 images: {n_patches:,} patches, "
                               f"{det.prototypes_.shape[0]} prototypes")
    assert f"threshold {-det.offset_:.4g}" in lines[3]
    # the clustering's own detail only at verbose=2
    assert "FINCH" not in err and "partition" not in err.lower()
    ProtoADDetector(**params, verbose=2).fit(normal_images)
    assert "partition" in capsys.readouterr().err.lower()
    # timed whatever the verbosity, and silent without it
    quiet = ProtoADDetector(**params).fit(normal_images)
    assert capsys.readouterr().err == ""
    seconds = quiet.fit_seconds_
    assert set(seconds) == {"features", "prototypes", "calibration", "total"}
    assert all(v >= 0 for v in seconds.values())
    assert sum(v for k, v in seconds.items() if k != "total") <= seconds["total"]


# ------------------------------------------------------------- max_patches
def test_a_training_set_under_max_patches_is_learned_whole(normal_images):
    uncapped = ProtoADDetector(**{**TINY, "max_patches": None}).fit(normal_images)
    n_patches = len(normal_images) * 16 * 16  # TINY: 64 px at stride 4
    at_cap = ProtoADDetector(**{**TINY, "max_patches": n_patches}).fit(normal_images)
    np.testing.assert_array_equal(at_cap.prototypes_, uncapped.prototypes_)
    assert at_cap.offset_ == uncapped.offset_
    np.testing.assert_array_equal(at_cap.calibration_scores_, uncapped.calibration_scores_)


def test_the_capped_draw_keeps_the_patches_unlike_the_rest_of_their_image():
    from skprotoad._features import draw_rows

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(400, 8)).astype(np.float32)
    rare = [3, 150, 333]  # far from everything: a random 50 of 400 would miss them
    rows[rare] += 40 * np.eye(8, dtype=np.float32)[:3]
    for k in range(5):
        kept = draw_rows(rows, 50, seed=1, k=k)
        positions = [int(np.flatnonzero((rows == r).all(axis=1))[0]) for r in kept]
        assert positions == sorted(set(positions)) and len(positions) == 50
        assert set(rare) <= set(positions)
        np.testing.assert_array_equal(draw_rows(rows, 50, seed=1, k=k), kept)  # seeded
    assert len(draw_rows(rows, 7, seed=1, k=0)) == 7  # too few to cover: all drawn
    np.testing.assert_array_equal(draw_rows(rows, 400, seed=1, k=0), rows)


@pytest.mark.parametrize("contamination", ["auto", 0.25])
def test_max_patches_caps_the_patches_held(normal_images, contamination, capsys):
    n_images = len(normal_images)
    params = {**TINY, "contamination": contamination, "max_patches": 50 * n_images}
    capped = ProtoADDetector(**params, verbose=True).fit(normal_images)
    assert f"{50 * n_images:,} patches" in capsys.readouterr().err.splitlines()[-1]
    again = ProtoADDetector(**params).fit(normal_images)  # seeded: the same sample
    np.testing.assert_array_equal(again.prototypes_, capped.prototypes_)
    full = ProtoADDetector(**{**params, "max_patches": None}).fit(normal_images)
    assert not np.array_equal(full.prototypes_, capped.prototypes_)
    if contamination == "auto":
        # the held-out images' scores come from a second pass through the backbone
        assert len(capped.calibration_scores_) == 10
    else:
        # the training images scored by the backbone again: as score_samples does
        # (up to the margin that keeps an image on the threshold normal)
        scores = -capped.score_samples(normal_images)
        assert -capped.offset_ == pytest.approx(np.quantile(scores, 1 - contamination),
                                               rel=1e-4)


def test_scoring_moves_the_network_only_when_it_lies_elsewhere(tiny_detector, synthetic,
                                                               monkeypatch):
    from skprotoad._features import on_device

    det = copy.deepcopy(tiny_detector)
    expected = det.score_samples(synthetic.X_test[:2])

    def no_move(*args, **kwargs):
        raise AssertionError("moved a network that was on its device already")

    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.Module, "to", no_move)
        np.testing.assert_array_equal(det.score_samples(synthetic.X_test[:2]), expected)
    moved = on_device(det.network_, "meta")
    assert {t.device.type for t in moved.state_dict().values()} == {"meta"}
