"""Image loading benchmark (issue 6): images per second for the resized cache and for training epochs.

Generates Dog-Breed-like JPEGs (500 x 375, smooth random content with grain, quality 90) in a temporary folder
and times, best of --repeats, each ratio taken against the baseline at the same size:
  1. the plain baseline `Image.open(p).convert("RGB").resize(size)` to short side 288 (1.3 x 224);
  2. `load_rgb(p, short_side=288)` in one process;
  3. `write_resized_cache(..., short_side=288)` in this process (the gain per core) and (3b) with 2 worker
     processes, pool start-up included (the issue's 3x target);
  4. decoding the cached 384 x 288 JPEGs with `load_rgb(p)`, what each training epoch does, in one process
     and (4b) in 2 worker processes (`check_images`, standing in for a data loader with 2 workers);
  5. the baseline and the cache build at short side 166 (1.3 x 128), where JPEG draft mode decodes at 1/2;
  6. the same at short side 83 (1.3 x 64, the sample's default size), where it decodes at 1/4.
CPU time (this process and its workers) is printed beside wall time: on a shared machine it is the figure
that other work barely moves, and wall time on N idle cores is about N / (CPU seconds per image) when the
work is spread over N workers. Then the speed and the mean absolute difference (grey levels, against a float Lanczos resize) of Pillow's
resampling filters, which is how `images.RESAMPLE` was chosen. Not a test: nothing is asserted.

Run from the repository root:
    PYTHONPATH=src .venv/bin/python bench/bench_images.py [--count 400] [--workers 2] [--repeats 3]
"""

import argparse
import os
import platform
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

os.environ.setdefault(
    "TQDM_DISABLE", "1"
)  # read when tqdm is imported; bars would interleave with the figures

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image  # noqa: E402

from kagglecls.images import RESAMPLE, check_images, load_rgb, write_resized_cache  # noqa: E402

WIDTH, HEIGHT = 500, 375


