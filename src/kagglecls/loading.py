"""What the stages that run the network share: the splits, the model, the device settings, image loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from kagglecls import images
from kagglecls.data import (
    EvalPreset,
    ImageDataset,
    Normalisation,
    TrainPreset,
    cache_short_side,
    make_loader,
    resized_files,
)
from kagglecls.device import SINGLE_PROCESS, DistributedContext, StepSettings, pick_device, unwrapped
from kagglecls.manifest import ManifestRow, read_class_info, read_manifest
from kagglecls.models import (
    Classifier,
    ModelError,
    build_classifier,
    fixed_image_size,
    set_train_mode,
    weights_mean_std,
)
from kagglecls.params import AugmentedFitParams, Params

ALL_DATA = "all"  # the fold name of the model trained on every labelled image (final.train_on_all)


@dataclass(frozen=True)
class Split:
    rows: list[ManifestRow]
    labels: np.ndarray  # class index per row; -1 for test
    # Where precompute put these rows' activations: (name, rows of data/features/<name>.npy) pairs, in order.
    parts: tuple[tuple[str, np.ndarray], ...] = ()


def load_splits(reorganised: Path, fold: int | str | None = 1) -> tuple[dict[str, Split], list[str]]:
    """Train, valid and test of `fold`: valid is the labelled images the fold holds out (with one split, the
    valid folder), train the other labelled images; for ALL_DATA, train is every labelled image and valid
    is empty. Each keeps its rows' place in precompute's arrays, which hold the manifest's train, valid and
    test rows in order (`fold` None: those three, as they are)."""
    classes = read_class_info(reorganised).classes
    index = {name: position for position, name in enumerate(classes)}
    rows = [row for row in read_manifest(reorganised / "manifest.csv") if row.file]
    stored = {name: [row for row in rows if row.split == name] for name in ("train", "valid", "test")}

    def taken(sources: tuple[str, ...], keep) -> Split:
        chosen, parts = [], []
        for source in sources:
            positions = [position for position, row in enumerate(stored[source]) if keep(row)]
            chosen += [stored[source][position] for position in positions]
            if positions:
                parts.append((source, np.array(positions, dtype=np.int64)))
        labels = np.array([index[row.label] if row.label else -1 for row in chosen], dtype=np.int64)
        return Split(chosen, labels, tuple(parts))

    def every(row: ManifestRow) -> bool:
        return True

    if fold is None:
        return {name: taken((name,), every) for name in stored}, classes
    if fold == ALL_DATA:
        return {
            "train": taken(("train", "valid"), every),
            "valid": taken((), every),
            "test": taken(("test",), every),
        }, classes
    splits = {
        "train": taken(("train",), lambda row: row.fold != fold),
        "valid": taken(("valid" if stored["valid"] else "train",), lambda row: row.fold == fold),
        "test": taken(("test",), every),
    }
    return splits, classes


def fold_name(fold: int | str) -> str:
    return ALL_DATA if fold == ALL_DATA else f"fold{fold}"


def fold_model(first: Path, folds_dir: Path, fold: int | str) -> Path:
    """Where the previous stage saved `fold`'s model: `first` (fold 1's), or in its folds folder."""
    return first if fold == 1 else folds_dir / f"{fold_name(fold)}.pt"


def fold_count(reorganised: Path) -> int:
    """The folds reorganise made (cv.folds): 1 for one train/valid split."""
    return max([1, *(row.fold for row in read_manifest(reorganised / "manifest.csv"))])


def step_settings(
    params: Params, device: torch.device, model: Classifier | None = None, *, bn_statistics: str = "batch"
) -> StepSettings:
    settings = StepSettings(device=device, amp=params.base.amp, channels_last=params.base.channels_last)
    if model is not None:
        frozen_bn = params.model.frozen_bn
        settings.train_mode = lambda wrapped: set_train_mode(
            unwrapped(wrapped), frozen_bn=frozen_bn, bn_statistics=bn_statistics
        )
    return settings


def normalisation_for(params: Params) -> Normalisation:
    mean, std = weights_mean_std(params.model.arch, params.model.weights)
    return Normalisation(mean=mean, std=std)


def trained_augmentation(fit_params: AugmentedFitParams, model_path: Path) -> str:
    """The stage's augmentation: its own unless `auto`, then the one the model of `model_path` was trained with
    (side_on for a file that does not say)."""
    if fit_params.augmentation != "auto":
        return fit_params.augmentation
    # mmap: the weights, which the caller loads anyway, are not read a second time
    state = torch.load(model_path, map_location="cpu", weights_only=True, mmap=True)
    return state.get("augmentation", "side_on")


def presets(params: Params, augmented: AugmentedFitParams, size: int) -> tuple[TrainPreset, EvalPreset]:
    """The augmented (train) and plain (eval) transforms at `size`, with the arch's normalisation; `augmented`'s
    augmentation resolved (not auto)."""
    if augmented.augmentation == "auto":
        raise ValueError("presets: augmentation auto must be resolved first (trained_augmentation)")
    normalisation = normalisation_for(params)
    train = TrainPreset(
        size=size,
        augmentation=augmented.augmentation,
        max_zoom=augmented.max_zoom,
        normalisation=normalisation,
    )
    return train, EvalPreset(size=size, normalisation=normalisation)


def loader_workers(requested: int | str, *, device_type: str) -> int:
    """Loader worker processes: the number asked for, or for `auto` 0 on CPU (the compute threads already use
    every core) and on CUDA every core but one, shared among torchrun's processes, at most 8."""
    if requested != "auto":
        return int(requested)
    if device_type != "cuda":
        return 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by torchrun
    return max(1, min(8, images.image_workers() // max(1, processes) - 1))


def image_loader(
    params: Params,
    reorganised: Path,
    cache_dir: Path,
    split: Split,
    *,
    transform,
    shuffle: bool,
    size: int,
    batch_size: int,
    context: DistributedContext = SINGLE_PROCESS,
    shard: bool = False,
    seed_offset: int = 0,
):
    """A loader over the split's pre-resized images; `shard` gives each torchrun rank its part. Every rank
    calls it in the same order: rank 0 builds missing cache files while the others wait."""
    if context.enabled and not context.is_main:
        dist.barrier()
    files = resized_files(
        split.rows,
        root=reorganised,
        cache_dir=cache_dir,
        short_side=cache_short_side(size, params.data.resize_factor),
        workers=images.image_workers(),
    )
    if context.enabled and context.is_main:
        dist.barrier()
    workers = loader_workers(params.base.num_workers, device_type=pick_device(params.base.device).type)
    # Loader workers would each keep their own copy of every image, and they decode in parallel anyway.
    keep = params.base.decoded_cache_mb * 2**20 if workers == 0 else 0
    dataset = ImageDataset(files, split.labels, transform, keep_decoded_bytes=keep)
    return make_loader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=params.base.seed + seed_offset,
        num_workers=workers,
        drop_last=shuffle and len(dataset) > batch_size,
        rank=context.rank if shard else 0,
        world_size=context.world_size if shard else 1,
        pin_memory=torch.cuda.is_available(),
    )


def build_model(params: Params, n_classes: int, *, pretrained: bool) -> Classifier:
    model = params.model
    classifier = build_classifier(
        model.arch,
        n_classes=n_classes,
        pretrained=pretrained,
        weights=model.weights,
        weights_file=model.weights_file,
        head_hidden=model.head_hidden,
        head_dropout=model.head_dropout,
    )
    required = fixed_image_size(classifier)
    sizes = {params.base.image_size, *params.finetune.sizes}
    if required is not None and sizes != {required}:
        raise ModelError(
            f"model.arch: {model.arch} takes {required} px images only; set base.image_size and finetune.sizes "
            f"to {required} (they are {sorted(sizes)})"
        )
    return classifier


def to_device(model: Classifier, settings: StepSettings) -> Classifier:
    model = model.to(settings.device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def load_classifier(params: Params, *, head_path: Path, weights_key: str) -> tuple[Classifier, list[str]]:
    state = torch.load(head_path, map_location="cpu", weights_only=True)
    classes = list(state["classes"])
    model = build_model(params, len(classes), pretrained=weights_key == "head" and params.model.pretrained)
    if weights_key == "head":
        model.head.load_state_dict(state["head"])
    else:
        model.load_state_dict(state["model"])
    return model, classes
