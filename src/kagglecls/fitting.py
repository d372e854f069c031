"""Stages train_head, train_augmented and finetune: the three ways the recipe trains."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kagglecls import logistic
from kagglecls.atomic import write_json
from kagglecls.checkpoints import fingerprint_of, save_atomic
from kagglecls.device import (
    DistributedContext,
    StepSettings,
    compiled,
    init_distributed,
    pick_device,
    reduce_sums,
    seed_everything,
    wrap_distributed,
)
from kagglecls.features import PIXEL_GRID, PIXELS_SUFFIX, FeatureBatches, split_features
from kagglecls.loading import (
    ALL_DATA,
    Split,
    build_model,
    fold_count,
    fold_model,
    fold_name,
    image_loader,
    load_classifier,
    load_splits,
    presets,
    step_settings,
    to_device,
    trained_augmentation,
)
from kagglecls.lr_find import lr_find, suggest_lr, why_no_suggestion
from kagglecls.manifest import file_md5
from kagglecls.models import Classifier, batchnorms_in_convs, differential_lrs, freeze_to, group_parameters
from kagglecls.params import AugmentedFitParams, FitParams, HeadParams, Params, ParamsError
from kagglecls.schedule import make_schedule, sgdr_cycle_ends, sgdr_epochs
from kagglecls.tracking import StageLive
from kagglecls.training import FitPlan, evaluate, fit, log_loss

log = logging.getLogger(__name__)


def make_optimizer(
    parameter_groups: Sequence[Sequence[nn.Parameter]],
    lrs: Sequence[float],
    *,
    kind: str,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """One optimizer group per layer group, each with its own peak lr (kept as `initial_lr`). AdamW is fused
    on CPU and CUDA; SGD is foreach on the CPU, whose numbers match the runs so far bit for bit."""
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


@dataclass(frozen=True)
class HeadSweep:
    """Where lr_find sweeps when only the head trains: the head alone, on precomputed activations."""

    head: nn.Module
    loader: Iterable


@dataclass(frozen=True)
class StageOutputs:
    model: Path
    live: Path  # dvclive's folder: the stage's metrics and plots
    checkpoint: Path | None = None
    folds: Path | None = None  # with cv.folds k > 1, folds 2..k's models and dvclive folders

    def of_fold(self, fold: int | str) -> StageOutputs:
        """Fold 1's outputs are the stage's own (with one split, its only ones); fold k's model is
        <folds>/fold<k>.pt, its dvclive folder <folds>/fold<k>/ (ALL_DATA's: <folds>/all.pt, <folds>/all/)."""
        if fold == 1:
            return self
        name = fold_name(fold)
        checkpoint = self.checkpoint and self.checkpoint.with_name(
            f"{self.checkpoint.stem}_{name}{self.checkpoint.suffix}"
        )
        model = fold_model(self.model, self.folds, fold)  # where the next stage looks for it
        return StageOutputs(model=model, live=self.folds / name, checkpoint=checkpoint)


def each_fold(
    stage: str,
    reorganised: Path,
    outputs: StageOutputs,
    train_fold: Callable[[int | str, StageOutputs], dict | None],
    *,
    train_on_all: bool = False,
) -> None:
    """`train_fold(fold, its outputs)` for each fold reorganise made, then for ALL_DATA with `train_on_all`;
    it returns the fold's summary figures (None on torchrun's other ranks). <folds>/folds.json gets each
    fold's figures and, with k > 1 folds, the stage's metrics.json their mean."""
    folds = fold_count(reorganised)
    if outputs.folds is not None:
        outputs.folds.mkdir(parents=True, exist_ok=True)  # a DVC output, without models with one split
    figures = []
    for fold in range(1, folds + 1):
        if folds > 1:
            log.info("%s: fold %d of %d", stage, fold, folds)
        figures.append(train_fold(fold, outputs.of_fold(fold)))
    if train_on_all:
        log.info("%s: the model of all the data (final.train_on_all)", stage)
        train_fold(ALL_DATA, outputs.of_fold(ALL_DATA))
    if figures[0] is None:  # rank 0 writes
        return
    if outputs.checkpoint is not None:
        # A checkpoint only serves to resume an interrupted run (a finished fold's resumes with nothing left
        # to train): once every fold is done, none is left to be mistaken for this run's result by a later one.
        checkpoint = outputs.checkpoint
        for path in checkpoint.parent.glob(f"{checkpoint.stem}_*{checkpoint.suffix}"):
            path.unlink()
    if outputs.folds is not None:
        each = [{"fold": fold, **figure} for fold, figure in enumerate(figures, 1)]
        write_json({"folds": each}, outputs.folds / "folds.json")
    if folds > 1:
        mean = {}
        for name, first in figures[0].items():
            # a word (augmentation) is the same for every fold; numbers are averaged
            mean[name] = (
                first if isinstance(first, str) else float(np.mean([figure[name] for figure in figures]))
            )
        write_json({stage: {**mean, "folds": folds}}, outputs.live / "metrics.json")
        log.info("%s: mean valid log loss over %d folds %.4f", stage, folds, mean["log_loss"])


def choose_lr(
    fit_params: FitParams,
    *,
    model,
    optimizer,
    loader,
    settings,
    live: StageLive | None,
    curve: str = "lr_find",
):
    """The lr to train with and where it came from: "fixed", "lr_find", or "fallback" (lr_find.fallback_lr)
    when the sweep's curve cannot give a suggestion. The sweep leaves the weights as they were; its curve
    goes to `live` as the plot `curve`."""
    if fit_params.lr != "auto":
        return float(fit_params.lr), "fixed"
    finder = fit_params.lr_find
    result = lr_find(
        model,
        optimizer,
        loader,
        start_lr=finder.start_lr,
        end_lr=finder.end_lr,
        num_steps=finder.num_steps,
        settings=settings,
    )
    suggested = suggest_lr(result, finder.suggestion)
    if live is not None:
        rows = [
            {"log10_lr": math.log10(lr), "loss": loss}
            for lr, loss in zip(result.lrs, result.losses, strict=True)
        ]
        live.log_curve(curve, rows, x="log10_lr", y="loss", title=f"{curve}: smoothed loss against log10(lr)")
    if suggested is not None:
        log.info("lr_find (%s): suggested lr %.3g", finder.suggestion, suggested)
        return suggested, "lr_find"
    reason = why_no_suggestion(result)
    log.warning("lr_find: no suggestion (%s); using lr_find.fallback_lr %.3g", reason, finder.fallback_lr)
    return finder.fallback_lr, "fallback"


def plan_fit(fit_params: FitParams, *, steps_per_epoch: int, seed: int) -> FitPlan:
    cycles = {
        "n_cycle": fit_params.n_cycle,
        "cycle_len": fit_params.cycle_len,
        "cycle_mult": fit_params.cycle_mult,
    }
    epochs = max(1, round(sgdr_epochs(**cycles)))
    schedule = make_schedule(
        fit_params.schedule, steps_per_epoch=steps_per_epoch, warmup=fit_params.warmup, **cycles
    )
    ends = [epochs]  # one_cycle has a single cycle
    if fit_params.schedule == "sgdr":
        ends = sorted({*(end for end in sgdr_cycle_ends(**cycles) if end <= epochs), epochs})
    snapshots: tuple[int, ...] = ()
    if getattr(fit_params, "keep", "last_epoch") == "best_cycle_end":
        snapshots = (0, *ends)  # the start and each cycle end are the candidates
    # Mid-cycle weights (high lr) are never kept: by default only the cycle ends are validated.
    every_epoch = getattr(fit_params, "validate", "every_epoch") == "every_epoch"
    return FitPlan(
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        schedule=schedule,
        seed=seed,
        snapshot_epochs=snapshots,
        valid_epochs=None if every_epoch else tuple(ends),
        label_smoothing=getattr(fit_params, "label_smoothing", 0.0),
        mixup=getattr(fit_params, "mixup", 0.0),
    )


def summarise_stage(live: StageLive, history: list[dict], *, kept: dict | None = None, **extra) -> dict:
    """The stage's summary, returned: the valid figures of the weights it hands on (`kept`: a kept snapshot's
    record, its epoch `kept_epoch`; else the last epoch's; none for a model of all the data), the last
    epoch's train loss, and `extra`."""
    chosen = kept or history[-1]
    if "valid_log_loss" not in chosen:
        figures = {"train_loss": history[-1]["train_loss"], **extra}
        live.summarise(**figures)
        live.end()
        return figures
    figures = {
        "log_loss": chosen["valid_log_loss"],
        "accuracy": chosen["valid_accuracy"],
        "train_loss": history[-1]["train_loss"],
        **({"kept_epoch": kept["epoch"]} if kept else {}),
        **extra,
    }
    live.summarise(**figures)
    live.end()
    log.info("valid log loss %.4f, accuracy %.4f", chosen["valid_log_loss"], chosen["valid_accuracy"])
    return figures


def train_head(*, params: Params, reorganised: Path, features_dir: Path, outputs: StageOutputs) -> None:
    """The head trained on the precomputed activations (precompute=True in fastai), once per fold: by default
    a logistic regression fitted full-batch (logistic.py), or, with `method: epochs`, lr_find then SGDR."""
    each_fold(
        "train_head",
        reorganised,
        outputs,
        partial(_train_head_fold, params=params, reorganised=reorganised, features_dir=features_dir),
        train_on_all=params.final.train_on_all,
    )


def _train_head_fold(
    fold: int | str, outputs: StageOutputs, *, params: Params, reorganised: Path, features_dir: Path
) -> dict:
    seed_everything(params.base.seed)
    device = pick_device(params.base.device)
    live = StageLive("train_head", outputs.live)
    splits, classes = load_splits(reorganised, fold)
    model = build_model(params, len(classes), pretrained=False)
    head = model.head.to(device)
    settings = StepSettings(device=device)
    valid_loader = None  # none for a model of all the data
    if splits["valid"].rows:
        valid_loader = FeatureBatches(
            split_features(features_dir, splits["valid"]),
            splits["valid"].labels,
            batch_size=256,
            shuffle=False,
            seed=params.base.seed,
        )
    if params.train_head.method == "lbfgs":
        extra = fit_linear_head(
            head,
            split_features(features_dir, splits["train"]),
            splits["train"].labels,
            n_classes=len(classes),
            fit_params=params.train_head,
            seed=params.base.seed,
        )
        history = [{"epoch": 1, "train_loss": extra.pop("train_loss")}]
        if valid_loader is not None:
            history[0].update(evaluate(head, valid_loader, settings=settings))
        live.log_epoch(history[0])
    else:
        history, extra = _train_head_epochs(params, head, features_dir, splits, settings, valid_loader, live)
    save_atomic({"head": head.state_dict(), "classes": classes}, outputs.model)
    return summarise_stage(live, history, **extra)


@torch.no_grad()
def fit_linear_head(
    head: nn.Sequential,
    features: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int,
    fit_params: HeadParams,
    seed: int,
) -> dict:
    """Set a [BatchNorm1d, Dropout, Linear] head to the logistic regression fitted on `features`: in eval mode
    the BatchNorm standardises and the Linear holds the fitted weights."""
    batchnorm, linear = head[0], head[-1]
    device = linear.weight.device
    inputs = torch.from_numpy(np.asarray(features, dtype=np.float32)).to(device)
    targets = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
    standardisation = logistic.Standardisation.of(inputs)
    standardised = standardisation.apply(inputs)
    with torch.enable_grad():
        fitted = logistic.choose_and_fit(
            standardised,
            targets,
            n_classes=n_classes,
            l2=None if fit_params.l2 == "auto" else fit_params.l2,
            n_folds=fit_params.cv_folds,
            seed=seed,
        )
    batchnorm.running_mean.copy_(standardisation.mean)
    batchnorm.running_var.copy_(standardisation.var)
    batchnorm.weight.fill_(1.0)
    batchnorm.bias.zero_()
    linear.weight.copy_(fitted.weight)
    linear.bias.copy_(fitted.bias)
    train_loss = nn.functional.cross_entropy(standardised @ fitted.weight.T + fitted.bias, targets).item()
    log.info("logistic head: l2 %g (cv log loss %s)", fitted.l2, fitted.cv_log_loss)
    return {"train_loss": train_loss, "l2_used": fitted.l2}


def _training_features(params: Params, fit_params: FitParams, features_dir: Path, train: Split):
    """Shuffled mini-batches of the training activations, at the stage's batch size."""
    return FeatureBatches(
        split_features(features_dir, train),
        train.labels,
        batch_size=fit_params.batch_size or params.base.batch_size,
        shuffle=True,
        seed=params.base.seed,
    )


def _train_head_epochs(params, head, features_dir, splits, settings, valid_loader, live: StageLive):
    """fastai's way: lr_find on the activations, then SGDR epochs of mini-batches."""
    fit_params = params.train_head
    train_loader = _training_features(params, fit_params, features_dir, splits["train"])
    optimizer = make_optimizer(
        [list(head.parameters())], [1.0], kind=fit_params.optimizer, weight_decay=fit_params.weight_decay
    )
    lr, source = choose_lr(
        fit_params,
        model=head,
        optimizer=optimizer,
        loader=train_loader,
        settings=settings,
        live=live,
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = lr
    plan = plan_fit(fit_params, steps_per_epoch=len(train_loader), seed=params.base.seed)
    result = fit(
        head,
        optimizer,
        plan=plan,
        train_loader=train_loader,
        valid_loader=valid_loader,
        settings=settings,
        description="train_head",
        on_epoch=live.log_epoch,
    )
    log.info("train_head: lr %.3g (%s)", lr, source)
    return result.history, {"lr_used": lr}


def train_augmented(
    *,
    params: Params,
    reorganised: Path,
    cache_dir: Path,
    features_dir: Path,
    head_path: Path,
    head_folds: Path,
    outputs: StageOutputs,
) -> None:
    """The head trained on augmented images through the frozen body (precompute=False), SGDR with cycle_len,
    once per fold from that fold's head (`head_path`, or head_folds/fold<k>.pt). Augmentation auto is chosen
    once, on fold 1 (choose_augmentation), for every fold."""
    checked = {}
    if params.train_augmented.augmentation == "auto":
        augmentation, checked = choose_augmentation(reorganised, features_dir)
        params = replace(params, train_augmented=replace(params.train_augmented, augmentation=augmentation))

    def train_fold(fold: int | str, fold_outputs: StageOutputs) -> dict | None:
        head = fold_model(head_path, head_folds, fold)
        return _train_augmented_fold(
            params,
            fold,
            reorganised,
            cache_dir,
            features_dir,
            head_path=head,
            outputs=fold_outputs,
            extra=checked,
        )

    each_fold("train_augmented", reorganised, outputs, train_fold, train_on_all=params.final.train_on_all)


def _train_augmented_fold(
    params: Params,
    fold: int | str,
    reorganised: Path,
    cache_dir: Path,
    features_dir: Path,
    *,
    head_path: Path,
    outputs: StageOutputs,
    extra: dict,
) -> dict | None:
    """With lr auto and frozen_bn eval, lr_find sweeps a fresh head on the activations, as fastai 0.7's lesson
    did."""
    fit_params = params.train_augmented
    seed_everything(params.base.seed)  # before the sweep's fresh head is initialised
    model, _ = load_classifier(params, head_path=head_path, weights_key="head")
    freeze_to(model, -1, frozen_bn=params.model.frozen_bn)
    sweep = None
    if fit_params.lr == "auto" and params.model.frozen_bn == "eval":
        splits, _ = load_splits(reorganised, fold)
        features = _training_features(params, fit_params, features_dir, splits["train"])
        fresh_head = copy.deepcopy(model.head)
        for module in fresh_head.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        sweep = HeadSweep(head=fresh_head, loader=features)
    return _fit_images(
        params,
        fit_params,
        model,
        fold=fold,
        reorganised=reorganised,
        cache_dir=cache_dir,
        outputs=outputs,
        sizes=[params.base.image_size],
        lr_ratio=1.0,
        bn_statistics="batch",
        stage="train_augmented",
        inputs=[head_path],
        sweep=sweep,
        extra=extra,
    )


def finetune(
    *,
    params: Params,
    reorganised: Path,
    cache_dir: Path,
    model_path: Path,
    model_folds: Path,
    outputs: StageOutputs,
) -> None:
    """Unfreeze (from group freeze_to on); differential lrs over the layer groups; SGDR with cycle_mult; one run
    per size (progressive); once per fold from that fold's model (`model_path`, or model_folds/fold<k>.pt)."""
    fit_params = params.finetune

    def train_fold(fold: int | str, fold_outputs: StageOutputs) -> dict | None:
        start = fold_model(model_path, model_folds, fold)
        model, _ = load_classifier(params, head_path=start, weights_key="model")
        augmentation = trained_augmentation(fit_params, start)
        body_groups = len(model.layer_groups) - 1
        if fit_params.freeze_to > body_groups:
            raise ParamsError(
                f"finetune.freeze_to: {fit_params.freeze_to} but {params.model.arch}'s body has {body_groups} "
                f"layer groups; set 0 (the whole body trains) to {body_groups} (the head alone)"
            )
        freeze_to(model, fit_params.freeze_to, frozen_bn=params.model.frozen_bn)
        return _fit_images(
            params,
            replace(fit_params, augmentation=augmentation),
            model,
            fold=fold,
            reorganised=reorganised,
            cache_dir=cache_dir,
            outputs=fold_outputs,
            sizes=list(fit_params.sizes),
            lr_ratio=fit_params.lr_ratio,
            bn_statistics=fit_params.bn_statistics,
            stage="finetune",
            inputs=[start],
        )

    each_fold("finetune", reorganised, outputs, train_fold, train_on_all=params.final.train_on_all)


def _fit_images(
    params: Params,
    fit_params: AugmentedFitParams,
    model: Classifier,
    *,
    fold: int | str,
    reorganised: Path,
    cache_dir: Path,
    outputs: StageOutputs,
    sizes: Sequence[int],
    lr_ratio: float,
    bn_statistics: str,
    stage: str,
    inputs: Sequence[Path],
    sweep: HeadSweep | None = None,
    extra: dict | None = None,
) -> dict | None:
    """Fit one fold, with `fit_params`' augmentation (resolved, not auto), which the saved model records; its
    summary figures (None on torchrun's other ranks), with `extra`."""
    seed_everything(params.base.seed)
    context = init_distributed(params.base.device)
    device = pick_device(params.base.device, context)
    splits, classes = load_splits(reorganised, fold)
    # With frozen statistics each BatchNorm is an affine map: it trains inside its conv, the same results faster.
    folded = batchnorms_in_convs(model) if bn_statistics == "frozen" else nullcontext()
    with folded:
        settings = step_settings(params, device, model, bn_statistics=bn_statistics)
        model = to_device(model, settings)
        trained = compiled(wrap_distributed(model, context, device), params.base.compile)
        batch_size = fit_params.batch_size or params.base.batch_size
        live = StageLive(stage, outputs.live) if context.is_main else None
        histories, lrs = [], []
        for round_index, size in enumerate(sizes):
            train_loader, valid_loader = _augmented_loaders(
                params, fit_params, reorganised, cache_dir, splits, size, batch_size, context
            )
            optimizer, group_lrs, lr_source = _differential_optimizer(
                fit_params,
                model,
                trained,
                train_loader,
                settings,
                lr_ratio=lr_ratio,
                live=live,
                curve="lr_find" if len(sizes) == 1 else f"lr_find_{size}",
                sweep=sweep,
                context=context,
            )
            plan = plan_fit(
                fit_params.for_round(round_index),
                steps_per_epoch=len(train_loader),
                seed=params.base.seed + round_index,
            )
            checkpoint = outputs.checkpoint and outputs.checkpoint.with_name(
                f"{outputs.checkpoint.stem}_{size}{outputs.checkpoint.suffix}"
            )
            fingerprint = fingerprint_of(
                stage,
                asdict(params),
                fold,
                size,
                [file_md5(path) for path in inputs],
                file_md5(reorganised / "manifest.csv"),
            )
            offset = len(histories)

            def in_stage(record: dict, offset: int = offset, size: int = size) -> dict:
                """A record of this size's fit, its epoch counted across the stage's sizes."""
                return {**record, "epoch": offset + record["epoch"], "image_size": size}

            def report(record: dict, offset: int = offset) -> None:
                if record["epoch"] or not offset:  # a later size starts from the weights the last step logged
                    live.log_epoch(in_stage(record))

            result = fit(
                trained,
                optimizer,
                plan=plan,
                train_loader=train_loader,
                valid_loader=valid_loader,
                settings=settings,
                checkpoint=checkpoint,
                fingerprint=fingerprint,
                context=context,
                description=f"{stage} size {size}",
                on_epoch=report,
            )
            histories += [in_stage(record) for record in result.history]
            kept = {**result.kept, "epoch": offset + result.kept.get("epoch", 0)}
            lrs.append(group_lrs)
            if checkpoint is not None:
                # the next size's fingerprint covers the weights it starts from
                inputs = [*inputs, checkpoint]
    if not context.is_main:
        return None
    # The augmentation goes with the weights: finetune's auto trains with it, TTA draws its views with it.
    state = {"model": model.state_dict(), "classes": classes, "augmentation": fit_params.augmentation}
    save_atomic(state, outputs.model)
    log.info("%s: lrs %s (%s)", stage, ", ".join(f"{lr:.3g}" for lr in lrs[-1]), lr_source)
    figures = summarise_stage(
        live,
        histories,
        kept=kept if fit_params.keep == "best_cycle_end" else None,
        lr_used=lrs[-1][-1],  # the head's; the groups below it divide it by lr_ratio
        augmentation=fit_params.augmentation,
        **(extra or {}),
    )
    return figures


# augmentation auto: how much worse a mirror makes the check's valid log loss before flips are dropped. The
# suite's five seeds measured 1.88-3.79 times on digits and 0.84-1.17 on photos (bench/README).
MIRROR_TOLERANCE = 1.5
MIRROR_CHECK_L2 = 0.1  # the check's logistic regression: L2 penalty (logistic.fit_logistic's, per row)


def augmentation_for(plain: float, mirrored: float) -> str:
    """side_on where the mirror check's valid log loss on mirrored images (`mirrored`) is about what it is on the
    images as they are (`plain`), else basic."""
    return "side_on" if mirrored <= MIRROR_TOLERANCE * plain else "basic"


def choose_augmentation(reorganised: Path, features_dir: Path) -> tuple[str, dict[str, float]]:
    """augmentation auto: side_on, or basic (no flips) where a mirror changes the class. The check: a logistic
    regression on precompute's pixel grids of fold 1's training images (16 x 16, so it sees where things are,
    which the pretrained body's pooled activations, trained with flips, barely do), its valid log loss on the
    valid images as they are and mirrored. Also those two figures (none without valid images: side_on)."""
    splits, classes = load_splits(reorganised, 1)
    if not splits["valid"].rows:
        log.info("augmentation auto: side_on (no valid images to check mirrors on)")
        return "side_on", {}
    train, valid = (
        torch.from_numpy(
            np.asarray(split_features(features_dir, splits[name], suffix=PIXELS_SUFFIX), np.float32)
        )
        for name in ("train", "valid")
    )
    standardisation = logistic.Standardisation.of(train)
    weight, bias = logistic.fit_logistic(
        standardisation.apply(train),
        torch.from_numpy(splits["train"].labels.astype(np.int64)),
        n_classes=len(classes),
        l2=MIRROR_CHECK_L2,
    )
    grids = valid.reshape(len(valid), 3, PIXEL_GRID, PIXEL_GRID)
    plain, mirrored = (
        log_loss(
            torch.softmax(standardisation.apply(view.flatten(1)) @ weight.T + bias, dim=1).numpy(),
            splits["valid"].labels,
        )
        for view in (grids, grids.flip(-1))
    )
    augmentation = augmentation_for(plain, mirrored)
    log.info(
        "augmentation auto: %s (the mirror check's valid log loss %.4f, mirrored %.4f: %.2f times, tolerance %.2f)",
        augmentation,
        plain,
        mirrored,
        mirrored / plain,
        MIRROR_TOLERANCE,
    )
    return augmentation, {"mirror_check_log_loss": plain, "mirror_check_log_loss_mirrored": mirrored}


def _differential_optimizer(
    fit_params: FitParams,
    model: Classifier,
    trained: nn.Module,
    loader,
    settings: StepSettings,
    *,
    lr_ratio: float,
    live: StageLive | None,
    curve: str,
    sweep: HeadSweep | None,
    context: DistributedContext,
) -> tuple[torch.optim.Optimizer, list[float], str]:
    """An optimizer over the trainable layer groups, each at the top lr / lr_ratio^(groups above it); also
    where the top lr came from (choose_lr)."""
    group_parameter_lists = group_parameters(model)
    optimizer = make_optimizer(
        group_parameter_lists,
        [1.0] * len(group_parameter_lists),
        kind=fit_params.optimizer,
        weight_decay=fit_params.weight_decay,
    )
    sweep_model, sweep_loader, sweep_settings, sweep_optimizer = trained, loader, settings, optimizer
    if sweep is not None:  # the head alone, on the activations, with an optimizer of its own
        sweep_model, sweep_loader = sweep.head, sweep.loader
        sweep_settings = replace(settings, train_mode=nn.Module.train)
        sweep_optimizer = make_optimizer(
            [list(sweep.head.parameters())],
            [1.0],
            kind=fit_params.optimizer,
            weight_decay=fit_params.weight_decay,
        )
    top_lr, source = choose_lr(
        fit_params,
        model=sweep_model,
        optimizer=sweep_optimizer,
        loader=sweep_loader,
        settings=sweep_settings,
        live=live,
        curve=curve,
    )
    if sweep is not None:
        # Every rank swept alone; the mean makes them agree even if a GPU kernel is not bit-deterministic.
        top_lr = reduce_sums([top_lr], context, settings.device)[0] / context.world_size
    all_lrs = differential_lrs(top_lr, n_groups=len(group_parameter_lists), ratio=lr_ratio)
    trainable_lrs = [lr for lr, group in zip(all_lrs, group_parameter_lists, strict=True) if group]
    for group, lr in zip(optimizer.param_groups, trainable_lrs, strict=True):
        group["initial_lr"] = lr
    return optimizer, trainable_lrs, source


def _augmented_loaders(params, fit_params, reorganised, cache_dir, splits, size, batch_size, context):
    augmented, plain = presets(params, fit_params, size)
    load = partial(image_loader, params, reorganised, cache_dir, size=size, context=context)
    train = load(splits["train"], transform=augmented, shuffle=True, batch_size=batch_size, shard=True)
    if not splits["valid"].rows:  # a model of all the data
        return train, None
    valid = load(splits["valid"], transform=plain, shuffle=False, batch_size=params.precompute.batch_size)
    return train, valid
