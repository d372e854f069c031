"""Decode, verify and pre-resize images: the one place that opens image files (JPEG draft mode and a bilinear
antialiased resize are the speed choices; figures in bench/bench_images.py)."""

import csv
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from kagglecls.atomic import remove_temporaries, write_file
from kagglecls.errors import UserError

logger = logging.getLogger(__name__)

# Images with more pixels than this are refused as possible decompression bombs (120 megapixels is about
# 12600 x 9500, bigger than any camera photo; decoded as RGB it would take 360 MB). Tests monkeypatch it.
MAX_PIXELS = 120_000_000
RESAMPLE = Image.Resampling.BILINEAR
# Large non-JPEG images are first shrunk by an integer factor (box filter) down to 3x the target, then
# resampled: Pillow's docs call the result indistinguishable from a full resample.
REDUCING_GAP = 3.0
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class BadImageError(UserError):
    """An image file that cannot be decoded; the message is one line that names the file."""


@dataclass(frozen=True)
class ImageCheck:
    path: Path
    width: int | None  # after EXIF orientation; None when unreadable
    height: int | None
    error: str | None  # None when readable


def load_rgb(path: Path, *, short_side: int | None = None) -> Image.Image:
    """Decode an image file (format sniffed from the content) to upright RGB, alpha on white, 16-bit scaled to
    8, resized to `short_side` if given; BadImageError for empty, truncated, non-image or bomb-sized files."""
    return _decode(Path(path), short_side=short_side, upscale=True)


