"""The training loop as plain functions: one epoch, evaluation, a whole fit with checkpoints, lr_find.

Works on any (inputs, targets) loader: images through the full model, or precomputed activations through the
head alone. Distributed (torchrun) runs shard the data and reduce the metrics; only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kagglecls.atomic import write_file
from kagglecls.models import fused_for_inference
from kagglecls.schedule import Schedule

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- devices, seeds, distributed


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"base.device: {requested!r} but no CUDA device is available; use auto or cpu")
    return torch.device(requested)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


# ---------------------------------------------------------------- metrics


def log_loss(probabilities: np.ndarray, targets: np.ndarray, *, eps: float = 1e-15) -> float:
    """Multi-class log loss as Kaggle and scikit-learn compute it: rows renormalised, clipped to [eps, 1-eps]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    chosen = np.clip(probabilities[np.arange(len(targets)), targets], eps, 1 - eps)
    return float(-np.mean(np.log(chosen)))


def accuracy(probabilities: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == targets))


# ---------------------------------------------------------------- optimisation


@dataclass
class StepSettings:
    """How each step runs: device, precision, memory format, which BN to keep in eval mode."""

    device: torch.device
    amp: bool = False
    channels_last: bool = False
    frozen_bn: str = "eval"
    train_mode: Callable[[nn.Module], None] = field(default=lambda model: model.train())

    def autocast(self) -> torch.autocast:
        enabled = self.amp and self.device.type == "cuda"
        dtype = torch.bfloat16 if enabled and torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=enabled)

    def move(self, inputs: torch.Tensor) -> torch.Tensor:
        inputs = inputs.to(self.device, non_blocking=True)
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs


