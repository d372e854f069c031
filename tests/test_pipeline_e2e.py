"""End to end: `dvc repro` on a tiny sample competition in a temporary git repo, as a user would run it.

Checks the submission against sample_submission.csv, that a second repro runs nothing, and that changing a
train_head param with `dvc exp run -S` reruns train_head and what follows it, not the stages before it.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from project_fixture import ALL_STAGES, TINY_PARAMS, environment_for, make_project, run, stages_run

from kagglecls.fitting import augmentation_for


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git repo with the tracked project files and tiny params, after one `dvc repro`."""
    root = make_project(tmp_path_factory.mktemp("project"), TINY_PARAMS)
    output = run(["dvc", "repro"], root)
    assert stages_run(output) == ALL_STAGES
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "first run"], root)
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


def test_kagglecls_predict_with_tta_on_the_test_folder_reproduces_the_predictions(
    project: Path, tmp_path: Path
) -> None:
    """The exported model with its TTA settings, on the test images in the manifest's order (the folder's, by
    name): predict_tta's probabilities, to float precision."""
    out = tmp_path / "predictions.csv"
    command = ["python", "-m", "kagglecls", "predict", "models/export.pt2", "data/reorganised/test"]
    run([*command, "--tta", "--csv", str(out)], project)
    expected = np.load(project / "data/predictions/test.npz")
    written = pd.read_csv(out, dtype={"file": str})
    assert [Path(file).stem for file in written["file"]] == expected["ids"].tolist()
    assert list(written.columns) == ["file", "one", "two", "zero"]
    np.testing.assert_allclose(written.drop(columns="file").to_numpy(), expected["probabilities"], atol=1e-5)


def _summary(project: Path, stage: str) -> dict:
    return json.loads((project / f"dvclive/{stage}/metrics.json").read_text())[stage]


def _steps(project: Path, stage: str, figure: str) -> pd.DataFrame:
    return pd.read_csv(project / f"dvclive/{stage}/plots/metrics/{figure}.tsv", sep="\t")


