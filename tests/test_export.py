"""The exported model and `kagglecls predict`: the export loads with torch alone and predicts what predict_tta's
code predicts on the same images, plain and with TTA; the command prints and writes those figures, and a bad
model file or image is one line on stderr."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tomllib
import zipfile
from importlib import import_module
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kagglecls import __main__ as command
from kagglecls import predict
from kagglecls.export import METADATA_FILE, ExportError, export_model, load_export
from kagglecls.loading import Split, build_model, step_settings, to_device
from kagglecls.manifest import ManifestRow, file_md5
from kagglecls.params import params_from_mapping

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "fox"]
PARAMS = params_from_mapping(
    {
        "base": {"seed": 7},
        "data": {"resize_factor": 1.3},
        "model": {"arch": "efficientnet_lite0", "head_hidden": [], "head_dropout": [0.25]},
        "finetune": {"sizes": [48, 32], "augmentation": "side_on", "max_zoom": 1.2},
        "predict_tta": {"n_aug": 2, "beta": 0.25},
    }
)
# Sizes, modes and formats the resize cache and the eval preset treat differently: landscape and portrait,
# smaller than the cache's short side (not upscaled), grey, RGBA on white, PNG.
PICTURES = {
    "a.jpg": ((64, 40), "RGB"),
    "b.png": ((30, 50), "RGB"),
    "c.jpg": ((90, 90), "L"),
    "sub/d.png": ((44, 52), "RGBA"),
}


def _picture(size: tuple[int, int], mode: str, seed: int) -> Image.Image:
    """Smooth colour gradients with noise: the network's outputs differ from picture to picture."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) + np.cos(y / rng.uniform(3, 9)) for _ in range(4)
    ]
    pixels = np.stack(channels, axis=-1) * 60 + 128 + rng.normal(0, 10, (height, width, 4))
    picture = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGBA")
    return picture if mode == "RGBA" else picture.convert(mode)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Images in a folder, a finetune.pt of ImageNet body weights and a random head (as finetune saves it), and
    its export."""
    root = tmp_path_factory.mktemp("export")
    folder = root / "images"
    for index, (name, (size, mode)) in enumerate(PICTURES.items()):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        _picture(size, mode, seed=index).save(folder / name)
    torch.manual_seed(0)
    model = build_model(PARAMS, len(CLASSES), pretrained=True)
    with torch.no_grad():
        model.head[-1].weight.mul_(
            20
        )  # confident, distinct probabilities: the comparisons below mean something
    torch.save({"model": model.state_dict(), "classes": CLASSES}, root / "finetune.pt")
    export_model(params=PARAMS, model_path=root / "finetune.pt", out=root / "export.pt2")
    return {"root": root, "folder": folder, "model": model, "export": root / "export.pt2"}


def _pipeline_tta(exported: dict, files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(TTA, plain) probabilities from predict_tta's own code on `files`, as a test split."""
    rows = [
        ManifestRow(file=str(file.relative_to(exported["folder"])), label="", split="test", id=file.stem,
                    md5=file_md5(file), width=0, height=0)
        for file in files
    ]  # fmt: skip
    split = Split(rows, np.full(len(rows), -1))
    settings = step_settings(PARAMS, torch.device("cpu"))
    model = to_device(exported["model"], settings)
    cache = exported["root"] / "cache"
    return predict._tta(
        PARAMS,
        model,
        exported["folder"],
        cache,
        split,
        size=32,
        settings=settings,
        augmentation=PARAMS.finetune.augmentation,
    )


def test_export_predicts_what_predict_tta_predicts_plain_and_with_tta(exported: dict) -> None:
    files = predict.image_files([exported["folder"]])
    assert [file.relative_to(exported["folder"]).as_posix() for file in files] == sorted(PICTURES)
    network, info = load_export(exported["export"])
    ours_tta, ours_plain = predict.predict_files(network, info, files, tta=True)
    pipeline_tta, pipeline_plain = _pipeline_tta(exported, files)
    np.testing.assert_allclose(ours_plain, pipeline_plain, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours_tta, pipeline_tta, rtol=0, atol=1e-5)
    assert np.ptp(pipeline_plain, axis=0).max() > 0.1  # the images' probabilities differ
    assert np.abs(pipeline_tta - pipeline_plain).max() > 1e-3  # the augmented views did count
    without_tta, plain = predict.predict_files(network, info, files, tta=False)
    np.testing.assert_array_equal(without_tta, plain)
    np.testing.assert_allclose(without_tta, pipeline_plain, rtol=0, atol=1e-5)


