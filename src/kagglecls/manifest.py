"""The manifest the stages share, the class list, and the train/valid split or the cross-validation folds.
Imports no torch, so the stages that only move files (download, reorganise, size_histogram, submission)
start fast."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from kagglecls.atomic import write_csv
from kagglecls.errors import UserError

MANIFEST_COLUMNS = ("file", "label", "split", "id", "md5", "width", "height", "fold")


class DataError(UserError, ValueError):
    """Inputs the pipeline cannot use: one line naming the file and what was expected."""


@dataclass(frozen=True)
class ManifestRow:
    file: str  # relative to the manifest's folder; empty for a test id without a readable image
    label: str  # empty for test rows
    split: str  # train | valid | test
    id: str
    md5: str
    width: int  # px, 0 when there is no readable image
    height: int
    # The fold whose model holds this image out and predicts it: 1..cv.folds for labelled images (with one
    # split, the valid images are fold 1's and the train images 0), 0 for test rows.
    fold: int = 0


def read_manifest(path: Path) -> list[ManifestRow]:
    if not Path(path).is_file():
        raise DataError(f"{path}: not found; the reorganise stage writes it (dvc repro reorganise)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != MANIFEST_COLUMNS:
            raise DataError(
                f"{path}: expected columns {','.join(MANIFEST_COLUMNS)}, found {reader.fieldnames}"
            )
        return [
            ManifestRow(
                **{
                    **row,
                    "width": int(row["width"] or 0),
                    "height": int(row["height"] or 0),
                    "fold": int(row["fold"] or 0),
                }
            )
            for row in reader
        ]


def write_manifest(rows: Sequence[ManifestRow], path: Path) -> None:
    write_csv([asdict(row) for row in rows], path, columns=MANIFEST_COLUMNS)


@dataclass(frozen=True)
class ClassInfo:
    classes: list[str]
    prior: list[float]  # training-set frequency of each class
    warnings: list[str]


def read_class_info(reorganised: Path) -> ClassInfo:
    return ClassInfo(**json.loads((reorganised / "classes.json").read_text()))


def stratified_split(labels: Sequence[str], *, valid_pct: float, seed: int) -> list[str]:
    """'train' or 'valid' per item: round(valid_pct x n) of each class to valid, at least one, never all."""
    generator = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    splits = ["train"] * len(labels)
    for label in sorted(by_class):
        indices = by_class[label]
        if len(indices) < 2:
            raise DataError(f"class {label!r} has {len(indices)} image; at least 2 are needed to split")
        generator.shuffle(indices)
        n_valid = min(max(1, round(valid_pct * len(indices))), len(indices) - 1)
        for index in indices[:n_valid]:
            splits[index] = "valid"
    return splits


def stratified_folds(labels: Sequence[str], *, folds: int, seed: int) -> list[int]:
    """The fold (1..folds) holding out each item: each class shuffled and dealt round the folds in turn, each
    class starting where the last one stopped, so every fold has its share of each class and the folds' sizes
    differ by at most one."""
    if folds > len(labels):
        raise DataError(f"cv.folds: {folds} folds but only {len(labels)} training images")
    generator = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    assigned = [0] * len(labels)
    dealt = 0
    for label in sorted(by_class):
        indices = by_class[label]
        if len(indices) < 2:
            raise DataError(f"class {label!r} has {len(indices)} image; at least 2 are needed to split")
        generator.shuffle(indices)
        for index in indices:
            assigned[index] = dealt % folds + 1
            dealt += 1
    return assigned


def file_md5(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()
