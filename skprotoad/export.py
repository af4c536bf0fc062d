"""Export a fitted detector's network to TorchScript or ONNX for deployment.

The exported model is the fitted end-to-end :class:`~skprotoad.network.ProtoADNetwork`,
which runs without skprotoad, timm or scikit-learn:

* **input** ``images``: float32 ``(N, 3, crop_h, crop_w)``, RGB in [0, 1], each image
  already resized to ``image_size`` (bilinear, antialiased) and centre-cropped
  to ``crop_size``; :func:`preprocess` does exactly that. The batch size ``N``
  is free; the spatial size is fixed at export. Models fitted with a float
  ``image_size`` (a scale factor: the input size varies per image) cannot be
  exported; every function here raises ``ValueError`` for them.
* **inside**: ImageNet (``mean``/``std``) normalisation, backbone, join of the
  stages, L2 normalisation, prototypes, ``1 - max cosine``, upsampling,
  Gaussian smoothing and the maximum (with ``normalization="image"``: the
  per-image scaling and the distance to the nearest prototype instead).
* **outputs** ``maps``: float32 ``(N, crop_h, crop_w)`` anomaly maps, and
  ``scores``: float32 ``(N,)`` anomaly scores (their maxima; with
  ``normalization="image"`` and an ``image_score`` other than ``"map"``, the
  maxima of that readout), which are ``-score_samples``. An image is an anomaly
  when its score exceeds ``threshold`` (``-offset_``), a pixel a defect when
  its map value exceeds ``pixel_threshold`` (``pixel_threshold_``, the same
  number unless the score is a readout of its own); the thresholds and the preprocessing settings
  travel in the file's metadata (``skprotoad.json`` extra file / ONNX
  ``metadata_props["skprotoad"]``).

ONNX export needs the optional ``export`` extra (``onnx``, ``onnxscript``,
``onnxruntime``); TorchScript only needs torch, but ``torch.jit`` is deprecated
in PyTorch 2.14 (it still works, and is what C++ ``torch::jit::load`` and older
runtimes read).
"""

from __future__ import annotations

import copy
import json
import numbers
import warnings

import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from . import _images
from ._threads import tracing
from ._validation import check_unchanged_since_fit
from ._version import __version__
from .detector import ProtoADDetector
from .preprocessing import model_inputs
from ._files import write_new_file

