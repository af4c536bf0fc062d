"""Save and load fitted detectors in a format that runs no code when loaded.

:func:`save` writes one `safetensors <https://github.com/huggingface/safetensors>`_
file: the network's tensors (the backbone truncated after the last stage used,
and the prototypes) plus ``calibration_scores_``, with everything else (the
constructor parameters, the fitted scalars, the network's description and
versions) as JSON in the file's metadata header. :func:`load` parses that header
and the raw tensor bytes, nothing else: unlike ``joblib.load`` / ``pickle.load``
it cannot run code from the file, so it is the format to use for models that come
from elsewhere.

Before a model is returned, :func:`load` checks the header's size, the format
version, the JSON's keys, types and finite values, every number the network
is built from against the parameters and the tensors' shapes (before building
anything), the tensors' names, shapes and dtypes against the network rebuilt
from the description, and a SHA-256 checksum of the tensor bytes. A file that
fails any check raises :class:`ValueError`; no partly loaded model is ever
returned, and nothing on disk but the file is read or created (the ``memory``
cache folder is not saved). The checksum catches corruption (a truncated download,
flipped bits), not deliberate forgery: whoever edits a file can recompute it.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted

from ._files import refuse_existing, write_new_file
from ._images import fixed_input_size
from ._validation import (
    check_params, check_unchanged_since_fit, params_missing_from_format,
    record_fitted_settings, torch_device, validate,
)
from ._version import __version__
from .detector import ProtoADDetector
from .network import FORMAT_VERSION as NETWORK_FORMAT_VERSION
from .network import READABLE_FORMAT_VERSIONS as READABLE_NETWORK_FORMAT_VERSIONS
from .network import (
    NETWORK_CONSTRAINTS, ProtoADNetwork, all_finite, effective_image_score, effective_map_metric,
    effective_score_whitening,
)

__all__ = ["save", "load", "FORMAT_VERSION"]

#: Version of the file layout written by :func:`save`; bumped when it changes.
#: The network description inside carries its own version,
#: :data:`skprotoad.network.FORMAT_VERSION`, which the detector's pickles share.
FORMAT_VERSION = 2
#: Versions :func:`load` reads: 1 had no ``config_sha256`` (its checksum
#: covered the tensors only).
_READABLE_FORMAT_VERSIONS = (1, 2)

_FORMAT_NAME = "skprotoad-safetensors"
_METADATA_KEY = "skprotoad"
_NETWORK_PREFIX = "network."
_CALIBRATION = "calibration_scores_"
_PROTOTYPES = _NETWORK_PREFIX + "prototype_conv.weight"
_MAX_HEADER_BYTES = 8 << 20
_PRE_RELEASE = (
    "it was saved by a pre-release development version of skprotoad ({}), whose files "
    "this version does not read; refit the model"
)
_JOBLIB_HINT = (
    "A joblib file needs joblib.load, which can run code: use it only for files you trust"
)
# Longest backbone name accepted (timm's are under 60 characters).
_MAX_NAME_LENGTH = 200
# the largest score-baseline grid a file may declare (a 16k-pixel side at stride 4)
_MAX_GRID = 4096
# safetensors' names of the dtypes a detector holds.
_DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float64: "F64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


# --------------------------------------------------------------------- save
def save(model, path, *, overwrite=False):
    """Save a fitted :class:`~skprotoad.ProtoADDetector` to one safetensors file.

    Parameters
    ----------
    model : ProtoADDetector
        A fitted detector; it is not modified (its network stays on its device).
    path : str or os.PathLike
        File to write, conventionally ``*.safetensors``. Written to a temporary
        file next to it first, so an interrupted save leaves no partial file.
    overwrite : bool, default=False
        Replace ``path`` if it exists; otherwise an existing file is an error.

    Returns
    -------
    path : pathlib.Path
        The file written.

    Raises
    ------
    FileExistsError
        When ``path`` exists and ``overwrite`` is False.
    OSError
        When the file cannot be written (a full disk, ``path`` a folder); the
        message names ``path``.
    ValueError
        When a parameter the fitted network embodies (``image_size``,
        ``sigma`` ...) was changed with ``set_params`` after fit.
    TypeError
        When a parameter has no JSON form (e.g. a custom object). A
        ``numpy.random.RandomState`` as ``random_state`` is stored as ``None``
        with a warning, since only refitting uses it. ``memory`` (a cache
        folder of this machine) is always stored as ``None``.

    Examples
    --------
    >>> from skprotoad.persistence import save, load
    >>> save(detector, "model.safetensors")  # doctest: +SKIP
    >>> detector = load("model.safetensors")  # doctest: +SKIP
    """
    if not isinstance(model, ProtoADDetector):
        raise TypeError(f"model must be a ProtoADDetector, got {type(model).__name__}.")
    check_is_fitted(model, "network_")
    check_unchanged_since_fit(model)
    path = Path(path)
    refuse_existing(path, overwrite)
    tensors = _collect_tensors(model)
    config = {
        "format": _FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "network_format_version": NETWORK_FORMAT_VERSION,
        "skprotoad_version": __version__,
        "torch_version": torch.__version__,
        "timm_version": _timm_version(),
        "params": _params_to_json(model.get_params(deep=False)),
        "fitted": {
            "offset_": float(model.offset_),
            # height and width are None with a scale-factor image_size
            "feature_shape_": [None if v is None else int(v) for v in model.feature_shape_],
            "n_train_images_": int(model.n_train_images_),
            # null unless the image score is not the map's maximum
            "pixel_threshold_": (
                None if model.network_.score_is_map_max else float(model.pixel_threshold_)
            ),
        },
        "network": model.network_.describe(),
        "tensors_sha256": _digest(tensors),
    }
    config["config_sha256"] = _config_digest(config)
    # Round-trip through JSON and validate what load() will see, so that save
    # never writes a file that load() refuses.
    header = json.dumps(config, allow_nan=False, sort_keys=True)
    _check_config(json.loads(header))
    _check_consistency(
        json.loads(header), {k: (_DTYPE_NAMES[t.dtype], tuple(t.shape)) for k, t in tensors.items()}
    )

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    def write(tmp):
        try:
            save_file(tensors, tmp, metadata={_METADATA_KEY: header})
        except SafetensorError as exc:  # how safetensors reports a full disk
            raise OSError(f"cannot write {path}: {exc}") from exc

    return write_new_file(path, write, overwrite)


def _collect_tensors(model):
    # Copies on the CPU, contiguous (as safetensors needs): a GPU-fitted model
    # saves like a CPU one and the model's own tensors are left alone.
    state = model.network_.state_dict()
    tensors = {
        _NETWORK_PREFIX + name: t.detach().to("cpu", copy=True).contiguous()
        for name, t in state.items()
    }
    tensors[_CALIBRATION] = torch.tensor(
        np.asarray(model.calibration_scores_, dtype=np.float64).reshape(-1)
    )
    return tensors


def _params_to_json(params):
    out = {}
    for name, value in params.items():
        if name == "random_state" and isinstance(value, np.random.RandomState):
            warnings.warn(
                "random_state is a RandomState instance, which the safe format cannot "
                "hold; it is saved as None (it only matters when refitting).",
                UserWarning,
                stacklevel=3,
            )
            value = None
        if name == "memory":
            # a cache folder of this machine: meaningless elsewhere, and load
            # must not create or depend on it
            value = None
        out[name] = _json_value(name, value)
    return out


def _json_value(name, value):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (tuple, list, np.ndarray)):
        return [_json_value(name, v) for v in np.asarray(value, dtype=object).ravel()]
    raise TypeError(
        f"Parameter {name}={value!r} cannot be saved in the safe format, which holds "
        f"only JSON values; use joblib for this model."
    )


def _timm_version():
    import timm

    return timm.__version__


def _config_digest(config):
    """SHA-256 of the config's canonical JSON, less ``config_sha256`` itself:
    the thresholds and parameters, which decide every verdict, are checked
    for corruption as the tensors are. JSON reads back Python floats exactly,
    so a loaded config digests as the saved one did."""
    rest = {k: v for k, v in config.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(rest, allow_nan=False, sort_keys=True).encode()).hexdigest()


def _digest(tensors):
    """SHA-256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# --------------------------------------------------------------------- load
