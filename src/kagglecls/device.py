"""Where and how the network runs: device, seeds, precision and memory format, torchrun processes."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE_PROCESS = DistributedContext()


def pick_device(requested: str, context: DistributedContext = SINGLE_PROCESS) -> torch.device:
    """base.device as a torch.device; under torchrun each process takes the GPU of its local rank."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"base.device: {requested!r} but no CUDA device is available; use auto or cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        # TF32 tensor cores for float32 matmuls (cuDNN's convolutions use them by default), and cuDNN's
        # fastest algorithm for each shape: speed over bit-exact reruns, on CUDA only.
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.benchmark = True
    return torch.device("cuda", context.local_rank) if device.type == "cuda" and context.enabled else device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed(device_name: str) -> DistributedContext:
    """Join the torchrun process group when launched by torchrun (gloo on CPU, nccl on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistributedContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank)


def reduce_sums(values: Sequence[float], context: DistributedContext, device: torch.device) -> list[float]:
    if not context.enabled:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def wrap_distributed(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    if not context.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def compiled(model: nn.Module, enabled: bool) -> nn.Module:
    """base.compile: `model` (DDP-wrapped or not) through torch.compile, for the training steps."""
    return torch.compile(model) if enabled else model


def uncompiled(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's OptimizedModule (`model` itself when it was not compiled)."""
    return getattr(model, "_orig_mod", model)


def unwrapped(model: nn.Module) -> nn.Module:
    """The Classifier inside torch.compile's and DistributedDataParallel's wrappers: its state_dict's keys are
    the same however it was trained."""
    model = uncompiled(model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


@dataclass
class StepSettings:
    """How each step runs: device, precision, memory format, and how the model is put in training mode."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    train_mode: Callable[[nn.Module], None] = field(default=lambda model: model.train())
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        # float16's narrow range lets small gradients underflow to zero: scale the loss; bfloat16 needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype() == torch.float16)

    def amp_dtype(self) -> torch.dtype | None:
        """Mixed precision on CUDA: bfloat16 where the GPU computes it natively (compute capability 8.0+),
        else float16 (a T4 or P100 emulates bfloat16, slowly); None without autocast."""
        if not (self.amp and self.device.type == "cuda"):
            return None
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.bfloat16 if native_bf16 else torch.float16

    def autocast(self) -> torch.autocast:
        dtype = self.amp_dtype()
        return torch.autocast(
            device_type=self.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None
        )

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """loss.backward() and optimizer.step(), through the GradScaler under float16 (a step whose scaled
        gradients overflowed is skipped)."""
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def move(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs
