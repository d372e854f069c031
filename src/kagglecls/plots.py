"""PNG figures on matplotlib's Agg canvas (no pyplot, no display), and the size_histogram stage. Imported only
by the stages that draw, so a figure's look reruns only those."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from kagglecls.atomic import write_file, write_json
from kagglecls.manifest import read_manifest

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(**options: object) -> Figure:
    """A matplotlib Figure without pyplot (no global state, no display; savefig picks the Agg canvas for a
    PNG). matplotlib is imported here, by the stages that draw."""
    from matplotlib.figure import Figure

    return Figure(**options)


def _save(figure: Figure, path: Path) -> None:
    with write_file(path) as temporary:
        figure.savefig(temporary, dpi=100, bbox_inches="tight")


def plot_size_histogram(widths: Sequence[int], heights: Sequence[int], *, path: Path) -> None:
    figure = _figure(figsize=(10, 4))
    left, right = figure.subplots(1, 2)
    left.hist(widths, bins=30)
    left.set_title("width (px)")
    right.hist(heights, bins=30)
    right.set_title("height (px)")
    _save(figure, path)


def image_grid(images: Sequence[Image.Image], titles: Sequence[str]) -> Image.Image:
    """A grid of images with a title each (top losses: actual / predicted / probability / loss), as a PNG
    image for dvclive."""
    columns = max(1, min(4, len(images)))
    rows = max(1, -(-len(images) // columns))
    figure = _figure(figsize=(3 * columns, 3.2 * rows))
    axes_grid = figure.subplots(rows, columns, squeeze=False)
    for axes in axes_grid.flat:
        axes.axis("off")
    for axes, image, title in zip(axes_grid.flat, images, titles, strict=False):
        axes.imshow(image)
        axes.set_title(title, fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return Image.open(buffer)


def size_histogram(*, reorganised: Path, png: Path, summary: Path) -> None:
    """Widths and heights of the training images: a histogram PNG and a JSON summary of them."""
    rows = [row for row in read_manifest(reorganised / "manifest.csv") if row.split in ("train", "valid")]
    widths = np.array([row.width for row in rows])
    heights = np.array([row.height for row in rows])
    plot_size_histogram(widths, heights, path=png)
    figures = {"count": len(rows)}
    for name, values in (("width", widths), ("height", heights)):
        for label, value in zip(
            ("min", "p10", "median", "p90", "max"), np.percentile(values, [0, 10, 50, 90, 100]), strict=True
        ):
            figures[f"{name}_{label}"] = float(value)
    write_json(figures, summary)