def load(path, *, device=None):
    """Load a detector written by :func:`save`, running no code from the file.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`save`.
    device : str, default=None
        Replaces the saved ``device`` parameter, e.g. ``"cpu"`` for a model
        fitted with ``device="cuda"`` and loaded where there is no GPU. The
        tensors are always loaded on the CPU; the detector moves them to its
        device when it scores.

    Returns
    -------
    model : ProtoADDetector
        Fitted, scoring exactly as the saved one did. Its backbone is rebuilt
        with ``weights=None`` and filled from the file, so a ``weights`` path
        or download used at fit time is not needed; the ``weights`` parameter
        keeps its saved value (refitting would use it).

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When ``device`` is not a device of this machine, or the file is not
        a valid model of this format version: truncated, corrupted, edited,
        or written by an incompatible version of skprotoad (the message says
        which check failed).

    Examples
    --------
    >>> from skprotoad.persistence import load
    >>> detector = load("model.safetensors", device="cpu")  # doctest: +SKIP
    >>> detector.predict(images)  # doctest: +SKIP
    """
    if device is not None:
        torch_device(device)  # the device asked for here must exist here: say so now
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No model file at {path}.")
    try:
        return _load(path, device)
    except _Invalid as exc:
        raise ValueError(f"{path} is not a valid skprotoad model file: {exc}") from None