def test_the_metadata_holds_what_using_the_model_needs(exported: dict) -> None:
    _, info = load_export(exported["export"])
    assert info.classes == tuple(CLASSES)
    assert (info.image_size, info.cache_short_side) == (32, 42)  # finetune.sizes[-1], round(32 x 1.3)
    assert (info.mean, info.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # efficientnet_lite0's
    assert (info.tta.n_aug, info.tta.beta, info.tta.augmentation, info.tta.max_zoom) == (
        2,
        0.25,
        "side_on",
        1.2,
    )
    assert info.tta.seed == 7 and info.arch == "efficientnet_lite0"


def test_the_export_loads_and_runs_with_torch_alone(exported: dict) -> None:
    """In a fresh interpreter where kagglecls and the EfficientNet package cannot be imported."""
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(images, exported["root"] / "inputs.pt")
    script = f"""
import json, sys
sys.modules["kagglecls"] = sys.modules["efficientnet_lite_pytorch"] = None  # import fails
import torch
extra = {{"{METADATA_FILE}": ""}}
network = torch.export.load(sys.argv[1], extra_files=extra).module()
with torch.inference_mode():
    torch.save(network(torch.load(sys.argv[2])), sys.argv[3])
print(json.loads(extra["{METADATA_FILE}"])["classes"])
"""
    output = subprocess.run(
        [sys.executable, "-c", script, str(exported["export"]), str(exported["root"] / "inputs.pt"),
         str(exported["root"] / "logits.pt")],
        capture_output=True, text=True, check=True, cwd=exported["root"],
    ).stdout  # fmt: skip
    assert output.strip() == str(CLASSES)
    with torch.inference_mode():
        expected = exported["model"].eval()(images)
    np.testing.assert_allclose(torch.load(exported["root"] / "logits.pt"), expected, rtol=0, atol=1e-4)


def test_the_command_prints_the_top_classes_of_each_image_of_a_folder(exported: dict, capsys) -> None:
    files = predict.image_files([exported["folder"]])
    network, info = load_export(exported["export"])
    probabilities, _ = predict.predict_files(network, info, files, tta=False)
    assert predict.main([str(exported["export"]), str(exported["folder"]), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(PICTURES)
    for line, file, row in zip(lines, files, probabilities, strict=True):
        name, ranked = line.split(": ")
        assert name == str(file)
        best, second = np.argsort(-row)[:2]
        assert ranked == f"{CLASSES[best]} {row[best]:.4f}, {CLASSES[second]} {row[second]:.4f}"
    assert command.main(["predict", str(exported["export"]), str(files[0])]) == 0  # `kagglecls predict`
    assert len(capsys.readouterr().out.split(": ")[1].split(", ")) == 3  # top 5 of 3 classes: all 3


def test_the_command_writes_every_probability_to_csv_with_tta(exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "predictions.csv"
    assert predict.main([str(exported["export"]), str(exported["folder"]), "--tta", "--csv", str(out)]) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    files = predict.image_files([exported["folder"]])
    expected, _ = _pipeline_tta(exported, files)
    assert [row["file"] for row in rows] == [str(file) for file in files]
    assert list(rows[0]) == ["file", *CLASSES]
    written = np.array([[float(row[name]) for name in CLASSES] for row in rows])
    np.testing.assert_allclose(written, expected, rtol=0, atol=1e-5)


def _error_line(argv: list[str], capsys) -> str:
    assert predict.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    # The one line, after any progress bar (the resize cache's, before the unreadable image was found).
    lines = [line for line in captured.err.splitlines() if line.startswith("kagglecls predict:")]
    assert len(lines) == 1 and captured.err.endswith(lines[0] + "\n"), captured.err
    return lines[0]


def test_a_file_that_is_not_an_export_is_one_line_naming_it(exported: dict, tmp_path: Path, capsys) -> None:
    image = str(exported["folder"] / "a.jpg")
    state_dict = exported["root"] / "finetune.pt"  # a zip too, from torch.save
    text = tmp_path / "notes.pt2"
    text.write_text("hello\n")
    for model in (state_dict, text):
        line = _error_line([str(model), image], capsys)
        assert line.startswith(f"kagglecls predict: error: {model}: not a model exported by the export stage")
    line = _error_line([str(tmp_path / "missing.pt2"), image], capsys)
    assert line == (
        f"kagglecls predict: error: {tmp_path / 'missing.pt2'}: expected a model exported by the export "
        "stage, found nothing there"
    )
    with pytest.raises(ExportError, match="found a folder there"):
        load_export(tmp_path)


def test_unreadable_images_and_empty_folders_are_one_line_naming_them(
    exported: dict, tmp_path: Path, capsys
) -> None:
    model = str(exported["export"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG start, then noise
    line = _error_line([model, str(exported["folder"] / "a.jpg"), str(broken)], capsys)
    assert line.startswith(f"kagglecls predict: error: {broken}: not a recognised image format")
    empty = tmp_path / "empty"
    (empty / ".hidden.jpg").parent.mkdir()
    (empty / "notes.txt").write_text("no images here\n")
    (empty / ".hidden.jpg").write_bytes((exported["folder"] / "a.jpg").read_bytes())
    line = _error_line([model, str(empty)], capsys)
    assert (
        line
        == f"kagglecls predict: error: {empty}: no image files in this folder (expected .jpg, .png, ... files)"
    )
    line = _error_line([model, str(tmp_path / "nowhere")], capsys)
    assert line == f"kagglecls predict: error: {tmp_path / 'nowhere'}: no such file or folder"


def test_python_m_kagglecls_predict_runs_the_command(exported: dict, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kagglecls.predict", str(tmp_path / "missing.pt2"), str(exported["folder"])],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"kagglecls predict: error: {tmp_path / 'missing.pt2'}: expected a model exported by the export "
        "stage, found nothing there"
    ]


def test_the_console_script_names_the_command() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["kagglecls"].split(":")
    assert getattr(import_module(module), function) is command.main


def test_the_export_names_no_file_of_the_code_that_traced_it(exported: dict) -> None:
    """Stack traces would put this checkout's paths in the file: the same weights exported from another folder
    would give other bytes, another hash for DVC."""
    with zipfile.ZipFile(exported["export"]) as archive:
        contents = b"".join(archive.read(name) for name in archive.namelist())
    assert str(REPO).encode() not in contents
    assert b"kagglecls/models.py" not in contents


def test_export_metadata_is_json_a_reader_without_kagglecls_can_use(exported: dict) -> None:
    extra = {METADATA_FILE: ""}
    torch.export.load(exported["export"], extra_files=extra)
    metadata = json.loads(extra[METADATA_FILE])
    assert {"classes", "image_size", "mean", "std", "preprocessing", "tta", "output"} <= set(metadata)
    assert metadata["output"] == "logits"
