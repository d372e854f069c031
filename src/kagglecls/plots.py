"""PNG figures (matplotlib, no display) and the CSV/JSON files DVC renders as plots and metrics.

Inside `drawn_in_background()` the figures are drawn by a child process (`python -m kagglecls.plots`), so a
stage neither waits for matplotlib's import nor for the drawing: both overlap the stage's own work.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import pickle
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from matplotlib.figure import Figure


_drawer: subprocess.Popen | None = None  # the child process drawing the figures, inside drawn_in_background()


@contextlib.contextmanager
def drawn_in_background() -> Iterator[None]:
    """Within it, each plot_* call hands its arguments to a child process and returns at once; the child
    imports matplotlib (about 0.7 s) while the stage imports torch, then draws while the stage computes. On
    leaving, waits until every figure is written; a figure that failed raises RuntimeError (its traceback is
    on stderr). The PNG files are the ones drawing in this process writes, byte for byte."""
    global _drawer
    package_parent = str(Path(__file__).resolve().parent.parent)
    search_path = os.pathsep.join(filter(None, (package_parent, os.environ.get("PYTHONPATH"))))
    process = subprocess.Popen(
        [sys.executable, "-m", "kagglecls.plots"],
        stdin=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": search_path},
    )
    _drawer = process
    finished = False
    try:
        yield
        finished = True
    finally:
        _drawer = None
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        status = process.wait()
    if finished and status != 0:
        raise RuntimeError(
            f"drawing the figures failed in the child process (exit status {status}), see above"
        )


def _drawn_by_child_if_any(draw: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(draw)
    def draw_or_hand_over(*arguments: object, **options: object) -> None:
        if _drawer is None:
            draw(*arguments, **options)
            return
        try:
            pickle.dump((draw.__name__, arguments, options), _drawer.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            _drawer.stdin.flush()
        except BrokenPipeError:
            raise RuntimeError(
                f"the child process drawing the figures has stopped, see above; {draw.__name__} not drawn"
            ) from None

    return draw_or_hand_over


def _draw_handed_over(stream: IO[bytes]) -> None:
    """The child's side: draw each (function name, arguments, options) read from `stream` until it ends.
    A thread reads while matplotlib is imported, so the parent never waits on a full pipe."""
    jobs: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            while True:
                jobs.put(pickle.load(stream))
        except EOFError:
            jobs.put(None)
        except BaseException as error:  # noqa: BLE001 - raised in the drawing thread
            jobs.put(error)

    threading.Thread(target=read, name="figures", daemon=True).start()
    import matplotlib.figure  # noqa: F401 - the slow import, done while the parent imports torch

    while (job := jobs.get()) is not None:
        if isinstance(job, BaseException):
            raise job
        name, arguments, options = job
        globals()[name](*arguments, **options)


def write_json(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def write_csv(rows: Sequence[dict], path: Path, *, columns: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def _figure(**options: object) -> Figure:
    """A matplotlib Figure without pyplot: no global state, no display backend, and matplotlib is imported
    only by the stages that draw (pyplot alone costs about 0.3 s of each stage's start-up)."""
    from matplotlib.figure import Figure

    return Figure(**options)


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=100, bbox_inches="tight")
    os.replace(temporary, path)


@_drawn_by_child_if_any
def plot_lr_find(
    lrs: Sequence[float], losses: Sequence[float], *, suggested: float | None, path: Path
) -> None:
    figure = _figure(figsize=(6, 4))
    axes = figure.subplots()
    axes.plot(lrs, losses)
    if suggested is not None:
        axes.axvline(suggested, color="red", linestyle="--", label=f"suggested lr {suggested:.2e}")
        axes.legend()
    else:
        axes.set_title("no suggestion: the loss never fell")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("smoothed loss")
    _save(figure, path)


@_drawn_by_child_if_any
def plot_history(history: Sequence[dict], *, best_epoch: int, path: Path) -> None:
    """Train and valid loss per epoch, the kept epoch marked (0: the weights the stage started from)."""
    figure = _figure(figsize=(6, 4))
    axes = figure.subplots()
    epochs = [record["epoch"] for record in history]
    axes.plot(epochs, [record["train_loss"] for record in history], label="train loss")
    axes.plot(epochs, [record["valid_log_loss"] for record in history], label="valid log loss")
    axes.axvline(best_epoch, color="red", linestyle="--", label=f"kept: epoch {best_epoch}")
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.legend()
    _save(figure, path)


@_drawn_by_child_if_any
def plot_size_histogram(widths: Sequence[int], heights: Sequence[int], *, path: Path) -> None:
    figure = _figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    left.hist(widths, bins=30)
    left.set_title("width (px)")
    right.hist(heights, bins=30)
    right.set_title("height (px)")
    _save(figure, path)


@_drawn_by_child_if_any
def plot_confusion(counts: np.ndarray, classes: Sequence[str], *, path: Path) -> None:
    size = max(4.0, 0.35 * len(classes) + 2)
    figure = _figure(figsize=(size, size))
    axes = figure.subplots()
    axes.imshow(counts, cmap="Blues")
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, classes, rotation=90, fontsize=7)
    axes.set_yticks(ticks, classes, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("actual")
    if len(classes) <= 20:
        for actual in range(len(classes)):
            for predicted in range(len(classes)):
                axes.text(
                    predicted, actual, str(counts[actual, predicted]), ha="center", va="center", fontsize=7
                )
    _save(figure, path)


@_drawn_by_child_if_any
def plot_image_grid(images: Sequence[Image.Image], titles: Sequence[str], *, path: Path) -> None:
    """A grid of images with a title each (top losses: actual / predicted / probability / loss)."""
    columns = max(1, min(4, len(images)))
    rows = max(1, -(-len(images) // columns))
    figure = _figure(figsize=(3 * columns, 3.2 * rows))
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    for axes in axes_grid.flat:
        axes.axis("off")
    for axes, image, title in zip(axes_grid.flat, images, titles, strict=False):
        axes.imshow(image)
        axes.set_title(title, fontsize=8)
    _save(figure, path)


if __name__ == "__main__":
    _draw_handed_over(sys.stdin.buffer)
