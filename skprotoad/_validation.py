"""Parameter rules, declared once and checked by one function, and input checks.

:class:`~skprotoad.ProtoADDetector` lists a rule per parameter in its
``_parameter_constraints`` (scikit-learn's name for such a table) and checks
them all at the start of :meth:`~skprotoad.ProtoADDetector.fit`;
:mod:`skprotoad.network` and :mod:`skprotoad.persistence` check their own
copies of those parameters with the same rules. A small equivalent of
:mod:`sklearn.utils._param_validation` (a private module whose API moves
between releases), whose messages name the parameter and the rule.

Also the checks of the estimator's other inputs (labels, thresholds, scores,
the options of its scoring methods), and the record of the settings a fit
embodies, which scoring checks that ``set_params`` has not changed since.
"""

from __future__ import annotations

import math
import numbers
import os

import numpy as np
import torch

from . import _images


class InvalidParameterError(ValueError, TypeError):
    """A parameter breaks its rule: a ValueError and a TypeError, as in scikit-learn,
    so that either ``except`` catches a wrong value and a wrong type alike."""


class OneOf:
    """One of the strings ``options``."""

    def __init__(self, options):
        self.options = tuple(options)

    def __call__(self, name, value):
        if not isinstance(value, str) or value not in self.options:
            quoted = [repr(o) for o in self.options]
            allowed = ", ".join(quoted[:-1]) + " or " + quoted[-1]
            raise InvalidParameterError(f"{name} must be {allowed}, got {value!r}.")


class Integer:
    """An int (any integral type but bool) of at least ``minimum``, odd if
    ``odd``; None too when ``allow_none``."""

    def __init__(self, minimum, allow_none=False, odd=False):
        self.minimum, self.allow_none, self.odd = minimum, allow_none, odd

    def __call__(self, name, value):
        if value is None and self.allow_none:
            return
        # any integral type: a grid search over a numpy array passes numpy ints
        is_int = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if self.odd:
            if not is_int or value < self.minimum or value % 2 == 0:
                raise InvalidParameterError(
                    f"{name} must be an odd int >= {self.minimum}, got {value!r}."
                )
            return
        if not is_int:
            kind = "an int or None" if self.allow_none else "an int"
            raise InvalidParameterError(f"{name} must be {kind}, got {value!r}.")
        if value < self.minimum:
            raise InvalidParameterError(f"{name} must be at least {self.minimum}, got {value}.")


class RealInterval:
    """A real number (not a bool) in ``[low, high]``; NaN never is."""

    def __init__(self, low, high, unit=""):
        self.low, self.high, self.unit = low, high, unit

    def __call__(self, name, value):
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise InvalidParameterError(f"{name} must be a number, got {value!r}.")
        if not self.low <= value <= self.high:  # NaN fails too
            raise InvalidParameterError(
                f"{name} must be in [{self.low:g}, {self.high:g}]{self.unit}, got {value}."
            )


class Satisfies:
    """Whatever ``predicate`` accepts, described as ``description``."""

    def __init__(self, predicate, description):
        self.predicate, self.description = predicate, description

    def __call__(self, name, value):
        if not self.predicate(value):
            raise InvalidParameterError(f"{name} must be {self.description}, got {value!r}.")


class Delegated:
    """Checked by ``check(value)``, the function that owns the rule (it raises
    its own errors); ``check=None``: checked where the value is used, named in
    ``where``."""

    def __init__(self, check=None, where=""):
        self.check, self.where = check, where

    def __call__(self, name, value):
        if self.check is not None:
            self.check(value)


class RGB:
    """Three finite numbers (R, G, B), all positive if ``positive``."""

    def __init__(self, positive=False):
        self.positive = positive

    def __call__(self, name, value):
        if len(np.ravel(value)) != 3 or not np.all(np.isfinite(value)):
            raise InvalidParameterError(
                f"{name} must hold 3 finite numbers (R, G, B), got {value!r}."
            )
        if self.positive and np.any(np.asarray(value, dtype=float) <= 0):
            raise InvalidParameterError(f"{name} must be positive, got {value!r}.")


def is_random_state(value):
    """What :func:`sklearn.utils.check_random_state` accepts, bools aside."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return 0 <= value < 2**32
    return value is None or isinstance(value, np.random.RandomState)


def validate(constraints, params):
    """Check each of ``params`` that ``constraints`` has a rule for, in its order."""
    for name, rule in constraints.items():
        if name in params:
            rule(name, params[name])


def torch_device(device):
    """The :class:`torch.device` that a ``device`` parameter names.

    ``"auto"`` is CUDA when available, else the CPU.
    """
    if isinstance(device, str) and device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}."
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here.")
    return resolved


def check_labels(y, n_images):
    """Indices of the images that outlier labels ``y`` call normal (1); all if None."""
    if y is None:
        return np.arange(n_images)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n_images:
        raise ValueError(
            f"y must be 1-D with one label per image ({n_images}), got shape {y.shape}."
        )
    if y.dtype.kind not in "iuf" or not np.isin(y, (1, -1)).all():
        raise ValueError(
            f"y must hold outlier labels 1 (normal) and -1 (anomaly), got values "
            f"{np.unique(y)[:5].tolist()}."
        )
    normal = np.flatnonzero(y == 1)
    if len(normal) == 0:
        raise ValueError("y marks no image as normal (1): nothing to learn from.")
    return normal


def check_threshold(threshold):
    """``threshold`` as a finite float."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a number, got {threshold!r}.")
    if not math.isfinite(threshold):
        # NaN would mark no pixel as defective: "normal" by accident
        raise ValueError(f"threshold must be finite, got {threshold!r}.")
    return float(threshold)


