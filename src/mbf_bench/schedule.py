"""Learning-rate schedules as a function of progress through a run's budget.

A schedule maps *progress* (the fraction of the budget spent, 0 at the start, 1 at the end)
to a factor on every parameter group's base learning rate. Driving it by progress rather than
by a step count lets one schedule serve step, epoch and time budgets alike: under a budget of
training seconds (the comparison protocol's), progress is seconds spent / seconds allowed, so
the decay ends exactly when the budget does, whatever an optimizer's step costs and however
that cost varies over the run (early factorizations, compilation on the first step). A step
count calibrated beforehand from a measured step time could only approximate that: it ends the
decay early or late whenever the measured time differs from the run's.

Schedules:

- ``"constant"``: factor 1 (the optimizer's own behaviour; Schedule-Free optimizers need it).
- ``"warmup-cosine"``: linear warmup from 0 over the first ``warmup_fraction`` of the budget,
  then half a cosine from 1 down to 0 at the end of the budget.
"""

from __future__ import annotations

import math

__all__ = ["SCHEDULES", "lr_factor"]

SCHEDULES = ("constant", "warmup-cosine")


def lr_factor(schedule: str, progress: float, warmup_fraction: float = 0.0) -> float:
    """The factor on the base learning rate at ``progress`` (clipped to [0, 1]) of the budget.

    Args:
        schedule: one of :data:`SCHEDULES`.
        progress: fraction of the budget spent before the step about to be taken.
        warmup_fraction: fraction of the budget spent warming up linearly (``warmup-cosine``).

    Raises:
        ValueError: an unknown schedule, or a warmup fraction outside [0, 1).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; schedules: {', '.join(SCHEDULES)}")
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction}")
    if schedule == "constant":
        return 1.0
    p = min(max(progress, 0.0), 1.0)
    if p < warmup_fraction:
        # The first step (p = 0) takes a small positive rate, not 0: a zero step is wasted time.
        return max(p, 1e-3 * warmup_fraction) / warmup_fraction
    decay = (p - warmup_fraction) / (1.0 - warmup_fraction)
    return 0.5 * (1.0 + math.cos(math.pi * decay))
