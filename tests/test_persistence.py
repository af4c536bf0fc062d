"""Saving and loading fitted detectors: joblib/pickle and the safe format."""

import copy
import json
import os
import pickle

import joblib
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sklearn.exceptions import NotFittedError

from skprotoad import ProtoADDetector, network, persistence

from .conftest import TINY


def _assert_same_model(loaded, original, X):
    np.testing.assert_array_equal(loaded.anomaly_maps(X), original.anomaly_maps(X))
    assert loaded.get_params() == original.get_params()
    assert loaded.offset_ == original.offset_
    assert loaded.feature_shape_ == original.feature_shape_
    assert loaded.n_train_images_ == original.n_train_images_
    np.testing.assert_array_equal(loaded.calibration_scores_, original.calibration_scores_)
    assert loaded.calibration_scores_.dtype == original.calibration_scores_.dtype


def _full_model_bytes(name):
    import timm

    return 4 * sum(p.numel() for p in timm.create_model(name).parameters())


@pytest.fixture(scope="module")
def saved(tiny_detector, tmp_path_factory):
    return persistence.save(tiny_detector, tmp_path_factory.mktemp("safe") / "tiny.safetensors")


@pytest.fixture(scope="module")
def X(synthetic):
    """A few test images, normal and defective: scoring is what these tests cost."""
    return synthetic.X_test[[0, 1, -2, -1]]


@pytest.fixture(scope="module")
def tiny_scores(tiny_detector, X):
    return tiny_detector.score_samples(X)


# ----------------------------------------------------------------- round trips


def test_safe_round_trip_is_identical(tiny_detector, saved, X):
    _assert_same_model(persistence.load(saved), tiny_detector, X)


def test_safe_round_trip_of_an_imagenet_backbone(lite0_detector, X, tmp_path):
    path = persistence.save(lite0_detector, tmp_path / "lite0.safetensors")
    _assert_same_model(persistence.load(path), lite0_detector, X)


@pytest.mark.parametrize("fixture, name", [
    ("tiny_detector", "resnet18"),
    ("lite0_detector", "efficientnet_lite0"),
])
def test_files_hold_only_the_truncated_backbone(fixture, name, request, tmp_path):
    model = request.getfixturevalue(fixture)
    joblib.dump(model, tmp_path / "m.joblib")
    persistence.save(model, tmp_path / "m.safetensors")
    full = _full_model_bytes(name)
    for file in ("m.joblib", "m.safetensors"):
        assert os.path.getsize(tmp_path / file) < 0.5 * full
    # Both formats hold the same tensors: sizes agree to a few percent.
    sizes = [os.path.getsize(tmp_path / f) for f in ("m.joblib", "m.safetensors")]
    assert max(sizes) < 1.05 * min(sizes)


def test_saving_leaves_the_model_alone(tiny_detector, tmp_path, tiny_scores, X):
    before = {k: v.data_ptr() for k, v in tiny_detector.network_.state_dict().items()}
    params = tiny_detector.get_params()
    persistence.save(tiny_detector, tmp_path / "m.safetensors")
    joblib.dump(tiny_detector, tmp_path / "m.joblib")
    assert {k: v.data_ptr() for k, v in tiny_detector.network_.state_dict().items()} == before
    assert tiny_detector.get_params() == params
    np.testing.assert_array_equal(tiny_detector.score_samples(X), tiny_scores)


def test_weights_file_is_not_needed_to_load(tiny_detector, normal_images, X, tmp_path):
    weights = tmp_path / "resnet18.pth"
    torch.save(tiny_detector.network_.embedding.backbone.model.state_dict(), weights)
    params = {**TINY, "weights": str(weights), "contamination": 0.1}
    model = ProtoADDetector(**params).fit(normal_images[:6])
    path = persistence.save(model, tmp_path / "m.safetensors")
    joblib.dump(model, tmp_path / "m.joblib")
    weights.unlink()
    for loaded in (persistence.load(path), joblib.load(tmp_path / "m.joblib")):
        assert loaded.weights == str(weights)  # the parameter is kept, for refitting
        _assert_same_model(loaded, model, X)


