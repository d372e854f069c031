"""bench/suite.py's generated competitions and bench/recipe.py's scoring, without any dvc repro (seconds).

The photo competitions crop scikit-image's bundled photos (pinned in requirements.txt for the suite).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import log_loss

from kagglecls.competition import load_competition
from kagglecls.kaggle_io import download
from kagglecls.params import params_from_mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "bench"))

import recipe  # noqa: E402
import suite  # noqa: E402

# A small embedded sample: params' data.sample ranges allow it, and it builds in a fraction of a second.
SAMPLE_PARAMS = {"n_classes": 3, "train_per_class": 4, "n_test": 6, "image_size": 32}
SAMPLE_SEED = 3


def expected_classes(entry: suite.SuiteCompetition) -> int:
    if entry.embedded_sample:
        return SAMPLE_PARAMS["n_classes"]
    return len(entry.spec.photos) if isinstance(entry.spec, suite.CropSpec) else len(entry.spec.names)


@pytest.fixture(scope="module")
def suite_work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("suite")


def prepared_entry(entry: suite.SuiteCompetition, work: Path) -> suite.Prepared:
    return suite.prepare(entry, work, seed=SAMPLE_SEED, sample_params=SAMPLE_PARAMS)


@pytest.mark.parametrize("entry", suite.SUITE, ids=suite.SUITE_NAMES)
def test_generated_competition_loads_with_its_layout_and_kept_aside_labels(
    entry: suite.SuiteCompetition, suite_work: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prepared = prepared_entry(entry, suite_work)
    with caplog.at_level(logging.INFO, logger="kagglecls.competition"):
        found = load_competition(prepared.competition_dir)
    assert any(message.startswith(f"{entry.layout} layout:") for message in caplog.messages), caplog.messages
    assert load_competition(prepared.competition_dir, layout=entry.layout).train_files == found.train_files
    assert len(found.classes) == expected_classes(entry)
    assert not found.warnings and all(path is not None for path in found.test_files)
    labels = suite.read_test_labels(prepared.test_labels_path)
    assert sorted(labels) == sorted(found.test_ids)
    assert set(labels.values()) <= set(found.classes)
    # The answers lie beside the folder the pipeline reads, not in it.
    assert prepared.competition_dir not in prepared.test_labels_path.parents
    assert prepared.source == ("sample" if entry.embedded_sample else str(prepared.competition_dir.resolve()))


def test_a_second_prepare_reuses_the_competition(suite_work: Path) -> None:
    entry = suite.by_name("binary_filename")
    first = suite.prepare(entry, suite_work / "again", seed=1, sample_params=SAMPLE_PARAMS)
    stamp = (first.competition_dir / "sample_submission.csv").stat().st_mtime_ns
    second = suite.prepare(entry, suite_work / "again", seed=2, sample_params=SAMPLE_PARAMS)
    assert second == first
    assert (second.competition_dir / "sample_submission.csv").stat().st_mtime_ns == stamp


def test_the_sample_is_what_data_source_sample_builds(suite_work: Path, tmp_path: Path) -> None:
    """The download stage's own code, given the same data.sample and base.seed, writes the same bytes."""
    prepared = suite.prepare(
        suite.by_name("sample"), suite_work, seed=SAMPLE_SEED, sample_params=SAMPLE_PARAMS
    )
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    overrides = {"base.seed": SAMPLE_SEED, "data.source": "sample", "data.sample": SAMPLE_PARAMS}
    download(params=params_from_mapping(recipe.merged_params(raw, overrides)), dest=tmp_path / "raw")
    assert recipe.differing_files(tmp_path / "raw", prepared.competition_dir) == []


# ------------------------------------------------------------------------------------------------------------
# Scoring as Kaggle does


def write_table(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    suite.write_csv(path, header, rows)
    return path


def test_probability_submission_scores_as_sklearn(tmp_path: Path) -> None:
    classes = ["ant", "bee", "cow"]
    sample = write_table(tmp_path / "sample.csv", ["id", *classes], [[i, 0.3, 0.3, 0.4] for i in "wxyz"])
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1]])
    submission = write_table(
        tmp_path / "sub.csv",
        ["id", *classes],
        [[i, *row] for i, row in zip("wxyz", probabilities, strict=True)],
    )
    truth = {"w": "ant", "x": "bee", "y": "ant", "z": "cow"}
    scored = recipe.score_submission(submission, sample, test_labels=truth, classes=classes)
    expected_truth = [truth[i] for i in "wxyz"]
    assert scored["kind"] == "probabilities" and scored["n"] == 4
    assert scored["log_loss"] == pytest.approx(log_loss(expected_truth, probabilities, labels=classes))
    assert scored["accuracy"] == pytest.approx(0.5)


def test_probability_rows_are_renormalised_and_clipped_as_kaggle() -> None:
    rows = np.array(
        [[2.0, 1.0, 1.0], [0.0, 1.0, 0.0]]
    )  # the first sums to 4; the second gives 0 to the truth
    loss = recipe.multiclass_log_loss(rows, np.array([0, 0]))
    assert loss == pytest.approx((-np.log(0.5) - np.log(1e-15)) / 2)


