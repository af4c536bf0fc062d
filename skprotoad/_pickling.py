"""How a :class:`~skprotoad.ProtoADDetector` pickles (joblib, ``copy``, clones):
:class:`NetworkPickling`, a mixin.

The fitted network is pickled as :meth:`ProtoADNetwork.to_state
<skprotoad.network.ProtoADNetwork.to_state>` (plain values and CPU tensors),
not as torch modules, so that a pickle does not depend on the classes' code;
everything is checked when it is read back.
"""

from __future__ import annotations

import numpy as np

from ._validation import params_missing_from_format
from .network import ProtoADNetwork

_PRE_RELEASE = (
    "this ProtoADDetector was saved by a pre-release development version of "
    "skprotoad, whose models this version does not read; refit it."
)
# set by fit, besides the network: a pickle without them is of an older layout
_FITTED = ("pixel_threshold_", "_fitted_settings")


def pickled_state(state):
    """A copy of the detector's ``state`` with its network as plain values."""
    state = dict(state)  # object.__getstate__ returns the instance dict itself
    network = state.pop("network_", None)
    if network is not None:
        state["_network_state"] = network.to_state()
    return state


def split_state(state, param_names):
    """``(state, network_state)``: what :func:`pickled_state` gave, less the
    network's part (None for an unfitted detector), checked for its layout."""
    network_state = state.pop("_network_state", None)
    # parameters added since it was pickled, at the values it was fitted with
    # (an unfitted detector's pickle says nothing of its version: the oldest)
    version = 1 if network_state is None else network_state.get("format_version")
    state = {**params_missing_from_format(version), **state}
    if not set(param_names) <= set(state) or (
        network_state is not None and not all(name in state for name in _FITTED)
    ):
        raise ValueError(_PRE_RELEASE)
    return state, network_state


def restore_network(detector, network_state):
    """The network of ``network_state``, once ``detector``'s other attributes
    are restored; raises if the network or the thresholds are not finite."""
    try:
        network = ProtoADNetwork.from_state(network_state)
    except KeyError:
        raise ValueError(_PRE_RELEASE) from None
    # a NaN anywhere would score every image NaN and call it normal
    bad = network.non_finite_tensors()
    if bad or not np.isfinite([detector.offset_, detector.pixel_threshold_]).all():
        raise ValueError(
            "this ProtoADDetector holds non-finite values ("
            + (f"tensors {bad[:5]}" if bad else "its thresholds")
            + "): the file is damaged or was edited; refit the model."
        )
    return network


class NetworkPickling:
    """Mixin: pickles ``network_`` as plain values (:func:`pickled_state`) and
    checks it when read back; before ``BaseEstimator`` in the bases."""

    def __getstate__(self):
        return pickled_state(super().__getstate__())

    def __setstate__(self, state):
        state, network_state = split_state(state, self._get_param_names())
        super().__setstate__(state)
        if network_state is not None:
            self.network_ = restore_network(self, network_state)
