"""The training loop as plain functions on any (inputs, targets) loader: one epoch, evaluation, and a fit that
checkpoints and resumes. Under torchrun each rank trains its shard, metrics are reduced, rank 0 writes."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from kagglecls.checkpoints import Snapshot, resume, save_checkpoint
from kagglecls.device import SINGLE_PROCESS, DistributedContext, StepSettings, reduce_sums, unwrapped
from kagglecls.models import fused_for_inference
from kagglecls.schedule import Schedule

log = logging.getLogger(__name__)


def log_loss(probabilities: np.ndarray, targets: np.ndarray, *, eps: float = 1e-15) -> float:
    """Multi-class log loss as Kaggle and scikit-learn compute it: rows renormalised, clipped to [eps, 1-eps]."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    chosen = np.clip(probabilities[np.arange(len(targets)), targets], eps, 1 - eps)
    return float(-np.mean(np.log(chosen)))


def accuracy(probabilities: np.ndarray, targets: np.ndarray) -> float:
    return float(np.mean(np.argmax(probabilities, axis=1) == targets))


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
    mixup: float = 0.0,
) -> dict[str, float]:
    """One pass over `loader`; the lr at global step s is each group's peak lr x schedule.factor_at(s). With
    `mixup` (Beta's alpha), each batch is mixed with itself shuffled, weight lam ~ Beta(alpha, alpha) taken
    >= 0.5 as fastai's MixUp does, and the loss mixes the two targets' losses the same way."""
    settings.train_mode(model)
    loss_function = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    beta = torch.distributions.Beta(mixup, mixup) if mixup > 0 else None
    total_loss, total_items, step = 0.0, 0, first_step
    for inputs, targets in tqdm(loader, desc=description, leave=False, disable=not context.is_main):
        set_lr_factor(optimizer, schedule.factor_at(step))
        inputs, targets = settings.move(inputs), targets.to(settings.device, non_blocking=True)
        if beta is None:
            with settings.autocast():
                loss = loss_function(model(inputs), targets)
        else:
            lam = max(float(beta.sample()), 0.5)  # the torch generator fit() seeds each epoch
            other = torch.randperm(len(targets)).to(settings.device)
            with settings.autocast():
                outputs = model(lam * inputs + (1 - lam) * inputs[other])
                loss = lam * loss_function(outputs, targets) + (1 - lam) * loss_function(
                    outputs, targets[other]
                )
        optimizer.zero_grad(set_to_none=True)
        settings.backward_and_step(loss, optimizer)
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
    """Softmax probabilities and targets for every item of `loader`, in its order, through a BatchNorm-fused
    copy of the model; with `views`, batches are (items, views, ...) and probabilities (items, views,
    classes)."""
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


@dataclass(frozen=True)
class FitPlan:
    epochs: int
    steps_per_epoch: int
    schedule: Schedule
    seed: int
    # Epochs whose weights may be kept (SGDR's cycle ends; 0: the weights the fit starts from): the fit ends
    # with the weights of the one with the lowest valid log loss. Empty: the last epoch's weights.
    snapshot_epochs: tuple[int, ...] = ()
    # Epochs whose valid figures are computed (a fit's last epoch always is); None: every epoch.
    valid_epochs: tuple[int, ...] | None = None
    label_smoothing: float = 0.0  # of the training loss (nn.CrossEntropyLoss); valid figures never smooth
    mixup: float = 0.0  # Beta's alpha for mixup of the training batches; 0: off

    def validates(self, epoch: int) -> bool:
        """Whether `epoch` (1-based) gets valid figures: every epoch, or valid_epochs, the epochs whose weights
        may be kept and the last."""
        return self.valid_epochs is None or epoch in {*self.valid_epochs, *self.snapshot_epochs, self.epochs}


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
    valid_loader: Iterable | None,
    settings: StepSettings,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    context: DistributedContext = SINGLE_PROCESS,
    description: str = "fit",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train plan.epochs epochs, evaluating (each, or plan.valid_epochs), checkpointing and reseeding from
    (seed, epoch) each, so a resumed run ends the same; with plan.snapshot_epochs the best of those epochs'
    weights (valid log loss) is kept. `on_epoch` gets each epoch's record on rank 0 as it ends (a resumed
    run's earlier ones first). Without a valid_loader (a model of all the data) there are no valid figures
    and the last epoch is kept."""
    if valid_loader is None:
        plan = replace(plan, snapshot_epochs=())
    history, start_epoch, best = resume(checkpoint, fingerprint, model, optimizer)
    report = on_epoch if on_epoch is not None and context.is_main else lambda record: None
    for record in history:
        report(record)
    if 0 in plan.snapshot_epochs and start_epoch == 0 and context.is_main:
        start = {"epoch": 0, **evaluate(unwrapped(model), valid_loader, settings=settings)}
        log.info("%s before training: %s", description, _format(start))
        history.append(start)  # saved with each checkpoint, so a resumed run reports it again
        report(start)
        best = Snapshot.of(model, start)
    for epoch in range(start_epoch, plan.epochs):
        record = _one_epoch(
            model, optimizer, plan, epoch, train_loader, valid_loader, settings, context, description
        )
        history.append(record)
        report(record)
        if context.is_main and epoch + 1 in plan.snapshot_epochs:
            if best is None or record["valid_log_loss"] < best.record["valid_log_loss"]:
                best = Snapshot.of(model, record)
        if checkpoint is not None and context.is_main:
            save_checkpoint(
                checkpoint,
                model=unwrapped(model),
                optimizer=optimizer,
                epoch=epoch + 1,
                history=history,
                fingerprint=fingerprint,
                best=best,
            )
        if context.enabled:
            dist.barrier()
    trained = [record for record in history if record["epoch"] > 0]
    kept = trained[-1] if trained else {}
    if plan.snapshot_epochs:
        kept = _load_best(model, best, context) or kept
    return FitResult(history=trained, kept=kept)


def _one_epoch(model, optimizer, plan, epoch, train_loader, valid_loader, settings, context, description):
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
        mixup=plan.mixup,
    )
    first, top_lr = epoch * plan.steps_per_epoch, optimizer.param_groups[-1]["initial_lr"]
    factors = [plan.schedule.factor_at(step) for step in range(first, first + plan.steps_per_epoch)]
    number = epoch + 1
    # lr: the top layer group's, averaged over the epoch's steps
    record = {"epoch": number, "train_loss": record["train_loss"], "lr": top_lr * float(np.mean(factors))}
    if context.is_main:
        if valid_loader is not None and plan.validates(number):
            record.update(evaluate(unwrapped(model), valid_loader, settings=settings))
        log.info("%s epoch %d/%d: %s", description, number, plan.epochs, _format(record))
    return record


def _load_best(model: nn.Module, best: Snapshot | None, context: DistributedContext) -> dict[str, float]:
    """Load the kept snapshot: rank 0 chose it, every rank gets its weights. Returns its record ({} on the
    other ranks, which have no valid figures)."""
    if context.is_main and best is not None:
        unwrapped(model).load_state_dict(best.state)
        log.info("kept the weights of epoch %d: %s", best.record["epoch"], _format(best.record))
    if context.enabled:
        for tensor in unwrapped(model).state_dict().values():
            dist.broadcast(tensor, src=0)
    return best.record if context.is_main and best is not None else {}


def _format(record: dict[str, float]) -> str:
    return " ".join(
        f"{key}={value:.3g}"
        if key == "lr"
        else f"{key}={value:.4f}"
        if isinstance(value, float)
        else f"{key}={value}"
        for key, value in record.items()
    )
