"""The rule of ``contamination="auto"``: held-out images and a conformal threshold.

:meth:`ProtoADDetector.fit <skprotoad.ProtoADDetector.fit>` holds out a
random share of the normal training images, learns prototypes without them,
and sets its thresholds at a split-conformal order statistic of their scores;
see :doc:`/user_guide/thresholds`. These are the functions it does that with,
so that another method can be split and thresholded exactly alike.
"""

from ._calibration import calibration_folds, conformal_threshold, expected_false_alarm_rate

__all__ = ["conformal_threshold", "calibration_folds", "expected_false_alarm_rate"]
