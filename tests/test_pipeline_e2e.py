"""End to end: `dvc repro` on a tiny sample competition in a temporary git repo, as a user would run it.

Checks the submission against sample_submission.csv, that a second repro runs nothing, and that changing a
train_head param with `dvc exp run -S` reruns train_head and what follows it, not the stages before it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ALL_STAGES = [
    "download", "reorganise", "size_histogram", "precompute", "train_head",
    "train_augmented", "finetune", "predict_tta", "submission",
]  # fmt: skip

TINY_PARAMS = {
    "base": {"image_size": 32, "batch_size": 8, "num_workers": 0},
    "data": {"sample": {"n_classes": 3, "train_per_class": 8, "n_test": 6, "image_size": 40}},
    "precompute": {"batch_size": 16},
    "train_head": {"n_cycle": 1, "cycle_len": 2, "cycle_mult": 1, "lr_find": {"num_steps": 12}},
    "train_augmented": {"lr": 0.001, "n_cycle": 1},
    "finetune": {"lr": 0.0005, "n_cycle": 1, "sizes": [32]},
    "predict_tta": {"n_aug": 1, "top_losses": 4},
}


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) else value
    return merged


def _run(command: list[str], cwd: Path) -> str:
    environment = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    environment["PYTHONPATH"] = str(cwd / "src")
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def _stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git repo with the tracked project files and tiny params, after one `dvc repro`."""
    root = tmp_path_factory.mktemp("project")
    for relative in ("dvc.yaml", "stages", "src", ".dvcignore"):
        source = REPO / relative
        if source.is_dir():
            shutil.copytree(
                source, root / relative, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
            )
        elif source.exists():
            shutil.copy(source, root / relative)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY_PARAMS), sort_keys=False))
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    _run(["git", "init", "-q"], root)
    _run(["git", "config", "user.email", "test@example.com"], root)
    _run(["git", "config", "user.name", "test"], root)
    _run(["dvc", "init", "-q"], root)
    _run(["dvc", "config", "core.analytics", "false"], root)
    output = _run(["dvc", "repro"], root)
    assert _stages_run(output) == ALL_STAGES
    _run(["git", "add", "-A"], root)
    _run(["git", "commit", "-qm", "first run"], root)
    return root


def test_submission_matches_the_sample(project: Path) -> None:
    sample = pd.read_csv(project / "data/raw/sample_submission.csv", dtype={"id": str})
    submission = pd.read_csv(project / "data/submission.csv", dtype={"id": str})
    assert list(submission.columns) == list(sample.columns)
    assert submission["id"].tolist() == sample["id"].tolist()
    probabilities = submission.drop(columns="id").to_numpy()
    assert probabilities.shape == (6, 3)
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_every_training_stage_records_log_loss_and_accuracy(project: Path) -> None:
    for stage in ("train_head", "train_augmented", "finetune", "predict_tta"):
        metrics = yaml.safe_load((project / f"metrics/{stage}.json").read_text())
        assert 0 <= metrics["valid_accuracy"] <= 1
        assert metrics["valid_log_loss"] > 0
    for picture in (
        "plots/size_histogram.png",
        "plots/train_head/lr_find.png",
        "plots/predict_tta/top_losses.png",
    ):
        assert (project / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_repro_runs_nothing(project: Path) -> None:
    output = _run(["dvc", "repro"], project)
    assert _stages_run(output) == []


def test_train_head_param_reruns_from_train_head_on(project: Path) -> None:
    output = _run(["dvc", "exp", "run", "-S", "train_head.weight_decay=0.02"], project)
    assert _stages_run(output) == ["train_head", "train_augmented", "finetune", "predict_tta", "submission"]
    shown = _run(["dvc", "exp", "show", "--csv"], project)
    assert "valid_log_loss" in shown.splitlines()[0]


def test_resnet34_from_random_weights_runs_to_a_valid_submission(project: Path) -> None:
    _run(["dvc", "exp", "run", "-S", "model.arch=resnet34", "-S", "model.pretrained=false"], project)
    sample = pd.read_csv(project / "data/raw/sample_submission.csv", dtype={"id": str})
    submission = pd.read_csv(project / "data/submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == sample["id"].tolist()
    np.testing.assert_allclose(submission.drop(columns="id").to_numpy().sum(axis=1), 1.0, atol=1e-6)