__all__ = ["preprocess", "to_torchscript", "to_onnx", "InspectionPipeline"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("maps", "scores")
#: Outputs of the whole inference path (``pipeline=True``).
PIPELINE_OUTPUT_NAMES = ("maps", "scores", "anomalous", "masks")
_METADATA_KEY = "skprotoad"
_TOLERANCE = 1e-4
_CHECK_BATCH = 3  # differs from the tracing batch, so a batch size baked in shows
# Lowest opset that holds the network: older ones lack align_corners upsampling.
_MIN_OPSET = 11
# ... and the whole pipeline: Resize's antialias attribute came with opset 18.
_MIN_PIPELINE_OPSET = 18


def preprocess(model, X):
    """The exported model's input for images ``X``: resized, cropped, in [0, 1].

    Parameters
    ----------
    model : ProtoADDetector
        The fitted detector that was exported.
    X : array or list of images
        As for :meth:`ProtoADDetector.fit`.

    Returns
    -------
    images : ndarray of shape (n_images, 3, crop_h, crop_w), float32

    Examples
    --------
    >>> import numpy as np
    >>> from skprotoad import ProtoADDetector
    >>> from skprotoad.export import preprocess
    >>> X = np.random.default_rng(0).integers(0, 255, (4, 40, 50, 3), dtype=np.uint8)
    >>> det = ProtoADDetector(backbone="resnet18", weights=None, layers=(1,),
    ...                       image_size=32, crop_size=24, clustering="kmeans",
    ...                       n_clusters=4, contamination=0.1).fit(X)
    >>> preprocess(det, X).shape
    (4, 3, 24, 24)
    """
    network = _fitted_network(model)
    batches = model_inputs(X, model.image_size, network.input_size, model.batch_size)
    return torch.cat([batch for _, batch in batches]).numpy()


def to_torchscript(model, path, *, pipeline=False, overwrite=False, check=True):
    """Write the fitted network as a TorchScript module (``torch.jit.load``-able).

    The network is traced on the CPU (``torch.jit.trace``) and wrapped in a
    scripted module that rejects inputs of the wrong shape or dtype (a traced
    graph would silently misread them). ``torch.jit`` is deprecated in PyTorch
    2.14; its deprecation warnings are silenced here, since this function exists
    for runtimes that read TorchScript.

    Parameters
    ----------
    model : ProtoADDetector
        A fitted detector; it is not modified.
    path : str or os.PathLike
        File to write, conventionally ``*.pt``.
    pipeline : bool, default=False
        ``True``: the whole inference path (:class:`InspectionPipeline`: uint8
        ``(N, H, W, 3)`` images of any size in, or ``(N, H, W, 1)`` grey ones;
        maps, scores, verdicts, masks out), as in :func:`to_onnx`. The saved
        module raises on images of another dtype or shape (float images in
        [0, 1] would otherwise be divided by 255 again).
    overwrite : bool, default=False
        Replace ``path`` if it exists; otherwise an existing file is an error.
    check : bool, default=True
        Run the exported module on random images (batch of 3) and raise
        ``RuntimeError`` if its maps or scores differ from the network's by
        more than 1e-4.

    Returns
    -------
    path : pathlib.Path

    Examples
    --------
    >>> from skprotoad.export import to_torchscript, preprocess
    >>> to_torchscript(detector, "model.pt")  # doctest: +SKIP
    >>> module = torch.jit.load("model.pt")  # doctest: +SKIP
    >>> maps, scores = module(torch.from_numpy(preprocess(detector, X)))  # doctest: +SKIP
    """
    _check_pipeline(pipeline)
    exported, example, _, check_against = _export_target(model, pipeline)
    with _quiet_tracing():
        module = torch.jit.trace(exported, example, check_trace=False)
        if pipeline:  # the trace casts any dtype to float and divides by 255: guard it
            module = torch.jit.script(_CheckedImages(module))
        else:  # the network's input size is fixed: guard it
            module = torch.jit.script(_CheckedInput(module, *exported.input_size))
    if check:
        check_against(lambda x: module(x))
    extra = {f"{_METADATA_KEY}.json": json.dumps(_metadata(model, pipeline))}

    def write(tmp):
        with _quiet_tracing():
            torch.jit.save(module, tmp, _extra_files=extra)

    return write_new_file(path, write, overwrite)


def to_onnx(model, path, *, pipeline=False, opset=18, dynamo=True, overwrite=False,
            check=True):
    """Write the fitted network as an ONNX model with a dynamic batch size.

    Needs the ``export`` extra: ``onnx`` and, for ``dynamo=True``, ``onnxscript``;
    ``onnxruntime`` for ``check``.

    Parameters
    ----------
    model : ProtoADDetector
        A fitted detector; it is not modified.
    path : str or os.PathLike
        File to write, conventionally ``*.onnx``; weights are stored inside it.
    pipeline : bool, default=False
        ``False``: the network alone; its input is :func:`preprocess`'s.
        ``True``: the whole inference path, :class:`InspectionPipeline`: raw
        uint8 ``(N, H, W, 3)`` images of any size in (dynamic ``N``, ``H``,
        ``W``), resizing and cropping inside the graph, the thresholds too;
        outputs ``maps``, ``scores``, ``anomalous``, ``masks``. A station then
        needs onnxruntime alone. Needs ``dynamo=True`` and an opset of 18 or
        more (antialiased resizing).
    opset : int, default=18
        ONNX opset version, from 11 (the first with the upsampling the network
        uses) to the highest the installed torch writes (23 for torch 2.14; 20
        with ``dynamo=False``).
    dynamo : bool, default=True
        Use PyTorch's ``torch.export``-based exporter (the default of
        ``torch.onnx.export`` since PyTorch 2.9). ``False`` selects the legacy
        TorchScript-based exporter, deprecated but without the ``onnxscript``
        dependency, and faster.
    overwrite : bool, default=False
        Replace ``path`` if it exists; otherwise an existing file is an error.
    check : bool, default=True
        Run the file with onnxruntime on random images (batch of 3) and raise
        ``RuntimeError`` if its maps or scores differ from the network's by
        more than 1e-4.

    Returns
    -------
    path : pathlib.Path

    Examples
    --------
    >>> import onnxruntime as ort  # doctest: +SKIP
    >>> from skprotoad.export import to_onnx, preprocess
    >>> to_onnx(detector, "model.onnx")  # doctest: +SKIP
    >>> session = ort.InferenceSession("model.onnx")  # doctest: +SKIP
    >>> maps, scores = session.run(None, {"images": preprocess(detector, X)})  # doctest: +SKIP
    """
    _check_opset(opset, dynamo)
    _check_pipeline(pipeline)
    if pipeline and (not dynamo or opset < _MIN_PIPELINE_OPSET):
        raise ValueError(
            f"pipeline=True needs dynamo=True and opset >= {_MIN_PIPELINE_OPSET} "
            f"(antialiased resizing of inputs of any size); got dynamo={dynamo}, "
            f"opset={opset}."
        )
    onnx = _require("onnx")
    if dynamo:
        _require("onnxscript", "the dynamo ONNX exporter; or pass dynamo=False")
    if check:
        ort = _require("onnxruntime", "check=True; or pass check=False")
    module, example, names, check_against = _export_target(model, pipeline)
    metadata = json.dumps(_metadata(model, pipeline))

    def write(tmp):
        _export_onnx(module, example, tmp, opset, dynamo, names, spatial=pipeline)
        proto = onnx.load(tmp)
        entry = proto.metadata_props.add()
        entry.key, entry.value = _METADATA_KEY, metadata
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
        if check:
            session = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])

            check_against(
                lambda x: [torch.from_numpy(o) for o in session.run(None, {INPUT_NAME: x.numpy()})]
            )

    return write_new_file(path, write, overwrite)