def make_optimizer(
    parameter_groups: Sequence[Sequence[nn.Parameter]],
    lrs: Sequence[float],
    *,
    kind: str,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """One optimizer group per layer group, each with its own peak lr (kept as `initial_lr`).

    AdamW runs torch's fused kernel, on the CPU as on CUDA: one call a step for every parameter, and the same
    numbers, bit for bit, as the runs so far (measured). SGD is fused on CUDA; on the CPU its foreach form
    gives those runs' numbers, bit for bit, where the fused one differs in the last bits.
    """
    groups = [
        {"params": list(params), "lr": lr, "initial_lr": lr}
        for params, lr in zip(parameter_groups, lrs, strict=True)
        if params
    ]
    if kind == "adam":
        return torch.optim.AdamW(groups, betas=(0.9, 0.99), weight_decay=weight_decay, fused=True)
    if kind == "sgd":
        on_cuda = any(param.is_cuda for group in groups for param in group["params"])
        return torch.optim.SGD(
            groups, momentum=0.9, weight_decay=weight_decay, fused=on_cuda, foreach=not on_cuda
        )
    raise ValueError(f"optimizer {kind!r}: expected adam or sgd")


def set_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * factor


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    schedule: Schedule,
    first_step: int,
    settings: StepSettings,
    context: DistributedContext = SINGLE_PROCESS,
    description: str = "train",
    label_smoothing: float = 0.0,
) -> dict[str, float]:
    """One pass over `loader`; the lr at global step s is each group's peak lr x schedule.factor_at(s)."""
    settings.train_mode(model)
    loss_function = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    total_loss, total_items, step = 0.0, 0, first_step
    for inputs, targets in tqdm(loader, desc=description, leave=False, disable=not context.is_main):
        set_lr_factor(optimizer, schedule.factor_at(step))
        inputs, targets = settings.move(inputs), targets.to(settings.device, non_blocking=True)
        with settings.autocast():
            loss = loss_function(model(inputs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        total_items += len(targets)
        step += 1
    summed_loss, summed_items = reduce_sums([total_loss, total_items], context, settings.device)
    return {"train_loss": summed_loss / max(summed_items, 1), "steps": step - first_step}


@torch.inference_mode()
def predict_probabilities(
    model: nn.Module,
    loader: Iterable,
    *,
    settings: StepSettings,
    description: str = "predict",
    views: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and targets for every item of `loader`, in its order.

    With `views`, each item is several inputs (batches of shape (items, views, ...), as TtaViews makes):
    they go through the model together and the probabilities have shape (items, views, classes).
    Nothing trains on these, so they run on a copy of the model with BatchNorm fused into the convs
    (models.fused_for_inference).
    """
    fused = fused_for_inference(model)
    all_probabilities, all_targets = [], []
    for inputs, targets in tqdm(loader, desc=description, leave=False):
        shape = inputs.shape[:2] if views else inputs.shape[:1]
        with settings.autocast():
            logits = fused(settings.move(inputs.flatten(0, len(shape) - 1)))
        probabilities = torch.softmax(logits.float(), dim=1).reshape(*shape, -1)
        all_probabilities.append(probabilities.cpu().numpy())
        all_targets.append(np.asarray(targets))
    return np.concatenate(all_probabilities), np.concatenate(all_targets)


def evaluate(model: nn.Module, loader: Iterable, *, settings: StepSettings) -> dict[str, float]:
    probabilities, targets = predict_probabilities(model, loader, settings=settings, description="valid")
    return {
        "valid_log_loss": log_loss(probabilities, targets),
        "valid_accuracy": accuracy(probabilities, targets),
    }


# ---------------------------------------------------------------- a whole fit, with checkpoints


@dataclass(frozen=True)
class FitPlan:
    epochs: int
    steps_per_epoch: int
    schedule: Schedule
    seed: int
    # Epochs whose weights may be kept (SGDR's cycle ends; 0: the weights the fit starts from): the fit ends
    # with the weights of the one with the lowest valid log loss. Empty: the last epoch's weights.
    snapshot_epochs: tuple[int, ...] = ()
    label_smoothing: float = 0.0  # of the training loss (nn.CrossEntropyLoss); valid figures never smooth


@dataclass
class Snapshot:
    record: dict[str, float]  # epoch and valid figures
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, record: dict[str, float]) -> Snapshot:
        # On the CPU: a snapshot of a large model does not take GPU memory the training needs.
        state = {
            key: value.detach().to("cpu", copy=True) for key, value in _unwrapped(model).state_dict().items()
        }
        return cls(record=dict(record), state=state)


@dataclass(frozen=True)
class FitResult:
    history: list[dict[str, float]]
    kept: dict[str, float]  # the record (epoch, valid figures) of the weights the model ends with; epoch 0:
    # the weights it started from


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    plan: FitPlan,
    train_loader: Iterable,
    valid_loader: Iterable,
    settings: StepSettings,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    context: DistributedContext = SINGLE_PROCESS,
    description: str = "fit",
) -> FitResult:
    """Train for plan.epochs epochs, evaluating after each; saves a checkpoint every epoch and resumes from it.

    Each epoch reseeds from (seed, epoch), so a run resumed after epoch e ends with the same weights as one
    that was never stopped. With plan.snapshot_epochs, the best of those epochs' weights (by valid log loss)
    is kept and loaded at the end: the lesson's "train until it over-fits", judged at SGDR's cycle ends.
    """
    history, start_epoch, best = _resume(checkpoint, fingerprint, model, optimizer)
    if 0 in plan.snapshot_epochs and start_epoch == 0 and context.is_main:
        start = {"epoch": 0, **evaluate(_unwrapped(model), valid_loader, settings=settings)}
        log.info("%s before training: %s", description, _format(start))
        best = Snapshot.of(model, start)
    for epoch in range(start_epoch, plan.epochs):
        record = _one_epoch(
            model, optimizer, plan, epoch, train_loader, valid_loader, settings, context, description
        )
        history.append(record)
        if context.is_main and epoch + 1 in plan.snapshot_epochs:
            if best is None or record["valid_log_loss"] < best.record["valid_log_loss"]:
                best = Snapshot.of(model, record)
        if checkpoint is not None and context.is_main:
            save_checkpoint(
                checkpoint,
                model=_unwrapped(model),
                optimizer=optimizer,
                epoch=epoch + 1,
                history=history,
                fingerprint=fingerprint,
                best=best,
            )
        if context.enabled:
            dist.barrier()
    kept = history[-1] if history else {}
    if plan.snapshot_epochs:
        kept = _load_best(model, best, context) or kept
    return FitResult(history=history, kept=kept)


def _one_epoch(model, optimizer, plan, epoch, train_loader, valid_loader, settings, context, description):  # noqa: ANN001, ANN202, PLR0913
    torch.manual_seed(plan.seed * 7_919 + epoch)
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    record = train_one_epoch(
        model,
        train_loader,
        optimizer,
        schedule=plan.schedule,
        first_step=epoch * plan.steps_per_epoch,
        settings=settings,
        context=context,
        description=f"{description} epoch {epoch + 1}/{plan.epochs}",
        label_smoothing=plan.label_smoothing,
    )
    record = {"epoch": epoch + 1, "train_loss": record["train_loss"]}
    if context.is_main:
        record.update(evaluate(_unwrapped(model), valid_loader, settings=settings))
        log.info("%s epoch %d/%d: %s", description, epoch + 1, plan.epochs, _format(record))
    return record


def _load_best(model: nn.Module, best: Snapshot | None, context: DistributedContext) -> dict[str, float]:
    """Load the kept snapshot: rank 0 chose it, every rank gets its weights. Returns its record ({} on the
    other ranks, which have no valid figures)."""
    if context.is_main and best is not None:
        _unwrapped(model).load_state_dict(best.state)
        log.info("kept the weights of epoch %d: %s", best.record["epoch"], _format(best.record))
    if context.enabled:
        for tensor in _unwrapped(model).state_dict().values():
            dist.broadcast(tensor, src=0)
    return best.record if context.is_main and best is not None else {}


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _format(record: dict[str, float]) -> str:
    return " ".join(
        f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}"
        for key, value in record.items()
    )


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, float]],
    fingerprint: str,
    best: Snapshot | None = None,
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history_json": json.dumps(history),
        "fingerprint": fingerprint,
    }
    if best is not None:
        state.update(best_record_json=json.dumps(best.record), best_model=best.state)
    save_atomic(state, path)


def save_atomic(state: dict, path: Path) -> None:
    """torch.save through atomic.write_file. Saved through a file object, the archive's inner
    folder is always "archive" (given a path, torch names it after the file, here with our pid): the same
    weights give the same bytes, so DVC sees an unchanged model as unchanged."""
    with write_file(path) as temporary, open(temporary, "wb") as handle:
        torch.save(state, handle)


def _resume(
    checkpoint: Path | None, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[dict[str, float]], int, Snapshot | None]:
    if checkpoint is None or not checkpoint.is_file():
        return [], 0, None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is from other inputs, params or code: starting over", checkpoint)
        return [], 0, None
    _unwrapped(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s after epoch %d", checkpoint, state["epoch"])
    best = None
    if "best_model" in state:
        best = Snapshot(record=json.loads(state["best_record_json"]), state=state["best_model"])
    return json.loads(state["history_json"]), int(state["epoch"]), best


def fingerprint_of(*parts: object) -> str:
    """A short hash of what a checkpoint's weights depend on: the given parts (params, input hashes) and the
    code, this package's sources and the running script, so that a checkpoint left by other code is never
    resumed."""
    digest = hashlib.sha256(json.dumps([str(part) for part in parts]).encode())
    script = Path(sys.argv[0])
    sources = sorted(Path(__file__).parent.glob("*.py")) + ([script] if script.suffix == ".py" else [])
    for path in sources:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- lr_find


@dataclass(frozen=True)
class LrFindResult:
    lrs: list[float]
    losses: list[float]  # smoothed, debiased


def lr_find(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    start_lr: float,
    end_lr: float,
    num_steps: int,
    settings: StepSettings,
    smoothing: float = 0.98,
    divergence: float = 4.0,
) -> LrFindResult:
    """fastai's lr finder: lr_i = start x (end/start)^(i/n), one batch a step, smoothed debiased loss; stops when
    the loss exceeds `divergence` x the best or is NaN. Model and optimizer state are restored afterwards."""
    saved_model = {key: value.detach().clone() for key, value in model.state_dict().items()}
    saved_optimizer = _clone_state(optimizer.state_dict())
    lrs, losses = [], []
    try:
        lrs, losses = _sweep(
            model, optimizer, loader, start_lr, end_lr, num_steps, settings, smoothing, divergence
        )
    finally:
        model.load_state_dict(saved_model)
        optimizer.load_state_dict(saved_optimizer)
    return LrFindResult(lrs=lrs, losses=losses)


def _sweep(model, optimizer, loader, start_lr, end_lr, num_steps, settings, smoothing, divergence):  # noqa: ANN001, ANN202, PLR0913
    settings.train_mode(model)
    loss_function = nn.CrossEntropyLoss()
    # Under DDP every rank must see the same curve, or ranks stop at different steps (a hang) and suggest
    # different lrs (replicas that drift apart).
    synchronised = isinstance(model, nn.parallel.DistributedDataParallel)
    average, best = 0.0, math.inf
    lrs, losses = [], []
    peak = [group["initial_lr"] for group in optimizer.param_groups]
    top = max(peak)
    step = 0
    while step < num_steps:
        for inputs, targets in loader:
            lr = start_lr * (end_lr / start_lr) ** (step / max(num_steps - 1, 1))
            for group, group_peak in zip(optimizer.param_groups, peak, strict=True):
                group["lr"] = lr * group_peak / top  # keep differential ratios during the sweep
            with settings.autocast():
                loss = loss_function(model(settings.move(inputs)), targets.to(settings.device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = _mean_over_ranks(loss) if synchronised else loss.item()
            average = smoothing * average + (1 - smoothing) * value
            smoothed = average / (1 - smoothing ** (step + 1))
            lrs.append(lr)
            losses.append(smoothed)
            best = min(best, smoothed)
            step += 1
            if step >= num_steps or not math.isfinite(smoothed) or smoothed > divergence * best:
                return lrs, losses
    return lrs, losses


def _mean_over_ranks(loss: torch.Tensor) -> float:
    total = loss.detach().to(torch.float64, copy=True)
    dist.all_reduce(total)
    return total.item() / dist.get_world_size()


def _clone_state(state: object) -> object:
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: _clone_state(value) for key, value in state.items()}
    if isinstance(state, list):
        return [_clone_state(value) for value in state]
    return state


def suggestion_window(lrs: Sequence[float], losses: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """fastai 2 drops the first 10% and the last 5 points before suggesting (or plotting)."""
    n = len(lrs)
    start, end = n // 10, max(n - 5, n // 10 + 2)
    return np.asarray(lrs[start:end], dtype=np.float64), np.asarray(losses[start:end], dtype=np.float64)


def suggest_minimum(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr at the lowest loss, one order of magnitude back."""
    losses = np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=np.inf)
    return float(lrs[int(np.argmin(losses))]) / 10


def suggest_steep(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The lr where the loss falls fastest against log(lr)."""
    lrs_array, losses_array = np.asarray(lrs, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    slopes = np.diff(losses_array) / np.diff(np.log(lrs_array))
    return float(lrs_array[int(np.nanargmin(slopes))])


def suggest_valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai 2's valley: the longest decreasing run of the loss, about half way along it."""
    n = len(losses)
    run_length = [1] * n
    best_start, best_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run_length[i] < run_length[j] + 1:
                run_length[i] = run_length[j] + 1
            if run_length[best_end] < run_length[i]:
                best_end = i
                best_start = best_end - run_length[best_end]
    sections = (best_end - best_start) / 3
    return float(lrs[best_start + int(sections) + int(sections / 2)])


SUGGESTERS = {"valley": suggest_valley, "minimum": suggest_minimum, "steep": suggest_steep}


# A sweep whose smoothed loss never falls this much below its first value has nothing to suggest from: a flat
# curve, or a model already at its minimum (a trained head), whose loss only rises as the lr grows.
MIN_RELATIVE_FALL = 0.01


def suggest_lr(result: LrFindResult, method: str) -> float | None:
    """The suggested lr, or None where the curve cannot give one (too few steps, or a loss that never fell)."""
    lrs, losses = suggestion_window(result.lrs, result.losses)
    if len(lrs) < 3:
        return None
    first, lowest = float(losses[0]), float(np.nanmin(losses))
    if not first - lowest > MIN_RELATIVE_FALL * abs(first):
        return None
    return SUGGESTERS[method](list(lrs), list(losses))


def why_no_suggestion(result: LrFindResult) -> str:
    steps = len(result.lrs)
    if len(suggestion_window(result.lrs, result.losses)[0]) < 3:
        return f"the sweep stopped after {steps} steps, too few to read"
    return f"the loss never fell by {MIN_RELATIVE_FALL:.0%} over {steps} steps"