def test_unfitted_or_foreign_models_are_refused(tmp_path):
    with pytest.raises(NotFittedError):
        persistence.save(ProtoADDetector(), tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match="ProtoADDetector"):
        persistence.save(object(), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_parameters_without_a_json_form(tiny_detector, tmp_path):
    model = copy.deepcopy(tiny_detector)
    model.set_params(random_state=np.random.RandomState(0))
    with pytest.warns(UserWarning, match="saved as None"):
        path = persistence.save(model, tmp_path / "m.safetensors")
    assert persistence.load(path).random_state is None
    model.set_params(random_state=0, verbose=object())
    with pytest.raises(TypeError, match="verbose"):
        persistence.save(model, tmp_path / "other.safetensors")


# -------------------------------------------------------------- cross device
# There is no GPU here. What is simulated: a model whose device parameter is
# "cuda", loaded where torch.cuda.is_available() is False; and a network whose
# tensors sit in a non-default memory layout (channels_last, as GPU inference
# set-ups use). Tensors are always written from CPU copies.


def test_gpu_fitted_model_loads_on_a_cpu_only_machine(
    tiny_detector, tmp_path, monkeypatch, X, tiny_scores
):
    model = copy.deepcopy(tiny_detector).set_params(device="cuda")
    path = persistence.save(model, tmp_path / "m.safetensors")
    joblib.dump(model, tmp_path / "m.joblib")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for loaded in (persistence.load(path), joblib.load(tmp_path / "m.joblib")):
        assert loaded.device == "cuda"
        assert all(t.device.type == "cpu" for t in loaded.network_.state_dict().values())
        with pytest.raises(ValueError, match="CUDA is not available"):
            loaded.score_samples(X)
        loaded.set_params(device="cpu")
        np.testing.assert_array_equal(loaded.score_samples(X), tiny_scores)
    on_cpu = persistence.load(path, device="cpu")
    np.testing.assert_array_equal(on_cpu.score_samples(X), tiny_scores)
    # the device asked for at load is checked there, not at the first score
    for device, message in (("banana", "device must be"), ("cuda", "CUDA is not available"),
                            (5, "CUDA is not available")):
        with pytest.raises(ValueError, match=message):
            persistence.load(path, device=device)


def test_non_default_memory_layout_round_trips(tiny_detector, tmp_path, X, tiny_scores):
    model = copy.deepcopy(tiny_detector)
    model.network_.to(memory_format=torch.channels_last)
    assert not model.network_.embedding.backbone.model.conv1.weight.is_contiguous()
    path = persistence.save(model, tmp_path / "m.safetensors")
    joblib.dump(model, tmp_path / "m.joblib")
    for loaded in (persistence.load(path), joblib.load(tmp_path / "m.joblib")):
        np.testing.assert_allclose(loaded.score_samples(X), tiny_scores, atol=1e-6)


# ------------------------------------------------------------------ versions


def test_joblib_file_of_another_format_version_is_refused(tiny_detector, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(network, "FORMAT_VERSION", 999)
        joblib.dump(tiny_detector, tmp_path / "m.joblib")
    with pytest.raises(ValueError, match="format 999.*Install that version"):
        joblib.load(tmp_path / "m.joblib")


@pytest.mark.parametrize("key", ["format_version", "network_format_version"])
def test_safe_file_of_another_format_version_is_refused(saved, tmp_path, key):
    path = _rewrite(saved, tmp_path / "m.safetensors", config=lambda c: c.update({key: 999}))
    with pytest.raises(ValueError, match=f"{key} 999.*Install that version"):
        persistence.load(path)


# ---------------------------------------------------------------- overwriting


def test_save_never_overwrites_unless_asked(tiny_detector, tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        persistence.save(tiny_detector, path)
    assert path.read_bytes() == b"precious"
    persistence.save(tiny_detector, path, overwrite=True)
    assert persistence.load(path).offset_ == tiny_detector.offset_
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp files


def test_save_onto_a_folder_or_a_full_disk_names_the_users_path(tiny_detector, tmp_path,
                                                                monkeypatch):
    folder = tmp_path / "models"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=f"{folder} is a folder") as info:
        persistence.save(tiny_detector, folder, overwrite=True)
    assert ".tmp" not in str(info.value)

    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="cannot write .*m.safetensors.*No space left"):
        persistence.save(tiny_detector, folder / "m.safetensors")
    assert list(folder.iterdir()) == []  # no temporary file left


def test_save_refuses_parameters_changed_after_fit(tiny_detector, tmp_path):
    """A file must describe the model that was fitted: load would otherwise
    take the changed sigma or image_size for the fitted one."""
    for change in ({"sigma": 8.0}, {"image_size": 80}):
        model = copy.deepcopy(tiny_detector).set_params(**change)
        with pytest.raises(ValueError, match=f"{next(iter(change))}=.*changed after fit"):
            persistence.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_saved_file_has_normal_permissions(saved):
    umask = os.umask(0)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~umask


def test_saving_leaves_the_umask_alone_and_a_replaced_file_its_mode(tiny_detector, tmp_path,
                                                                    monkeypatch):
    # setting the umask, even for an instant, is a race with every other
    # thread creating files
    calls = []
    monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or 0o022)
    path = persistence.save(tiny_detector, tmp_path / "m.safetensors")
    assert calls == []
    monkeypatch.undo()
    os.chmod(path, 0o600)  # a private model stays private when replaced
    persistence.save(tiny_detector, path, overwrite=True)
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