def make_images(folder: Path, *, count: int, width: int, height: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        coarse = rng.integers(0, 256, size=(height // 40 + 2, width // 40 + 2, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
        grain = rng.normal(0.0, 6.0, size=smooth.shape)  # sensor-like noise, so files are not trivially small
        path = folder / f"{index:05d}.jpg"
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(
            path, format="JPEG", quality=90
        )
        paths.append(path)
    return paths


def cpu_seconds_so_far() -> float:
    """CPU time of this process and of its finished children (the pool's workers, once shut down)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def best_seconds(cases: list[Callable[[], object]], *, repeats: int) -> list[tuple[float, float]]:
    """Best (wall, CPU) seconds of `repeats` runs per case, the cases taken in turn so that a busy spell
    hits them all alike. CPU seconds are what other work on a shared machine does not inflate much."""
    best = [(float("inf"), float("inf"))] * len(cases)
    for _ in range(repeats):
        for index, run_once in enumerate(cases):
            wall_start, cpu_start = time.perf_counter(), cpu_seconds_so_far()
            run_once()
            wall, cpu = time.perf_counter() - wall_start, cpu_seconds_so_far() - cpu_start
            best[index] = (min(best[index][0], wall), min(best[index][1], cpu))
    return best


def count_up(limit: int) -> int:
    total = 0
    for number in range(limit):
        total += number
    return total


def parallel_speedup(*, workers: int, limit: int = 4_000_000) -> float:
    """How much faster `workers` processes ran `workers` pure-CPU loops than one process ran them in turn:
    about `workers` on idle cores, less when other work shares the machine (read the figures in that light)."""
    start = time.perf_counter()
    for _ in range(workers):
        count_up(limit)
    serial = time.perf_counter() - start
    with ProcessPoolExecutor(max_workers=workers) as executor:
        list(executor.map(count_up, [1] * workers))  # workers started before the clock
        start = time.perf_counter()
        list(executor.map(count_up, [limit] * workers))
        return serial / (time.perf_counter() - start)


def size_for_short_side(short_side: int) -> tuple[int, int]:
    return round(WIDTH * short_side / HEIGHT), short_side


def each(function: Callable[[Path], object], paths: list[Path]) -> Callable[[], None]:
    """Calls `function` on every path, keeping no result (as a data loader does once it has the tensor)."""

    def run_once() -> None:
        for path in paths:
            function(path)

    return run_once


def plain_baseline(paths: list[Path], *, short_side: int) -> Callable[[], None]:
    size = size_for_short_side(short_side)
    return each(lambda path: Image.open(path).convert("RGB").resize(size), paths)


def cache_build(paths: list[Path], folder: Path, *, short_side: int, workers: int) -> Callable[[], object]:
    """Builds the cache into a fresh, empty folder each time, so nothing is skipped."""

    def run_once() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        targets = [folder / path.name for path in paths]
        errors = write_resized_cache(paths, targets, short_side=short_side, workers=workers)
        if any(errors):
            raise RuntimeError(f"cache build failed: {[error for error in errors if error]}")

    return run_once


def loading_rows(
    paths: list[Path], work: Path, *, workers: int, repeats: int
) -> list[tuple[str, float, float, float, float]]:
    """(label, images/s, CPU ms per image, and both as ratios to the baseline at the same size) per case."""
    cached = [work / "cache288" / path.name for path in paths]
    cases: list[tuple[str, Callable[[], object]]] = [
        ("1  baseline open+convert+resize, short 288", plain_baseline(paths, short_side=288)),
        ("2  load_rgb(short_side=288), 1 process", each(partial(load_rgb, short_side=288), paths)),
        ("3  write_resized_cache 288, 1 process", cache_build(paths, work / "cache288_1", short_side=288, workers=1)),
        (f"3b write_resized_cache 288, {workers} workers", cache_build(paths, work / "cache288", short_side=288, workers=workers)),
        ("4  decode cached 384x288, load_rgb, 1 process", each(load_rgb, cached)),
        (f"4b decode cached 384x288, {workers} workers", lambda: check_images(cached, workers=workers)),
        ("5  baseline open+convert+resize, short 166", plain_baseline(paths, short_side=166)),
        (f"5b write_resized_cache 166, {workers} workers", cache_build(paths, work / "cache166", short_side=166, workers=workers)),
        ("6  baseline open+convert+resize, short 83", plain_baseline(paths, short_side=83)),
        (f"6b write_resized_cache 83, {workers} workers", cache_build(paths, work / "cache83", short_side=83, workers=workers)),
    ]  # fmt: skip
    rows = []
    reference = (0.0, 0.0)
    for (label, _), (wall, cpu) in zip(
        cases, best_seconds([run for _, run in cases], repeats=repeats), strict=True
    ):
        figures = (len(paths) / wall, cpu * 1000 / len(paths))
        reference = figures if "baseline" in label else reference
        rows.append((label, *figures, figures[0] / reference[0], reference[1] / figures[1]))
    return rows


def float_lanczos(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A reference resize without 8-bit rounding between passes."""
    channels = np.asarray(image, dtype=np.float32)
    resized = [
        Image.fromarray(channels[..., channel]).resize(size, Image.Resampling.LANCZOS) for channel in range(3)
    ]
    return np.stack([np.asarray(channel) for channel in resized], axis=-1)


def resampling_rows(
    paths: list[Path], *, short_side: int, draft: bool, repeats: int
) -> list[tuple[str, float, float]]:
    """(filter, CPU milliseconds per image for decode + resize, mean absolute difference to float Lanczos)."""
    decoded = [Image.open(path).convert("RGB") for path in paths]
    size = tuple(round(side * short_side / min(decoded[0].size)) for side in decoded[0].size)
    references = [float_lanczos(image, size) for image in decoded]
    names = ("NEAREST", "BOX", "BILINEAR", "BICUBIC", "LANCZOS")

    def decode_and_resize(resample: Image.Resampling) -> list[Image.Image]:
        results = []
        for path in paths:
            image = Image.open(path)
            if draft:
                image.draft("RGB", size)
            results.append(image.convert("RGB").resize(size, resample, reducing_gap=3.0))
        return results

    cases = [partial(decode_and_resize, Image.Resampling[name]) for name in names]
    rows = []
    for name, run_once, (_, seconds) in zip(names, cases, best_seconds(cases, repeats=repeats), strict=True):
        differences = [
            np.abs(np.asarray(result, dtype=np.float32) - reference).mean()
            for result, reference in zip(run_once(), references, strict=True)
        ]
        label = name + (" (chosen)" if Image.Resampling[name] == RESAMPLE else "")
        rows.append((label, seconds * 1000 / len(paths), float(np.mean(differences))))  # CPU ms
    return rows


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=400, help="number of 500x375 JPEGs to generate")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for the cache and checks")
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure; the best is reported")
    return parser.parse_args()


def print_report(arguments: argparse.Namespace, figures: dict) -> None:
    print(
        f"{arguments.count} JPEGs {WIDTH}x{HEIGHT} (mean {figures['kilobytes']:.0f} KB), best of {arguments.repeats}"
    )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load} at the end, Pillow {PIL.__version__}"
    )
    print(
        f"{arguments.workers} processes ran pure-CPU loops {figures['speedup_before']:.2f}x (before) and"
        f" {figures['speedup_after']:.2f}x (after) as fast as one; {arguments.workers}.00x = cores free for us"
    )
    print(
        f"\n{'measurement':48s} {'images/s':>9s} {'vs baseline':>12s} {'CPU ms/image':>13s} {'vs baseline':>12s}"
    )
    for label, rate, cpu_milliseconds, rate_ratio, cpu_ratio in figures["loading"]:
        print(f"{label:48s} {rate:9.0f} {rate_ratio:11.2f}x {cpu_milliseconds:13.2f} {cpu_ratio:11.2f}x")
    for title, key in (
        ("500x375 -> 384x288, full decode", "small"),
        ("2000x1500 -> 384x288, draft 1/4", "large"),
    ):
        print(f"\n{title:40s} {'CPU ms/image':>13s} {'mean abs diff':>14s}")
        for name, milliseconds, difference in figures[key]:
            print(f"{name:40s} {milliseconds:13.2f} {difference:14.2f}")


def main() -> None:
    arguments = parse_arguments()
    figures = {"speedup_before": parallel_speedup(workers=arguments.workers)}
    with tempfile.TemporaryDirectory(prefix="bench_images_") as temporary:
        work = Path(temporary)
        paths = make_images(work / "originals", count=arguments.count, width=WIDTH, height=HEIGHT)
        large = make_images(work / "large", count=10, width=2000, height=1500, seed=1)
        figures["kilobytes"] = np.mean([path.stat().st_size for path in paths]) / 1024
        figures["loading"] = loading_rows(paths, work, workers=arguments.workers, repeats=arguments.repeats)
        figures["small"] = resampling_rows(paths[:40], short_side=288, draft=False, repeats=arguments.repeats)
        figures["large"] = resampling_rows(large, short_side=288, draft=True, repeats=arguments.repeats)
    figures["speedup_after"] = parallel_speedup(workers=arguments.workers)
    print_report(arguments, figures)


if __name__ == "__main__":
    main()
