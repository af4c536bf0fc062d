"""The scale geometry: a float ``image_size`` resizes every image by one factor,
keeping its aspect ratio, and scores the whole image."""

import pickle

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from skprotoad import ProtoADDetector
from skprotoad._images import (
    ImageSequence,
    crop_map_to_input,
    load_image,
    resize_and_crop,
    scaled_size,
)
from skprotoad.backbones import create_feature_extractor
from skprotoad.network import GaussianSmoothing, PatchEmbedding, ProtoADNetwork

from .conftest import TINY

# TINY in the scale geometry: resnet18 stages 1, 2 (strides 4, 8), so sizes are
# multiples of 8 and these ones are kept as they are.
SCALE = {**TINY, "image_size": 1.0, "crop_size": None}
SIZES = [(48, 80), (64, 40), (48, 80), (56, 56), (64, 40), (48, 80), (64, 40), (56, 56)]


def _textures(sizes, seed=0):
    """Uniform noisy grey-ish images of the given sizes."""
    rng = np.random.default_rng(seed)
    return [rng.integers(90, 150, size=(*s, 3), dtype=np.uint8) for s in sizes]


@pytest.fixture(scope="module")
def mixed():
    return _textures(SIZES)


@pytest.fixture(scope="module")
def scale_detector(mixed):
    # 8 images, contamination="auto": 2 of them are held out to calibrate
    return ProtoADDetector(**SCALE).fit(mixed)


# ------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "params, error, match",
    [
        ({"image_size": 0.75, "crop_size": 224}, ValueError, "crop_size must be None"),
        ({"image_size": 0.75, "crop_size": 32}, ValueError, "crop_size must be None"),
        ({"image_size": 0.0, "crop_size": None}, ValueError, r"scale factor in \(0, 4\]"),
        ({"image_size": -0.5, "crop_size": None}, ValueError, "scale factor"),
        ({"image_size": 4.5, "crop_size": None}, ValueError, "scale factor"),
        ({"image_size": 256.0, "crop_size": None}, ValueError, "pass an int"),
        ({"image_size": float("nan"), "crop_size": None}, ValueError, "scale factor"),
        ({"image_size": True, "crop_size": None}, TypeError, "image_size"),
        ({"image_size": (0.5, 0.5), "crop_size": None}, TypeError, "image_size"),
    ],
)
def test_bad_scale_geometry_is_named(mixed, params, error, match):
    with pytest.raises(error, match=match):
        ProtoADDetector(**{**TINY, **params}).fit(mixed)


def test_scale_factor_accepts_numpy_floats_and_four():
    for value in (np.float64(0.5), np.float32(0.75), 4.0, 1e-3):
        ProtoADDetector(image_size=value, crop_size=None)._validate_params()


def test_int_image_size_without_crop_scores_the_whole_squashed_image(mixed):
    det = ProtoADDetector(**{**TINY, "image_size": (48, 72), "crop_size": None}).fit(mixed)
    assert det.anomaly_maps(mixed[:2]).shape == (2, 48, 72)
    (full,) = det.anomaly_maps(mixed[:1], output="input")
    assert full.shape == SIZES[0] and not np.isnan(full).any()


# -------------------------------------------------------------- sizes, batches


def test_scaled_sizes_are_stride_multiples_of_at_least_32():
    assert scaled_size((300, 103), 0.75, 16) == (224, 80)  # 225 -> 224, 77.25 -> 80
    assert scaled_size((403, 632), 0.75, 16) == (304, 480)
    assert scaled_size((20, 500), 0.75, 16) == (32, 368)  # 15 -> at least 32
    assert scaled_size((20, 20), 1.0, 8) == (32, 32)
    assert scaled_size((20, 20), 1.0, 64) == (64, 64)  # at least one cell
    assert scaled_size((48, 80), 1.0, 8) == (48, 80)
    # the benchmark's own rule (benchmarks/bench_geometry.py, "native")
    for h, w in [(222, 103), (403, 632), (300, 401), (257, 129)]:
        expected = [max(32, int(round(side * 0.75 / 16)) * 16) for side in (h, w)]
        assert scaled_size((h, w), 0.75, 16) == tuple(expected)


