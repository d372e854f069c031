"""Whole output folders built next to their place and moved there only when complete. Imports nothing of ours."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def replace_folder(source: Path, dest: Path) -> None:
    """Move `source` to `dest`; an existing `dest` is moved aside first and deleted after."""
    if not dest.exists():
        os.replace(source, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, old / dest.name)
    os.replace(source, dest)
    shutil.rmtree(old, ignore_errors=True)


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