def check_map_options(output, return_scores):
    """Check :meth:`~skprotoad.ProtoADDetector.anomaly_maps`' options."""
    if output not in ("crop", "input"):
        raise ValueError(f"output must be 'crop' or 'input', got {output!r}.")
    if not isinstance(return_scores, (bool, np.bool_)):
        raise TypeError(f"return_scores must be True or False, got {return_scores!r}.")


def check_finite_scores(scores):
    """A NaN score compares as neither anomalous nor normal: never call it normal."""
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        raise ValueError(
            f"the anomaly scores of {len(bad)} image(s) (indices "
            f"{bad[:10].tolist()}{' ...' if len(bad) > 10 else ''}) are not finite: the "
            f"model or the images are broken, and such an image is not called normal."
        )


def check_params(estimator):
    """Check every parameter of ``estimator`` against its class's
    ``_parameter_constraints``, and the combinations no single rule sees.

    The one check of a :class:`~skprotoad.ProtoADDetector`'s parameters:
    ``fit`` starts with it, and the command line and :mod:`skprotoad.persistence`
    run it on a detector they build, before it has data to fit.
    """
    params = estimator.get_params(deep=False)
    validate(type(estimator)._parameter_constraints, params)
    if params["n_clusters"] is None and params["clustering"] == "kmeans":
        raise ValueError("clustering='kmeans' needs n_clusters (an int).")
    _images.check_geometry(params["image_size"], params["crop_size"])


def _embodied_settings(params):
    """The detector parameters a fitted network embodies (and ``image_size``,
    which scoring reads along with it), in a form that compares by value."""
    from .network import effective_image_score, effective_map_metric, effective_score_whitening

    def size(value):
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return (int(value), int(value))
        return _plain(value)

    names = ("backbone", "layers", "weights", "sigma", "alignment", "neighborhood_size",
             "normalization", "padding", "position_baseline")
    return {
        **{name: _plain(params[name]) for name in names},
        # with normalization="patch" every image_score is the same network
        "image_score": effective_image_score(params["normalization"], params["image_score"]),
        "map_metric": effective_map_metric(params["normalization"], params["map_metric"]),
        "score_whitening": effective_score_whitening(
            params["normalization"], params["image_score"], params["map_metric"],
            params["score_whitening"]),
        "image_size": size(params["image_size"]),
        "crop_size": size(params["crop_size"]),
        "mean": _plain(params["mean"]),
        "std": _plain(params["std"]),
    }


#: Detector parameters added with each network format
#: (:data:`skprotoad.network.FORMAT_VERSION`), at the values that reproduce a
#: model of an earlier format: its files and pickles lack them, and read with them.
PARAMS_ADDED_WITH_FORMAT = {2: {"map_metric": "euclidean"}, 3: {"score_whitening": 0.0}}


def params_missing_from_format(version):
    """The parameters a model of network format ``version`` lacks, at the
    values it was fitted with (none for an unknown version, which loading
    refuses by its own check)."""
    if not isinstance(version, int):
        return {}
    return {name: value for added, params in PARAMS_ADDED_WITH_FORMAT.items()
            if added > version for name, value in params.items()}


def record_fitted_settings(estimator):
    """Note the parameters ``estimator``'s fitted network embodies, for
    :func:`check_unchanged_since_fit`; what ``fit`` and loading a model do last."""
    estimator._fitted_settings = _embodied_settings(estimator.get_params(deep=False))


def check_unchanged_since_fit(estimator):
    """Raise if ``set_params`` changed a parameter that ``estimator``'s fitted
    network embodies: the network would keep the old value while scoring read
    the new one."""
    fitted = _whole_image_crop(estimator._fitted_settings)
    now = _whole_image_crop(_embodied_settings(estimator.get_params(deep=False)))
    changed = [
        f"{name}={now[name]!r} (fitted with {fitted[name]!r})"
        for name in fitted
        if now.get(name) != fitted[name]
    ]
    if changed:
        raise ValueError(
            f"{'; '.join(changed)}: changed after fit, which the fitted model "
            f"cannot follow; refit, or set them back."
        )


def _whole_image_crop(settings):
    """``settings`` with no crop written as a crop to the whole image, which
    it is; the record keeps None, as models saved before read it."""
    if settings.get("crop_size") is None:
        return {**settings, "crop_size": settings.get("image_size")}
    return settings


def _plain(value):
    """Sequences as tuples and numpy scalars as Python ones, for comparisons."""
    if isinstance(value, (tuple, list, np.ndarray)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value