def test_batches_group_images_of_one_size(mixed):
    images = ImageSequence(mixed)
    chunks = list(images.batches(2, 1.0, None, multiple=8))
    for chunk, batch in chunks:
        assert len(chunk) <= 2 and len({SIZES[i] for i in chunk}) == 1
        assert tuple(batch.shape) == (len(chunk), 3, *SIZES[chunk[0]])
        for i, tensor in zip(chunk, batch):
            expected = resize_and_crop(load_image(mixed[i]), SIZES[i], None)
            torch.testing.assert_close(tensor, expected)
    # groups in order of first appearance, each in the given order
    assert [c for c, _ in chunks] == [[0, 2], [5], [1, 4], [6], [3, 7]]
    assert sorted(i for c, _ in chunks for i in c) == list(range(len(mixed)))
    assert images.original_size(1) == (64, 40)


def test_batches_follow_a_given_order_within_each_size(mixed):
    images = ImageSequence(mixed)
    # 0.75, multiples of 8: (48, 80) -> (36, 60) -> (32, 64) (ties round to even);
    # (64, 40) -> (48, 30) -> (48, 32); (56, 56) -> (42, 42) -> (40, 40)
    plan = images.plan(4, 0.75, None, indices=[7, 1, 3, 0], multiple=8)
    assert plan == [[7, 3], [1], [0]]
    sizes = images.input_sizes(0.75, None, 8, [7, 1, 0])
    assert sizes == [(40, 40), (48, 32), (32, 64)]
    shapes = [tuple(b.shape[-2:]) for _, b in images.batches(4, 0.75, None, [7, 1, 3, 0], 8)]
    assert shapes == [(40, 40), (48, 32), (32, 64)]


def test_scale_map_back_to_the_input_covers_the_whole_image():
    # a map that is its own y coordinate, in model-input pixels
    rows = np.arange(32, dtype=np.float32)[:, None].repeat(48, axis=1)
    out = crop_map_to_input(rows, (50, 70), 0.66, None)
    assert out.shape == (50, 70) and not np.isnan(out).any()
    # original pixel centre y maps to (y + 0.5) * 32 / 50 - 0.5 (clamped at the border)
    expected = np.clip((np.arange(50) + 0.5) * 32 / 50 - 0.5, 0, 31)
    np.testing.assert_allclose(out[:, 0], expected, atol=1e-5)


# ------------------------------------------------------------------ network


@pytest.fixture(scope="module")
def embedding():
    return PatchEmbedding(create_feature_extractor("resnet18", (1, 2), weights=None))


def test_free_size_network_equals_the_fixed_one_on_its_size(embedding):
    torch.manual_seed(0)
    prototypes = torch.randn(9, 192)
    x = torch.rand(2, 3, 64, 64)
    fixed = ProtoADNetwork(embedding, prototypes, (64, 64), sigma=4.0).eval()
    free = ProtoADNetwork(embedding, prototypes, None, sigma=4.0).eval()
    with torch.inference_mode():
        (fm, fs), (gm, gs) = fixed(x), free(x)
    assert torch.equal(fm, gm) and torch.equal(fs, gs)
    assert free.input_size is None


def test_free_size_network_takes_any_size(embedding):
    torch.manual_seed(0)
    net = ProtoADNetwork(embedding, torch.randn(9, 192), None, sigma=2.0).eval()
    with torch.inference_mode():
        for size in ((48, 80), (64, 40), (40, 40)):
            maps, scores = net(torch.rand(2, 3, *size))
            assert tuple(maps.shape) == (2, *size)
            torch.testing.assert_close(scores, maps.flatten(1).amax(1))
    with pytest.raises(ValueError, match="input_size"):
        net.head(torch.rand(1, 192, 8, 8))