def _check_opset(opset, dynamo):
    """Refuse an opset the exporter cannot write before any work: torch's own
    error for one dumps the whole graph."""
    if isinstance(opset, bool) or not isinstance(opset, numbers.Integral):
        raise TypeError(f"opset must be an int, got {opset!r}.")
    from torch.onnx import _constants

    highest = _constants.ONNX_MAX_OPSET if dynamo else _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if not _MIN_OPSET <= opset <= highest:
        raise ValueError(
            f"opset must be between {_MIN_OPSET} and {highest} (with dynamo={dynamo}), "
            f"got {opset}."
        )


def _export_onnx(network, example, path, opset, dynamo, outputs=OUTPUT_NAMES, spatial=False):
    names = dict(input_names=[INPUT_NAME], output_names=list(outputs))
    dims = {0: torch.export.Dim("batch")}
    if spatial:  # raw images of any size: (N, H, W, 3)
        dims.update({1: torch.export.Dim("height", min=2, max=65535),
                     2: torch.export.Dim("width", min=2, max=65535)})
    if dynamo:
        options = dict(dynamo=True, dynamic_shapes={INPUT_NAME: dims}, external_data=False,
                       verbose=False)
    else:
        options = dict(dynamo=False,
                       dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)})
    try:
        with _quiet_tracing():
            torch.onnx.export(network, (example,), path, **names, opset_version=opset, **options)
    except Exception as error:
        # torch's own message is an assertion deep in the exporter, often with
        # the whole graph: say which model and exporter it was, and what to try
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(
            f"ONNX export failed ({_settings(network)}; dynamo={dynamo}, opset={opset}): "
            f"{type(error).__name__}: {first_line} Try another opset"
            + ("." if spatial else f" or dynamo={not dynamo}.")
        ) from error


def _settings(module):
    """The exported network's settings that change its graph, for messages."""
    network = getattr(module, "network", module)
    embedding = getattr(network, "embedding", None)
    if embedding is None:
        return type(module).__name__
    return (f"backbone={embedding.backbone.name!r}, normalization={embedding.normalization!r}, "
            f"image_score={network.image_score!r}, alignment={embedding.alignment!r}, "
            f"padding={embedding.padding!r}, neighborhood_size={embedding.neighborhood_size}, "
            f"position_baseline={network.score_baseline.numel() > 0}, "
            f"map_whitened={network.whitened_channels > 0}, "
            f"score_whitening={network.score_whitening:g}, "
            f"pipeline={module is not network}")


