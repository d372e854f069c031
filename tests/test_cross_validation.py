"""k-fold cross-validation as a user runs it: `dvc exp run -S cv.folds=5` on a tiny sample competition ends
with a valid submission averaged over the folds, `dvc exp show` lists the out-of-fold (CV) log loss, and a
finetune param then reruns the folds' finetune and what follows, nothing before."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from project_fixture import ALL_STAGES, TINY_PARAMS, make_project, run, stages_run

from kagglecls.training import log_loss

pytestmark = pytest.mark.slow  # two `dvc exp run`s, five folds each

FOLDS = 5


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = make_project(tmp_path_factory.mktemp("cv"), TINY_PARAMS)
    output = run(["dvc", "exp", "run", "-n", "cv5", "-S", f"cv.folds={FOLDS}"], root)
    return root, stages_run(output)


def test_every_stage_runs_and_the_submission_is_valid(project) -> None:
    root, stages = project
    assert stages == ALL_STAGES
    sample = pd.read_csv(root / "data/raw/sample_submission.csv", dtype={"id": str})
    submission = pd.read_csv(root / "data/submission.csv", dtype={"id": str})
    assert list(submission.columns) == list(sample.columns)
    assert submission["id"].tolist() == sample["id"].tolist()
    np.testing.assert_allclose(submission.drop(columns="id").to_numpy().sum(axis=1), 1.0, atol=1e-6)


def test_each_labelled_image_is_held_out_by_exactly_one_fold(project) -> None:
    root, _ = project
    manifest = pd.read_csv(root / "data/reorganised/manifest.csv", dtype=str, keep_default_na=False)
    labelled = manifest[manifest["split"] != "test"]
    assert set(labelled["split"]) == {"train"}  # no valid folder: every fold validates on its own images
    sizes = Counter(labelled["fold"].astype(int))
    assert sorted(sizes) == list(range(1, FOLDS + 1)) and max(sizes.values()) - min(sizes.values()) <= 1
    oof = np.load(root / "data/predictions/valid.npz")
    assert sorted(oof["ids"].tolist()) == sorted(labelled["id"].tolist())


def test_every_fold_has_its_model_and_the_stage_summary_is_their_mean(project) -> None:
    root, _ = project
    for stage, folder in (("train_head", "head"), ("train_augmented", "augmented"), ("finetune", "finetune")):
        assert sorted(path.name for path in (root / "models/folds" / folder).glob("*.pt")) == [
            f"fold{fold}.pt" for fold in range(2, FOLDS + 1)
        ]
        per_fold = json.loads((root / "models/folds" / folder / "folds.json").read_text())["folds"]
        summary = json.loads((root / "dvclive" / stage / "metrics.json").read_text())[stage]
        assert summary["folds"] == FOLDS and len(per_fold) == FOLDS
        assert summary["log_loss"] == pytest.approx(np.mean([fold["log_loss"] for fold in per_fold]))


def test_the_cv_log_loss_is_the_out_of_fold_predictions_and_exp_show_lists_it(project) -> None:
    root, _ = project
    oof = np.load(root / "data/predictions/valid.npz")
    summary = json.loads((root / "dvclive/predict_tta/metrics.json").read_text())["predict_tta"]
    assert summary["folds"] == FOLDS
    assert summary["log_loss"] == pytest.approx(log_loss(oof["probabilities"], oof["targets"]))
    shown = list(csv.DictReader(io.StringIO(run(["dvc", "exp", "show", "--csv"], root))))
    row = next(row for row in shown if row["Experiment"] == "cv5")
    assert float(row["predict_tta.log_loss"]) == pytest.approx(summary["log_loss"])
    assert row["predict_tta.folds"] == str(FOLDS) and row["cv.folds"] == str(FOLDS)


def test_the_submission_averages_the_folds_test_predictions(project) -> None:
    root, _ = project
    test = np.load(root / "data/predictions/test.npz")
    assert test["folds"].shape == (FOLDS, len(test["ids"]), 3)
    # cv.ensemble logits: the softmax of the mean of the folds' log-probabilities
    geometric = np.exp(np.log(np.clip(test["folds"], 1e-15, None)).mean(axis=0))
    np.testing.assert_allclose(
        test["probabilities"], geometric / geometric.sum(axis=1, keepdims=True), rtol=1e-5
    )


def test_a_finetune_param_reruns_the_folds_finetune_and_what_follows(project) -> None:
    root, _ = project
    output = run(["dvc", "exp", "run", "-S", "finetune.lr=0.0003"], root)
    stages = stages_run(output)
    # export reruns only if fold 1's model changed: a fold whose finetune does not beat its start keeps it
    assert stages in (
        ["finetune", "export", "predict_tta", "submission"],
        ["finetune", "predict_tta", "submission"],
    )
    assert output.count("finetune: fold ") == FOLDS


def test_train_on_all_submits_the_model_of_every_labelled_image(project) -> None:
    """One split and final.train_on_all: a second model on train and valid together (precompute's two arrays),
    the last epoch's weights (nothing to validate on), whose test probabilities are the submission's."""
    root, _ = project
    settings = ["cv.folds=1", "final.train_on_all=true", "final.submit=all"]
    output = run(["dvc", "exp", "run", *[part for setting in settings for part in ("-S", setting)]], root)
    assert "train_head: the model of all the data (final.train_on_all)" in output
    for folder in ("head", "augmented", "finetune"):
        assert sorted(path.name for path in (root / "models/folds" / folder).glob("*.pt")) == ["all.pt"]
    summary = json.loads((root / "models/folds/finetune/all/metrics.json").read_text())["finetune"]
    assert "log_loss" not in summary and summary["train_loss"] > 0
    test = np.load(root / "data/predictions/test.npz")
    assert test["folds"].shape == test["all"][None].shape  # the split's model, kept to compare with
    np.testing.assert_allclose(test["probabilities"], test["all"])
    submission = pd.read_csv(root / "data/submission.csv", dtype={"id": str}).set_index("id")
    classes = json.loads((root / "data/reorganised/classes.json").read_text())["classes"]
    np.testing.assert_allclose(submission.loc[test["ids"], classes].to_numpy(), test["all"], atol=1e-6)