def test_binary_submission_scores_the_class_sorting_last(tmp_path: Path) -> None:
    sample = write_table(tmp_path / "sample.csv", ["id", "label"], [[i, 0.5] for i in range(1, 6)])
    p_dog = np.array([0.9, 0.2, 0.6, 0.4, 0.99])
    submission = write_table(
        tmp_path / "sub.csv", ["id", "label"], [[i, p] for i, p in enumerate(p_dog, start=1)]
    )
    truth = {"1": "dog", "2": "cat", "3": "cat", "4": "dog", "5": "dog"}
    scored = recipe.score_submission(submission, sample, test_labels=truth, classes=["cat", "dog"])
    y_true = [truth[str(i)] for i in range(1, 6)]
    assert scored["kind"] == "binary"
    assert scored["log_loss"] == pytest.approx(log_loss(y_true, p_dog, labels=["cat", "dog"]))
    assert scored["accuracy"] == pytest.approx(0.6)


def test_label_submission_gives_accuracy_only(tmp_path: Path) -> None:
    sample = write_table(
        tmp_path / "sample.csv", ["file", "species"], [[f"{i}.png", "maize"] for i in range(4)]
    )
    predicted = ["maize", "wheat", "wheat", "rye"]
    submission = write_table(
        tmp_path / "sub.csv", ["file", "species"], [[f"{i}.png", p] for i, p in enumerate(predicted)]
    )
    truth = {"0.png": "maize", "1.png": "wheat", "2.png": "rye", "3.png": "rye"}
    scored = recipe.score_submission(submission, sample, test_labels=truth, classes=["maize", "rye", "wheat"])
    assert scored == {"kind": "label", "n": 4, "log_loss": None, "accuracy": pytest.approx(0.75)}


def test_a_submission_missing_test_ids_is_not_scored(tmp_path: Path) -> None:
    sample = write_table(tmp_path / "sample.csv", ["id", "label"], [[1, 0.5], [2, 0.5]])
    submission = write_table(tmp_path / "sub.csv", ["id", "label"], [[1, 0.7]])
    with pytest.raises(recipe.ScoringError, match="1 test ids have no row"):
        recipe.score_submission(
            submission, sample, test_labels={"1": "dog", "2": "cat"}, classes=["cat", "dog"]
        )


# ------------------------------------------------------------------------------------------------------------
# A failed run and the baseline


def test_failure_names_the_stage_and_its_error_line(tmp_path: Path) -> None:
    log_path = tmp_path / "repro.log"
    log_path.write_text(
        "[     0.1s] Running stage 'train_head':\n"
        "[     9.0s] Running stage 'train_augmented':\n"
        "[    10.0s] 10:00:00 train_augmented INFO lr_find\n"
        "[    11.0s] train_augmented: error: lr_find stopped after 6 steps\n"
        "[    11.5s] ERROR: failed to reproduce 'train_augmented': failed to run: python ..., exited with 2\n"
    )
    assert recipe.failure_of(log_path) == (
        "train_augmented",
        "train_augmented: error: lr_find stopped after 6 steps",
    )


def test_baseline_reads_the_activations_in_manifest_order(tmp_path: Path) -> None:
    """Rows of each features array are the manifest's rows of that split in file order (test rows without an
    image have none): with labels that a linear model separates, a mixed-up order could not score 1.0."""
    rng = np.random.default_rng(0)
    reorganised, features = tmp_path / "data" / "reorganised", tmp_path / "data" / "features"
    reorganised.mkdir(parents=True)
    features.mkdir(parents=True)
    (reorganised / "classes.json").write_text('{"classes": ["a", "b"], "prior": [0.5, 0.5], "warnings": []}')
    rows, test_labels = [], {}
    for split, count in (("train", 40), ("valid", 10), ("test", 10)):
        labels = rng.choice(["a", "b"], size=count)
        centres = np.where(labels == "a", -3.0, 3.0)[:, None]
        np.save(features / f"{split}.npy", (centres + rng.normal(size=(count, 4))).astype(np.float16))
        for index, label in enumerate(labels):
            item_id = f"{split}{index}"
            rows.append(
                [f"{split}/{item_id}.jpg", "" if split == "test" else label, split, item_id, "", 8, 8]
            )
            test_labels.update({item_id: label} if split == "test" else {})
    rows.append(["", "", "test", "unreadable", "", 0, 0])  # no image: no row in test.npy
    suite.write_csv(
        reorganised / "manifest.csv", ["file", "label", "split", "id", "md5", "width", "height"], rows
    )
    figures = recipe.logistic_baseline(tmp_path, test_labels=test_labels, seed=1)
    assert figures["valid_accuracy"] == 1.0 and figures["test_accuracy"] == 1.0
    assert figures["test_log_loss"] < 0.2
