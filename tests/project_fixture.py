"""A throwaway copy of the project for end-to-end tests: a fresh git + DVC repo with the tracked code and params.

`make_project(root, overrides)` copies dvc.yaml, stages/ and src/ into `root`, writes params.yaml with
`overrides` merged into the project's own params, and makes a first commit, so `dvc repro`, `dvc exp run` and
`dvc queue` work there as they would for a user. `run` runs a command in it with this venv's tools on PATH and
the copy's own src/ on PYTHONPATH.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = [
    "download", "reorganise", "size_histogram", "precompute", "train_head",
    "train_augmented", "finetune", "export", "predict_tta", "submission",
]  # fmt: skip
PROJECT_FILES = ("dvc.yaml", "stages", "src", ".dvcignore", ".gitignore")

# 3 classes of 8 training images at 32 px: every stage runs, each in a few seconds on one CPU core.
TINY_PARAMS = {
    "base": {"image_size": 32, "batch_size": 8, "num_workers": 0},
    "data": {"sample": {"n_classes": 3, "train_per_class": 8, "n_test": 6, "image_size": 40}},
    "precompute": {"batch_size": 16},
    "train_head": {"n_cycle": 1, "cycle_len": 2, "cycle_mult": 1, "lr_find": {"num_steps": 12}},
    "train_augmented": {"lr": 0.001, "n_cycle": 1},
    "finetune": {"lr": 0.0005, "n_cycle": 1, "sizes": [32]},
    "predict_tta": {"n_aug": 1, "top_losses": 4},
}


def merge(base: dict, override: dict) -> dict:
    """`base` with `override`'s values put in, nested sections merged key by key."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merged[key] = merge(base[key], value)
        else:
            merged[key] = value
    return merged


def environment_for(cwd: Path) -> dict[str, str]:
    """This venv's dvc/git/python first on PATH; the project copy's own src/ importable."""
    environment = dict(os.environ)
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    environment["PYTHONPATH"] = str(Path(cwd) / "src")
    return environment


def run(command: list[str], cwd: Path, *, timeout: float = 900) -> str:
    """Run `command` in `cwd`; its stdout and stderr together. Fails the test, with the output's end, on error."""
    result = subprocess.run(
        command, cwd=cwd, env=environment_for(cwd), capture_output=True, text=True, timeout=timeout
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def stages_run(output: str) -> list[str]:
    """The stages `dvc repro` / `dvc exp run` ran, in order, from their output."""
    return re.findall(r"Running stage '(\w+)'", output)


def make_project(root: Path, overrides: dict) -> Path:
    """A git + DVC repo in `root` (created; must be empty) with the project's code and params.yaml with
    `overrides` merged in, committed once. Returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise FileExistsError(f"{root}: expected an empty folder for the project copy")
    for relative in PROJECT_FILES:
        source = REPO / relative
        if source.is_dir():
            shutil.copytree(
                source, root / relative, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        elif source.exists():
            shutil.copy(source, root / relative)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(merge(params, overrides), sort_keys=False))
    run(["git", "init", "-q"], root)
    run(["git", "config", "user.email", "test@example.com"], root)
    run(["git", "config", "user.name", "test"], root)
    run(["dvc", "init", "-q"], root)
    run(["dvc", "config", "core.analytics", "false"], root)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "project copy"], root)
    return root
