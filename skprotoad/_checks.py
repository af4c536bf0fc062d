"""Checks of user input that need numpy only.

Kept free of torch: drawing (:mod:`skprotoad.plotting`) and reports
(:mod:`skprotoad.report`) use them without loading it, and the estimator's
image reading (:mod:`skprotoad._images`) shares them, so that each rule and
its message are written once.
"""

import numbers

import numpy as np


def check_unit_range(arr, where):
    """Refuse a float image ``arr`` with values that are not finite or not in [0, 1]."""
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{where} contains NaN or infinite values.")
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        # clipped, 0..255 data would be drawn all but white
        raise ValueError(
            f"{where} is a float image with values in [{arr.min():g}, {arr.max():g}]; "
            f"float images must lie in [0, 1] (divide 8-bit data by 255)."
        )


def check_int(value, name, minimum, maximum=None):
    """``value``, an int (any integral type but bool) in [minimum, maximum], as an int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}.")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {bounds}, got {value}.")
    return int(value)