class InspectionPipeline(nn.Module):
    """The whole inference path: raw uint8 images in; maps, scores, verdicts, masks out.

    ``forward(images)`` takes uint8 ``(N, H, W, 3)`` RGB images of any
    ``H x W`` (one size per batch), resizes them to ``image_size`` (bilinear,
    antialiased: the filter of skprotoad's own preprocessing), centre-crops
    them to the network's input, runs the network and returns

    - ``maps``: float32 ``(N, crop_h, crop_w)``, as :meth:`ProtoADDetector.anomaly_maps`;
    - ``scores``: float32 ``(N,)``, ``-score_samples``;
    - ``anomalous``: bool ``(N,)``, ``scores > threshold`` (``predict == -1``);
    - ``masks``: bool ``(N, crop_h, crop_w)``, ``maps > pixel_threshold`` for
      anomalous images and empty for the others. Unlike
      :meth:`ProtoADDetector.predict_masks`, an anomalous image whose map
      exceeds the pixel threshold nowhere gets an empty mask here (its peak
      region needs connected components, which ONNX lacks): draw it from
      ``maps`` where a station needs it.

    Parameters
    ----------
    network : ProtoADNetwork
    image_size : (int, int)
    threshold, pixel_threshold : float
    """

    def __init__(self, network, image_size, threshold, pixel_threshold):
        super().__init__()
        self.network = network
        self.image_size = (int(image_size[0]), int(image_size[1]))
        top, left, height, width = _images.center_crop_box(self.image_size, network.input_size)
        self.crop_box = (int(top), int(left), int(height), int(width))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("pixel_threshold", torch.tensor(float(pixel_threshold)))

    def forward(self, images):
        if not tracing():  # traced, the check is _CheckedImages' (scripted)
            _check_uint8_images(images)
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = nn.functional.interpolate(x, size=self.image_size, mode="bilinear",
                                      antialias=True, align_corners=False)
        top, left, height, width = self.crop_box
        maps, scores = self.network(x[:, :, top:top + height, left:left + width])
        anomalous = scores > self.threshold
        masks = (maps > self.pixel_threshold) & anomalous[:, None, None]
        return maps, scores, anomalous, masks


class _CheckedInput(nn.Module):
    """Scripted guard around the traced network: a trace fixes the spatial
    size (the readout's matrices, upsampling sizes) and would misread other inputs."""

    def __init__(self, network, height, width):
        super().__init__()
        self.network = network
        self.height = int(height)
        self.width = int(width)

    def forward(self, images):
        # type: (Tensor) -> Tuple[Tensor, Tensor]
        if (
            images.dim() != 4
            or images.size(1) != 3
            or images.size(2) != self.height
            or images.size(3) != self.width
        ):
            raise ValueError(
                "expected images of shape (N, 3, "
                + str(self.height)
                + ", "
                + str(self.width)
                + "): RGB in [0, 1], resized and centre-cropped; got shape "
                + str(images.shape)
            )
        if images.dtype != torch.float32:
            raise ValueError("expected float32 images in [0, 1]")
        return self.network(images)


class _CheckedImages(nn.Module):
    """Scripted guard around the traced :class:`InspectionPipeline`: the trace
    converts any input to float and divides it by 255, so that float images
    in [0, 1] would be scored as near-black ones, without an error."""

    def __init__(self, pipeline):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, images):
        # type: (Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]
        _check_uint8_images(images)
        return self.pipeline(images)


def _check_uint8_images(images):
    # type: (Tensor) -> None
    """What :class:`InspectionPipeline` takes; TorchScript, so that the saved
    pipeline keeps the check its trace would lose."""
    # (N, H, W, 1) grey images broadcast against the 3-channel mean as
    # the estimator repeats them: allowed
    if images.dim() != 4 or (images.size(3) != 3 and images.size(3) != 1):
        raise ValueError(
            "expected uint8 images of shape (N, H, W, 3) (RGB) or (N, H, W, 1) "
            "(grey); got shape " + str(images.shape)
        )
    if images.dtype != torch.uint8:
        raise ValueError(
            "expected uint8 images (0..255), as read from files, not another dtype: "
            "the pipeline divides by 255 itself (float images in [0, 1]: multiply "
            "them by 255 and round to uint8 first)"
        )


