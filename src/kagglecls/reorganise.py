"""Stage reorganise: Kaggle's files to class folders train/<class>/, valid/<class>/ and test/, a manifest, the
class list and a report of unreadable images, built in a temporary folder and moved into place whole. With
cv.folds k > 1 every labelled image goes to train/<class>/ and the manifest gives each its fold."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

from kagglecls import competition, images
from kagglecls.atomic import building_folder, write_json
from kagglecls.manifest import (
    ClassInfo,
    DataError,
    ManifestRow,
    file_md5,
    stratified_folds,
    stratified_split,
    write_manifest,
)
from kagglecls.params import Params

log = logging.getLogger(__name__)


def reorganise(*, params: Params, raw_dir: Path, out_dir: Path) -> None:
    """Class folders train/<class>/, valid/<class>/ (stratified split, or stratified folds), test/, a manifest
    and a bad-image report."""
    data = params.data
    found = competition.load_competition(
        raw_dir,
        layout=data.layout,
        labels_file=data.labels_file,
        id_column=data.id_column,
        label_column=data.label_column,
    )
    checks = images.check_images(
        [*found.train_files, *[f for f in found.test_files if f]], workers=images.image_workers()
    )
    by_path = {check.path: check for check in checks}
    bad = [check for check in checks if check.error is not None]
    _stop_if_too_many_bad(found, by_path, data.max_bad_fraction)
    with building_folder(out_dir) as temporary:
        rows = _place_training_images(
            found, by_path, temporary, valid_pct=data.valid_pct, folds=params.cv.folds, seed=params.base.seed
        )
        rows += _place_test_images(found, by_path, temporary)
        write_manifest(rows, temporary / "manifest.csv")
        # Paths relative to data/raw, so the outputs' hashes do not depend on where the project sits.
        raw_root = raw_dir.resolve()
        images.write_bad_image_report(
            [
                replace(check, path=check.path.relative_to(raw_root), error=_relative(check.error, raw_root))
                for check in bad
            ],
            temporary / "bad_images.csv",
        )
        counts = {
            name: sum(row.label == name for row in rows if row.split == "train") for name in found.classes
        }
        total = sum(counts.values())
        info = ClassInfo(
            list(found.classes),
            [counts[name] / total for name in found.classes],
            [_relative(warning, raw_root) for warning in found.warnings],
        )
        write_json(asdict(info), temporary / "classes.json")
    log.info("reorganise: %d images (%d unreadable) into %s", len(rows), len(bad), out_dir)


def _relative(text: str | None, root: Path) -> str | None:
    return None if text is None else text.replace(f"{root}{os.sep}", "")


def _stop_if_too_many_bad(found, by_path, max_bad_fraction: float) -> None:
    bad_train = [path for path in found.train_files if by_path[path].error is not None]
    for path in bad_train:
        log.warning("reorganise: skipping unreadable training image %s: %s", path, by_path[path].error)
    if len(bad_train) > max_bad_fraction * len(found.train_files):
        names = ", ".join(path.name for path in bad_train[:5])
        raise DataError(
            f"{len(bad_train)} of {len(found.train_files)} training images cannot be decoded (more than "
            f"data.max_bad_fraction={max_bad_fraction}), e.g. {names}"
        )


def _place_training_images(
    found, by_path, root: Path, *, valid_pct: float, folds: int, seed: int
) -> list[ManifestRow]:
    readable = [
        (path, label)
        for path, label in zip(found.train_files, found.train_labels, strict=True)
        if by_path[path].error is None
    ]
    labels = [label for _, label in readable]
    if folds == 1:
        splits = stratified_split(labels, valid_pct=valid_pct, seed=seed)
        item_folds = [int(split == "valid") for split in splits]
    else:
        item_folds = stratified_folds(labels, folds=folds, seed=seed)
        splits = ["train"] * len(readable)
    rows = []
    for (path, label), split, fold in zip(readable, splits, item_folds, strict=True):
        relative = Path(split) / _folder_name(label) / path.name
        row = _copy_image(
            path, root, relative, label=label, split=split, item_id=path.stem, check=by_path[path]
        )
        rows.append(replace(row, fold=fold))
    return rows


def _place_test_images(found, by_path, root: Path) -> list[ManifestRow]:
    rows = []
    for item_id, path in zip(found.test_ids, found.test_files, strict=True):
        if path is None or by_path[path].error is not None:
            rows.append(ManifestRow(file="", label="", split="test", id=item_id, md5="", width=0, height=0))
            continue
        relative = Path("test") / path.name
        rows.append(
            _copy_image(path, root, relative, label="", split="test", item_id=item_id, check=by_path[path])
        )
    return rows


def _copy_image(
    source: Path, root: Path, relative: Path, *, label: str, split: str, item_id: str, check
) -> ManifestRow:
    target = root / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return ManifestRow(
        file=relative.as_posix(),
        label=label,
        split=split,
        id=item_id,
        md5=file_md5(target),
        width=check.width,
        height=check.height,
    )


def _folder_name(label: str) -> str:
    return label.replace("/", "_").replace("\\", "_") or "_"
