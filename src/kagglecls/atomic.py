"""Files and folders written beside their place and os.replace'd there only when complete, so a crash never
leaves a half-written output that looks whole; the JSON and CSV files DVC reads. Imports nothing of ours."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_MARK = ".kagglecls-tmp"  # in every temporary file's name, so those a killed run left can be found


@contextmanager
def write_file(path: Path, *, sync: bool = False) -> Iterator[Path]:
    """A hidden temporary path beside `path` (same suffix: numpy and matplotlib choose a format by it), moved
    onto `path` when the block ends well, deleted otherwise; `sync` fsyncs first, to survive a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{TEMPORARY_MARK}{path.suffix}")
    try:
        yield temporary
        if sync:
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json(data: dict, path: Path) -> None:
    with write_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(rows: Sequence[dict], path: Path, *, columns: Sequence[str]) -> None:
    with write_file(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def remove_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files (of write_file) that killed runs left in `folder`; returns their paths."""
    stale = sorted(Path(folder).glob(f".*{TEMPORARY_MARK}*")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def replace_folder(source: Path, dest: Path) -> None:
    """Move `source` to `dest`. An existing `dest` (or a link there) is moved aside first, put back if the move
    fails, and deleted after."""
    if not (dest.exists() or dest.is_symlink()):
        os.replace(source, dest)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, aside / dest.name)
    try:
        os.replace(source, dest)
    except OSError:
        os.replace(aside / dest.name, dest)
        aside.rmdir()
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def building_folder(dest: Path) -> Iterator[Path]:
    """A fresh temporary folder beside `dest`, put in its place when the block ends well, deleted otherwise."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        yield work
        replace_folder(work, dest)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