class _Invalid(Exception):
    """A check of the file failed; :func:`load` turns it into a ValueError."""


def _load(path, device):
    from safetensors import SafetensorError, safe_open

    _check_header_size(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            layout = {
                k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                for k in f.keys()
            }
            config = _parse_header(metadata)
            _check_config_digest(config)
            _check_config(config)
            # every number the network is built from, against the parameters
            # and the tensors' shapes, before anything is allocated from it
            _check_consistency(config, layout)
            network = _rebuild(config["network"])
            expected = {
                _NETWORK_PREFIX + k: (_DTYPE_NAMES.get(v.dtype, str(v.dtype)), tuple(v.shape))
                for k, v in network.state_dict().items()
            }
            expected[_CALIBRATION] = ("F64", layout.get(_CALIBRATION, ("F64", (0,)))[1])
            if "map_whitening_shape" not in config["network"]:  # format 1: no whitening
                del expected[_NETWORK_PREFIX + "map_whitening"]
            _check_layout(layout, expected)
            tensors = {k: f.get_tensor(k) for k in sorted(layout)}
    except SafetensorError as exc:
        raise _Invalid(f"{exc} (truncated or damaged? {_JOBLIB_HINT})") from None
    if _digest(tensors) != config["tensors_sha256"]:
        raise _Invalid("the tensor data does not match its checksum (corrupted file)")
    _check_tensor_values(tensors, config)
    state = {k[len(_NETWORK_PREFIX):]: v for k, v in tensors.items() if k != _CALIBRATION}
    network.load_described_state(state, config["network"])
    return _assemble(config, network.eval(), tensors[_CALIBRATION], device)


def _check_header_size(path):
    # safetensors accepts headers of up to 100 MB; a model's is a few kB (the
    # tensors' names and shapes, and the JSON config)
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) == 8 and int.from_bytes(head, "little") > _MAX_HEADER_BYTES:
        raise _Invalid(
            f"its header would be {int.from_bytes(head, 'little')} bytes, more than the "
            f"{_MAX_HEADER_BYTES} any model needs (not a safetensors file? {_JOBLIB_HINT})"
        )


