"""The exported model: the fine-tuned network as one torch.export file with what using it needs inside (class
names, image size, normalisation, preprocessing, TTA settings, as JSON). It loads with torch alone:

    extra = {"kagglecls.json": ""}
    network = torch.export.load("models/export.pt2", extra_files=extra).module()
    info = json.loads(extra["kagglecls.json"])
    logits = network(images)  # images: (N, 3, image_size, image_size) float32, prepared as info says

torch.export rather than TorchScript: torch 2.15 warns that torch.jit.trace, save and load are deprecated.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from kagglecls.atomic import write_file
from kagglecls.data import cache_short_side
from kagglecls.errors import UserError
from kagglecls.loading import load_classifier, normalisation_for, trained_augmentation
from kagglecls.models import fused_for_inference
from kagglecls.params import Params

log = logging.getLogger(__name__)

METADATA_FILE = "kagglecls.json"  # the extra file inside the export that holds ExportInfo
FORMAT = "kagglecls-export-1"
PREPROCESSING = (
    "decode to RGB (EXIF orientation applied, alpha on white); shorter side to cache_short_side (bilinear, "
    "antialiased, never upscaled) and saved as a JPEG of quality 95, as the pipeline's resize cache; then "
    "shorter side to image_size and the centre square cropped, one bilinear antialiased resize of the centre "
    "square (Pillow resize with box, reducing_gap 3); (pixel / 255 - mean) / std per channel; NCHW float32"
)
TTA = (
    "(1 - beta) x mean of n_aug augmented views + beta x the plain view, of softmax probabilities; the "
    "augmentation is kagglecls.data.TrainPreset, seeded from seed and each image's position as predict_tta"
)


class ExportError(UserError):
    """A file that is not a model exported by the export stage."""


@dataclass(frozen=True)
class TtaSettings:
    n_aug: int  # augmented views per image, besides the plain one
    beta: float  # weight of the plain view
    augmentation: str  # side_on | top_down | basic | none: the one the model was trained with
    max_zoom: float
    seed: int  # base.seed


@dataclass(frozen=True)
class ExportInfo:
    classes: tuple[str, ...]  # in the order of the network's outputs
    image_size: int  # px, the square side the network sees (finetune.sizes[-1])
    cache_short_side: int  # px, the resize cache's shorter side (data.resize_factor x image_size)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tta: TtaSettings
    arch: str


def export_model(*, params: Params, model_path: Path, out: Path) -> None:
    """Write the fine-tuned model of `model_path` (BatchNorm fused, as predict_tta runs it) to `out`, any batch
    size, with its ExportInfo inside."""
    model, classes = load_classifier(params, head_path=model_path, weights_key="model")
    size = params.finetune.sizes[-1]
    normalisation = normalisation_for(params)
    info = ExportInfo(
        classes=tuple(classes),
        image_size=size,
        cache_short_side=cache_short_side(size, params.data.resize_factor),
        mean=normalisation.mean,
        std=normalisation.std,
        tta=TtaSettings(
            n_aug=params.predict_tta.n_aug,
            beta=params.predict_tta.beta,
            augmentation=trained_augmentation(params.finetune, model_path),
            max_zoom=params.finetune.max_zoom,
            seed=params.base.seed,
        ),
        arch=params.model.arch,
    )
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(fused_for_inference(model), (example,), dynamic_shapes=({0: batch},))
    # Each node's stack trace names the files of the code that traced it: the export's bytes would depend on
    # the folder the repository lies in, and the same weights would hash differently for DVC.
    for node in program.graph.nodes:
        node.meta.pop("stack_trace", None)
    metadata = {
        "format": FORMAT,
        **asdict(info),
        "preprocessing": PREPROCESSING,
        "output": "logits",
        "tta_formula": TTA,
    }
    # Through a file object the archive's inner folder is "archive", not the temporary file's name: the same
    # weights give the same bytes.
    with write_file(out) as temporary, open(temporary, "wb") as handle:
        torch.export.save(program, handle, extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})
    log.info("exported %s: %d classes, %d px, to %s", params.model.arch, len(classes), size, out)


def load_export(path: Path) -> tuple[nn.Module, ExportInfo]:
    """The network (logits) and ExportInfo of a file written by export_model; ExportError for anything else."""
    path = Path(path)
    if not path.is_file():
        found = "a folder" if path.is_dir() else "nothing"
        raise ExportError(f"{path}: expected a model exported by the export stage, found {found} there")
    if not _has_metadata(path):
        raise ExportError(
            f"{path}: not a model exported by the export stage (no {METADATA_FILE} inside); "
            "expected its output, e.g. models/export.pt2"
        )
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except (RuntimeError, ValueError, KeyError, OSError, zipfile.BadZipFile) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"{path}: cannot load the exported program ({first_line})") from None
    return program.module(), _info(extra[METADATA_FILE], path)


def _has_metadata(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith(f"/extra/{METADATA_FILE}") for name in archive.namelist())


def _info(text: str, path: Path) -> ExportInfo:
    try:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ExportError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        return ExportInfo(
            classes=tuple(raw["classes"]),
            image_size=int(raw["image_size"]),
            cache_short_side=int(raw["cache_short_side"]),
            mean=tuple(raw["mean"]),
            std=tuple(raw["std"]),
            tta=TtaSettings(**raw["tta"]),
            arch=raw["arch"],
        )
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ExportError(f"{path}: {METADATA_FILE} is not valid export metadata ({error!r})") from None