# ------------------------------------------------------------------ tampering


def _rewrite(src, dst, config=None, tensors=None, fix_checksum=True):
    """Copy a saved model, editing its JSON config and/or tensors in place."""
    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["skprotoad"])
        data = {k: f.get_tensor(k) for k in f.keys()}
    if config:
        config(header)
    if tensors:
        tensors(data)
    if fix_checksum:
        header["tensors_sha256"] = persistence._digest(data)
        if "config_sha256" in header:
            header["config_sha256"] = persistence._config_digest(header)
    save_file(data, str(dst), metadata={"skprotoad": json.dumps(header)})
    return dst


def test_a_corrupted_threshold_is_caught_by_the_checksum(saved, tmp_path, X):
    # one digit of offset_ flipped every verdict, and the checksum covered
    # the tensors only
    def corrupt(config):
        config["fitted"]["offset_"] *= 10

    path = _rewrite(saved, tmp_path / "m.safetensors", config=corrupt, fix_checksum=False)
    with pytest.raises(ValueError, match="metadata does not match its checksum"):
        persistence.load(path)


def test_files_of_format_version_1_still_load(saved, tmp_path, X):
    # version 1 had no config_sha256
    def version_1(config):
        config["format_version"] = 1
        del config["config_sha256"]

    path = _rewrite(saved, tmp_path / "m.safetensors", config=version_1)
    np.testing.assert_array_equal(persistence.load(path).score_samples(X),
                                  persistence.load(saved).score_samples(X))


def _flip_byte(src, dst, offset_from_end):
    data = bytearray(src.read_bytes())
    data[-offset_from_end] ^= 0xFF
    dst.write_bytes(bytes(data))
    return dst


def _setter(dotted, value):
    keys = dotted.split(".")

    def edit(config):
        target = config
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return edit


def _flip_pixel_threshold(config):
    # set exactly when the image score is not the map's maximum: either way is wrong
    fitted = config["fitted"]
    fitted["pixel_threshold_"] = 0.5 if fitted.get("pixel_threshold_") is None else None


