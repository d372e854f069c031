"""A competition with a few percent of broken files, used as `data.source`, through `dvc repro`.

The sample competition (Dog Breed layout: labels.csv, train/<id>.jpg, test/<id>.jpg) with one training jpg
truncated, one replaced by text, one empty, one test jpg unreadable and one deleted. Under
`data.max_bad_fraction` the pipeline completes with a full, valid submission (unreadable and missing test ids
get the training class prior) and a report naming every broken file; above it, reorganise stops with one line
and leaves nothing half-made.
"""

from __future__ import annotations

import csv
import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from project_fixture import ALL_STAGES, TINY_PARAMS, environment_for, make_project, merge, run, stages_run

from kagglecls.competition import build_sample_competition

pytestmark = pytest.mark.slow  # runs `dvc repro`

CLASSES = ["one", "two", "zero"]  # the sample's first 3 digit names, sorted
TRAIN_PER_CLASS = 20  # 60 training images: 3 broken = 5%
N_TEST = 20  # 2 broken = 10%


def _break_competition(folder: Path) -> dict[str, str]:
    """Break 3 training images of class zero and 2 test images; {what was done: file name}."""
    labels = pd.read_csv(folder / "labels.csv", dtype=str)
    zeros = labels.loc[labels["breed"] == "zero", "id"].iloc[:3]
    truncated, text, empty = (folder / "train" / f"{image_id}.jpg" for image_id in zeros)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    text.write_text("this is not an image\n")
    empty.write_bytes(b"")
    test_ids = pd.read_csv(folder / "sample_submission.csv", dtype=str)["id"].tolist()
    unreadable, deleted = (folder / "test" / f"{image_id}.jpg" for image_id in test_ids[:2])
    unreadable.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)  # a JPEG start, then noise
    deleted.unlink()
    return {
        "truncated": truncated.name,
        "text": text.name,
        "empty": empty.name,
        "unreadable test": unreadable.name,
        "deleted test": deleted.name,
    }


@pytest.fixture(scope="module")
def competition(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("competition") / "dog-breed"
    build_sample_competition(
        folder, n_classes=3, train_per_class=TRAIN_PER_CLASS, n_test=N_TEST, image_size=40, seed=5
    )
    return folder, _break_competition(folder)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, competition: tuple[Path, dict[str, str]]) -> Path:
    """`dvc repro` of the whole pipeline on the broken competition, with max_bad_fraction 0.1."""
    folder, _ = competition
    overrides = merge(TINY_PARAMS, {"data": {"source": str(folder), "max_bad_fraction": 0.1}})
    root = make_project(tmp_path_factory.mktemp("bad_data"), overrides)
    output = run(["dvc", "repro"], root)
    assert stages_run(output) == ALL_STAGES
    return root


def test_the_submission_is_full_and_valid(project: Path, competition: tuple[Path, dict[str, str]]) -> None:
    folder, _ = competition
    sample = pd.read_csv(folder / "sample_submission.csv", dtype={"id": str})
    submission = pd.read_csv(project / "data/submission.csv", dtype={"id": str})
    assert list(submission.columns) == ["id", *CLASSES] == list(sample.columns)
    assert submission["id"].tolist() == sample["id"].tolist()  # every id once, in the sample's order
    assert len(submission) == N_TEST
    probabilities = submission[CLASSES].to_numpy()
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_unreadable_and_missing_test_ids_get_the_training_class_prior(
    project: Path, competition: tuple[Path, dict[str, str]]
) -> None:
    _, broken = competition
    manifest = pd.read_csv(project / "data/reorganised/manifest.csv", dtype=str, keep_default_na=False)
    training = manifest.loc[manifest["split"] == "train", "label"]
    counts = Counter(training)
    prior = np.array([counts[name] / len(training) for name in CLASSES])
    # one, two: 20 images, round(0.2 x 20) = 4 to valid, 16 train; zero: 17 readable, 3 valid, 14 train.
    np.testing.assert_allclose(prior, [16 / 46, 16 / 46, 14 / 46])
    assert json.loads((project / "data/reorganised/classes.json").read_text())["prior"] == pytest.approx(
        prior
    )
    submission = pd.read_csv(project / "data/submission.csv", dtype={"id": str}).set_index("id")
    for name in (broken["unreadable test"], broken["deleted test"]):
        np.testing.assert_allclose(submission.loc[Path(name).stem, CLASSES].to_numpy(float), prior, atol=1e-6)
    test_rows = manifest[manifest["split"] == "test"]
    assert len(test_rows) == N_TEST
    without_image = test_rows.loc[test_rows["file"] == "", "id"].tolist()
    assert sorted(without_image) == sorted(
        Path(broken[key]).stem for key in ("unreadable test", "deleted test")
    )


def test_the_report_names_every_broken_file(project: Path, competition: tuple[Path, dict[str, str]]) -> None:
    _, broken = competition
    with open(project / "data/reorganised/bad_images.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    reported = {Path(row["file"]).name: row["error"] for row in rows}
    unreadable_files = {broken[key] for key in ("truncated", "text", "empty", "unreadable test")}
    assert set(reported) == unreadable_files  # the deleted image is no file: its id is a logged warning
    assert "empty file (0 bytes)" in reported[broken["empty"]]
    assert "not a recognised image format" in reported[broken["text"]]
    for name in unreadable_files:
        assert name in reported[name]  # each error names its file
    manifest_files = pd.read_csv(project / "data/reorganised/manifest.csv", dtype=str)["file"].dropna()
    assert not {Path(file).name for file in manifest_files} & unreadable_files  # none of them was used


def test_above_max_bad_fraction_reorganise_stops_with_one_line_and_leaves_nothing(
    tmp_path: Path, competition: tuple[Path, dict[str, str]]
) -> None:
    folder, broken = competition
    overrides = merge(TINY_PARAMS, {"data": {"source": str(folder), "max_bad_fraction": 0.02}})
    root = make_project(tmp_path / "project", overrides)
    result = subprocess.run(
        ["dvc", "repro", "reorganise"], cwd=root, env=environment_for(root), capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert stages_run(output) == ["download", "reorganise"]
    assert "failed to reproduce 'reorganise'" in output and "exited with 2" in output  # a user error
    errors = [line for line in output.splitlines() if line.startswith("reorganise: error:")]
    assert len(errors) == 1, output[-3000:]
    assert "3 of 60 training images cannot be decoded" in errors[0]
    assert "data.max_bad_fraction=0.02" in errors[0]
    for key in ("truncated", "text", "empty"):
        assert broken[key] in errors[0]
    assert sorted(path.name for path in (root / "data").iterdir()) == ["raw"]  # no reorganised, no temporary
