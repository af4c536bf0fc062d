"""Exported networks (TorchScript, ONNX) score exactly like the estimator."""

import json
import warnings

import numpy as np
import pytest
import torch

from skprotoad import ProtoADDetector, export

from .conftest import MAGNETIC_TILE, TINY

TOLERANCE = 1e-4


def _jit_load(path, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated", category=FutureWarning)
        return torch.jit.load(str(path), **kwargs)


def _assert_matches(model, X, maps, scores):
    np.testing.assert_allclose(maps, model.anomaly_maps(X), rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(scores, -model.score_samples(X), rtol=0, atol=TOLERANCE)


def _real_images(n_per_class=1):
    """A few magnetic-tile test images of several classes, or skip."""
    folders = sorted(p for p in (MAGNETIC_TILE / "test").glob("*") if p.is_dir())
    images = [
        path
        for folder in folders[:3]
        for path in sorted(folder.glob("*.jpg"))[:n_per_class]
    ]
    if not images:
        pytest.skip(f"no magnetic_tile images under {MAGNETIC_TILE}")
    return images


@pytest.fixture(scope="module")
def crop_detector(normal_images):
    """Tiny random backbone with a non-square crop inside a larger resize."""
    params = {**TINY, "image_size": (64, 72), "crop_size": (48, 56), "contamination": 0.1}
    return ProtoADDetector(**params).fit(normal_images[:6])


# ------------------------------------------------------------------ preprocess


def test_preprocess_is_the_estimators_input(crop_detector, synthetic):
    x = export.preprocess(crop_detector, synthetic.X_test[:3])
    assert x.shape == (3, 3, 48, 56) and x.dtype == np.float32
    assert 0 <= x.min() and x.max() <= 1
    with torch.inference_mode():
        maps, scores = crop_detector.network_(torch.from_numpy(x))
    _assert_matches(crop_detector, synthetic.X_test[:3], maps.numpy(), scores.numpy())


# ---------------------------------------------------------------- TorchScript


def test_torchscript_matches_for_any_batch_size(crop_detector, synthetic, tmp_path):
    path = export.to_torchscript(crop_detector, tmp_path / "m.pt")
    extra = {"skprotoad.json": ""}
    module = _jit_load(path, _extra_files=extra)
    X = synthetic.X_test[:4]
    x = torch.from_numpy(export.preprocess(crop_detector, X))
    for batch in (1, 4):
        with torch.inference_mode():
            maps, scores = module(x[:batch])
        _assert_matches(crop_detector, X[:batch], maps.numpy(), scores.numpy())
    meta = json.loads(extra["skprotoad.json"])
    assert meta["pixel_threshold"] == crop_detector.pixel_threshold_
    assert meta["input"]["shape"] == ["N", 3, 48, 56]
    assert meta["input"]["image_size"] == [64, 72]


def test_torchscript_refuses_other_input_sizes(crop_detector, tmp_path):
    module = _jit_load(export.to_torchscript(crop_detector, tmp_path / "m.pt", check=False))
    with pytest.raises(Exception, match=r"shape \(N, 3, 48, 56\)"):
        module(torch.rand(2, 3, 56, 48))
    with pytest.raises(Exception, match="float32"):
        module(torch.rand(2, 3, 48, 56, dtype=torch.float64))


def test_export_never_overwrites_unless_asked(crop_detector, tmp_path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.to_torchscript(crop_detector, path, check=False)
    assert path.read_bytes() == b"precious"
    export.to_torchscript(crop_detector, path, overwrite=True, check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_export_leaves_the_model_alone(crop_detector, tmp_path):
    before = {k: v.data_ptr() for k, v in crop_detector.network_.state_dict().items()}
    export.to_torchscript(crop_detector, tmp_path / "m.pt", check=False)
    after = {k: v.data_ptr() for k, v in crop_detector.network_.state_dict().items()}
    assert after == before
    assert crop_detector.network_.training is False


def test_unfitted_models_are_refused(tmp_path):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        export.to_torchscript(ProtoADDetector(), tmp_path / "m.pt")


# ----------------------------------------------------------------------- ONNX


def test_onnx_needs_the_export_extra(crop_detector, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)
    with pytest.raises(ImportError, match=r"skprotoad\[export\]"):
        export.to_onnx(crop_detector, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("opset, error, match", [
    (3, ValueError, "opset must be between 11 and"),
    (99, ValueError, "opset must be between 11 and"),
    ("x", TypeError, "opset must be an int"),
    (18.0, TypeError, "opset must be an int"),
    (True, TypeError, "opset must be an int"),
])
def test_onnx_opset_is_checked_before_export(crop_detector, tmp_path, opset, error, match):
    """opset=3 dumped the whole traced graph as its error message."""
    with pytest.raises(error, match=match) as info:
        export.to_onnx(crop_detector, tmp_path / "m.onnx", opset=opset, dynamo=False)
    assert len(str(info.value)) < 200
    assert not list(tmp_path.iterdir())


def test_export_refuses_parameters_changed_after_fit(crop_detector, tmp_path):
    import copy

    changed = copy.deepcopy(crop_detector).set_params(image_size=96)
    with pytest.raises(ValueError, match="image_size=.*changed after fit"):
        export.to_torchscript(changed, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="changed after fit"):
        export.preprocess(changed, np.zeros((1, 64, 64, 3), np.uint8))


def _run_onnx(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["maps", "scores"]
    return session.run(None, {"images": x})


def test_legacy_onnx_exporter(crop_detector, synthetic, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = export.to_onnx(crop_detector, tmp_path / "m.onnx", dynamo=False, opset=17)
    X = synthetic.X_test[:3]
    x = export.preprocess(crop_detector, X)
    for batch in (1, 3):
        maps, scores = _run_onnx(path, x[:batch])
        _assert_matches(crop_detector, X[:batch], maps, scores)


@pytest.fixture(scope="module", params=["projection", "cosine"])
def image_detector(request, normal_images):
    """The defaults' per-image normalisation, readout and position baseline,
    on the tiny random backbone."""
    params = {**TINY, "normalization": "image", "image_score": request.param,
              "position_baseline": True, "contamination": 0.1}
    return ProtoADDetector(**params).fit(normal_images[:6])


@pytest.mark.parametrize("opset", [11, 17])
def test_legacy_onnx_exports_the_default_normalization(image_detector, synthetic, tmp_path,
                                                       capfd, opset):
    """The projection and cosine readouts failed in the legacy exporter
    (addcmul with out=) and dumped the graph to stdout."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    path = export.to_onnx(image_detector, tmp_path / "m.onnx", dynamo=False, opset=opset)
    assert capfd.readouterr().out == ""
    X = synthetic.X_test[:3]
    x = export.preprocess(image_detector, X)
    for batch in (1, 3):
        maps, scores = _run_onnx(path, x[:batch])
        _assert_matches(image_detector, X[:batch], maps, scores)


class _Unexportable(torch.nn.Module):
    """What the legacy exporter cannot write: an op with out=."""

    def forward(self, images):
        out = torch.empty_like(images)
        return torch.addcmul(images, images, images, out=out), images.sum()


def test_onnx_export_failure_names_the_model(image_detector, tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(RuntimeError, match=r"ONNX export failed \(_Unexportable; "
                                           r"dynamo=False, opset=17\): AssertionError"):
        export._export_onnx(_Unexportable(), torch.rand(2, 3, 8, 8), tmp_path / "m.onnx", 17,
                            False)
    # a failing export of a detector names its settings
    network = export._cpu_copy(image_detector)
    network.forward = _Unexportable().forward
    with pytest.raises(RuntimeError, match="normalization='image', image_score="):
        export._export_onnx(network, torch.rand(2, 3, 64, 64), tmp_path / "m.onnx", 17, False)


# ------------------------------------- ImageNet backbone, synthetic and real images


@pytest.fixture(scope="module")
def lite0_files(lite0_detector, tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    files = {"torchscript": export.to_torchscript(lite0_detector, folder / "m.pt")}
    if all(_importable(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        files["onnx"] = export.to_onnx(lite0_detector, folder / "m.onnx")
    return files


def _importable(name):
    try:
        __import__(name)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", params=["synthetic", "magnetic_tile"])
def lite0_case(request, lite0_detector, synthetic):
    """Images, the exported model's input, and the estimator's maps and scores."""
    X = synthetic.X_test[[0, 1, -1]] if request.param == "synthetic" else _real_images()
    x = export.preprocess(lite0_detector, X)
    return x, lite0_detector.anomaly_maps(X), -lite0_detector.score_samples(X)


def test_lite0_torchscript_matches_on_images(lite0_case, lite0_files):
    x, maps, scores = lite0_case
    with torch.inference_mode():
        got = _jit_load(lite0_files["torchscript"])(torch.from_numpy(x))
    np.testing.assert_allclose(got[0].numpy(), maps, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(got[1].numpy(), scores, rtol=0, atol=TOLERANCE)


def test_lite0_onnx_matches_on_images(lite0_case, lite0_files):
    if "onnx" not in lite0_files:
        pytest.skip("onnx, onnxscript and onnxruntime are needed (the export extra)")
    x, maps, scores = lite0_case
    for batch in (1, 3):
        got = _run_onnx(lite0_files["onnx"], x[:batch])
        np.testing.assert_allclose(got[0], maps[:batch], rtol=0, atol=TOLERANCE)
        np.testing.assert_allclose(got[1], scores[:batch], rtol=0, atol=TOLERANCE)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(lite0_files["onnx"])).metadata_props}
    assert json.loads(meta["skprotoad"])["backbone"] == "efficientnet_lite0"


# ------------------------------------------------ the whole inference path


@pytest.fixture(scope="module")
def lite0_pipeline(lite0_detector, tmp_path_factory):
    if not all(_importable(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        pytest.skip("onnx, onnxscript and onnxruntime are needed (the export extra)")
    return export.to_onnx(lite0_detector, tmp_path_factory.mktemp("pipe") / "p.onnx",
                          pipeline=True)


def _raw_images(case, synthetic):
    """uint8 RGB images of several sizes, as a station reads them."""
    from PIL import Image

    if case == "magnetic_tile":
        return [np.asarray(Image.open(p).convert("RGB")) for p in _real_images(2)]
    images = list(synthetic.X_test[[0, 1, -2, -1]])
    # other sizes and aspects, up and down from the model's 64 px
    return images + [np.asarray(Image.fromarray(images[1]).resize(size))
                     for size in ((120, 80), (40, 52))]


@pytest.mark.parametrize("case", ["synthetic", "magnetic_tile"])
def test_lite0_pipeline_is_the_estimator_on_raw_images(case, lite0_detector, lite0_pipeline,
                                                       synthetic):
    import onnxruntime as ort

    session = ort.InferenceSession(str(lite0_pipeline), providers=["CPUExecutionProvider"])
    images = _raw_images(case, synthetic)
    maps, scores = lite0_detector.anomaly_maps(images, return_scores=True)
    flagged = lite0_detector.predict(images) == -1
    above = lite0_detector.predict_masks(images, threshold=lite0_detector.pixel_threshold_)
    for i, image in enumerate(images):
        got_map, got_score, got_flag, got_mask = session.run(None, {"images": image[None]})
        np.testing.assert_allclose(got_map[0], maps[i], rtol=0, atol=TOLERANCE)
        assert got_score[0] == pytest.approx(-scores[i], abs=TOLERANCE)
        assert bool(got_flag[0]) == flagged[i]
        expected_mask = above[i] & flagged[i]
        assert np.mean(got_mask[0] == expected_mask) > 0.999
    # a batch of one size at once: the same
    batch = np.stack(images[:3]) if case == "synthetic" else images[0][None]
    got = session.run(None, {"images": batch})
    np.testing.assert_allclose(got[0], maps[:len(batch)], rtol=0, atol=TOLERANCE)


def test_pipeline_torchscript_takes_any_image_size(crop_detector, synthetic, tmp_path):
    from PIL import Image

    module = _jit_load(export.to_torchscript(crop_detector, tmp_path / "p.pt", pipeline=True))
    for size in ((64, 64), (90, 70), (33, 47)):
        X = np.stack([np.asarray(Image.fromarray(x).resize(size)) for x in synthetic.X_test[:2]])
        with torch.inference_mode():
            maps, scores, flagged, masks = module(torch.from_numpy(X))
        np.testing.assert_allclose(maps.numpy(), crop_detector.anomaly_maps(X), atol=TOLERANCE)
        np.testing.assert_array_equal(flagged.numpy(), crop_detector.predict(X) == -1)
        assert masks.dtype == torch.bool and masks.shape == maps.shape


def test_pipeline_torchscript_refuses_images_other_than_uint8(crop_detector, synthetic,
                                                              tmp_path):
    """Float images in [0, 1] were divided by 255 again and scored, silently,
    by the saved pipeline and by the module in Python alike."""
    module = _jit_load(export.to_torchscript(crop_detector, tmp_path / "p.pt", pipeline=True))
    in_python = export.InspectionPipeline(crop_detector.network_, crop_detector.image_size,
                                          -crop_detector.offset_, crop_detector.pixel_threshold_)
    X = synthetic.X_test[:2]
    for bad in (X.astype(np.float32) / 255, X.astype(np.float32), X.astype(np.int64)):
        with pytest.raises(Exception, match="expected uint8 images"):
            module(torch.from_numpy(bad))
        with pytest.raises(ValueError, match="expected uint8 images"):
            in_python(torch.from_numpy(bad))
    for bad in (X[..., :2], X[0]):
        with pytest.raises(Exception, match=r"shape \(N, H, W, 3\)"):
            module(torch.from_numpy(np.ascontiguousarray(bad)))
    with torch.inference_mode():
        rgb = module(torch.from_numpy(X))
        grey = module(torch.from_numpy(X[..., :1]))  # grey images as (N, H, W, 1)
    _assert_matches(crop_detector, X, rgb[0].numpy(), rgb[1].numpy())
    _assert_matches(crop_detector, X[..., 0], grey[0].numpy(), grey[1].numpy())


def test_pipeline_exports_small_models(normal_images, synthetic, tmp_path):
    # The export check runs the pipeline on images shorter and narrower than
    # image_size: below 38 x 4 pixels it used to ask for negative sizes.
    params = {**TINY, "layers": (1,), "image_size": (32, 3), "crop_size": None,
              "contamination": 0.1}
    model = ProtoADDetector(**params).fit(normal_images[:4])
    X = synthetic.X_test[:2]
    module = _jit_load(export.to_torchscript(model, tmp_path / "p.pt", pipeline=True))
    with torch.inference_mode():
        maps = module(torch.from_numpy(X))[0]
    np.testing.assert_allclose(maps.numpy(), model.anomaly_maps(X), atol=TOLERANCE)
    if all(_importable(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        export.to_onnx(model, tmp_path / "p.onnx", pipeline=True)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dynamo=False), "pipeline=True needs dynamo=True"),
    (dict(opset=17), "opset >= 18"),
    (dict(pipeline="yes"), "pipeline must be True or False"),
])
def test_pipeline_needs_the_dynamo_exporter(crop_detector, tmp_path, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        export.to_onnx(crop_detector, tmp_path / "p.onnx", **{"pipeline": True, **kwargs})
    assert not list(tmp_path.iterdir())


def test_reflect_padding_exports_to_torchscript_and_onnx(normal_images, synthetic, tmp_path):
    params = {**TINY, "image_size": 64, "crop_size": None, "padding": "reflect",
              "contamination": 0.1}
    model = ProtoADDetector(**params).fit(normal_images[:6])
    X = synthetic.X_test[:3]
    x = export.preprocess(model, X)
    module = _jit_load(export.to_torchscript(model, tmp_path / "m.pt"))
    with torch.inference_mode():
        maps, scores = module(torch.from_numpy(x))
    _assert_matches(model, X, maps.numpy(), scores.numpy())
    if all(_importable(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        maps, scores = _run_onnx(export.to_onnx(model, tmp_path / "m.onnx"), x)
        _assert_matches(model, X, maps, scores)
