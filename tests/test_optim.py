"""kagglecls.optim against torch.optim, step for step, and its state dict."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from kagglecls import optim


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


def _groups(model: nn.Module, lrs: tuple[float, float]) -> list[dict]:
    params = list(model.parameters())
    return [{"params": params[:2], "lr": lrs[0]}, {"params": params[2:], "lr": lrs[1]}]


def _train(model: nn.Module, optimizer, steps: int, *, first: int = 0) -> None:  # noqa: ANN001
    for step in range(first, first + steps):
        generator = torch.Generator().manual_seed(step)
        inputs = torch.randn(8, 3, 8, 8, generator=generator)
        targets = torch.randint(0, 5, (8,), generator=generator)
        for group_index, group in enumerate(optimizer.param_groups):
            group["lr"] = (1e-2, 3e-3)[group_index] * (1 - step / 20)  # a schedule moves the lr every step
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()


def _pair(kind: str) -> tuple[nn.Module, object, nn.Module, object]:
    ours_model, torch_model = _model(), _model()
    if kind == "adam":
        ours = optim.AdamW(_groups(ours_model, (1e-2, 3e-3)), betas=(0.9, 0.99), weight_decay=0.01)
        reference = torch.optim.AdamW(
            _groups(torch_model, (1e-2, 3e-3)), betas=(0.9, 0.99), weight_decay=0.01, fused=True
        )
    else:
        ours = optim.SGD(_groups(ours_model, (1e-2, 3e-3)), momentum=0.9, weight_decay=0.01)
        reference = torch.optim.SGD(_groups(torch_model, (1e-2, 3e-3)), momentum=0.9, weight_decay=0.01)
    return ours_model, ours, torch_model, reference


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_steps_match_torch_optim(kind: str) -> None:
    ours_model, ours, torch_model, reference = _pair(kind)
    _train(ours_model, ours, 6)
    _train(torch_model, reference, 6)
    for (name, mine), theirs in zip(
        ours_model.state_dict().items(), torch_model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7, msg=name)
    assert not torch.equal(ours_model[0].weight, _model()[0].weight)  # it did train
    for mine, theirs in zip(ours.state.values(), reference.state.values(), strict=True):
        assert mine.keys() == theirs.keys()


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_state_dict_round_trip_resumes_exactly(kind: str) -> None:
    model, optimizer, _, _ = _pair(kind)
    _train(model, optimizer, 3)
    saved_model = {key: value.clone() for key, value in model.state_dict().items()}
    saved = copy.deepcopy(optimizer.state_dict())  # as a checkpoint on disk: the live state moves on
    assert [group["params"] for group in saved["param_groups"]] == [[0, 1], [2, 3, 4, 5]]
    _train(model, optimizer, 3, first=3)

    resumed_model = _model(seed=1)
    resumed_model.load_state_dict(saved_model)
    resumed = type(optimizer)(_groups(resumed_model, (1.0, 1.0)))
    resumed.load_state_dict(saved)
    _train(resumed_model, resumed, 3, first=3)
    for mine, theirs in zip(resumed_model.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)


def test_loading_copies_the_state() -> None:
    """lr_find restores a saved state dict: training afterwards must not write into that saved copy."""
    model, optimizer, _, _ = _pair("adam")
    _train(model, optimizer, 2)
    saved = optimizer.state_dict()
    optimizer.load_state_dict(saved)
    before = {number: values["exp_avg"].clone() for number, values in saved["state"].items()}
    _train(model, optimizer, 2, first=2)
    for number, values in saved["state"].items():
        assert torch.equal(values["exp_avg"], before[number])


def test_resumes_from_a_torch_optim_checkpoint() -> None:
    """Checkpoints written before this module (by torch.optim.AdamW) resume to the same weights."""
    _, _, torch_model, reference = _pair("adam")
    _train(torch_model, reference, 3)
    continued = _model(seed=2)
    continued.load_state_dict(torch_model.state_dict())
    ours = optim.AdamW(_groups(continued, (1.0, 1.0)), betas=(0.9, 0.99), weight_decay=0.01)
    ours.load_state_dict(reference.state_dict())
    _train(torch_model, reference, 2, first=3)
    _train(continued, ours, 2, first=3)
    for mine, theirs in zip(continued.state_dict().values(), torch_model.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-7)


def test_mismatched_state_dict_is_refused() -> None:
    model, optimizer, _, _ = _pair("adam")
    _train(model, optimizer, 1)
    other = optim.AdamW([{"params": list(model.parameters())}])
    with pytest.raises(ValueError, match="parameter groups do not match"):
        other.load_state_dict(optimizer.state_dict())


def test_empty_parameter_list_is_refused() -> None:
    with pytest.raises(ValueError, match="empty parameter list"):
        optim.AdamW([{"params": []}])


def test_training_does_not_import_dynamo() -> None:
    """The point of the module: a step with it leaves torch._dynamo (1.9 s to import here) unimported."""
    code = (
        "import sys, torch\n"
        "from kagglecls.training import make_optimizer\n"
        "model = torch.nn.Linear(3, 2)\n"
        "optimizer = make_optimizer([list(model.parameters())], [0.1], kind='adam', weight_decay=0.01)\n"
        "model(torch.ones(4, 3)).sum().backward()\n"
        "optimizer.step()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