def test_every_stage_summarises_its_valid_figures_under_its_name(project: Path) -> None:
    for stage in ("train_head", "train_augmented", "finetune", "predict_tta"):
        summary = _summary(project, stage)
        assert 0 <= summary["accuracy"] <= 1
        assert summary["log_loss"] > 0
    assert _summary(project, "train_head")["l2_used"] > 0
    assert _summary(project, "finetune")["lr_used"] == 0.0005
    # augmentation auto: chosen by train_augmented from its mirror check, then finetune trains with the same
    augmented = _summary(project, "train_augmented")
    assert augmented["augmentation"] == augmentation_for(
        augmented["mirror_check_log_loss"], augmented["mirror_check_log_loss_mirrored"]
    )
    assert _summary(project, "finetune")["augmentation"] == augmented["augmentation"]
    finetuned = torch.load(project / "models/finetune.pt", weights_only=True)
    assert finetuned["augmentation"] == augmented["augmentation"]
    assert _summary(project, "predict_tta")["log_loss_no_tta"] > 0
    for picture in ("plots/size_histogram.png", "dvclive/predict_tta/plots/images/top_losses.png"):
        assert (project / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_epoch_is_logged_as_a_dvclive_step_and_the_kept_one_is_summarised(project: Path) -> None:
    """finetune (one size, 32 px, SGDR n_cycle 1 x cycle_len 1 x ... from TINY_PARAMS): a row per epoch in each
    figure's step file, no timestamps (a second repro would otherwise see changed outputs)."""
    losses = _steps(project, "finetune", "valid_log_loss")
    assert list(losses.columns) == ["step", "valid_log_loss"]
    epochs = len(_steps(project, "finetune", "train_loss"))
    # step 0: the weights finetune starts from (a candidate for keeping), then one step per epoch
    assert losses["step"].tolist() == list(range(epochs + 1))
    assert _steps(project, "finetune", "image_size")["image_size"].tolist() == [32] * (epochs + 1)
    assert _steps(project, "finetune", "lr")["step"].tolist() == list(range(1, epochs + 1))
    summary = _summary(project, "finetune")
    kept = losses.set_index("step")["valid_log_loss"][summary["kept_epoch"]]
    assert summary["log_loss"] == pytest.approx(kept)
    train_head = _steps(project, "train_head", "valid_log_loss")  # lbfgs, the default: one fit, one step
    assert train_head["step"].tolist() == [1]


def test_second_repro_runs_nothing(project: Path) -> None:
    output = run(["dvc", "repro"], project)
    assert stages_run(output) == []


def test_train_head_param_reruns_from_train_head_on(project: Path) -> None:
    output = run(["dvc", "exp", "run", "-S", "train_head.l2=0.5"], project)
    assert stages_run(output) == [
        "train_head",
        "train_augmented",
        "finetune",
        "export",
        "predict_tta",
        "submission",
    ]
    header = run(["dvc", "exp", "show", "--csv"], project).splitlines()[0]
    assert "finetune.log_loss" in header and "predict_tta.accuracy" in header
    assert "width_median" not in header  # the image-size summary describes the data: not a metric


def test_the_readmes_exp_show_views_fit_120_columns(project: Path) -> None:
    """After the experiment above, in a 120-column terminal: the first view names each stage's valid log loss,
    and no view cuts a column (no "…")."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    views = [line.split("#")[0] for line in re.findall(r"^dvc exp show --drop .*$", readme, re.MULTILINE)]
    assert len(views) == 2
    environment = {**environment_for(project), "COLUMNS": "120"}
    for index, view in enumerate(views):
        shown = subprocess.run(
            [*shlex.split(view), "--no-pager"], cwd=project, env=environment, capture_output=True, text=True
        ).stdout
        lines = shown.splitlines()
        assert lines and max(len(line) for line in lines) <= 120, shown
        assert "…" not in shown and "predict_tta.log_loss" in shown, shown
        if index == 0:
            assert all(
                f"{stage}.log_loss" in shown for stage in ("train_head", "train_augmented", "finetune")
            )


def test_train_augmented_with_lr_auto_gives_the_same_weights_twice(project: Path) -> None:
    """Same machine, params and seed, same result: the sweep's fresh head included."""
    run(["dvc", "exp", "run", "-S", "train_augmented.lr=auto"], project)
    first = (project / "models/augmented.pt").read_bytes()
    curve = json.loads((project / "dvclive/train_augmented/plots/custom/lr_find.json").read_text())
    assert len(curve) >= 2 and all(row["log10_lr"] < 1 for row in curve)
    output = run(["dvc", "repro", "-f", "-s", "train_augmented"], project)
    assert stages_run(output) == ["train_augmented"]
    assert (project / "models/augmented.pt").read_bytes() == first


def test_resnet34_from_random_weights_runs_to_a_valid_submission(project: Path) -> None:
    run(["dvc", "exp", "run", "-S", "model.arch=resnet34", "-S", "model.pretrained=false"], project)
    sample = pd.read_csv(project / "data/raw/sample_submission.csv", dtype={"id": str})
    submission = pd.read_csv(project / "data/submission.csv", dtype={"id": str})
    assert submission["id"].tolist() == sample["id"].tolist()
    np.testing.assert_allclose(submission.drop(columns="id").to_numpy().sum(axis=1), 1.0, atol=1e-6)


def test_a_finished_run_leaves_no_checkpoint_and_a_code_change_retrains(project: Path) -> None:
    """A checkpoint only resumes an interrupted run: none is left once finetune is done, so a code change
    (here a comment in the library finetune imports) retrains from the start instead of resuming."""
    assert not any((project / "models").rglob("checkpoints/*.pt"))
    library = project / "src/kagglecls/fitting.py"
    library.write_text(library.read_text() + "\n# a change\n")
    output = run(["dvc", "repro", "finetune"], project)
    assert stages_run(output) == ["train_head", "train_augmented", "finetune"]
    assert "resuming" not in output
    assert "finetune size 32 epoch 1/1" in output


def test_dvc_plots_show_draws_each_figure_once(project: Path) -> None:
    """After the lr: auto experiment above, so train_augmented's lr_find curve is there."""
    shown = json.loads(run(["dvc", "plots", "show", "--json"], project))["data"]
    assert set(shown) == {
        "lr_find (train_augmented)",
        "training loss",
        "valid accuracy",
        "finetune image size (progressive resizing)",
        "confusion matrix (valid, TTA)",
        "plots/size_histogram.png",
        "dvclive/predict_tta/plots/images/top_losses.png",
    }
    assert all(len(renders) == 1 for renders in shown.values())
    for name, (render,) in shown.items():
        if render["type"] == "vega":
            assert render["content"]["data"]["values"], f"{name}: no data"


def test_finetune_freeze_to_one_keeps_the_early_layer_group_and_out_of_range_is_one_line(
    project: Path,
) -> None:
    """fastai's learn.freeze_to(1) for finetune: the stem and the early blocks keep train_augmented's weights
    (their BatchNorm statistics too) while the later blocks train; past the body's groups, a one-line error."""
    overrides = ["-S", "model.arch=efficientnet_lite0", "-S", "model.pretrained=true"]
    # keep: last_epoch, so finetune hands on trained weights even where no epoch beats the ones it started from
    run(
        ["dvc", "exp", "run", *overrides, "-S", "+finetune.keep=last_epoch", "-S", "finetune.freeze_to=1"],
        project,
    )
    augmented = torch.load(project / "models/augmented.pt", weights_only=True)["model"]
    finetuned = torch.load(project / "models/finetune.pt", weights_only=True)["model"]
    early = [
        key for key in augmented if key.startswith(("body.network._conv_stem", "body.network._blocks.5."))
    ]
    late = [
        key
        for key in augmented
        if key.startswith("body.network._blocks.15.")
        and key.endswith(("conv.weight", "bn0.weight", "bn1.bias"))
    ]
    assert early and all(torch.equal(augmented[key], finetuned[key]) for key in early)
    assert late and not any(torch.equal(augmented[key], finetuned[key]) for key in late)
    result = subprocess.run(
        ["dvc", "exp", "run", "-S", "finetune.freeze_to=3"],
        cwd=project,
        env=environment_for(project),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert (
        "finetune: error: finetune.freeze_to: 3 but efficientnet_lite0's body has 2 layer groups; "
        "set 0 (the whole body trains) to 2 (the head alone)" in output
    )
    assert "Traceback" not in output
