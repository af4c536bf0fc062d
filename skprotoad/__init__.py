"""skprotoad: ProtoAD image anomaly detection as a scikit-learn estimator.

ProtoAD (Huang, Kang, Wu, "A Prototype-Based Neural Network for Image Anomaly
Detection and Localization", arXiv 2310.02576) compares the patch features of a
pre-trained CNN with prototypes of normal patches learned by FINCH clustering.
"""

from ._version import __version__

__all__ = ["ProtoADDetector", "WeightsUnavailableError", "CalibrationWarning", "__version__"]


def __getattr__(name):
    # Imported on first use: they import torch, which takes seconds, and
    # `python -m skprotoad` imports this package before the command line can
    # turn a Ctrl-C during that wait into a quiet exit.
    if name == "ProtoADDetector":
        from .detector import ProtoADDetector

        return ProtoADDetector
    if name == "CalibrationWarning":
        from ._calibration import CalibrationWarning

        return CalibrationWarning
    if name == "WeightsUnavailableError":
        from .backbones import WeightsUnavailableError

        return WeightsUnavailableError
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
