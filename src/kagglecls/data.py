"""Datasets, loaders, augmentation presets, the train/valid split and the manifest the stages share.

Augmentation randomness is seeded per sample from (seed, epoch, index), so a run gives the same batches
whatever the number of loader workers, and a run resumed at epoch e sees exactly what it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import v2

from kagglecls.images import load_rgb, write_resized_cache
from kagglecls.manifest import (  # noqa: F401 - re-exported: data is where loaders look for them
    MANIFEST_COLUMNS,
    ClassInfo,
    DataError,
    ManifestRow,
    file_md5,
    read_class_info,
    read_manifest,
    stratified_split,
    write_manifest,
)

# Bump when the way cached images are made changes, so old caches are never read for new ones.
CACHE_VERSION = "v1"


def cache_short_side(image_size: int, resize_factor: float) -> int:
    return round(image_size * resize_factor)


def resized_files(
    rows: Sequence[ManifestRow], *, root: Path, cache_dir: Path, short_side: int, workers: int
) -> list[Path]:
    """Paths of the pre-resized copies of `rows`' images, made once and named by content hash and size.

    A name says which source bytes and which size it holds, so a changed image or size never reuses a stale file.
    """
    folder = cache_dir / f"{CACHE_VERSION}-short{short_side}"
    targets = [folder / row.md5[:2] / f"{row.md5}.jpg" for row in rows]
    missing = [index for index, target in enumerate(targets) if not target.exists()]
    if missing:
        errors = write_resized_cache(
            [root / rows[index].file for index in missing],
            [targets[index] for index in missing],
            short_side=short_side,
            workers=workers,
        )
        for index, error in zip(missing, errors, strict=True):
            if error is not None:
                raise DataError(f"{root / rows[index].file}: cannot be decoded for the resize cache: {error}")
    return targets


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class EvalPreset:
    """Scale the shorter side to `size`, centre crop a square of `size`, normalise."""

    def __init__(self, *, size: int, normalisation: Normalisation) -> None:
        self.transform = v2.Compose(
            [v2.Resize(size, antialias=True), v2.CenterCrop(size), *_to_normalised_tensor(normalisation)]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


class TrainPreset:
    """fastai's transforms: zoom (shorter side to [size, size x max_zoom]), rotate 10 deg (p=0.75), random crop,
    flip, lighting; `top_down` adds the dihedral group (vertical flips and 90 degree turns)."""

    def __init__(
        self, *, size: int, augmentation: str, max_zoom: float, normalisation: Normalisation
    ) -> None:
        if augmentation == "none":
            steps: list[v2.Transform] = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        elif augmentation in ("side_on", "top_down"):
            steps = [
                v2.RandomResize(size, max(size + 1, round(size * max_zoom) + 1), antialias=True),
                v2.RandomApply([v2.RandomRotation(10, interpolation=v2.InterpolationMode.BILINEAR)], p=0.75),
                v2.RandomCrop(size),
                v2.RandomHorizontalFlip(),
            ]
            if augmentation == "top_down":
                steps += [v2.RandomVerticalFlip(), v2.RandomChoice([v2.Identity(), _Transpose()])]
            steps.append(v2.ColorJitter(brightness=0.05, contrast=0.05))
        else:
            raise DataError(f"augmentation {augmentation!r}: expected side_on, top_down or none")
        self.transform = v2.Compose([*steps, *_to_normalised_tensor(normalisation)])

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)


class _Transpose(v2.Transform):
    """Swap height and width: with the flips, every element of the dihedral group."""

    def transform(self, inpt, params):  # noqa: ANN001, ANN201 - torchvision's signature
        if isinstance(inpt, Image.Image):
            return inpt.transpose(Image.Transpose.TRANSPOSE)
        return inpt.transpose(-1, -2)


def _to_normalised_tensor(normalisation: Normalisation) -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(normalisation.mean), std=list(normalisation.std)),
    ]


class ImageDataset(Dataset):
    """Images and label indices (-1 for unlabelled). Items are fetched by (index, sample_seed)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int] | None, transform) -> None:  # noqa: ANN001
        self.files = list(files)
        self.labels = list(labels) if labels is not None else [-1] * len(self.files)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        image = load_rgb(self.files[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            tensor = self.transform(image)
        return tensor, self.labels[index]


class SeededSampler(Sampler):
    """Yields (index, sample_seed): a shuffled (or ordered) pass, this rank's shard of it, seeded per epoch."""

    def __init__(self, n_items: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n_items, self.shuffle, self.seed = n_items, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(range(self.rank, self._padded_length(), self.world_size))

    def _padded_length(self) -> int:
        # Every rank gets the same number of items, as DistributedSampler does: pad by repeating the start.
        return -(-self.n_items // self.world_size) * self.world_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch_seed = self.seed * 100_003 + self.epoch
        order = np.arange(self.n_items)
        if self.shuffle:
            order = np.random.default_rng(epoch_seed).permutation(self.n_items)
        order = np.resize(order, self._padded_length())
        for index in order[self.rank :: self.world_size]:
            yield int(index), (epoch_seed * 1_000_003 + int(index)) % (2**63)


def make_loader(
    dataset: ImageDataset,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_workers: int,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    sampler = SeededSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