def _parse_header(metadata):
    if _METADATA_KEY not in metadata:
        raise _Invalid(
            f"no {_METADATA_KEY!r} entry in the safetensors metadata (a safetensors "
            f"file, but not one written by skprotoad.persistence.save)"
        )
    try:
        config = json.loads(metadata[_METADATA_KEY], parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"the metadata is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise _Invalid("the metadata JSON is not an object")
    return config


def _check_config_digest(config):
    # before _check_config, which edits the config it checks
    if config.get("format_version") == 1:  # written before the config had a checksum
        return
    digest = _require(config, "config_sha256", str)
    if _config_digest(config) != digest:
        raise _Invalid("the metadata does not match its checksum (corrupted file)")


def _refuse_constant(name):
    raise _Invalid(f"the metadata holds the non-finite number {name}")


# ------------------------------------------------------------- JSON checks
def _check_config(config):
    _require(config, "format", str)
    if config["format"] != _FORMAT_NAME:
        raise _Invalid(f"format is {config['format']!r}, expected {_FORMAT_NAME!r}")
    saved_by = config.get("skprotoad_version", "?")
    versions = (
        ("format_version", FORMAT_VERSION), ("network_format_version", NETWORK_FORMAT_VERSION)
    )
    for key, ours in versions:
        version = _require(config, key, int)
        readable = (_READABLE_FORMAT_VERSIONS if key == "format_version"
                    else READABLE_NETWORK_FORMAT_VERSIONS)
        if version not in readable:
            raise _Invalid(
                f"it was saved by skprotoad {saved_by} with {key} {version}; this is "
                f"skprotoad {__version__} ({key} {ours}). Install that version to "
                f"load it, or refit"
            )
    for key in ("skprotoad_version", "torch_version", "timm_version", "tensors_sha256"):
        _require(config, key, str)
    params = _require(config, "params", dict)
    # save writes None; any other value (an edited file) is a cache folder of
    # another machine, which checking the parameters would create
    params["memory"] = None
    # parameters added since its format, at the values it was fitted with
    missing = params_missing_from_format(config["network_format_version"])
    params.update({k: v for k, v in missing.items() if k not in params})
    _check_params(params, saved_by)
    _check_fitted(_require(config, "fitted", dict))
    _check_network(_require(config, "network", dict), saved_by, config["network_format_version"])
    extra = set(config) - {
        "format", "format_version", "network_format_version", "skprotoad_version",
        "torch_version", "timm_version", "params", "fitted", "network", "tensors_sha256",
        *(("config_sha256",) if config["format_version"] >= 2 else ()),
    }
    if extra:
        raise _Invalid(f"unexpected metadata keys {sorted(extra)}")


def _require(mapping, key, kind, where=""):
    if key not in mapping:
        raise _Invalid(f"missing {where}{key!r}")
    value = mapping[key]
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(kind, isinstance(value, kind))
    if not ok:
        raise _Invalid(f"{where}{key!r} must be {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise _Invalid(f"{where}{key!r} must be finite, got {value!r}")
    return value


def _require_list(mapping, key, kind, length=None, where="", positive=False):
    values = _require(mapping, key, list, where)
    if length is not None and len(values) != length:
        raise _Invalid(f"{where}{key!r} must hold {length} values, got {values!r}")
    for i in range(len(values)):
        v = _require({i: values[i]}, i, kind, f"{where}{key}")
        if positive and v <= 0:
            raise _Invalid(f"{where}{key!r} must be positive, got {values!r}")
    return values


def _check_params(params, saved_by):
    names = set(ProtoADDetector().get_params(deep=False))
    if not names <= set(params):
        # every parameter is saved: one that is missing was added since
        raise _Invalid(_PRE_RELEASE.format(saved_by))
    if set(params) != names:
        raise _Invalid(f"params do not match ProtoADDetector's: unknown {sorted(set(params) - names)}")
    for name, value in params.items():
        if not _is_json_param(value):
            raise _Invalid(f"parameter {name!r} has an unexpected value {value!r}")
    device = params["device"]
    if not isinstance(device, str):
        raise _Invalid(f"parameter 'device' must be a string, got {device!r}")
    try:
        if device != "auto":
            torch.device(device)
        # The device is checked above: validating it here would reject a
        # GPU-fitted model on a machine without a GPU.
        check_params(ProtoADDetector(**{**_params_from_json(params), "device": "cpu"}))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise _Invalid(f"invalid parameters: {exc}") from None


def _is_json_param(value):
    if value is None or isinstance(value, (bool, str, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        for v in value
    )


def _params_from_json(params):
    # JSON has no tuples; every sequence parameter (layers, sizes, mean, std)
    # is a tuple by default.
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def _check_fitted(fitted):
    where = "fitted "
    _require(fitted, "offset_", float, where)
    shape = _require(fitted, "feature_shape_", list, where)
    # (height, width, channels); height and width are both null when the
    # model's input size varies (a scale-factor image_size)
    if len(shape) == 3 and shape[0] is None and shape[1] is None:
        _require_list({"feature_shape_": shape[2:]}, "feature_shape_", int, 1, where, True)
    else:
        _require_list(fitted, "feature_shape_", int, 3, where, positive=True)
    if _require(fitted, "n_train_images_", int, where) < 1:
        raise _Invalid("fitted 'n_train_images_' must be at least 1")
    # null (or absent) when it is -offset_: the image score is the map's maximum
    if fitted.get("pixel_threshold_") is not None:
        _require(fitted, "pixel_threshold_", float, where)
    required = {"offset_", "feature_shape_", "n_train_images_"}
    if not required <= set(fitted) <= required | {"pixel_threshold_"}:
        raise _Invalid(f"unexpected fitted keys {sorted(fitted)}")


def _check_network(network, saved_by, version):
    where = "network "
    required = {
        "backbone", "layers", "mean", "std", "alignment", "neighborhood_size", "normalization",
        "padding", "image_score", "score_baseline_shape", "input_size", "sigma", "n_prototypes",
        *(("map_whitening_shape",) if version >= 2 else ()),
        *(("score_whitening",) if version >= 3 else ()),
    }
    if not required <= set(network):
        raise _Invalid(_PRE_RELEASE.format(saved_by))
    if set(network) != required:
        raise _Invalid(f"network keys {sorted(network)} differ from {sorted(required)}")
    if len(_require(network, "backbone", str, where)) > _MAX_NAME_LENGTH:
        raise _Invalid(f"network 'backbone' is a {len(network['backbone'])}-character name")
    _require_list(network, "layers", int, None, where)
    _require_list(network, "mean", float, 3, where)
    _require_list(network, "std", float, 3, where, positive=True)
    try:
        validate(NETWORK_CONSTRAINTS, network)
    except ValueError as exc:
        raise _Invalid(f"network {exc}") from None
    if network["input_size"] is not None:  # null: any input size
        _require_list(network, "input_size", int, 2, where, positive=True)
    if _require(network, "sigma", float, where) < 0:
        raise _Invalid("network 'sigma' must be >= 0")
    if _require(network, "n_prototypes", int, where) < 1:
        raise _Invalid("network 'n_prototypes' must be at least 1")
    baseline = _require_list(network, "score_baseline_shape", int, 2, where)
    if min(baseline) < 0 or max(baseline) > _MAX_GRID or (0 in baseline and max(baseline)):
        raise _Invalid(f"network 'score_baseline_shape' {baseline} is not a patch grid")
    if version >= 2:
        whitening = _require_list(network, "map_whitening_shape", int, 2, where)
        if whitening[0] != whitening[1] or whitening[0] < 0:
            raise _Invalid(f"network 'map_whitening_shape' {whitening} is not square")


def _check_consistency(config, layout):
    """The network description against the parameters and the tensors' shapes.

    Run on the header alone, before the network is built: each number that
    sizes an allocation (prototypes, input size, sigma) must agree with the
    validated parameters or with tensors that are in the file.
    """
    params, fitted, network = config["params"], config["fitted"], config["network"]
    model = ProtoADDetector(**_params_from_json(params))
    expected = {
        "backbone": model.backbone,
        "layers": list(model.layers),
        "alignment": model.alignment,
        "neighborhood_size": model.neighborhood_size,
        "normalization": model.normalization,
        "padding": model.padding,
        "image_score": effective_image_score(model.normalization, model.image_score),
        "input_size": fixed_input_size(model.image_size, model.crop_size),
        "sigma": float(model.sigma),
    }
    if expected["input_size"] is not None:
        expected["input_size"] = list(expected["input_size"])
    for key, value in expected.items():
        described = network[key]
        if described != value:
            raise _Invalid(
                f"the network's {key} {described!r} is not the {value!r} of its parameters"
            )
    for key in ("mean", "std"):
        if not np.array_equal(
            np.float32(network[key]), np.float32(np.asarray(params[key], dtype=float))
        ):
            raise _Invalid(f"the network's {key} is not the {key} of its parameters")
    if _PROTOTYPES not in layout or len(layout[_PROTOTYPES][1]) != 4:
        raise _Invalid(f"the prototypes, a 4-D tensor {_PROTOTYPES!r}, are missing")
    n_prototypes, n_channels = layout[_PROTOTYPES][1][:2]
    if network["n_prototypes"] != n_prototypes:
        raise _Invalid(
            f"network 'n_prototypes' is {network['n_prototypes']}, the file holds "
            f"{n_prototypes} prototypes"
        )
    if fitted["feature_shape_"][2] != n_channels:
        raise _Invalid(
            f"fitted 'feature_shape_' {fitted['feature_shape_']} does not match the "
            f"prototypes' {n_channels} channels"
        )
    if (fitted["feature_shape_"][0] is None) != (network["input_size"] is None):
        raise _Invalid(
            f"fitted 'feature_shape_' {fitted['feature_shape_']} does not match the "
            f"network's input size {network['input_size']}"
        )
    baseline = network["score_baseline_shape"]
    if baseline != [0, 0]:
        if not model.position_baseline:
            raise _Invalid("the network has a score baseline, its parameters position_baseline=False")
        grid = fitted["feature_shape_"][:2]
        if grid[0] is not None and baseline != grid:
            raise _Invalid(
                f"network 'score_baseline_shape' {baseline} is not the patch grid {grid}"
            )
    whitening = network.get("map_whitening_shape", [0, 0])  # format 1: none
    if (whitening != [0, 0]) != (
        effective_map_metric(model.normalization, model.map_metric) == "whitened"
    ):
        raise _Invalid(
            f"network 'map_whitening_shape' {whitening} does not match its parameters' "
            f"map_metric={model.map_metric!r} (normalization={model.normalization!r})"
        )
    score_whitening = network.get("score_whitening", 0.0)  # formats 1, 2: plain
    expected_whitening = effective_score_whitening(
        model.normalization, model.image_score, model.map_metric, model.score_whitening)
    if score_whitening != expected_whitening:
        raise _Invalid(
            f"network 'score_whitening' {score_whitening!r} is not the "
            f"{expected_whitening!r} of its parameters"
        )
    if whitening != [0, 0] and list(layout.get(_NETWORK_PREFIX + "map_whitening",
                                               (None, []))[1]) != whitening:
        raise _Invalid(f"network 'map_whitening_shape' {whitening} is not its tensor's shape")
    score_is_map_max = baseline == [0, 0] and (
        expected["image_score"] == "map" or expected["normalization"] == "patch"
    )
    if (fitted.get("pixel_threshold_") is None) != score_is_map_max:
        raise _Invalid(
            "fitted 'pixel_threshold_' must be set exactly when the image score is not "
            "the map's maximum (normalization='image' with an image_score other than "
            "'map', or a score baseline)"
        )


# ---------------------------------------------------------- tensor checks
def _rebuild(description):
    try:
        return ProtoADNetwork.from_description(description)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise _Invalid(f"cannot rebuild the network it describes: {exc}") from None


def _check_layout(layout, expected):
    missing = sorted(set(expected) - set(layout))
    extra = sorted(set(layout) - set(expected))
    if missing or extra:
        raise _Invalid(
            f"its tensors do not fit the network: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''} (saved by another timm version?)"
        )
    for name in sorted(expected):
        if layout[name] != expected[name]:
            raise _Invalid(
                f"tensor {name!r} is {layout[name][0]} of shape {layout[name][1]}, "
                f"the network needs {expected[name][0]} of shape {expected[name][1]}"
            )
    if len(layout[_CALIBRATION][1]) != 1:
        raise _Invalid(f"{_CALIBRATION!r} must be 1-D, got shape {layout[_CALIBRATION][1]}")


def _check_tensor_values(tensors, config):
    for name, t in tensors.items():
        if t.is_floating_point() and not all_finite(t):
            raise _Invalid(f"tensor {name!r} holds non-finite values")
    if len(tensors[_CALIBRATION]) > config["fitted"]["n_train_images_"]:
        raise _Invalid(f"more {_CALIBRATION} than training images")
    for key in ("mean", "std"):
        # the tensors normalise the images; the parameters must say the same
        values = tensors[f"{_NETWORK_PREFIX}embedding.{key}"].reshape(-1).numpy()
        if not np.array_equal(values, np.float32(config["params"][key])):
            raise _Invalid(f"tensor 'embedding.{key}' is not the {key} of its parameters")


def _assemble(config, network, calibration, device):
    params = _params_from_json(config["params"])
    if device is not None:
        params["device"] = device
    model = ProtoADDetector(**params)
    fitted = config["fitted"]
    model.network_ = network
    model.offset_ = float(fitted["offset_"])
    model.calibration_scores_ = calibration.numpy().astype(np.float64)
    model.feature_shape_ = tuple(fitted["feature_shape_"])
    model.n_train_images_ = fitted["n_train_images_"]
    own = fitted.get("pixel_threshold_")
    model.pixel_threshold_ = -model.offset_ if own is None else float(own)
    # _check_consistency matched the parameters with the network
    record_fitted_settings(model)
    return model


