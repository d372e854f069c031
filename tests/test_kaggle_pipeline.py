"""`dvc repro` with `data.source: kaggle` against the stand-in Kaggle server, then with a local zip, for each of
the three layouts and each of the three submission formats, ends in a valid submission.

Layout and format go together as on Kaggle: labels csv + probabilities (Dog Breed), class folders + one label
column (Plant Seedlings), label in the file name + one binary column (Dogs vs. Cats Redux).
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from kaggle_server import assert_no_credentials, kaggle_env, serve_competition, subprocess_env, zip_bytes
from project_fixture import TINY_PARAMS, environment_for, make_project, merge, stages_run

from kagglecls.competition import build_sample_competition

pytestmark = pytest.mark.slow


def _dog_breed_files(source: Path) -> dict[str, bytes]:
    return {
        path.relative_to(source).as_posix(): path.read_bytes() for path in source.rglob("*") if path.is_file()
    }


def _class_folder_files(source: Path) -> dict[str, bytes]:
    """Plant Seedlings: train/<class>/<file>, and a sample with `file,species`."""
    labels = pd.read_csv(source / "labels.csv", dtype=str)
    files = {f"train/{breed}/{item}.jpg": (source / "train" / f"{item}.jpg").read_bytes()
             for item, breed in zip(labels["id"], labels["breed"], strict=True)}  # fmt: skip
    test_ids = pd.read_csv(source / "sample_submission.csv", dtype=str)["id"]
    files |= {f"test/{item}.png": (source / "test" / f"{item}.jpg").read_bytes() for item in test_ids}
    sample = pd.DataFrame({"file": [f"{item}.png" for item in test_ids], "species": "one"})
    files["sample_submission.csv"] = sample.to_csv(index=False).encode()
    return files


def _file_name_files(source: Path) -> dict[str, bytes]:
    """Dogs vs. Cats Redux: train/cat.12.jpg, test/<n>.jpg and a sample `id,label` of numbers (dog = 1)."""
    names = {"zero": "cat", "one": "dog"}
    labels = pd.read_csv(source / "labels.csv", dtype=str)
    files = {f"train/{names[breed]}.{index}.jpg": (source / "train" / f"{item}.jpg").read_bytes()
             for index, (item, breed) in enumerate(zip(labels["id"], labels["breed"], strict=True))}  # fmt: skip
    test_ids = pd.read_csv(source / "sample_submission.csv", dtype=str)["id"]
    files |= {f"test/{number}.JPG": (source / "test" / f"{item}.jpg").read_bytes()
              for number, item in enumerate(test_ids, start=1)}  # fmt: skip
    sample = pd.DataFrame({"id": range(1, len(test_ids) + 1), "label": 0.5})
    files["sample_submission.csv"] = sample.to_csv(index=False).encode()
    return files


CASES = {
    "dog-breed-identification": (3, _dog_breed_files, "probabilities"),
    "plant-seedlings-classification": (3, _class_folder_files, "label"),
    "dogs-vs-cats-redux-kernels-edition": (2, _file_name_files, "binary"),
}


def _run(command: list[str], cwd: Path, extra_env: dict[str, str]) -> str:
    environment = subprocess_env(extra_env) | {
        key: environment_for(cwd)[key] for key in ("PATH", "PYTHONPATH")
    }
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{output[-4000:]}"
    return output


def _check_submission(project: Path, kind: str) -> None:
    sample = pd.read_csv(project / "data/raw/sample_submission.csv", dtype=str)
    submission = pd.read_csv(project / "data/submission.csv", dtype=str)
    assert list(submission.columns) == list(sample.columns)
    assert submission.iloc[:, 0].tolist() == sample.iloc[:, 0].tolist()
    values = submission.iloc[:, 1:]
    if kind == "probabilities":
        assert values.astype(float).sum(axis=1).round(6).eq(1.0).all()
    elif kind == "label":
        assert set(values.iloc[:, 0]) <= {"zero", "one", "two"}
    else:
        numbers = values.iloc[:, 0].astype(float)
        assert numbers.between(0, 1).all()


@pytest.mark.parametrize("competition", list(CASES))
def test_kaggle_download_then_local_zip_end_in_a_valid_submission(tmp_path: Path, competition: str) -> None:
    n_classes, arrange, kind = CASES[competition]
    build_sample_competition(
        tmp_path / "built", n_classes=n_classes, train_per_class=8, n_test=6, image_size=40
    )
    archive = zip_bytes(arrange(tmp_path / "built"))
    overrides = merge(TINY_PARAMS, {"data": {"source": "kaggle", "competition": competition}})
    project = make_project(tmp_path / "project", overrides)
    with serve_competition({competition: archive}) as (port, requests):
        output = _run(["dvc", "repro"], project, kaggle_env(port, tmp_path))
    assert [request.api_method for request in requests if request.api_method][:1] == ["DownloadDataFiles"]
    assert_no_credentials(output + (project / "dvc.lock").read_text())
    _check_submission(project, kind)
    before = (project / "data/submission.csv").read_bytes()

    local_zip = tmp_path / f"{competition}.zip"
    local_zip.write_bytes(archive)
    output = _run(["dvc", "exp", "run", "-S", f"data.source={local_zip}"], project, {})
    # The same files from a local zip: only download reruns, and everything after it is already up to date.
    assert stages_run(output) == ["download"]
    assert (project / "data/submission.csv").read_bytes() == before
    assert pd.read_csv(io.BytesIO(before)).shape[0] == 6
