"""make_optimizer: torch.optim's AdamW and SGD with the recipe's settings, and their state through a checkpoint."""

import copy

import pytest
import torch
from torch import nn

from kagglecls.device import StepSettings
from kagglecls.fitting import make_optimizer
from kagglecls.lr_find import lr_find


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    params = list(model.parameters())
    return make_optimizer([params[:2], params[2:]], [1e-2, 3e-3], kind=kind, weight_decay=0.01)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 3, 8, 8, generator=generator), torch.randint(0, 5, (8,), generator=generator)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, *, first: int = 0) -> None:
    for step in range(first, first + steps):
        inputs, targets = _batch(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * (1 - step / 20)  # a schedule moves the lr every step
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def test_the_recipes_settings():
    model = _model()
    adam = _optimizer(model, "adam")
    assert type(adam) is torch.optim.AdamW
    assert [group["initial_lr"] for group in adam.param_groups] == [1e-2, 3e-3]
    assert all(group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.01 for group in adam.param_groups)
    sgd = _optimizer(model, "sgd")
    assert type(sgd) is torch.optim.SGD
    assert all(group["momentum"] == 0.9 and group["weight_decay"] == 0.01 for group in sgd.param_groups)
    assert all(group["dampening"] == 0 and not group["nesterov"] for group in sgd.param_groups)


def test_a_first_adamw_step_by_value():
    """From a fresh state Adam's step is lr x g / (|g| + eps), after the decoupled decay p x (1 - lr x wd)."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    optimizer = make_optimizer([list(model.parameters())], [0.1], kind="adam", weight_decay=0.5)
    model.weight.grad = torch.tensor([[3.0, -1e-3]])
    optimizer.step()
    expected = torch.tensor([[1.0 * 0.95 - 0.1, -2.0 * 0.95 + 0.1 * 1e-3 / (1e-3 + 1e-8)]])
    torch.testing.assert_close(model.weight.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_state_dict_round_trip_resumes_exactly(kind: str) -> None:
    model = _model()
    optimizer = _optimizer(model, kind)
    _train(model, optimizer, 3)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())  # as a checkpoint on disk: the live state moves on
    assert [group["params"] for group in saved["param_groups"]] == [[0, 1], [2, 3, 4, 5]]
    _train(model, optimizer, 3, first=3)

    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(saved_model)
    resumed = _optimizer(resumed_model, kind)
    resumed.load_state_dict(saved)
    _train(resumed_model, resumed, 3, first=3)
    for mine, theirs in zip(resumed_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)


def test_training_after_lr_find_is_training_without_it():
    """lr_find restores the optimizer from a copy of its state: steps after it go as if it never ran."""
    model, other = _model(), _model()
    optimizer, untouched = _optimizer(model, "adam"), _optimizer(other, "adam")
    _train(model, optimizer, 2)
    _train(other, untouched, 2)
    settings = StepSettings(device=torch.device("cpu"))
    lr_find(model, optimizer, [_batch(10)], start_lr=1e-5, end_lr=1.0, num_steps=5, settings=settings)
    _train(model, optimizer, 3, first=2)
    _train(other, untouched, 3, first=2)
    for mine, theirs in zip(model.state_dict().values(), other.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)


def test_mismatched_state_dict_is_refused() -> None:
    model = _model()
    optimizer = _optimizer(model, "adam")
    _train(model, optimizer, 1)
    other = make_optimizer([list(model.parameters())], [1e-3], kind="adam", weight_decay=0.01)
    with pytest.raises(ValueError, match="parameter groups"):
        other.load_state_dict(optimizer.state_dict())


def test_empty_parameter_list_is_refused() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        make_optimizer([[], []], [1e-3, 1e-2], kind="adam", weight_decay=0.01)
