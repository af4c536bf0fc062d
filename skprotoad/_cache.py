"""Opt-in cache of the patch features of ``fit`` (``ProtoADDetector(memory=...)``).

Feature extraction is most of the cost of a fit, and in a grid search over
parameters that do not shape the features (``n_clusters``, ``clustering``,
``sigma``, ``contamination``) every candidate of a fold extracts the same
features. With a :class:`joblib.Memory` they are extracted once per fold and
feature-shaping setting.

:func:`cached_patch_features` is the function joblib caches. joblib hashes its
arguments ``key`` (everything that shapes the features: backbone, layers,
weights, geometry, normalisation, the images' content, the code that computes
them) and ``order`` (which images, in which order; it holds the calibration
split). The extraction itself arrives as ``extract``, a callable that joblib
is told to ignore, so the torch model is never pickled or hashed.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

import numpy as np
from sklearn.utils.validation import check_memory

from . import _images

# Modules whose code shapes the patch features: a change to any of them
# invalidates cached features, even without a new version number.
_FEATURE_MODULES = ("skprotoad._images", "skprotoad.backbones", "skprotoad.network",
                    "skprotoad._features", "skprotoad.detector")


def check_feature_memory(memory):
    """``memory`` as an object with joblib.Memory's interface, or None.

    Accepts what :class:`~sklearn.pipeline.Pipeline` accepts (None, a folder
    as str, a joblib.Memory) and also a :class:`os.PathLike` folder.
    """
    if memory is None:
        return None
    if isinstance(memory, os.PathLike):
        memory = os.fspath(memory)
    if isinstance(memory, bytes):
        raise ValueError(f"memory must be None, a folder or a joblib.Memory, got {memory!r}.")
    try:
        memory = check_memory(memory)
    except ValueError:
        raise ValueError(
            f"memory must be None, a folder (str or path) or a joblib.Memory, got "
            f"{memory!r}."
        ) from None
    except OSError as exc:
        # joblib creates the folder at once, and would fail with its own traceback
        warnings.warn(
            f"memory={memory!r}: the feature cache cannot be created there "
            f"({exc.strerror or exc}); fitting without it.", UserWarning, stacklevel=3,
        )
        return None
    if getattr(memory, "location", "") is None:
        return None  # joblib.Memory(None) caches nothing
    return memory


def cached_patch_features(key, order, extract):
    """Run ``extract()``; joblib caches the result under ``(key, order)``.

    Module-level, so that joblib can name it and hash its arguments; joblib
    ignores ``extract``.
    """
    return extract()


def patch_features(detector, images, order, seed, extract, may_cap=True):
    """``extract()``'s feature array, from the cache of ``detector.memory``
    when it has one and has them (see :func:`feature_key` for the arguments)."""
    memory = check_feature_memory(detector.memory)
    if memory is None:
        return extract()
    cached = memory.cache(cached_patch_features, ignore=["extract"])
    key = feature_key(detector, images, seed, may_cap)
    return cached(key, np.asarray(order, dtype=np.int64), extract)


def feature_key(detector, images, seed, may_cap=True):
    """Everything that shapes the patch features of ``detector.fit(images)``.

    ``seed`` seeds the backbone's initialisation and the draw of the patches
    kept under ``max_patches``: it matters with ``weights=None``, or when
    ``may_cap`` (the cap may apply to these images). The image order is not
    part of the key: it is passed to :func:`cached_patch_features` as its
    own argument.
    """
    import timm
    import torch

    from ._validation import torch_device
    from ._version import __version__

    if _images.is_scale(detector.image_size):
        # one resize factor for all images, no crop
        image_size, crop = ("scale", float(detector.image_size)), None
    else:
        image_size = _images.check_size(detector.image_size, "image_size")
        crop = _images.center_crop_box(detector.image_size, detector.crop_size)
    return {
        "skprotoad": __version__,
        "code": _code_digest(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "backbone": detector.backbone,
        "layers": tuple(int(i) for i in detector.layers),
        "weights": _weights_token(detector.weights),
        "seed": int(seed) if detector.weights is None or may_cap else None,
        "alignment": detector.alignment,
        "padding": detector.padding,
        "neighborhood_size": int(detector.neighborhood_size),
        "normalization": detector.normalization,
        "image_size": image_size,
        "crop": crop,
        "mean": tuple(float(v) for v in np.ravel(detector.mean)),
        "std": tuple(float(v) for v in np.ravel(detector.std)),
        "device": torch_device(detector.device).type,
        # the backbone's batch moves its outputs by float rounding: a cached
        # fit must equal the uncached one exactly
        "batch_size": int(detector.batch_size),
        "max_patches": detector.max_patches,
        "images": images.cache_token(),
    }


def _weights_token(weights):
    if weights is None or (isinstance(weights, str) and weights == "imagenet"):
        return weights
    # the file's identity, not its hash: hashing a 100 MB state dict on every
    # fit would cost more than it saves on small grids
    return _images.file_identity(weights)


@functools.lru_cache(maxsize=None)
def _code_digest():
    digest = hashlib.sha256()
    for name in _FEATURE_MODULES:
        module = sys.modules.get(name)
        source = getattr(module, "__file__", None)
        try:
            digest.update(Path(source).read_bytes())
        except (OSError, TypeError):
            digest.update(name.encode())  # no source to read (frozen): version only
    return digest.hexdigest()
