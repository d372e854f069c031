"""Mixed precision and the CUDA settings, checked on the CPU: which dtype autocast picks, when the loss is
scaled, and that the CPU path is untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kagglecls import device as device_module
from kagglecls.device import StepSettings, pick_device

CUDA = torch.device("cuda")


@pytest.fixture
def recorded_scalers(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Each GradScaler made, as its arguments (no GPU here to make a real enabled one)."""
    made: list[dict] = []
    real = torch.amp.GradScaler

    def record(device: str, enabled: bool) -> torch.amp.GradScaler:
        made.append({"device": device, "enabled": enabled})
        return real("cpu", enabled=False)

    monkeypatch.setattr(device_module.torch.amp, "GradScaler", record)
    return made


@pytest.mark.parametrize(("native_bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_autocast_takes_bfloat16_only_where_the_gpu_computes_it_natively(
    monkeypatch: pytest.MonkeyPatch, recorded_scalers: list[dict], native_bf16: bool, expected: torch.dtype
) -> None:
    # A T4 reports bfloat16 as supported only counting emulation: it must get float16 and a scaler.
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: native_bf16 or including_emulation
    )
    settings = StepSettings(device=CUDA, amp=True)
    assert settings.amp_dtype() == expected
    assert recorded_scalers == [{"device": "cuda", "enabled": expected == torch.float16}]


def test_no_autocast_and_no_scaling_on_the_cpu_or_with_amp_off(recorded_scalers: list[dict]) -> None:
    assert StepSettings(device=torch.device("cpu"), amp=True).amp_dtype() is None
    assert StepSettings(device=CUDA, amp=False).amp_dtype() is None
    assert [scaler["enabled"] for scaler in recorded_scalers] == [False, False]
    assert not torch.is_autocast_enabled("cpu")
    with StepSettings(device=torch.device("cpu"), amp=True).autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_backward_and_step_on_the_cpu_is_a_plain_backward_and_step() -> None:
    torch.manual_seed(0)
    first = nn.Linear(4, 3)
    second = nn.Linear(4, 3)
    second.load_state_dict(first.state_dict())
    inputs, targets = torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    loss = nn.functional.cross_entropy(first(inputs), targets)
    loss.backward()
    plain.step()
    scaled = torch.optim.SGD(second.parameters(), lr=0.1, momentum=0.9)
    settings = StepSettings(device=torch.device("cpu"))
    settings.backward_and_step(nn.functional.cross_entropy(second(inputs), targets), scaled)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cuda_device_turns_on_tf32_and_cudnn_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.get_float32_matmul_precision()
    try:
        assert pick_device("cpu").type == "cpu"
        assert not torch.backends.cudnn.benchmark  # the CPU path changes nothing
        assert torch.get_float32_matmul_precision() == before == "highest"
        assert pick_device("cuda") == CUDA
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)