def _fitted_network(model):
    if not isinstance(model, ProtoADDetector):
        raise TypeError(f"model must be a ProtoADDetector, got {type(model).__name__}.")
    check_is_fitted(model, "network_")
    # the metadata and preprocess() read image_size: it must be the fitted one
    check_unchanged_since_fit(model)
    if model.network_.input_size is None:
        # The traced graph and the checked-input wrapper bake in one input size
        # (the smoothing's border indices, the upsampling size).
        raise ValueError(
            f"export needs a fixed input size; this model was fitted with "
            f"image_size={model.image_size!r}, a scale factor, so its input size "
            f"varies with each image's. Refit with an int or (height, width) "
            f"image_size to export, or save it with skprotoad.persistence.save."
        )
    return model.network_


def _cpu_copy(model):
    # Exported on the CPU, in float32, from a copy: the model keeps its device.
    network = copy.deepcopy(_fitted_network(model)).to("cpu", torch.float32)
    return network.eval().requires_grad_(False)


def _example_input(network, batch):
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, *network.input_size, generator=generator)


def _check_pipeline(pipeline):
    if not isinstance(pipeline, bool):
        raise TypeError(f"pipeline must be True or False, got {pipeline!r}.")


def _export_target(model, pipeline):
    """What to export: (module, tracing example, output names, ``check(run)``
    that compares ``run``'s outputs with the module's)."""
    network = _cpu_copy(model)
    if not pipeline:
        example = _example_input(network, batch=2)
        return network, example, OUTPUT_NAMES, lambda run: _check_outputs(network, run)
    size = _images.check_size(model.image_size, "image_size")
    module = InspectionPipeline(network, size, -model.offset_, model.pixel_threshold_).eval()
    return (module, _raw_example(module, batch=2), PIPELINE_OUTPUT_NAMES,
            lambda run: _check_pipeline_outputs(module, run))


def _raw_example(module, batch, size=None, seed=0):
    """Random uint8 images of ``size``; by default a size that is not the
    model's, so that no size coincides with a constant of the graph during export."""
    generator = torch.Generator().manual_seed(seed)
    if size is None:
        size = (module.image_size[0] + 7, module.image_size[1] + 13)
    return torch.randint(0, 256, (batch, *size, 3), dtype=torch.uint8, generator=generator)