def image_workers() -> int:
    """Processes for the image checks and the resized cache: every core this process may use (they run
    alone, before any training)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_images(paths: Sequence[Path], *, workers: int = 2) -> list[ImageCheck]:
    """Fully decode every image (not just its header); one ImageCheck per path, in the order of `paths`."""
    return _map_in_workers(_check_one, [Path(path) for path in paths], workers=workers, description="check")


def write_resized_cache(
    sources: Sequence[Path], targets: Sequence[Path], *, short_side: int, workers: int = 2
) -> list[str | None]:
    """Save each source as a JPEG of shorter side `short_side` (never upscaled, as fastai's data.resize); None
    or the error text per item. Existing targets are skipped (a build resumes), a killed run's temporaries go."""
    target_paths = [Path(target) for target in targets]
    for folder in sorted({target.parent for target in target_paths}):
        for stale in remove_temporaries(folder):
            logger.info("removed %s, left by an interrupted run", stale)
    jobs = [(Path(source), target) for source, target in zip(sources, target_paths, strict=True)]
    jobs = [(source, target) for source, target in jobs if not target.exists()]
    resize = partial(_resize_one, short_side=short_side)
    job_results = _map_in_workers(resize, jobs, workers=workers, description="resize")
    job_errors = {target: error for (_source, target), error in zip(jobs, job_results, strict=True)}
    errors = [job_errors.get(target) for target in target_paths]
    logger.info(
        "resized cache at short side %d: %d written, %d already there, %d unreadable",
        short_side,
        len(jobs) - sum(error is not None for error in job_errors.values()),
        len(target_paths) - len(jobs),
        sum(error is not None for error in errors),
    )
    return errors


def write_bad_image_report(checks: Sequence[ImageCheck], path: Path) -> None:
    """Write a CSV `file,error` of the unreadable images (just the header when there are none), atomically."""
    with write_file(path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["file", "error"])
        writer.writerows([str(check.path), check.error] for check in checks if check.error is not None)


def _decode(path: Path, *, short_side: int | None, upscale: bool) -> Image.Image:
    image = _open_checked(path)
    try:
        if short_side is not None and image.format == "JPEG":
            _request_draft(image, short_side=short_side)
        image.load()
        # In place and without needless copies: each copy of a fresh 500x375 image costs about 0.5 ms.
        ImageOps.exif_transpose(image, in_place=True)
        rgb = _to_rgb(image)
    # Pillow's parsers raise many exception types on malformed bytes; this block only calls Pillow.
    except Exception as error:
        image.close()
        raise BadImageError(_one_line(f"{path}: cannot decode {image.format} image: {error}")) from error
    if short_side is not None and (upscale or min(rgb.size) > short_side):
        size = _size_for_short_side(rgb.size, short_side=short_side)
        rgb = rgb if size == rgb.size else rgb.resize(size, RESAMPLE, reducing_gap=REDUCING_GAP)
    if rgb is not image:
        image.close()  # frees the full-size pixels now, and the file a multi-frame image keeps open
    elif getattr(image, "n_frames", 1) > 1:
        rgb = image.copy()  # load() closed the file of a single-frame image, but not of this one
        image.close()
    return rgb


def _open_checked(path: Path) -> Image.Image:
    """Open the file's header: content sniffed by Pillow, empty, non-image and oversized files refused."""
    try:
        size_in_bytes = path.stat().st_size
    except OSError as error:
        raise BadImageError(f"{path}: cannot read file ({error.strerror or error})") from error
    if size_in_bytes == 0:
        raise BadImageError(f"{path}: empty file (0 bytes), expected an image")
    try:
        with warnings.catch_warnings():
            # The MAX_PIXELS check below replaces Pillow's warning; its hard error (2x its limit) stays.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except UnidentifiedImageError as error:
        with open(path, "rb") as handle:
            first_bytes = handle.read(8)
        raise BadImageError(f"{path}: not a recognised image format (starts with {first_bytes!r})") from error
    except Image.DecompressionBombError as error:
        raise BadImageError(
            _one_line(f"{path}: refused as a possible decompression bomb: {error}")
        ) from error
    except OSError as error:  # a header Pillow recognised but could not parse, e.g. cut short
        raise BadImageError(_one_line(f"{path}: cannot decode the image header: {error}")) from error
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise BadImageError(
            f"{path}: {width} x {height} = {width * height:,} pixels, more than the limit of {MAX_PIXELS:,}"
            " (refused as a possible decompression bomb)"
        )
    return image


def _request_draft(image: Image.Image, *, short_side: int) -> None:
    """Let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay at least the target's."""
    width, height = image.size
    scale = short_side / min(width, height)
    if scale < 0.5:
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """The same image when it is already plain RGB, else an RGB copy."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _HIGH_BIT_MODES:
        image = _to_8_bit_gray(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8_bit_gray(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer, or float) grayscale to 8 bits: 0..65535 maps to 0..255."""
    values = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16") or values.max(initial=0.0) > 255:
        values = values / 257.0
    gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    if "transparency" in image.info:
        gray.info["transparency"] = round(image.info["transparency"] / 257)
    return gray


def _size_for_short_side(size: tuple[int, int], *, short_side: int) -> tuple[int, int]:
    width, height = size
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def _check_one(path: Path) -> ImageCheck:
    try:
        image = _decode(path, short_side=None, upscale=False)
    except BadImageError as error:
        return ImageCheck(path=path, width=None, height=None, error=str(error))
    return ImageCheck(path=path, width=image.width, height=image.height, error=None)


def _resize_one(job: tuple[Path, Path], *, short_side: int) -> str | None:
    source, target = job
    try:
        image = _decode(source, short_side=short_side, upscale=False)
    except BadImageError as error:
        return str(error)
    with write_file(target) as temporary:
        image.save(temporary, format="JPEG", quality=95)
    return None


def _map_in_workers(
    function: Callable[[_Item], _Result], items: Sequence[_Item], *, workers: int, description: str
) -> list[_Result]:
    """`[function(item) for item in items]` in `workers` processes (1: this process), with a progress bar."""
    progress = partial(tqdm, total=len(items), desc=description, unit="image", mininterval=1.0)
    if workers == 1 or len(items) < 2:
        return [function(item) for item in progress(items)]
    # Chunks amortise the inter-process traffic; 4 chunks per worker keeps the bar moving and the load even.
    chunk_size = max(1, min(64, len(items) // (workers * 4)))
    with ProcessPoolExecutor(max_workers=workers) as executor:
        return list(progress(executor.map(function, items, chunksize=chunk_size)))


def _one_line(message: str) -> str:
    return " ".join(message.split())