_TAMPERED_JSON = {
    "more prototypes than tensors": (
        _setter("network.n_prototypes", 17), "n_prototypes' is 17, the file holds 16"),
    "fewer layers": (_setter("network.layers", [1]), "layers \\[1\\] is not the \\[1, 2\\]"),
    "unknown backbone": (
        lambda c: [_setter(k, "no_such_net")(c) for k in ("network.backbone", "params.backbone")],
        "Unknown backbone"),
    "backbone differs from network": (
        _setter("network.backbone", "resnet34"), "backbone 'resnet34' is not the 'resnet18'"),
    "offset as a string": (_setter("fitted.offset_", "0.5"), "offset_.*must be float"),
    "feature shape of 2": (_setter("fitted.feature_shape_", [8, 8]), "must hold 3"),
    "bool as int": (_setter("fitted.n_train_images_", True), "must be int"),
    "negative sigma": (_setter("network.sigma", -1.0), "sigma"),
    "unknown parameter": (_setter("params.colour", "red"), "unknown \\['colour'\\]"),
    "bad parameter": (_setter("params.clustering", "dbscan"), "clustering must be"),
    "object parameter": (_setter("params.weights", {"a": 1}), "weights"),
    "crop differs from network": (_setter("params.crop_size", 32), "input_size"),
    "normalization differs from network": (
        _setter("params.normalization", "image"), "normalization 'patch' is not"),
    "unknown normalization": (_setter("network.normalization", "layer"), "normalization"),
    "unknown image score": (_setter("network.image_score", "mean"), "image_score"),
    "image score differs from network": (
        _setter("network.image_score", "cosine"), "image_score 'cosine' is not the 'map'"),
    "pixel threshold against the score's kind": (
        _flip_pixel_threshold, "pixel_threshold_' must be set exactly"),
    "baseline its parameters rule out": (
        _setter("network.score_baseline_shape", [16, 16]), "position_baseline=False"),
    "baseline off the patch grid": (
        lambda c: (_setter("params.position_baseline", True)(c),
                   _setter("network.score_baseline_shape", [3, 5])(c)),
        "is not the patch grid"),
    "baseline not a grid": (
        _setter("network.score_baseline_shape", [0, 5]), "is not a patch grid"),
    "feature channels": (_setter("fitted.feature_shape_", [16, 16, 5]), "channels"),
    "foreign format": (_setter("format", "something-else"), "format is"),
    "extra key": (_setter("code", "import os"), "unexpected metadata keys"),
    "missing key": (lambda c: c.pop("fitted"), "missing 'fitted'"),
}


def _both(keys, value):
    def edit(config):
        for key in keys:
            _setter(key, value)(config)

    return edit


# Header numbers that once sized allocations before they were checked (1.5 GB
# for a million prototypes, 3.3 GB for input_size 1e8, 1.6 GB for sigma 4e6,
# which then even loaded), or raised OverflowError (sigma 1e300).
_HUGE_NUMBERS = {
    "a million prototypes": (_setter("network.n_prototypes", 10**6), "holds 16 prototypes"),
    "input size 1e8": (
        _both(["network.input_size", "params.image_size", "params.crop_size"], [10**8] * 2),
        "image_size must be at most 8192"),
    "network input size 1e8": (_setter("network.input_size", [10**8] * 2), "input_size"),
    "long backbone name": (
        _both(["network.backbone", "params.backbone"], "x" * 100_000), "100000-character name"),
    "network sigma 4e6": (_setter("network.sigma", 4e6), "sigma 4000000.0 is not the 4.0"),
    "sigma 4e6": (_both(["network.sigma", "params.sigma"], 4e6), "sigma must be in"),
    "sigma 1e300": (_both(["network.sigma", "params.sigma"], 1e300), "sigma must be in"),
    "neighborhood 1e9+1": (
        _setter("network.neighborhood_size", 10**9 + 1), "neighborhood_size 1000000001"),
}


@pytest.mark.parametrize("case", list(_HUGE_NUMBERS))
def test_header_numbers_are_checked_before_anything_is_built(case, saved, tmp_path, monkeypatch):
    edit, match = _HUGE_NUMBERS[case]
    path = _rewrite(saved, tmp_path / "m.safetensors", config=edit)

    def build(description):
        raise AssertionError("the network was built from unchecked numbers")

    monkeypatch.setattr(persistence.ProtoADNetwork, "from_description", build)
    with pytest.raises(ValueError, match=match):
        persistence.load(path)


