"""kagglecls ensemble's arithmetic: weights fitted on valid probabilities, and members that cannot be combined."""

from __future__ import annotations

import numpy as np
import pytest

from kagglecls.ensemble import EnsembleError, Member, check_compatible, fit_weights
from kagglecls.training import log_loss

TARGETS = np.array([0, 1, 2, 0, 1, 2, 0, 1])


def member(name: str, valid: np.ndarray, *, ids: list[str] | None = None, classes=("a", "b", "c")) -> Member:
    ids = np.array(ids or [f"v{index}" for index in range(len(TARGETS))])
    return Member(
        name=name,
        classes=classes,
        valid_ids=ids,
        valid=valid,
        targets=TARGETS,
        test_ids=np.array(["t1", "t2"]),
        test=np.full((2, 3), 1 / 3),
    )


def confident(right: list[bool]) -> np.ndarray:
    """0.8 on the target where `right`, else 0.8 on the next class."""
    rows = np.full((len(TARGETS), 3), 0.1)
    for index, (target, is_right) in enumerate(zip(TARGETS, right, strict=True)):
        rows[index, target if is_right else (target + 1) % 3] = 0.8
    return rows


def test_two_members_wrong_on_different_images_weigh_equally_and_beat_both():
    first = member("first", confident([True, True, True, True, False, False, True, True]))
    second = member("second", confident([True, True, False, False, True, True, True, True]))
    weights = fit_weights([first, second])
    np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-3)  # each is wrong twice: symmetric
    ensemble = log_loss(weights[0] * first.valid + weights[1] * second.valid, TARGETS)
    assert ensemble < min(first.valid_log_loss(), second.valid_log_loss()) - 0.05


def test_a_member_that_only_adds_noise_gets_no_weight():
    good = member("good", confident([True] * 8))
    uniform = member("uniform", np.full((8, 3), 1 / 3))
    weights = fit_weights([good, uniform])
    assert weights[0] > 0.99 and weights.sum() == pytest.approx(1.0)
    ensemble = log_loss(np.tensordot(weights, np.stack([good.valid, uniform.valid]), axes=1), TARGETS)
    assert ensemble <= good.valid_log_loss() + 1e-9


def test_members_on_other_images_or_classes_are_refused():
    base = member("base", confident([True] * 8))
    shifted = member("shifted", confident([True] * 8), ids=[f"w{index}" for index in range(8)])
    with pytest.raises(
        EnsembleError, match="shifted and base validate on different images .* --weights equal"
    ):
        check_compatible([base, shifted], need_valid=True)
    check_compatible([base, shifted], need_valid=False)  # equal weights need the same test ids only
    other = member("other", confident([True] * 8), classes=("a", "b", "d"))
    with pytest.raises(EnsembleError, match="other and base have different classes"):
        check_compatible([base, other], need_valid=False)


def test_a_better_member_gets_the_larger_interior_weight():
    better = member("better", confident([True, True, True, True, True, True, True, False]))
    worse = member("worse", confident([False, False, True, True, True, True, True, True]))
    weights = fit_weights([better, worse])
    assert 0.5 < weights[0] < 0.95 and weights.sum() == pytest.approx(1.0)

    def loss_at(first_weight: float) -> float:
        return log_loss(first_weight * better.valid + (1 - first_weight) * worse.valid, TARGETS)

    assert loss_at(weights[0]) < loss_at(0.5) - 1e-3  # fitted beats equal weights
    assert loss_at(weights[0]) <= min(loss_at(weights[0] + 0.02), loss_at(weights[0] - 0.02))  # a minimum
    assert loss_at(weights[0]) < min(better.valid_log_loss(), worse.valid_log_loss())
