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