def test_mean_tensor_must_match_the_parameters(saved, tmp_path):
    def shift(data):
        data["network.embedding.mean"] += 0.1

    path = _rewrite(saved, tmp_path / "m.safetensors", tensors=shift)
    with pytest.raises(ValueError, match="embedding.mean' is not the mean"):
        persistence.load(path)


@pytest.mark.parametrize("case", list(_TAMPERED_JSON))
def test_edited_json_is_refused(case, saved, tmp_path, tiny_detector, X, tiny_scores):
    edit, match = _TAMPERED_JSON[case]
    path = _rewrite(saved, tmp_path / "m.safetensors", config=edit)
    with pytest.raises(ValueError, match=match):
        persistence.load(path)
    np.testing.assert_array_equal(tiny_detector.score_samples(X[:2]), tiny_scores[:2])


def test_non_finite_json_is_refused(saved, tmp_path):
    path = _rewrite(saved, tmp_path / "m.safetensors", config=_setter("fitted.offset_", 1.0))
    # json.dumps writes NaN for float("nan"): put one where a number was.
    with safe_open(str(path), framework="pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata()["skprotoad"].replace('"offset_": 1.0', '"offset_": NaN')
    save_file(data, str(path), metadata={"skprotoad": header})
    with pytest.raises(ValueError, match="non-finite number NaN"):
        persistence.load(path)


def test_edited_tensor_shapes_and_values_are_refused(saved, tmp_path):
    name = "network.prototype_conv.weight"

    def reshape(data):
        data[name] = data[name][:-1].contiguous()

    path = _rewrite(saved, tmp_path / "a.safetensors", tensors=reshape)
    with pytest.raises(ValueError, match="'n_prototypes' is 16, the file holds 15 prototypes"):
        persistence.load(path)

    conv = "network.embedding.backbone.model.conv1.weight"

    def reshape_backbone(data):
        data[conv] = data[conv][:-1].contiguous()

    path = _rewrite(saved, tmp_path / "e.safetensors", tensors=reshape_backbone)
    with pytest.raises(ValueError, match="conv1.weight.*shape"):
        persistence.load(path)

    def to_double(data):
        data[name] = data[name].double()

    path = _rewrite(saved, tmp_path / "b.safetensors", tensors=to_double)
    with pytest.raises(ValueError, match="is F64.*needs F32"):
        persistence.load(path)

    def poison(data):
        data[name][0, 0] = float("nan")

    path = _rewrite(saved, tmp_path / "c.safetensors", tensors=poison)
    with pytest.raises(ValueError, match="non-finite values"):
        persistence.load(path)

    path = _rewrite(saved, tmp_path / "d.safetensors", tensors=lambda d: d.pop(name))
    with pytest.raises(ValueError, match="missing"):
        persistence.load(path)


@pytest.mark.parametrize("offset_from_end", [1, 1000, 100_000])
def test_flipped_bytes_in_the_tensors_are_caught(saved, tmp_path, offset_from_end):
    path = _flip_byte(saved, tmp_path / "m.safetensors", offset_from_end)
    with pytest.raises(ValueError, match="checksum"):
        persistence.load(path)


def test_flipped_byte_in_the_header_is_caught(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[data.index(b"offset_")] ^= 0x01  # a key name in the JSON
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="not a valid skprotoad model"):
        persistence.load(tmp_path / "m.safetensors")


@pytest.mark.parametrize("keep", [0, 4, 100, 0.5, -1])
def test_truncated_files_are_refused(saved, tmp_path, keep):
    data = saved.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    (tmp_path / "m.safetensors").write_bytes(data[:n])
    with pytest.raises(ValueError, match="not a valid skprotoad model"):
        persistence.load(tmp_path / "m.safetensors")


def test_other_files_are_refused_with_a_hint(tiny_detector, tmp_path):
    joblib.dump(tiny_detector, tmp_path / "m.joblib")
    with pytest.raises(ValueError, match="joblib.load"):
        persistence.load(tmp_path / "m.joblib")
    save_file({"w": torch.zeros(3)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not one written by skprotoad"):
        persistence.load(tmp_path / "plain.safetensors")
    with pytest.raises(FileNotFoundError):
        persistence.load(tmp_path / "absent.safetensors")


def test_loading_runs_no_code(tiny_detector, tmp_path):
    # A pickle payload placed where a string belongs stays a string.
    payload = pickle.dumps(os.system).decode("latin-1")
    path = _rewrite(
        persistence.save(tiny_detector, tmp_path / "m.safetensors"),
        tmp_path / "evil.safetensors",
        config=_setter("params.weights", payload),
    )
    assert persistence.load(path).weights == payload


# ------------------------------------------- files of pre-release versions


@pytest.mark.parametrize(
    "params, network_keys, fitted_keys",
    [
        (("n_jobs", "memory", "normalization", "image_score"),
         ("normalization", "image_score"), ("pixel_threshold_",)),
        (("neighborhood_size",), ("neighborhood_size",), ()),
    ],
)
def test_models_of_pre_release_versions_are_refused(tiny_detector, saved, tmp_path,
                                                    params, network_keys, fitted_keys):
    """Files and pickles written before a parameter existed (development
    versions before the first release): refused with a clear message."""

    def drop(config):
        for name in params:
            config["params"].pop(name)
        for name in network_keys:
            config["network"].pop(name)
        for name in fitted_keys:
            config["fitted"].pop(name)

    path = _rewrite(saved, tmp_path / "old.safetensors", config=drop)
    with pytest.raises(ValueError, match="pre-release development version.*refit"):
        persistence.load(path)
    state = tiny_detector.__getstate__()
    for name in params:
        del state[name]
    for name in network_keys:
        del state["_network_state"][name]
    unpickled = ProtoADDetector.__new__(ProtoADDetector)
    with pytest.raises(ValueError, match="pre-release development version.*refit"):
        unpickled.__setstate__(state)


def test_pickles_of_pre_release_versions_are_refused(tiny_detector):
    """Their pixel threshold was a private attribute, ``_pixel_threshold``."""
    state = tiny_detector.__getstate__()
    state["_pixel_threshold"] = state.pop("pixel_threshold_")
    with pytest.raises(ValueError, match="pre-release development version.*refit"):
        ProtoADDetector.__new__(ProtoADDetector).__setstate__(state)


def test_memory_is_not_saved_and_loading_touches_no_folder(tiny_detector, saved, tmp_path):
    """A cache folder is a path of the machine that saved the model: it is
    dropped on save, and a file that names one (saved by an earlier version,
    or edited) loads without creating or needing it."""
    model = copy.deepcopy(tiny_detector)
    model.set_params(memory=str(tmp_path / "cache"), n_jobs=2)
    loaded = persistence.load(persistence.save(model, tmp_path / "a.safetensors"))
    assert loaded.memory is None and loaded.n_jobs == 2
    model.set_params(memory=joblib.Memory(tmp_path / "cache", verbose=0))
    assert persistence.load(persistence.save(model, tmp_path / "b.safetensors")).memory is None

    elsewhere = tmp_path / "other_machine" / "cache"
    path = _rewrite(saved, tmp_path / "c.safetensors",
                    config=_setter("params.memory", str(elsewhere)))
    assert persistence.load(path).memory is None
    assert not (tmp_path / "other_machine").exists()
    joblib.dump(model, tmp_path / "m.joblib")  # pickle keeps the Memory as it is
    assert str(joblib.load(tmp_path / "m.joblib").memory.location) == str(tmp_path / "cache")


def test_reflect_padding_round_trips_and_is_checked(normal_images, tmp_path, X):
    model = ProtoADDetector(**{**TINY, "padding": "reflect"}).fit(normal_images)
    scores = model.score_samples(X)
    assert not np.array_equal(scores, ProtoADDetector(**TINY).fit(normal_images).score_samples(X))
    path = persistence.save(model, tmp_path / "m.safetensors")
    joblib.dump(model, tmp_path / "m.joblib")
    for loaded in (persistence.load(path), joblib.load(tmp_path / "m.joblib")):
        assert loaded.padding == "reflect" == loaded.network_.embedding.padding
        np.testing.assert_array_equal(loaded.score_samples(X), scores)
    # the network in the file must be the one the parameters describe
    bad = _rewrite(path, tmp_path / "bad.safetensors",
                   config=lambda c: c["network"].update({"padding": "zeros"}))
    with pytest.raises(ValueError, match="padding"):
        persistence.load(bad)


@pytest.fixture(scope="module")
def euclidean_image_model(normal_images):
    """Distances in the plain metric: what every model of network format 1 was."""
    return ProtoADDetector(**{**TINY, "normalization": "image", "map_metric": "euclidean"}).fit(
        normal_images)


def test_files_of_network_format_1_load_with_the_euclidean_map(euclidean_image_model,
                                                               tmp_path, X):
    # saved before map_metric and the map_whitening tensor existed
    saved = persistence.save(euclidean_image_model, tmp_path / "new.safetensors")

    def version_1(config):
        config["network_format_version"] = 1
        for key in ("map_metric", "score_whitening"):
            del config["params"][key]
        del config["network"]["map_whitening_shape"]
        del config["network"]["score_whitening"]

    def without_whitening(tensors):
        del tensors["network.map_whitening"]

    path = _rewrite(saved, tmp_path / "old.safetensors", config=version_1,
                    tensors=without_whitening)
    loaded = persistence.load(path)
    assert loaded.map_metric == "euclidean"
    _assert_same_model(loaded, euclidean_image_model, X)


def test_files_of_network_format_2_load_with_the_plain_score_metric(lite0_detector, tmp_path,
                                                                     synthetic):
    # saved before score_whitening existed: the image score in the plain metric
    assert lite0_detector.score_whitening == 0.0
    saved = persistence.save(lite0_detector, tmp_path / "new.safetensors")

    def version_2(config):
        config["network_format_version"] = 2
        del config["params"]["score_whitening"]
        del config["network"]["score_whitening"]

    loaded = persistence.load(_rewrite(saved, tmp_path / "old.safetensors", config=version_2))
    assert loaded.score_whitening == 0.0 == loaded.network_.score_whitening
    _assert_same_model(loaded, lite0_detector, synthetic.X_test)


@pytest.mark.parametrize("edit, message", [
    (_setter("network.score_whitening", 0.5), "network 'score_whitening' 0.5 is not the 0.0"),
    (_setter("network.score_whitening", "half"), "score_whitening must be a number"),
    (_setter("network.score_whitening", 2.0), r"score_whitening must be in \[0, 1\]"),
])
def test_a_score_whitening_that_disagrees_is_refused(lite0_detector, tmp_path, edit, message):
    saved = persistence.save(lite0_detector, tmp_path / "s.safetensors")
    path = _rewrite(saved, tmp_path / "edited.safetensors", config=edit)
    with pytest.raises(ValueError, match=message):
        persistence.load(path)


@pytest.mark.parametrize("edit, message", [
    (_setter("params.map_metric", "euclidean"), "does not match its parameters' map_metric"),
    (_setter("network.map_whitening_shape", [0, 0]), "does not match its parameters' map_metric"),
    (_setter("network.map_whitening_shape", [24, 23]), "is not square"),
    (_setter("network.map_whitening_shape", [23, 23]), "is not its tensor's shape"),
])
def test_a_map_whitening_that_disagrees_is_refused(lite0_detector, tmp_path, edit, message):
    saved = persistence.save(lite0_detector, tmp_path / "w.safetensors")
    path = _rewrite(saved, tmp_path / "edited.safetensors", config=edit)
    with pytest.raises(ValueError, match=message):
        persistence.load(path)
