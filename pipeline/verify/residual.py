"""The residual rule: which scored groups carry no group-relative learning signal.

A group is *residual* when every sample got the same reward: its group-normalised advantages are
all zero and it gives no gradient. Rewards are 0 or 1 (`pipeline.flow.validate` rejects any
other), so the group's pass rate (its mean reward, `group_pass_rate` on the wire) decides alone:
pass rate 1 is *all correct*, 0 is *all wrong*, anything in between is *informative*.

`residual` is the only place that decides it; the reward service's metrics, ERPO's temperature
rule, the learner's dynamic sampling, RA advantages and metrics, and the lake report all call it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

ALL_CORRECT, ALL_WRONG, INFORMATIVE = "all_correct", "all_wrong", "informative"
"""Names of the three kinds of group (metric labels, the learner's ``dropped_<kind>`` fates)."""


def residual(pass_rates: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``(all_correct, all_wrong)``: boolean masks, one entry per pass rate.

    Pass rates are compared as float32, their wire type: all correct where the rate is 1, all
    wrong where it is 0 (``>=`` and ``<=``, so a value outside [0, 1] is residual, never
    informative; NaN is neither).
    """
    p = np.asarray(pass_rates, dtype=np.float32)
    return p >= np.float32(1.0), p <= np.float32(0.0)
