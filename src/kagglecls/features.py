"""Stage precompute: the frozen body's concat-pooled activations, streamed to float16 memory-mapped arrays (memory
bounded by one batch), and the loaders that read them back for the head."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from kagglecls.atomic import building_folder, write_file, write_json
from kagglecls.data import EvalPreset
from kagglecls.device import StepSettings, pick_device, seed_everything
from kagglecls.loading import (
    Split,
    build_model,
    image_loader,
    load_splits,
    normalisation_for,
    step_settings,
    to_device,
)
from kagglecls.models import Classifier
from kagglecls.params import Params

PIXEL_GRID = 16  # the mirror check's view of an image: its normalised pixels averaged over a 16 x 16 grid
PIXELS_SUFFIX = "_pixels"  # <split>_pixels.npy beside <split>.npy


def pixel_grid(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, PIXEL_GRID, PIXEL_GRID): where an image is bright or dark, and which colour."""
    return nn.functional.adaptive_avg_pool2d(images.float(), PIXEL_GRID)


@torch.inference_mode()
def write_features(
    model: Classifier,
    loader: Iterable,
    *,
    n_items: int,
    path: Path,
    settings: StepSettings,
    description: str,
    pixels_path: Path | None = None,
) -> None:
    """Run the body over `loader` (in order) and write an (n_items, 2C) float16 .npy, atomically; with
    `pixels_path`, also each image's pixel_grid, flattened, as another."""
    model.eval()
    outputs = {"features": path, "pixels": pixels_path}
    arrays: dict[str, np.ndarray] = {}
    position = 0
    with ExitStack() as stack:
        temporaries = {
            kind: stack.enter_context(write_file(target)) for kind, target in outputs.items() if target
        }
        for inputs, _targets in tqdm(loader, desc=description, leave=False):
            with settings.autocast():
                rows = {"features": model.features(settings.move(inputs)).float().cpu().numpy()}
            if pixels_path is not None:
                rows["pixels"] = pixel_grid(inputs).flatten(1).numpy()
            for kind, values in rows.items():
                if kind not in arrays:
                    arrays[kind] = np.lib.format.open_memmap(
                        temporaries[kind], mode="w+", dtype=np.float16, shape=(n_items, values.shape[1])
                    )
                arrays[kind][position : position + len(values)] = values
            position += len(rows["features"])
        if not arrays:
            raise ValueError(f"{path}: nothing to precompute: the loader is empty")
        if position != n_items:
            raise AssertionError(f"{path}: wrote {position} rows, expected {n_items}")
        for array in arrays.values():
            array.flush()


class FeatureBatches:
    """Batches of a memory-mapped features array and its label indices (-1 without labels), sliced straight
    from the array (far cheaper than one row at a time), shuffled per epoch."""

    def __init__(
        self,
        features: Path | np.ndarray,
        labels: np.ndarray | None,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
    ) -> None:
        self.features = np.load(features, mmap_mode="r") if isinstance(features, Path) else features
        self.labels = labels if labels is not None else np.full(len(self.features), -1, dtype=np.int64)
        if len(self.labels) != len(self.features):
            source = features if isinstance(features, Path) else "features"
            raise ValueError(f"{source}: {len(self.features)} rows but {len(self.labels)} labels")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        # Training drops a last batch of one: BatchNorm cannot train on a single row.
        self.drop_last = shuffle and len(self.features) % batch_size == 1
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> FeatureBatches:
        return self  # fit() calls loader.sampler.set_epoch

    def __len__(self) -> int:
        n = len(self.features)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.features)
        order = np.arange(n)
        if self.shuffle:
            order = np.random.default_rng(self.seed * 100_003 + self.epoch).permutation(n)
        for batch in range(len(self)):
            indices = np.sort(order[batch * self.batch_size : (batch + 1) * self.batch_size])
            inputs = torch.from_numpy(np.asarray(self.features[indices], dtype=np.float32))
            yield inputs, torch.from_numpy(self.labels[indices].astype(np.int64))


def split_features(features_dir: Path, split: Split, *, suffix: str = "") -> np.ndarray:
    """The split's rows of precompute's activations (or with PIXELS_SUFFIX its pixel grids): a whole array
    memory-mapped, or a fold's rows of them."""
    arrays = []
    for name, positions in split.parts:
        array = np.load(features_dir / f"{name}{suffix}.npy", mmap_mode="r")
        # positions are ascending and distinct: as many as the array's rows means all of them, in order
        arrays.append(array if len(array) == len(positions) else array[positions])
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def precompute(*, params: Params, reorganised: Path, cache_dir: Path, out_dir: Path) -> None:
    """Activations of the frozen pretrained body (eval transforms: no augmentation) for train, valid and test."""
    seed_everything(params.base.seed)
    device = pick_device(params.base.device)
    splits, classes = load_splits(reorganised, fold=None)
    settings = step_settings(params, device)
    model = to_device(build_model(params, len(classes), pretrained=params.model.pretrained), settings)
    size = params.base.image_size
    transform = EvalPreset(size=size, normalisation=normalisation_for(params))
    with building_folder(out_dir) as temporary:
        for name, split in splits.items():
            if not split.rows:
                continue
            loader = image_loader(
                params,
                reorganised,
                cache_dir,
                split,
                transform=transform,
                shuffle=False,
                size=size,
                batch_size=params.precompute.batch_size,
            )
            write_features(
                model,
                loader,
                n_items=len(split.rows),
                path=temporary / f"{name}.npy",
                settings=settings,
                description=f"precompute {name}",
                pixels_path=temporary / f"{name}{PIXELS_SUFFIX}.npy" if name != "test" else None,
            )
        write_json(
            {
                "arch": params.model.arch,
                "image_size": size,
                "rows": {name: len(split.rows) for name, split in splits.items()},
            },
            temporary / "meta.json",
        )