def _check_sizes(image_size):
    """Two image sizes to check the exported pipeline on, other than
    ``image_size`` and the tracing example's: one shorter and wider, one taller
    and narrower. Relative to ``image_size``, so that small models get valid
    sizes too; at least 2 pixels a side, the ONNX graph's smallest."""
    height, width = image_size
    return [(max(2, height // 2), width + width // 2 + 20),
            (height + height // 2 + 20, max(2, width // 2))]


def _check_pipeline_outputs(module, run):
    """The exported pipeline against the module, on two other image sizes
    (:func:`_check_sizes`): equal within ``_TOLERANCE``, the verdicts and masks
    equal except within it of a threshold."""
    for seed, size in enumerate(_check_sizes(module.image_size), start=1):
        x = _raw_example(module, batch=_CHECK_BATCH, size=size, seed=seed)
        with torch.inference_mode():
            expected = module(x)
        got = run(x)
        maps, scores = expected[0], expected[1]
        near_verdict = (scores - module.threshold).abs() <= _TOLERANCE
        near = {
            "anomalous": near_verdict,
            "masks": ((maps - module.pixel_threshold).abs() <= _TOLERANCE)
            | near_verdict[:, None, None],
        }
        for name, e, g in zip(PIPELINE_OUTPUT_NAMES, expected, got):
            if tuple(g.shape) != tuple(e.shape):
                raise RuntimeError(f"The exported pipeline's {name} have shape "
                                   f"{tuple(g.shape)}, not {tuple(e.shape)}: export failed.")
            if e.dtype == torch.bool:
                if ((g != e) & ~near[name]).any():
                    raise RuntimeError(f"The exported pipeline's {name} differ from the "
                                       f"module's away from the threshold: export failed.")
            elif not torch.allclose(g, e, rtol=0, atol=_TOLERANCE):
                raise RuntimeError(
                    f"The exported pipeline's {name} differ from the module's (max error "
                    f"{(g - e).abs().max().item()}): export failed."
                )


def _check_outputs(network, run):
    x = _example_input(network, batch=_CHECK_BATCH)
    with torch.inference_mode():
        expected = network(x)
        got = run(x)
    for name, e, g in zip(OUTPUT_NAMES, expected, got):
        if tuple(g.shape) != tuple(e.shape) or not torch.allclose(g, e, rtol=0, atol=_TOLERANCE):
            error = (g - e).abs().max().item() if g.shape == e.shape else "shape"
            raise RuntimeError(
                f"The exported model's {name} differ from the network's (max error "
                f"{error}, shape {tuple(g.shape)} vs {tuple(e.shape)}): export failed."
            )


_MAP_MEANING = {"patch": "1 - max cosine", "image": "distance to the nearest prototype"}
_SCORE_MEANING = {
    "map": "max of each map",
    "cosine": "max of each image's smoothed 1 - max cosine map",
    "projection": "max of each image's smoothed |x| (1 - max cosine) map",
}


def _metadata(model, pipeline=False):
    network = model.network_
    meta = {
        "skprotoad_version": __version__,
        "torch_version": torch.__version__,
        "input": {
            "name": INPUT_NAME,
            "shape": ["N", 3, *network.input_size],
            "dtype": "float32",
            "description": "RGB in [0, 1], resized to image_size (bilinear, antialiased) "
            "and centre-cropped to crop_size",
            "image_size": list(_images.check_size(model.image_size, "image_size")),
            "crop_size": list(network.input_size),
        },
        "normalization": network.embedding.normalization,
        "outputs": {
            "maps": f"float32 (N, crop_h, crop_w), {_MAP_MEANING[network.embedding.normalization]}"
            + (" with the finest stage's channels whitened" if network.whitened_channels else "")
            + ", higher = more anomalous",
            "scores": "float32 (N,), "
            + _SCORE_MEANING["map" if network.reads_score_from_map else network.image_score]
            + (f", the finest stage's channels {network.score_whitening:g} of the way "
               "to the map's whitened metric" if network.score_whitening else "")
            + (" less the normal images' mean of it at each position"
               if network.score_baseline.numel() else "")
            + " = -score_samples",
        },
        "image_score": network.image_score,
        "score_whitening": network.score_whitening,
        "threshold": float(-model.offset_),
        "pixel_threshold": float(model.pixel_threshold_),
        "backbone": network.embedding.backbone.name,
        "layers": list(network.embedding.backbone.layers),
    }
    if pipeline:
        meta["input"] = {
            "name": INPUT_NAME,
            "shape": ["N", "H", "W", 3],
            "dtype": "uint8",
            "description": "RGB images of any size (one size per batch); grey images "
            "repeated to 3 channels. Resized (bilinear, antialiased) and centre-cropped "
            "inside the graph",
            "image_size": list(_images.check_size(model.image_size, "image_size")),
            "crop_size": list(network.input_size),
        }
        meta["outputs"].update({
            "anomalous": "bool (N,), scores > threshold (predict == -1)",
            "masks": "bool (N, crop_h, crop_w), maps > pixel_threshold for anomalous "
            "images, empty for the others",
        })
    return meta


class _quiet_tracing(warnings.catch_warnings):
    """Silence torch's deprecation notices for ``torch.jit`` / the legacy ONNX
    exporter, and the tracer's notes about Python ints: those come from the
    spatial-size arithmetic, fixed at export, and ``check`` verifies the result
    at another batch size."""

    def __enter__(self):
        result = super().__enter__()
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        warnings.filterwarnings(
            "ignore", message=r".*legacy TorchScript-based ONNX", category=DeprecationWarning
        )
        return result


def _require(name, purpose=None):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(
            f"{name} is needed for {purpose or 'ONNX export'}: "
            f"pip install 'skprotoad[export]' (or pip install {name})."
        ) from None