@pytest.mark.parametrize("size", [(31, 64), (12, 10), (40, 40)])
def test_smoothing_of_other_sizes_matches_scipy(size):
    maps = np.random.default_rng(1).random((2, *size)).astype(np.float32)
    for smoothing in (GaussianSmoothing(3.0, None), GaussianSmoothing(3.0, (40, 40))):
        ours = smoothing(torch.from_numpy(maps)).numpy()
        for m, o in zip(maps, ours):
            ref = gaussian_filter(m.astype(np.float64), sigma=3.0, mode="reflect")
            np.testing.assert_allclose(o, ref, atol=1e-5)


# ----------------------------------------------------------------- detector


def test_fit_on_mixed_sizes_holds_out_for_auto(scale_detector, mixed):
    det = scale_detector
    # four folds of two images of different sizes, each held out in turn
    assert det.n_train_images_ == 8 and len(det.calibration_scores_) == 8
    assert det.feature_shape_ == (None, None, 192)
    assert det.network_.input_size is None
    assert -det.offset_ >= np.median(det.calibration_scores_)
    assert np.isfinite(det.calibration_scores_).all()


def test_scores_equal_scoring_each_image_alone(scale_detector, mixed):
    together = scale_detector.score_samples(mixed)
    alone = [scale_detector.score_samples([image])[0] for image in mixed]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    labels = scale_detector.predict(mixed)
    np.testing.assert_array_equal(labels == -1, scale_detector.decision_function(mixed) < 0)


def test_maps_have_each_images_size(scale_detector):
    images = _textures([(48, 80), (70, 44), (20, 33)], seed=3)
    crop = scale_detector.anomaly_maps(images)
    # multiples of 8, at least 32
    assert [m.shape for m in crop] == [(48, 80), (72, 48), (32, 32)]
    assert all(m.dtype == np.float32 for m in crop)
    np.testing.assert_allclose(
        scale_detector.score_samples(images), [-m.max() for m in crop], rtol=1e-6
    )
    full = scale_detector.anomaly_maps(images, output="input")
    assert [m.shape for m in full] == [(48, 80), (70, 44), (20, 33)]
    assert not any(np.isnan(m).any() for m in full)
    for c, f in zip(crop, full):
        assert c.min() - 1e-6 <= f.min() and f.max() <= c.max() + 1e-6
    masks = scale_detector.predict_masks(images)
    assert [m.shape for m in masks] == [(48, 80), (72, 48), (32, 32)]
    assert all(m.dtype == bool for m in masks)
    masks = scale_detector.predict_masks(images, output="input", threshold=-1.0)
    assert [m.shape for m in masks] == [(48, 80), (70, 44), (20, 33)]
    assert all(m.all() for m in masks)


def test_an_array_batch_works_in_scale_mode(scale_detector):
    X = np.stack(_textures([(48, 80)] * 3, seed=4))
    maps = scale_detector.anomaly_maps(X)
    assert isinstance(maps, list) and [m.shape for m in maps] == [(48, 80)] * 3


def test_float_contamination_and_few_images(mixed):
    det = ProtoADDetector(**{**SCALE, "contamination": 0.25}).fit(mixed)
    assert np.mean(det.predict(mixed) == -1) == pytest.approx(0.25, abs=1 / 8 + 1e-9)
    assert len(det.calibration_scores_) == 0
    few = ProtoADDetector(**SCALE).fit(mixed[:3])
    # the fit scored its held features with the joined head, score_samples
    # the images with the stage-wise products: equal to float rounding
    np.testing.assert_allclose(-few.offset_, -few.score_samples(mixed[:3]).min(), rtol=1e-5,
                               atol=1e-6)


def test_too_many_clusters_names_the_varying_sizes(mixed):
    match = r"more than the \d+ training patches \(6 images of varying sizes, after holding out 2"
    with pytest.raises(ValueError, match=match):
        ProtoADDetector(**{**SCALE, "n_clusters": 5000}).fit(mixed)


def test_changing_the_geometry_after_fit_is_refused(scale_detector, mixed):
    det = pickle.loads(pickle.dumps(scale_detector))
    det.set_params(image_size=64, crop_size=64)
    with pytest.raises(ValueError, match="changed after fit"):
        det.score_samples(mixed[:1])


