"""A training stage killed mid-epoch by a real signal, then `dvc repro` again: the result equals a clean run's.

Two copies of one tiny project, reproduced up to train_augmented: in one, `dvc repro` runs to the end; in the
other, the real `python stages/finetune.py` process that `dvc repro` started gets SIGKILL once its epoch-1
checkpoint is saved and epoch 2 has begun, and a second `dvc repro` resumes from that checkpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from project_fixture import TINY_PARAMS, environment_for, make_project, merge, run, stages_run

# finetune: 1 + 2 = 3 epochs of 9 steps (18 training images, batch 2), so a kill can land inside epoch 2.
PARAMS = merge(TINY_PARAMS, {"finetune": {"n_cycle": 2, "batch_size": 2}})
CHECKPOINT = Path("models/checkpoints/finetune_32.pt")  # finetune's --checkpoint with the size appended
EPOCH_2_STARTED = "finetune size 32 epoch 2/3"  # the description of epoch 2's progress bar
WAIT_SECONDS = 600
pytestmark = pytest.mark.slow  # runs `dvc repro`


def _process_running(script: str, cwd: Path) -> int | None:
    """The id of the `python <script>` process whose working folder is `cwd` (not the shell around it)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
            folder = Path(os.readlink(entry / "cwd"))
        except OSError:  # the process ended while we looked
            continue
        if len(arguments) > 1 and arguments[1].decode() == script and folder == cwd.resolve():
            return int(entry.name)
    return None


def _kill_finetune_in_epoch_2(root: Path, log: Path) -> subprocess.CompletedProcess:
    """Start `dvc repro`; SIGKILL the finetune process as soon as epoch 2 starts; wait for dvc to exit."""
    with open(log, "w") as handle:
        repro = subprocess.Popen(
            ["dvc", "repro"], cwd=root, env=environment_for(root), stdout=handle, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + WAIT_SECONDS
    while not ((root / CHECKPOINT).exists() and EPOCH_2_STARTED in log.read_text(errors="replace")):
        assert repro.poll() is None, f"dvc repro ended before epoch 2:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"epoch 2 did not start in {WAIT_SECONDS} s"
        time.sleep(0.01)
    process_id = _process_running("stages/finetune.py", root)
    assert process_id is not None, "no `python stages/finetune.py` process found"
    os.kill(process_id, signal.SIGKILL)
    return_code = repro.wait(timeout=WAIT_SECONDS)
    return subprocess.CompletedProcess(repro.args, return_code, log.read_text(errors="replace"), "")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted project and an interrupted-then-rerun copy of it, side by side."""
    base = tmp_path_factory.mktemp("interruptions")
    clean = make_project(base / "clean", PARAMS)
    output = run(["dvc", "repro", "train_augmented"], clean)
    assert stages_run(output)[-1] == "train_augmented"
    killed = base / "killed"
    shutil.copytree(clean, killed, symlinks=True)  # same params, same upstream outputs, its own DVC cache
    with open(base / "clean.log", "w") as handle:
        clean_repro = subprocess.Popen(
            ["dvc", "repro"], cwd=clean, env=environment_for(clean), stdout=handle, stderr=subprocess.STDOUT
        )
    interrupted = _kill_finetune_in_epoch_2(killed, base / "killed.log")
    checkpoint_epoch = torch.load(killed / CHECKPOINT, weights_only=True)["epoch"]
    leftovers = sorted(path.name for path in (killed / "models").iterdir())
    rerun_output = run(["dvc", "repro"], killed)
    assert clean_repro.wait(timeout=WAIT_SECONDS) == 0, (base / "clean.log").read_text()[-3000:]
    return {
        "clean": clean,
        "killed": killed,
        "interrupted": interrupted,
        "checkpoint_epoch": checkpoint_epoch,
        "leftovers": leftovers,
        "rerun_output": rerun_output,
    }


def test_the_kill_landed_inside_epoch_2(runs: dict) -> None:
    interrupted = runs["interrupted"]
    assert interrupted.returncode != 0
    assert "failed to reproduce 'finetune'" in interrupted.stdout
    assert runs["checkpoint_epoch"] == 1  # epoch 2 never finished: its checkpoint was not written
    # no finetune.pt, half-made or not (folds/: the earlier stages' folds folders, empty with one split)
    assert runs["leftovers"] == ["augmented.pt", "checkpoints", "folds", "head.pt"]


def test_the_rerun_resumes_from_the_epoch_1_checkpoint(runs: dict) -> None:
    output = runs["rerun_output"]
    assert stages_run(output) == ["finetune", "export", "predict_tta", "submission"]
    assert f"resuming from {CHECKPOINT} after epoch 1" in output


def test_the_rerun_ends_with_the_clean_runs_model_metrics_and_submission(runs: dict) -> None:
    clean, killed = runs["clean"], runs["killed"]
    weights = [
        torch.load(root / "models/finetune.pt", weights_only=True)["model"] for root in (clean, killed)
    ]
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name
    live = [root / "dvclive/finetune" for root in (clean, killed)]
    assert (live[1] / "metrics.json").read_text() == (live[0] / "metrics.json").read_text()
    # the resumed run logged the epochs before the interruption again: every step file is whole
    steps = [(folder / "plots/metrics/valid_log_loss.tsv").read_text() for folder in live]
    assert steps[1] == steps[0]
    # a header, step 0 (the starting weights), the cycle ends of the 3 epochs (1 and 3)
    assert [line.split("\t")[0] for line in steps[0].splitlines()] == ["step", "0", "1", "3"]
    submissions = [pd.read_csv(root / "data/submission.csv", dtype={"id": str}) for root in (clean, killed)]
    assert submissions[1]["id"].tolist() == submissions[0]["id"].tolist()
    np.testing.assert_allclose(
        submissions[1].drop(columns="id").to_numpy(), submissions[0].drop(columns="id").to_numpy(), atol=1e-6
    )
    assert (killed / "data/submission.csv").read_bytes() == (clean / "data/submission.csv").read_bytes()
