"""Other backbones through the whole pipeline, as a user tries them: `dvc exp run -S model.arch=<name>
-S model.pretrained=false` on a tiny project (random weights: tests stay offline), each ending with a
submission in sample_submission.csv's shape whose rows are probabilities. Then `kagglecls ensemble` of two of
those experiments, read back from DVC's cache."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from project_fixture import ALL_STAGES, TINY_PARAMS, environment_for, make_project, run, stages_run

pytestmark = pytest.mark.slow  # runs `dvc exp run` four times

BACKBONES = {
    "convnext_tiny": 32,
    "efficientnet_v2_s": 32,
    "regnet_y_400mf": 32,
    "vit_b_16": 224,  # its position embedding fixes the image size
}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[list[str], Path]]]:
    """One experiment a backbone, named after it: (stages run, a copy of its submission) for each."""
    root = make_project(tmp_path_factory.mktemp("backbones"), TINY_PARAMS)
    copies = root.parent / "submissions"
    copies.mkdir()
    results = {}
    for arch, size in BACKBONES.items():
        settings = [f"model.arch={arch}", "model.pretrained=false"]
        if size != TINY_PARAMS["base"]["image_size"]:
            settings += [f"base.image_size={size}", f"finetune.sizes=[{size}]"]
        command = ["dvc", "exp", "run", "-n", arch.replace("_", "-")]
        output = run([*command, *[part for setting in settings for part in ("-S", setting)]], root)
        results[arch] = (
            stages_run(output),
            shutil.copy(root / "data" / "submission.csv", copies / f"{arch}.csv"),
        )
    return root, results


def _assert_valid_submission(root: Path, submission_csv: Path) -> None:
    sample = pd.read_csv(root / "data" / "raw" / "sample_submission.csv")
    submission = pd.read_csv(submission_csv)
    assert list(submission.columns) == list(sample.columns)
    assert list(submission["id"]) == list(sample["id"])
    probabilities = submission.drop(columns="id").to_numpy()
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


@pytest.mark.parametrize("arch", list(BACKBONES))
def test_exp_run_with_another_backbone_ends_with_a_valid_submission(experiments, arch: str) -> None:
    root, results = experiments
    ran, submission = results[arch]
    assert ran[-1] == "submission" and set(ran) <= set(ALL_STAGES)
    assert ran[0] in ("download", "precompute")  # the first run makes the data; later ones start at the body
    _assert_valid_submission(root, submission)


def test_ensemble_of_two_experiments_is_no_worse_on_valid_than_the_better(experiments) -> None:
    root, _ = experiments
    out = root / "data" / "ensemble_submission.csv"
    command = [sys.executable, "-m", "kagglecls", "ensemble", "convnext-tiny", "regnet-y-400mf"]
    result = subprocess.run(command, cwd=root, env=environment_for(root), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = dict(re.findall(r"^(\S+): .*valid log loss (\d+\.\d+)", result.stdout, flags=re.MULTILINE))
    assert set(figures) == {"convnext-tiny", "regnet-y-400mf", "ensemble"}
    members = [float(figures["convnext-tiny"]), float(figures["regnet-y-400mf"])]
    assert float(figures["ensemble"]) <= min(members) + 1e-4
    weights = [float(weight) for weight in re.findall(r"weight (\d\.\d+)", result.stdout)]
    assert len(weights) == 2 and sum(weights) == pytest.approx(1.0, abs=2e-3)
    _assert_valid_submission(root, out)
    # The member figures are those predict_tta recorded in each experiment.
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root))
    for name, figure in (("convnext-tiny", members[0]), ("regnet-y-400mf", members[1])):
        (metrics,) = [entry["data"]["metrics"] for entry in _entries(shown) if entry.get("name") == name]
        recorded = metrics["dvclive/predict_tta/metrics.json"]["data"]["predict_tta"]["log_loss"]
        assert figure == pytest.approx(recorded, abs=1e-4)


def _entries(node: object) -> list[dict]:
    """Every experiment entry in `dvc exp show --json`'s nesting (dicts with "rev" and "data")."""
    if isinstance(node, list):
        return [entry for item in node for entry in _entries(item)]
    if isinstance(node, dict):
        own = [node] if "rev" in node and "data" in node else []
        return own + [entry for value in node.values() for entry in _entries(value)]
    return []


def test_ensemble_names_what_it_cannot_read(experiments) -> None:
    root, _ = experiments
    command = [sys.executable, "-m", "kagglecls", "ensemble", "convnext-tiny", "no-such-experiment"]
    result = subprocess.run(command, cwd=root, env=environment_for(root), capture_output=True, text=True)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        "kagglecls ensemble: error: no-such-experiment: cannot read data/predictions/valid.npz"
    )
    assert "Traceback" not in result.stderr