def test_pickle_round_trip(scale_detector, mixed):
    loaded = pickle.loads(pickle.dumps(scale_detector))
    assert loaded.network_.input_size is None
    for a, b in zip(loaded.anomaly_maps(mixed[:3]), scale_detector.anomaly_maps(mixed[:3])):
        np.testing.assert_array_equal(a, b)
    assert loaded.feature_shape_ == scale_detector.feature_shape_


# ------------------------------------------------------------- localization


@pytest.fixture(scope="module")
def tile_detector():
    """ImageNet features, scale 0.5, trained on two sizes and aspects."""
    from skprotoad.datasets import make_defect_images

    wide, _, _ = make_defect_images(
        n_samples=5, image_size=(120, 240), anomaly_ratio=0.0, random_state=5
    )
    tall, _, _ = make_defect_images(
        n_samples=4, image_size=(176, 112), anomaly_ratio=0.0, random_state=6
    )
    det = ProtoADDetector(
        image_size=0.5, crop_size=None, clustering="kmeans", n_clusters=32,
        neighborhood_size=1, random_state=0,
    ).fit(list(wide[:4]) + list(tall))
    return det, wide[4]


@pytest.mark.parametrize("centre", [(60, 170), (30, 50)])
def test_a_blob_lands_where_it_is_in_input_maps(tile_detector, centre):
    det, image = tile_detector
    image = image.copy()
    rows, cols = np.mgrid[:120, :240]
    image[(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 9**2] = 20
    (crop,) = det.anomaly_maps([image])
    # 0.5 x (120, 240) = (60, 120), rounded to multiples of 16: (64, 128)
    assert crop.shape == (64, 128)
    (heat,) = det.anomaly_maps([image], output="input")
    assert heat.shape == (120, 240) and not np.isnan(heat).any()
    peak = np.unravel_index(np.argmax(heat), heat.shape)
    # tolerance: a few model-input pixels (efficientnet's deeper stages look
    # up-left of their grid point), twice that in input pixels
    assert abs(peak[0] - centre[0]) <= 10 and abs(peak[1] - centre[1]) <= 10
    (mask,) = det.predict_masks([image], output="input", threshold=heat.max() * 0.9)
    ys, xs = np.nonzero(mask)
    assert mask[peak]
    assert abs(ys.mean() - centre[0]) <= 12 and abs(xs.mean() - centre[1]) <= 12


# -------------------------------------------------------------- persistence


def test_safe_format_round_trip(scale_detector, mixed, tmp_path):
    from skprotoad import persistence

    path = persistence.save(scale_detector, tmp_path / "scale.safetensors")
    loaded = persistence.load(path)
    assert loaded.get_params() == scale_detector.get_params()
    assert loaded.network_.input_size is None
    assert loaded.feature_shape_ == (None, None, 192)
    assert loaded.offset_ == scale_detector.offset_
    for a, b in zip(loaded.anomaly_maps(mixed[:3]), scale_detector.anomaly_maps(mixed[:3])):
        np.testing.assert_array_equal(a, b)


def test_safe_format_refuses_a_mismatched_geometry(scale_detector, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from skprotoad import persistence

    path = persistence.save(scale_detector, tmp_path / "scale.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["skprotoad"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edits = {
        "crop": lambda h: h["params"].update(crop_size=32),
        "fixed network": lambda h: h["network"].update(input_size=[48, 80]),
        "feature shape": lambda h: h["fitted"].update(feature_shape_=[6, 10, 192]),
        "half none": lambda h: h["fitted"].update(feature_shape_=[None, 10, 192]),
    }
    for name, edit in edits.items():
        bad = json.loads(json.dumps(header))
        edit(bad)
        target = tmp_path / f"{name}.safetensors"
        save_file(tensors, target, metadata={"skprotoad": json.dumps(bad)})
        with pytest.raises(ValueError, match="not a valid skprotoad model"):
            persistence.load(target)


def test_export_needs_a_fixed_input_size(scale_detector, mixed, tmp_path):
    from skprotoad import export

    with pytest.raises(ValueError, match="export needs a fixed input size"):
        export.to_torchscript(scale_detector, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="export needs a fixed input size"):
        export.preprocess(scale_detector, mixed[:1])


# ------------------------------------------------------------- evaluation


def test_input_masks_have_each_images_size(tmp_path):
    from PIL import Image

    from skprotoad.datasets import load_input_masks

    mask = np.zeros((30, 20), np.uint8)
    mask[5:10, 2:4] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    same, other, none = load_input_masks(
        [tmp_path / "m.png", tmp_path / "m.png", None], [(30, 20), (60, 40), (7, 9)]
    )
    np.testing.assert_array_equal(same, mask > 0)
    np.testing.assert_array_equal(other, np.kron(mask > 0, np.ones((2, 2), bool)))
    assert none.shape == (7, 9) and not none.any()
    with pytest.raises(ValueError, match="same length"):
        load_input_masks([None], [])


def test_pixel_metrics_of_lists_equal_those_of_arrays():
    from skprotoad.metrics import aupro, evaluate_maps, pixel_auroc, pixel_f1_max, pro_curve

    rng = np.random.default_rng(0)
    masks = np.zeros((3, 12, 9), bool)
    masks[0, 2:5, 3:7] = True
    masks[1, 8:, :2] = True
    maps = rng.random(masks.shape) + masks * rng.random(masks.shape)
    for metric in (pixel_auroc, pixel_f1_max, aupro):
        assert metric(list(masks), list(maps)) == metric(masks, maps)
    for a, b in zip(pro_curve(list(masks), list(maps)), pro_curve(masks, maps)):
        np.testing.assert_array_equal(a, b)
    y, scores = [1, 1, 0], [0.9, 0.8, 0.1]
    expected = evaluate_maps(y, scores, masks, maps)
    assert evaluate_maps(y, scores, list(masks), list(maps)) == expected


# -------------------------------------------------------------------- CLI

# TINY as command-line options, scale 1.0 and no --crop-size (none by default)
SCALE_OPTIONS = [
    "--backbone", "resnet18", "--weights", "none", "--layers", "1", "2",
    "--image-size", "1.0", "--clustering", "kmeans", "--n-clusters", "16",
    "--batch-size", "8", "--seed", "0",
]
# (top, left, height, width) crops of the 64 x 64 synthetic images: mixed sizes
# and aspects at the texture's own scale
CROPS = [(0, 0, 48, 64), (0, 8, 64, 40), (8, 0, 56, 56), (0, 0, 64, 64)]


def _crop(array, k):
    top, left, h, w = CROPS[k % len(CROPS)]
    return np.ascontiguousarray(array[top : top + h, left : left + w])


@pytest.fixture(scope="module")
def scale_mvtec(tmp_path_factory, synthetic):
    """A one-category MVTec AD tree of mixed-size images, with masks."""
    from PIL import Image

    cat = tmp_path_factory.mktemp("scale_mvtec") / "tiles"

    def save(array, folder, name):
        (cat / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(cat / folder / name)

    for i, image in enumerate(synthetic.X_train):
        save(_crop(image, i), "train/good", f"{i:03d}.png")
    defects = np.flatnonzero(synthetic.y_test == 1)[:4]
    normals = np.flatnonzero(synthetic.y_test == 0)[:3]
    for k, i in enumerate(normals):
        save(_crop(synthetic.X_test[i], k), "test/good", f"{k:03d}.png")
    for k, i in enumerate(defects):
        save(_crop(synthetic.X_test[i], k), "test/scratch", f"{k:03d}.png")
        mask = _crop(synthetic.masks_test[i].astype(np.uint8) * 255, k)
        save(mask, "ground_truth/scratch", f"{k:03d}_mask.png")
    return cat


def test_cli_image_size_parses_a_scale_factor():
    from skprotoad.cli import build_parser, main

    parser = build_parser()
    args = parser.parse_args(["fit", "x", "-o", "m", "--image-size", "0.75"])
    assert args.image_size == 0.75 and isinstance(args.image_size, float)
    args = parser.parse_args(["fit", "x", "-o", "m", "--image-size", "300"])
    assert args.image_size == 300 and isinstance(args.image_size, int)
    for bad in ("0", "-0.5", "5.0", "nan", "big"):
        assert main(["fit", "x", "-o", "m", "--image-size", bad]) == 2


def test_cli_fit_predict_evaluate_on_mixed_sizes(scale_mvtec, tmp_path, capsys):
    import csv
    import json

    import joblib
    from PIL import Image

    from skprotoad.cli import main
    from skprotoad.datasets import load_input_masks, load_mvtec
    from skprotoad.metrics import evaluate_maps

    model = tmp_path / "model.joblib"
    argv = ["fit", scale_mvtec / "train" / "good", "-o", model, "-q", *SCALE_OPTIONS]
    assert main([str(a) for a in argv]) == 0
    det = joblib.load(model)
    assert det.image_size == 1.0 and det.crop_size is None
    assert det.network_.input_size is None

    # predict: scores as the Python API's, outputs at each image's own size
    out = tmp_path / "out"
    paths = sorted(str(p) for p in (scale_mvtec / "test").glob("*/*.png"))
    assert main(["predict", str(model), *paths, "-o", str(out), "-q"]) == 0
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == paths
    np.testing.assert_allclose(
        [float(r["score"]) for r in rows], -det.score_samples(paths), rtol=1e-6
    )
    for row in rows:
        with Image.open(row["path"]) as img, Image.open(out / row["overlay"]) as overlay:
            factor = max(1, -(-256 // min(img.size)))  # small images enlarged, to be read
            assert overlay.size == (img.size[0] * factor, img.size[1] * factor)
        with Image.open(out / row["mask"]) as mask:
            assert mask.size == img.size

    # evaluate: pixel metrics at each image's own size, as computed by hand
    results = tmp_path / "results.json"
    saved = tmp_path / "evaluated.joblib"
    argv = ["evaluate", scale_mvtec, "-o", results, "--save-model", saved, "-q", *SCALE_OPTIONS]
    assert main([str(a) for a in argv]) == 0
    assert "pixel AUROC" in capsys.readouterr().out
    report = json.loads(results.read_text())
    assert report["pixel_metrics_geometry"] == "input"
    assert report["detector"]["crop_size"] is None
    data = load_mvtec(scale_mvtec)
    det = joblib.load(saved)
    maps = det.anomaly_maps(data.test_paths, output="input")
    sizes = [m.shape for m in maps]
    assert len(set(sizes)) > 1
    masks = load_input_masks(data.test_mask_paths, sizes)
    scores = -det.score_samples(data.test_paths)
    expected = evaluate_maps(data.test_labels, scores, masks, maps)
    for key, value in expected.items():
        assert report["metrics"][key] == pytest.approx(value, abs=1e-6)


def test_split_image_score_in_scale_mode(mixed):
    """Default readout (distance maps, projection scores) on images of several sizes:
    the maps are the distance detector's, the pixel threshold their maxima's."""
    split = ProtoADDetector(
        **{**SCALE, "normalization": "image", "image_score": "projection", "contamination": 0.25}
    ).fit(mixed)
    distance = ProtoADDetector(
        **{**SCALE, "normalization": "image", "image_score": "map", "contamination": 0.25}
    ).fit(mixed)
    maps = split.anomaly_maps(mixed)
    assert [m.shape for m in maps] == [m.shape for m in distance.anomaly_maps(mixed)]
    for a, b in zip(maps, distance.anomaly_maps(mixed)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    maxima = np.array([m.max() for m in maps])
    assert split.pixel_threshold_ == pytest.approx(np.quantile(maxima, 0.75), abs=2e-5 * maxima.max())  # up to the tie margin
    assert not np.allclose(-split.score_samples(mixed), maxima)
    masks = split.predict_masks(mixed)
    flagged = split.predict(mixed) == -1
    # masks follow the verdicts: the pixels above the pixel threshold where
    # there are some, else the peak; nothing for an image passed as normal
    assert [m.any() for m in masks] == list(flagged)
    assert (flagged & (maxima > split.pixel_threshold_)).any()
    for mask, m, anomalous in zip(masks, maps, flagged):
        if anomalous and m.max() > split.pixel_threshold_:
            np.testing.assert_array_equal(mask, m > split.pixel_threshold_)
