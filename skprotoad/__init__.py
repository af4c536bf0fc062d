"""skprotoad: ProtoAD image anomaly detection as a scikit-learn estimator.

ProtoAD (Huang, Kang, Wu, "A Prototype-Based Neural Network for Image Anomaly
Detection and Localization", arXiv 2310.02576) compares the patch features of a
pre-trained CNN with prototypes of normal patches learned by FINCH clustering.
"""

from ._version import __version__
from .backbones import WeightsUnavailableError
from .detector import ProtoADDetector

__all__ = ["ProtoADDetector", "WeightsUnavailableError", "__version__"]
