"""Learning-rate schedules as pure functions of the step. Imports nothing of ours.

Each schedule gives a factor in (0, 1] that the training loop multiplies into every parameter group's own
peak lr at each step, so differential learning rates keep their ratios along the whole schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# fastai 0.7's warm-up: the first 1/20 of the first cycle runs at lr/100.
WARMUP_FRACTION = 1 / 20
WARMUP_FACTOR = 1 / 100


def cosine_between(start: float, end: float, position: float) -> float:
    """Cosine from `start` (position 0) to `end` (position 1), as fastai's sched_cos."""
    return start + (1 + math.cos(math.pi * (1 - position))) * (end - start) / 2


def sgdr_cycle_lengths(*, n_cycle: int, cycle_len: float, cycle_mult: float) -> list[float]:
    """Length in epochs of each cycle: cycle_len, cycle_len*mult, cycle_len*mult^2, ..."""
    return [cycle_len * cycle_mult**index for index in range(n_cycle)]


def sgdr_epochs(*, n_cycle: int, cycle_len: float, cycle_mult: float) -> float:
    """fastai's fit(lr, n_cycle, cycle_len, cycle_mult) epoch count: 3 cycles, len 1, mult 2 -> 1+2+4 = 7."""
    return sum(sgdr_cycle_lengths(n_cycle=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult))


def sgdr_cycle_ends(*, n_cycle: int, cycle_len: float, cycle_mult: float) -> list[int]:
    """The epochs (1-based, rounded) at which each cycle ends: 1, 3, 7 for 3 cycles, len 1, mult 2."""
    lengths = sgdr_cycle_lengths(n_cycle=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult)
    ends = [round(sum(lengths[: index + 1])) for index in range(n_cycle)]
    return sorted({max(1, end) for end in ends})


def sgdr_total_steps(*, steps_per_epoch: int, n_cycle: int, cycle_len: float, cycle_mult: float) -> int:
    lengths = sgdr_cycle_lengths(n_cycle=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult)
    return sum(_cycle_steps(length, steps_per_epoch) for length in lengths)


def sgdr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    n_cycle: int,
    cycle_len: float,
    cycle_mult: float,
    warmup: bool = False,
) -> float:
    """Cosine annealing with warm restarts: (1 + cos(pi * t / nb)) / 2 in each cycle of nb steps, nb growing
    by cycle_mult at each restart; past the last cycle it stays at that cycle's final value."""
    lengths = sgdr_cycle_lengths(n_cycle=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult)
    cycle_steps = [_cycle_steps(length, steps_per_epoch) for length in lengths]
    if warmup and step < cycle_steps[0] * WARMUP_FRACTION:
        return WARMUP_FACTOR
    position = min(step, sum(cycle_steps) - 1)
    for steps in cycle_steps:
        if position < steps:
            return (1 + math.cos(math.pi * position / steps)) / 2
        position -= steps
    raise AssertionError("unreachable: position is clamped to the last cycle")


def one_cycle_factor(
    step: int, *, total_steps: int, pct_start: float = 0.25, div: float = 25.0, div_final: float = 1e5
) -> float:
    """fastai 2's fit_one_cycle: cosine from 1/div up to 1 over pct_start of the steps, then down to 1/div_final."""
    warm_steps = pct_start * total_steps
    if step < warm_steps:
        return cosine_between(1 / div, 1.0, step / warm_steps)
    position = (step - warm_steps) / max(total_steps - warm_steps, 1)
    return cosine_between(1.0, 1 / div_final, min(position, 1.0))


@dataclass(frozen=True)
class Schedule:
    """A whole fit's schedule: how many steps, and the lr factor at each."""

    total_steps: int
    factor_at: Callable[[int], float]


def make_schedule(
    kind: str, *, steps_per_epoch: int, n_cycle: int, cycle_len: float, cycle_mult: float, warmup: bool
) -> Schedule:
    """SGDR or one-cycle over the epochs that fastai's fit(n_cycle, cycle_len, cycle_mult) would run."""
    total = sgdr_total_steps(
        steps_per_epoch=steps_per_epoch, n_cycle=n_cycle, cycle_len=cycle_len, cycle_mult=cycle_mult
    )
    if kind == "sgdr":

        def factor_at(step: int) -> float:
            return sgdr_factor(
                step,
                steps_per_epoch=steps_per_epoch,
                n_cycle=n_cycle,
                cycle_len=cycle_len,
                cycle_mult=cycle_mult,
                warmup=warmup,
            )

    elif kind == "one_cycle":

        def factor_at(step: int) -> float:
            return one_cycle_factor(step, total_steps=total)

    else:
        raise ValueError(f"schedule {kind!r}: expected sgdr or one_cycle")
    return Schedule(total_steps=total, factor_at=factor_at)


def _cycle_steps(length_in_epochs: float, steps_per_epoch: int) -> int:
    return max(1, round(length_in_epochs * steps_per_epoch))
