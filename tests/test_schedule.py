"""Learning-rate schedules by value table: SGDR restarts and warm-up, one-cycle endpoints, totals."""

import math

import pytest

from kagglecls.schedule import (
    make_schedule,
    one_cycle_factor,
    sgdr_cycle_lengths,
    sgdr_epochs,
    sgdr_factor,
    sgdr_total_steps,
)

# 10 steps an epoch, fastai's fit(lr, 3, cycle_len=1, cycle_mult=2): cycles of 10, 20 and 40 steps.
SGDR = {"steps_per_epoch": 10, "n_cycle": 3, "cycle_len": 1, "cycle_mult": 2}


def _cosine(t: int, steps: int) -> float:
    return (1 + math.cos(math.pi * t / steps)) / 2


def test_sgdr_epochs_and_cycle_lengths_with_cycle_mult_2():
    assert sgdr_epochs(n_cycle=3, cycle_len=1, cycle_mult=2) == 7
    assert sgdr_cycle_lengths(n_cycle=3, cycle_len=1, cycle_mult=2) == [1, 2, 4]
    assert sgdr_epochs(n_cycle=3, cycle_len=2, cycle_mult=2) == 14  # params.yaml's train_head
    assert sgdr_epochs(n_cycle=2, cycle_len=1, cycle_mult=1) == 2
    assert sgdr_total_steps(**SGDR) == 70
    assert sgdr_total_steps(steps_per_epoch=10, n_cycle=1, cycle_len=0.5, cycle_mult=1) == 5


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1.0),  # start of cycle 1 (10 steps)
        (5, 0.5),  # mid-cycle
        (9, _cosine(9, 10)),  # just before the first restart: 0.0245
        (10, 1.0),  # just after it: cycle 2 (20 steps)
        (20, 0.5),
        (29, _cosine(19, 20)),  # just before the second restart: 0.0062
        (30, 1.0),  # cycle 3 (40 steps)
        (50, 0.5),
        (69, _cosine(39, 40)),  # last step
        (70, _cosine(39, 40)),  # past the end: stays at the last value
        (1000, _cosine(39, 40)),
    ],
)
def test_sgdr_factor_table(step, expected):
    assert sgdr_factor(step, **SGDR) == pytest.approx(expected, abs=1e-12)


def test_sgdr_values_before_restarts_are_small_and_decreasing():
    assert sgdr_factor(9, **SGDR) == pytest.approx(0.024471741852423, abs=1e-12)
    assert sgdr_factor(29, **SGDR) == pytest.approx(0.006155829702431, abs=1e-12)
    cycle_two = [sgdr_factor(step, **SGDR) for step in range(10, 30)]
    assert cycle_two == sorted(cycle_two, reverse=True)


def test_sgdr_warmup_first_twentieth_of_first_cycle_at_one_hundredth():
    # First cycle of 40 steps: 40 / 20 = 2 warm-up steps at 1/100, then the cosine goes on from step 2.
    settings = {"steps_per_epoch": 40, "n_cycle": 2, "cycle_len": 1, "cycle_mult": 1, "warmup": True}
    assert sgdr_factor(0, **settings) == 0.01
    assert sgdr_factor(1, **settings) == 0.01
    assert sgdr_factor(2, **settings) == pytest.approx(_cosine(2, 40), abs=1e-12)
    assert sgdr_factor(20, **settings) == pytest.approx(0.5, abs=1e-12)
    # The second cycle has no warm-up.
    assert sgdr_factor(40, **settings) == 1.0
    assert sgdr_factor(41, **settings) == pytest.approx(_cosine(1, 40), abs=1e-12)
    assert sgdr_factor(0, **{**settings, "warmup": False}) == 1.0


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (0, 1 / 25),  # start: lr_max / div
        (25, (1 / 25 + 1) / 2),  # half way up the cosine
        (50, 1.0),  # peak at pct_start = 0.25 of 200 steps
        (125, (1 + 1e-5) / 2),  # half way down
        (200, 1e-5),  # end: lr_max / div_final
        (300, 1e-5),
    ],
)
def test_one_cycle_factor_table(step, expected):
    assert one_cycle_factor(step, total_steps=200) == pytest.approx(expected, rel=1e-12)


def test_one_cycle_rises_then_falls():
    factors = [one_cycle_factor(step, total_steps=200) for step in range(201)]
    assert factors[:51] == sorted(factors[:51])
    assert factors[50:] == sorted(factors[50:], reverse=True)
    # The last step taken (199) is one step short of the end, as in fastai: just above 1e-5.
    assert 1e-5 < factors[199] < 2e-4


def test_make_schedule_totals_and_factors():
    sgdr = make_schedule("sgdr", warmup=False, **SGDR)
    assert sgdr.total_steps == 70
    assert [sgdr.factor_at(step) for step in (0, 5, 10, 30)] == pytest.approx([1.0, 0.5, 1.0, 1.0])
    warm = make_schedule("sgdr", warmup=True, **SGDR)
    assert warm.factor_at(0) == 0.01  # 10 / 20 = 0.5 warm-up steps: only step 0
    assert warm.factor_at(1) == pytest.approx(_cosine(1, 10))
    one_cycle = make_schedule("one_cycle", warmup=False, **SGDR)
    assert one_cycle.total_steps == 70
    assert one_cycle.factor_at(0) == pytest.approx(1 / 25)
    assert one_cycle.factor_at(17) < one_cycle.factor_at(18)  # peak at pct_start 0.25 x 70 = 17.5
    assert one_cycle.factor_at(18) > one_cycle.factor_at(19)
    assert one_cycle.factor_at(70) == pytest.approx(1e-5)


def test_make_schedule_unknown_kind():
    with pytest.raises(ValueError, match="'cosine': expected sgdr or one_cycle"):
        make_schedule("cosine", warmup=False, **SGDR)
