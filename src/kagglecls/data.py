"""Datasets, loaders, augmentation presets and the pre-resized image cache. Augmentation is seeded per sample
from (seed, epoch, index): the same batches at any number of workers, and after a resume."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from kagglecls.images import RESAMPLE, load_rgb, write_resized_cache
from kagglecls.manifest import DataError, ManifestRow

# Bump when the way cached images are made changes, so old caches are never read for new ones.
CACHE_VERSION = "v1"
_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL's convert("L")


def cache_short_side(image_size: int, resize_factor: float) -> int:
    return round(image_size * resize_factor)


def resized_files(
    rows: Sequence[ManifestRow], *, root: Path, cache_dir: Path, short_side: int, workers: int
) -> list[Path]:
    """Paths of the pre-resized copies of `rows`' images, made once, named by content hash and size (so a
    changed image or size never reuses a stale file)."""
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
    """Scale the shorter side to `size`, centre crop a square of `size`, normalise: one antialiased resize of
    the centre square. Takes the same (image, rng) as TrainPreset and ignores the rng."""

    def __init__(self, *, size: int, normalisation: Normalisation) -> None:
        self.size, self.normalisation = size, normalisation

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        width, height = image.size
        side = min(width, height)
        left, top = (width - side) / 2, (height - side) / 2
        square = image.resize(
            (self.size, self.size), RESAMPLE, box=(left, top, left + side, top + side), reducing_gap=3.0
        )
        return _normalised_tensor(square, self.normalisation)


class TrainPreset:
    """fastai's transforms: zoom (shorter side to [size, size x max_zoom]), rotate up to 10 deg (p=0.75),
    random crop, lighting (`basic`, fastai 0.7's transforms_basic), and a horizontal flip (`side_on`); `top_down`
    adds vertical flips and transposes. Zoom, rotation, crop and flips are one affine map, so each image is
    resampled once; randomness comes only from the `rng` given per item."""

    def __init__(
        self, *, size: int, augmentation: str, max_zoom: float, normalisation: Normalisation
    ) -> None:
        self.size, self.augmentation, self.max_zoom = size, augmentation, max_zoom
        self.normalisation = normalisation
        self._plain = EvalPreset(size=size, normalisation=normalisation)

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        if self.augmentation == "none":
            return self._plain(image)
        # A source far bigger than needed is first box-shrunk by an integer factor: the affine resampling
        # below has no antialiasing, which is harmless only for shrinks under about 2x.
        factor = int(min(image.size) / (self.size * self.max_zoom) / 1.5)
        if factor >= 2:
            image = image.reduce(factor)
        matrix = self._output_to_source(image.size, rng)
        warped = image.transform(
            (self.size, self.size),
            Image.Transform.AFFINE,
            tuple(matrix[:2].ravel()),
            resample=Image.Resampling.BILINEAR,
            fillcolor=(0, 0, 0),
        )
        return _normalised_tensor(warped, self.normalisation, rng=rng)

    def _output_to_source(self, source_size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """3x3 matrix taking output pixel coordinates (continuous, corners at integers) to source ones."""
        width, height = source_size
        size = self.size
        scale = size * rng.uniform(1.0, self.max_zoom) / min(width, height)  # resized = source x scale
        resized_width, resized_height = width * scale, height * scale
        angle = np.deg2rad(rng.uniform(-10.0, 10.0)) if rng.random() < 0.75 else 0.0
        crop_x, crop_y = rng.uniform(0, resized_width - size), rng.uniform(0, resized_height - size)
        matrix = np.eye(3)
        if self.augmentation == "top_down":
            if rng.random() < 0.5:
                matrix = _affine(0, 1, 0, 1, 0, 0) @ matrix  # transpose
            if rng.random() < 0.5:
                matrix = _affine(1, 0, 0, 0, -1, size) @ matrix  # vertical flip
        if self.augmentation != "basic" and rng.random() < 0.5:
            matrix = _affine(-1, 0, size, 0, 1, 0) @ matrix  # horizontal flip
        matrix = _affine(1, 0, crop_x, 0, 1, crop_y) @ matrix
        centre_x, centre_y = resized_width / 2, resized_height / 2
        cos, sin = np.cos(angle), np.sin(angle)
        rotation = _affine(cos, -sin, 0, sin, cos, 0)
        matrix = (
            _affine(1, 0, centre_x, 0, 1, centre_y)
            @ rotation
            @ _affine(1, 0, -centre_x, 0, 1, -centre_y)
            @ matrix
        )
        return _affine(1 / scale, 0, 0, 0, 1 / scale, 0) @ matrix


class TtaViews:
    """The plain view and `n_aug` augmented views of one image, stacked as (1 + n_aug, C, H, W): TTA decodes
    each image once and the model sees every view in the same batches."""

    def __init__(self, *, plain: EvalPreset, augmented: TrainPreset, n_aug: int) -> None:
        self.plain, self.augmented, self.n_aug = plain, augmented, n_aug

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        views = [self.plain(image)] + [self.augmented(image, rng) for _ in range(self.n_aug)]
        return torch.stack(views)


def _affine(a: float, b: float, c: float, d: float, e: float, f: float) -> np.ndarray:
    """(x, y) -> (a x + b y + c, d x + e y + f) as a 3x3 matrix."""
    return np.array([[a, b, c], [d, e, f], [0.0, 0.0, 1.0]])


def _normalised_tensor(
    image: Image.Image, normalisation: Normalisation, *, rng: np.random.Generator | None = None
) -> torch.Tensor:
    """RGB image -> normalised float32 (C, H, W) tensor, a view of one HWC array (already channels_last); with
    `rng`, lighting first: brightness and contrast, each by a factor in [0.95, 1.05]."""
    pixels = np.asarray(image, dtype=np.float32)  # H, W, C in 0..255
    if rng is not None:
        brightness, contrast = rng.uniform(0.95, 1.05, size=2)
        pixels *= brightness
        np.clip(pixels, 0.0, 255.0, out=pixels)
        grey = float((pixels.reshape(-1, 3) @ _GREY_WEIGHTS).mean())
        pixels -= grey
        pixels *= contrast
        pixels += grey
        np.clip(pixels, 0.0, 255.0, out=pixels)
    std = np.asarray(normalisation.std, dtype=np.float32)
    pixels *= 1 / (255 * std)
    pixels -= np.asarray(normalisation.mean, dtype=np.float32) / std
    return torch.from_numpy(pixels).permute(2, 0, 1)


class ImageDataset(Dataset):
    """Images and label indices (-1 for unlabelled), fetched by (index, sample_seed); decoded images are kept
    in memory up to `keep_decoded_bytes` (the transforms never modify their input)."""

    def __init__(
        self, files: Sequence[Path], labels: Sequence[int], transform, *, keep_decoded_bytes: int = 0
    ) -> None:
        self.files = list(files)
        self.labels = list(labels)
        self.transform = transform
        self.keep_decoded_bytes = keep_decoded_bytes
        self._decoded: dict[int, Image.Image] = {}
        self.decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key
        return self.transform(self._image(index), np.random.default_rng(sample_seed)), self.labels[index]

    def _image(self, index: int) -> Image.Image:
        image = self._decoded.get(index)
        if image is None:
            image = load_rgb(self.files[index])
            size = image.width * image.height * len(image.getbands())
            if self.decoded_bytes + size <= self.keep_decoded_bytes:
                self._decoded[index] = image
                self.decoded_bytes += size
        return image


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
    return BackgroundLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # The loader draws a seed for its workers at every new iterator (each epoch without persistent
        # workers, once with them); drawn from its own generator, the global RNG that dropout uses is
        # untouched, so num_workers 0 and N give the same run. Augmentation is seeded per item instead.
        generator=torch.Generator().manual_seed(seed),
    )


class BackgroundLoader(DataLoader):
    """A DataLoader that, without worker processes, makes its batches in a background thread two ahead of the
    loop (decoding releases the GIL), so they overlap the compute; the same batches in the same order."""

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()  # made here, in the caller's thread, as the plain DataLoader does
        return iterator if self.num_workers > 0 else _made_ahead(iterator, depth=2)


_END = object()


def _made_ahead(iterator: Iterator, *, depth: int) -> Iterator:
    """The items of `iterator`, made by one thread at most `depth` ahead; its exceptions are raised here, and
    an early stop drops the items not yet started."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
    try:
        pending = deque(executor.submit(next, iterator, _END) for _ in range(depth))
        while (item := pending.popleft().result()) is not _END:
            pending.append(executor.submit(next, iterator, _END))
            yield item
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
