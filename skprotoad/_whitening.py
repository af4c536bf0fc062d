"""The whitening of the finest stage's channels that the anomaly map's
metric uses (``map_metric="whitened"``; see
:class:`~skprotoad.network.ProtoADNetwork`'s ``map_whitening``).

PaDiM measures a patch's deviation in the metric of the normal patches'
covariance; the prototypes' distance in the plain metric lets the few
channels of high variance decide and misses weak, low-contrast deviations.
Whitening the finest stage alone, with its covariance shrunk towards a
multiple of the identity and its total variance kept, brings the maps'
weak signals up without reweighting the stages against each other
(measured in :doc:`/user_guide/defaults`).
"""

from __future__ import annotations

import numpy as np

#: The covariance's shrinkage towards a multiple of the identity: ``S_l = (1 -
#: l) S + l tr(S) / c I``. It keeps the whitening bounded where channels are
#: nearly collinear (few patches, or a flat texture), and was chosen on the
#: suite (docs/user_guide/defaults.md).
SHRINKAGE = 0.1

#: Rows of the features converted to float64 at a time while summing.
_BLOCK_ROWS = 65536


def stage_whitening(patches, shrinkage=SHRINKAGE):
    """A symmetric whitening of ``patches``' channels, scaled to keep their
    total variance.

    Parameters
    ----------
    patches : ndarray of shape (n_patches, n_channels)
        The training patches' channels of the finest stage, as the network
        scores them (a view is fine: it is read block by block).
    shrinkage : float in (0, 1], default=SHRINKAGE
        Weight of the identity in the shrunk covariance.

    Returns
    -------
    whitening : ndarray of shape (n_channels, n_channels), float32
        ``W = S_l^(-1/2) * sqrt(tr S / tr(W S W))``: the channels' covariance
        ``S`` becomes ``S_l``'s whitened shape at ``S``'s own total variance,
        so that only the shape of the stage's metric changes, not its weight
        against the other stages. The identity when the channels do not vary.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(5000, 2)) * [3.0, 0.5]
    >>> w = stage_whitening(x, shrinkage=1e-6)
    >>> before, after = np.cov(x.T), np.cov((x @ w).T)
    >>> bool(np.allclose(after, after[0, 0] * np.eye(2), atol=1e-3))  # white
    True
    >>> round(float(np.trace(before)), 2), round(float(np.trace(after)), 2)  # same total
    (9.36, 9.36)
    """
    n, c = patches.shape
    total = np.zeros(c)
    gram = np.zeros((c, c))
    for start in range(0, n, _BLOCK_ROWS):
        block = np.asarray(patches[start : start + _BLOCK_ROWS], dtype=np.float64)
        total += block.sum(axis=0)
        gram += block.T @ block
    mean = total / max(n, 1)
    covariance = gram / max(n, 1) - np.outer(mean, mean)
    covariance = (covariance + covariance.T) / 2
    trace = float(np.trace(covariance))
    # no variance beside the mean (to float64 rounding): nothing to whiten
    if not trace > 1e-10 * np.trace(gram) / max(n, 1):
        return np.eye(c, dtype=np.float32)
    shrunk = (1 - shrinkage) * covariance + shrinkage * trace / c * np.eye(c)
    values, vectors = np.linalg.eigh(shrunk)
    whitening = (vectors / np.sqrt(values)) @ vectors.T
    whitening *= np.sqrt(trace / np.trace(whitening @ covariance @ whitening))
    return whitening.astype(np.float32)
