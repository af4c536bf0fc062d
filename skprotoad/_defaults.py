"""The estimator's default parameter values, written once.

Kept free of heavy imports (no torch, no numpy): the command line builds its
option defaults from :data:`DETECTOR_DEFAULTS` without loading torch, so that
``skprotoad --help`` stays instant. ``ProtoADDetector.__init__`` keeps its
defaults literally in its signature, where readers and scikit-learn look;
``tests/test_cli.py`` checks that the two agree.
"""

from types import MappingProxyType

#: ``ProtoADDetector`` parameter -> default value, for every parameter but
#: ``mean`` and ``std`` (ImageNet's, owned by :mod:`skprotoad.network`).
#: Read-only: a caller that changed it would change every later default.
DETECTOR_DEFAULTS = MappingProxyType({
    "backbone": "efficientnet_lite0",
    "layers": (1, 2, 3),
    "weights": "imagenet",
    "clustering": "finch",
    "n_clusters": None,
    "n_farthest": None,
    "max_patches": 2_000_000,
    "sigma": 4.0,
    "alignment": "center",
    "neighborhood_size": 3,
    "normalization": "image",
    "image_score": "projection",
    "map_metric": "whitened",
    "score_whitening": 0.0,
    "position_baseline": True,
    "image_size": 256,
    "crop_size": None,
    "padding": "zeros",
    "contamination": "auto",
    "batch_size": 16,
    "device": "auto",
    "random_state": None,
    "verbose": False,
    "n_jobs": None,
    "memory": None,
})
