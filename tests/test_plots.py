"""The PNG figures of kagglecls.plots and the CSV/JSON files of kagglecls.atomic."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from kagglecls import atomic, plots


def _png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_each_figure_is_a_png_and_leaves_no_temporary(tmp_path):
    plots.plot_size_histogram([500, 400, 500], [375, 300, 375], path=tmp_path / "sizes.png")
    assert _png_size(tmp_path / "sizes.png")[0] > 300
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["sizes.png"]


def test_the_image_grid_has_a_row_per_four_images():
    pictures = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue", "white", "black")]
    one_row = plots.image_grid(pictures[:4], [f"image {index}" for index in range(4)])
    two_rows = plots.image_grid(pictures, [f"image {index}" for index in range(5)])
    assert one_row.format == two_rows.format == "PNG"
    assert two_rows.width == one_row.width  # four columns: 12 inches
    assert two_rows.height > 1.5 * one_row.height  # two rows of 3.2 inches against one


def test_json_and_csv_are_written_whole(tmp_path):
    atomic.write_json({"b": 2, "a": 1.5}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5, "b": 2}
    atomic.write_csv([{"x": 1, "y": 2, "extra": 3}], tmp_path / "t.csv", columns=("x", "y"))
    assert (tmp_path / "t.csv").read_text().splitlines() == ["x,y", "1,2"]


def test_a_figure_that_cannot_be_written_raises_and_leaves_no_temporary(tmp_path):
    (tmp_path / "taken").write_text("a file where a folder should be\n")
    with pytest.raises(FileExistsError):
        plots.plot_size_histogram([1, 2], [3, 4], path=tmp_path / "taken" / "sizes.png")
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["taken"]


def test_drawing_leaves_pyplot_unimported(tmp_path):
    """Figures are drawn on an Agg canvas of their own: no pyplot, so no global figure state or display."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kagglecls import plots\n"
        f"plots.plot_size_histogram([1, 2], [3, 4], path=Path({str(tmp_path / 'sizes.png')!r}))\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    assert _png_size(tmp_path / "sizes.png")[0] > 300
