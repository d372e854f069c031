"""A grid of two seeds queued with `dvc exp run --queue -S 'base.seed=1,2'` and run side by side by
`dvc queue start -j 2`, as the README shows: each reruns the whole pipeline (the sample itself is drawn from
the seed) in its own temporary workspace, and both land in `dvc exp show --json`.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from project_fixture import ALL_STAGES, TINY_PARAMS, environment_for, make_project, run, stages_run

pytestmark = pytest.mark.slow  # runs `dvc repro` and dvc's queue workers

GRID = "base.seed=1,2"  # one experiment per value; the committed run's seed is 42
WAIT_SECONDS = 420
STATUS_LINE = re.compile(r"^\w+\s+(\S+)\s+.*\s(Queued|Running|Success|Failed)\s*$")


def _queue_status(root: Path) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    output = run(["dvc", "queue", "status"], root)
    return {match[1]: match[2] for line in output.splitlines() if (match := STATUS_LINE.match(line))}


def _run_queue(root: Path, log: Path) -> list[dict[str, str]]:
    """`dvc queue start -j 2`, then `dvc queue status` about every second until no experiment is waiting."""
    with open(log, "w") as handle:  # a file, not a pipe: the workers outlive `queue start` and keep it open
        subprocess.run(
            ["dvc", "queue", "start", "-j", "2"],
            cwd=root,
            env=environment_for(root),
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=True,
        )
    deadline = time.monotonic() + WAIT_SECONDS
    statuses = [_queue_status(root)]
    while any(state in ("Queued", "Running") for state in statuses[-1].values()):
        assert time.monotonic() < deadline, f"queue not done after {WAIT_SECONDS} s: {statuses[-1]}"
        time.sleep(1)
        statuses.append(_queue_status(root))
    return statuses


@pytest.fixture(scope="module")
def queued(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, list[dict[str, str]]]]:
    """A reproduced, committed tiny project whose two queued experiments ran; every status seen on the way."""
    root = make_project(tmp_path_factory.mktemp("queue"), TINY_PARAMS)
    assert stages_run(run(["dvc", "repro"], root)) == ALL_STAGES
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first run"], root)
    run(["dvc", "exp", "run", "--queue", "-S", GRID], root)
    assert list(_queue_status(root).values()) == ["Queued", "Queued"]
    try:
        yield root, _run_queue(root, root.parent / "queue_start.log")
    finally:
        subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=root, env=environment_for(root), check=False)


def _logs(root: Path, name: str) -> str:
    """The end of an experiment's output, for failure messages."""
    command = ["dvc", "queue", "logs", name]
    result = subprocess.run(command, cwd=root, env=environment_for(root), capture_output=True, text=True)
    return (result.stdout + result.stderr)[-3000:]


def _experiments(root: Path) -> dict[str, dict]:
    """{experiment name: its `dvc exp show --json` data (params, metrics, status)}."""
    shown = json.loads(run(["dvc", "exp", "show", "--json"], root))
    return {
        revision["name"]: revision["data"]
        for baseline in shown
        for experiment in baseline.get("experiments") or []
        for revision in experiment["revs"]
    }


def test_both_experiments_run_side_by_side_to_success(queued: tuple[Path, list[dict[str, str]]]) -> None:
    root, statuses = queued
    names = list(statuses[-1])
    assert list(statuses[-1].values()) == ["Success", "Success"], [_logs(root, name) for name in names]
    assert {name: "Running" for name in names} in statuses  # at one poll, both were running
    for name in names:
        logs = run(["dvc", "queue", "logs", name], root)
        assert stages_run(logs) == ALL_STAGES


def test_exp_show_lists_both_experiments_with_their_params(queued: tuple[Path, list[dict[str, str]]]) -> None:
    root, _ = queued
    experiments = _experiments(root)
    assert len(experiments) == 2
    params = [data["params"]["params.yaml"]["data"] for data in experiments.values()]
    assert sorted(section["base"]["seed"] for section in params) == [1, 2]
    assert [section["finetune"]["sizes"] for section in params] == [[32], [32]]


def test_exp_show_shows_both_experiments_metrics(queued: tuple[Path, list[dict[str, str]]]) -> None:
    root, _ = queued
    experiments = _experiments(root)
    for data in experiments.values():
        metrics = data["metrics"]
        tta, finetune = metrics["dvclive/predict_tta/metrics.json"], metrics["dvclive/finetune/metrics.json"]
        assert "error" not in tta, tta
        assert tta["data"]["predict_tta"]["log_loss"] > 0
        assert finetune["data"]["finetune"]["log_loss"] > 0
    losses = [
        data["metrics"]["dvclive/finetune/metrics.json"]["data"]["finetune"] for data in experiments.values()
    ]
    assert losses[0] != losses[1]  # another seed, another sample and another run
