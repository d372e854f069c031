"""The recipe benchmark: the whole pipeline over a suite of generated competitions, several seeds each.

For each competition of bench/suite.py and each seed (`base.seed`), `dvc repro` runs in a fresh copy of a
repository (this one, or `--repo`: an older commit's `git worktree`), at the default params or `--params`,
`--set` and the competition's own overrides. Reported per competition, as mean (min-max) over the seeds that
reached each figure:

- per training stage (train_head, train_augmented, finetune, predict_tta): valid log loss and accuracy (the
  copy's dvclive/<stage>/metrics.json) and seconds (from dvc repro's log);
- the submission (data/submission.csv) scored against the kept-aside test labels as Kaggle scores it, read
  in the format of the competition's sample_submission.csv: multi-class log loss (rows divided by their sum,
  clipped to [1e-15, 1 - 1e-15]), binary log loss of the positive class, or accuracy only for a label column;
- a baseline: StandardScaler + scikit-learn's LogisticRegressionCV (L2, C from 1e-4 to 1000 chosen by 3-fold
  stratified cross-validated log loss on the training split only) on the pipeline's own precomputed
  activations (data/features/{train,valid,test}.npy, rows in manifest.csv's order), valid and test figures.

A run whose `dvc repro` fails is recorded (the stage that failed and the last error line of its log) and the
bench goes on; it exits 1 at the end when any run failed or could not be scored.

Run from the repository root:
    .venv/bin/python bench/recipe.py [--quick | --seeds 1 2 3] [--competitions sample binary_filename ...]
        [--repo PATH] [--params FILE] [--set KEY=VALUE ...] [--work DIR] [--json PATH] [--markdown PATH] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import suite  # noqa: E402
import yaml  # noqa: E402

log = logging.getLogger("bench.recipe")

STAGES = ("train_head", "train_augmented", "finetune", "predict_tta")
QUICK_SEEDS, FULL_SEEDS = (1, 2), (1, 2, 3, 4, 5)
DEFAULT_WORK = Path("/tmp/kagglecls-recipe")
KAGGLE_CLIP = 1e-15  # Kaggle's log loss replaces p by max(min(p, 1 - 1e-15), 1e-15)
# Inverse L2 strengths the baseline cross-validates; the top is well above the C the photo competitions pick (10).
BASELINE_CS = tuple(np.logspace(-4, 3, 8))
BASELINE_FOLDS = 3
STAMP = re.compile(r"^\[\s*[\d.]+s\] ")  # run_measured's prefix on each log line
# A stage's one-line user error (`train_augmented: error: ...`) or the last line of a Python traceback.
ERROR_LINE = re.compile(r"^(\w+: error: |[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b)")
# Keys the bench sets itself for each run.
BENCH_KEYS = ("base.seed", "data.source")


class ScoringError(RuntimeError):
    """A submission that cannot be scored against the test labels; the message is one line."""


@dataclass(frozen=True)
class Settings:
    repo: Path  # the repository whose files each run copies
    params_file: Path | None  # replaces the copy's params.yaml
    set_overrides: Mapping[str, object]  # --set, applied after the competition's own overrides
    seeds: tuple[int, ...]
    work: Path
    keep: bool


@dataclass
class RunRecord:
    competition: str
    seed: int
    overrides: dict[str, object]
    returncode: int
    wall_seconds: float
    cpu_seconds: float
    other_cores: float  # CPU other work used meanwhile, in cores: a busy-machine flag for the seconds
    log_path: str
    stage_seconds: dict[str, float]  # every stage that started, the failed one up to the failure
    stages: dict[str, dict[str, float]]  # training stages that finished: valid_log_loss, valid_accuracy
    failed_stage: str | None = None
    error: str | None = None
    test: dict | None = None  # the submission scored: kind, log_loss, accuracy, n
    baseline: dict | None = None
    # With cv.folds k > 1, test log loss of fold 1's model alone and of the folds' two ensembles (cv.ensemble)
    folds: dict | None = None
    problems: list[str] = field(default_factory=list)  # figures that could not be computed, and why

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.problems


# ------------------------------------------------------------------------------------------------------------
# Scoring as Kaggle does


def multiclass_log_loss(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Kaggle's multi-class log loss: each row divided by its sum, then clipped; `truth` holds column indices."""
    rows = np.asarray(probabilities, dtype=np.float64)
    rows = np.clip(rows / rows.sum(axis=1, keepdims=True), KAGGLE_CLIP, 1 - KAGGLE_CLIP)
    return float(-np.mean(np.log(rows[np.arange(len(truth)), truth])))


def binary_log_loss(positive_probability: np.ndarray, is_positive: np.ndarray) -> float:
    """Kaggle's binary log loss of the positive class's probability, clipped."""
    p = np.clip(np.asarray(positive_probability, dtype=np.float64), KAGGLE_CLIP, 1 - KAGGLE_CLIP)
    return float(-np.mean(np.where(is_positive, np.log(p), np.log1p(-p))))


def score_submission(
    submission: Path, sample_submission: Path, *, test_labels: Mapping[str, str], classes: Sequence[str]
) -> dict:
    """The submission's test log loss and accuracy, read in the sample's format (kagglecls.submission's reading:
    probability columns, one binary column whose positive class is the one named by the column or else the
    class sorting last, or one label column: accuracy only)."""
    from kagglecls.submission import read_sample_submission

    fmt = read_sample_submission(sample_submission, classes=tuple(classes))
    table = pd.read_csv(submission, dtype=str, keep_default_na=False).set_index(fmt.id_column)
    ids = sorted(test_labels)
    missing = [test_id for test_id in ids if test_id not in table.index]
    if missing:
        raise ScoringError(f"{submission}: {len(missing)} test ids have no row, e.g. {missing[0]!r}")
    rows, truth = table.loc[ids], [test_labels[test_id] for test_id in ids]
    scored = {"kind": fmt.kind, "n": len(ids)}
    if fmt.kind == "label":
        predicted = rows[fmt.value_columns[0]].to_numpy()
        return {**scored, "log_loss": None, "accuracy": float(np.mean(predicted == np.array(truth)))}
    values = rows[list(fmt.value_columns)].apply(pd.to_numeric).to_numpy(dtype=np.float64)
    if fmt.kind == "binary":
        is_positive = np.array([label == fmt.positive_class for label in truth])
        hits = (values[:, 0] > 0.5) == is_positive
        return {
            **scored,
            "log_loss": binary_log_loss(values[:, 0], is_positive),
            "accuracy": float(hits.mean()),
        }
    truth_index = np.array([fmt.value_columns.index(label) for label in truth])
    accuracy = float(np.mean(values.argmax(axis=1) == truth_index))
    return {**scored, "log_loss": multiclass_log_loss(values, truth_index), "accuracy": accuracy}


# ------------------------------------------------------------------------------------------------------------
# The logistic-regression baseline on the pipeline's activations


def manifest_split(manifest: Path, split: str) -> list[dict[str, str]]:
    """The rows of one split that have an image, in file order: the rows of data/features/<split>.npy
    (kagglecls.loading.load_splits and features.precompute, which reads them with an unshuffled loader).
    Read with csv, not kagglecls.manifest, because the copy may come from another commit."""
    with open(manifest, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["split"] == split and row["file"]]


def baseline_model(seed: int, smallest_class: int):  # noqa: ANN201 - a scikit-learn Pipeline
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    folds = StratifiedKFold(
        n_splits=max(2, min(BASELINE_FOLDS, smallest_class)), shuffle=True, random_state=seed
    )
    return make_pipeline(
        StandardScaler(),
        LogisticRegressionCV(
            Cs=list(BASELINE_CS),
            cv=folds,
            l1_ratios=(0.0,),  # L2
            scoring="neg_log_loss",
            max_iter=1000,
            use_legacy_attributes=False,
        ),
    )


def logistic_baseline(copy: Path, *, test_labels: Mapping[str, str], seed: int) -> dict:
    """Fitted on the training split's activations only; its valid and test log loss and accuracy."""
    features, reorganised = copy / "data" / "features", copy / "data" / "reorganised"
    classes = json.loads((reorganised / "classes.json").read_text())["classes"]
    inputs, targets, ids = {}, {}, {}
    for split in ("train", "valid", "test"):
        rows = manifest_split(reorganised / "manifest.csv", split)
        inputs[split] = np.load(features / f"{split}.npy").astype(np.float32)
        if len(inputs[split]) != len(rows):
            raise ScoringError(
                f"{features / split}.npy: {len(inputs[split])} rows, manifest.csv has {len(rows)}"
            )
        labels = [row["label"] if split != "test" else test_labels[row["id"]] for row in rows]
        targets[split] = np.array([classes.index(label) for label in labels])
        ids[split] = [row["id"] for row in rows]
    model = baseline_model(seed, int(np.bincount(targets["train"]).min()))
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(inputs["train"], targets["train"])
    figures = {"fit_seconds": time.perf_counter() - started, "C": float(model[-1].C_)}
    figures["warnings"] = sorted(
        {f"{item.category.__name__}: {str(item.message).splitlines()[0]}" for item in caught}
    )
    for split in ("valid", "test"):
        probabilities = model.predict_proba(inputs[split])
        figures[f"{split}_log_loss"] = multiclass_log_loss(probabilities, targets[split])
        figures[f"{split}_accuracy"] = float(np.mean(probabilities.argmax(axis=1) == targets[split]))
    return figures


# ------------------------------------------------------------------------------------------------------------
# One pipeline run


def run_overrides(entry: suite.SuiteCompetition, *, source: str, seed: int, settings: Settings) -> dict:
    """The competition's overrides, then --set (the command line has the last word), then source and seed."""
    return {**entry.overrides, **settings.set_overrides, "data.source": source, "base.seed": seed}


def prepare_copy(folder: Path, *, settings: Settings, overrides: Mapping[str, object]) -> Path:
    """A fresh copy of the repository with this run's params, and no committed metrics left to be mistaken
    for this run's."""
    shutil.rmtree(folder, ignore_errors=True)
    copy = folder / "repo"
    common.copy_repository(copy, source=settings.repo)
    if settings.params_file is not None:
        shutil.copyfile(settings.params_file, copy / "params.yaml")
    common.override_params(copy / "params.yaml", overrides)
    for stage in STAGES:
        (copy / "dvclive" / stage / "metrics.json").unlink(missing_ok=True)
        (copy / "metrics" / f"{stage}.json").unlink(missing_ok=True)  # commits before dvclive
    return copy


def run_one(entry: suite.SuiteCompetition, seed: int, *, settings: Settings, base_params: dict) -> RunRecord:
    sample_params = merged_params(base_params, settings.set_overrides)["data"]["sample"]
    prepared = suite.prepare(entry, settings.work / "competitions", seed=seed, sample_params=sample_params)
    overrides = run_overrides(entry, source=prepared.source, seed=seed, settings=settings)
    folder = settings.work / "runs" / f"{entry.name}-seed{seed}"
    copy = prepare_copy(folder, settings=settings, overrides=overrides)
    log.info("%s seed %d: dvc repro in %s", entry.name, seed, copy)
    dvc = common.MAIN_VENV / "bin" / "dvc"
    measured = common.run_measured(
        [dvc, "repro"], cwd=copy, log_path=folder / "repro.log", env=common.pipeline_env(copy)
    )
    record = RunRecord(
        competition=entry.name,
        seed=seed,
        overrides=overrides,
        returncode=measured.returncode,
        wall_seconds=measured.wall_seconds,
        cpu_seconds=measured.cpu_seconds,
        other_cores=measured.other_cores,
        log_path=measured.log_path,
        stage_seconds=common.stage_seconds(Path(measured.log_path)),
        stages=stage_figures(copy),
    )
    if measured.returncode != 0:
        record.failed_stage, record.error = failure_of(Path(measured.log_path))
        log.warning("%s seed %d: %s failed: %s", entry.name, seed, record.failed_stage, record.error)
    score_run(record, copy, entry=entry, prepared=prepared)
    if not settings.keep:
        shutil.rmtree(copy)
    return record


def stage_figures(copy: Path) -> dict[str, dict[str, float]]:
    return {stage: figures for stage in STAGES if (figures := common.stage_metrics(copy, stage))}


def failure_of(log_path: Path) -> tuple[str | None, str | None]:
    """The stage dvc was running when it stopped, and the log's last error line (a stage's one-line error or a
    traceback's last line; else dvc's own ERROR line, else the last line)."""
    lines = [STAMP.sub("", line).strip() for line in log_path.read_text(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    started = [line.split("'")[1] for line in lines if line.startswith("Running stage '")]
    error = next((line for line in reversed(lines) if ERROR_LINE.match(line)), None)
    error = error or next((line for line in reversed(lines) if line.startswith("ERROR")), None)
    return (started[-1] if started else None), error or (lines[-1] if lines else None)


def score_run(
    record: RunRecord, copy: Path, *, entry: suite.SuiteCompetition, prepared: suite.Prepared
) -> None:
    """The submission's test figures and the baseline, where the run got far enough for them."""
    from kagglecls.competition import load_competition

    test_labels = suite.read_test_labels(prepared.test_labels_path)
    if entry.embedded_sample and (copy / "data" / "raw").is_dir():
        differing = differing_files(copy / "data" / "raw", prepared.competition_dir)
        if differing:
            record.problems.append(
                f"the copy's sample competition differs from the suite's ({len(differing)} files, e.g. "
                f"{differing[0]}): test labels do not apply"
            )
            return
    submission = copy / "data" / "submission.csv"
    if submission.is_file():
        classes = load_competition(prepared.competition_dir).classes
        sample_submission = prepared.competition_dir / "sample_submission.csv"
        try:
            record.test = score_submission(
                submission, sample_submission, test_labels=test_labels, classes=classes
            )
        except ScoringError as error:
            record.problems.append(str(error))
    predictions = copy / "data" / "predictions" / "test.npz"
    if predictions.is_file():
        try:
            record.folds = fold_ensembles(copy, test_labels)
        except (KeyError, ValueError) as error:
            record.problems.append(f"{predictions}: cannot score the folds' predictions: {error}")
    # The baseline fits on train and is judged on valid: there is no valid.npy with cv.folds > 1.
    if all((copy / "data" / "features" / f"{name}.npy").is_file() for name in ("test", "valid")):
        try:
            record.baseline = logistic_baseline(copy, test_labels=test_labels, seed=record.seed)
        except ScoringError as error:
            record.problems.append(str(error))


def fold_ensembles(copy: Path, test_labels: Mapping[str, str]) -> dict | None:
    """Where predict_tta saved each fold's test probabilities (cv.folds > 1) or the model of all the data's
    (final.train_on_all): the test log loss of fold 1's model alone, of the folds' two ensembles (cv.ensemble),
    of the model of all the data alone and beside the folds."""
    from kagglecls.predict import combine_folds

    with np.load(copy / "data" / "predictions" / "test.npz") as stored:
        saved = dict(stored)
    if "folds" not in saved and "all" not in saved:
        return None
    classes = json.loads((copy / "data" / "reorganised" / "classes.json").read_text())["classes"]
    truth = np.array([classes.index(test_labels[item]) for item in saved["ids"]])
    figures = {}
    folds = list(saved["folds"]) if "folds" in saved else []
    if folds:
        figures["folds"] = len(folds)
        figures["fold1_log_loss"] = multiclass_log_loss(folds[0], truth)
        figures["mean_fold_log_loss"] = float(np.mean([multiclass_log_loss(fold, truth) for fold in folds]))
        for how in ("probabilities", "logits"):
            figures[f"{how}_log_loss"] = multiclass_log_loss(combine_folds(folds, how), truth)
    if "all" in saved:
        figures["all_log_loss"] = multiclass_log_loss(saved["all"], truth)
        if folds:
            members = [saved["all"], *folds]
            figures["all_and_folds_log_loss"] = multiclass_log_loss(
                combine_folds(members, "probabilities"), truth
            )
    return figures


def differing_files(first: Path, second: Path) -> list[str]:
    """Relative names of the files that only one folder holds, or that differ in bytes."""

    def names(root: Path) -> set[str]:
        return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}

    in_first, in_second = names(first), names(second)
    changed = [
        name for name in in_first & in_second if (first / name).read_bytes() != (second / name).read_bytes()
    ]
    return sorted(in_first ^ in_second) + sorted(changed)


def merged_params(params: dict, overrides: Mapping[str, object]) -> dict:
    """`params` with dotted overrides applied, as common.override_params writes them, without a file."""
    merged = json.loads(json.dumps(params))
    for dotted, value in overrides.items():
        section = merged
        *parents, last = dotted.split(".")
        for key in parents:
            section = section.setdefault(key, {})
        section[last] = value
    return merged


# ------------------------------------------------------------------------------------------------------------
# Summaries and the markdown table


def spread(values: Sequence[float]) -> dict | None:
    if not values:
        return None
    return {
        "mean": float(np.mean(values)),
        "min": float(min(values)),
        "max": float(max(values)),
        "n": len(values),
    }


def summarise(entry: suite.SuiteCompetition, records: Sequence[RunRecord]) -> dict:
    """Mean, min and max over the seeds that reached each figure, with how many did."""
    stages = {}
    for stage in STAGES:
        done = [record for record in records if stage in record.stages]
        stages[stage] = {
            "valid_log_loss": spread([record.stages[stage]["valid_log_loss"] for record in done]),
            "valid_accuracy": spread([record.stages[stage]["valid_accuracy"] for record in done]),
            "seconds": spread(
                [record.stage_seconds[stage] for record in done if stage in record.stage_seconds]
            ),
        }
    tested = [record.test for record in records if record.test is not None]
    baselines = [record.baseline for record in records if record.baseline is not None]
    return {
        "competition": entry.name,
        "runs": len(records),
        "failed": sum(not record.ok for record in records),
        "stages": stages,
        "submission": {
            "kind": tested[0]["kind"] if tested else None,
            "test_log_loss": spread([test["log_loss"] for test in tested if test["log_loss"] is not None]),
            "test_accuracy": spread([test["accuracy"] for test in tested]),
            "seconds": spread(
                [
                    record.stage_seconds["submission"]
                    for record in records
                    if record.test and "submission" in record.stage_seconds
                ]
            ),
        },
        "baseline": {
            key: spread([baseline[key] for baseline in baselines])
            for key in ("valid_log_loss", "valid_accuracy", "test_log_loss", "test_accuracy", "fit_seconds")
        },
        "repro_seconds": spread([record.wall_seconds for record in records if record.returncode == 0]),
        "folds": {
            key: spread([record.folds[key] for record in records if record.folds and key in record.folds])
            for key in (
                "fold1_log_loss",
                "mean_fold_log_loss",
                "probabilities_log_loss",
                "logits_log_loss",
                "all_log_loss",
                "all_and_folds_log_loss",
            )
        },
    }


def shown(figure: dict | None, digits: int) -> str:
    """`mean (min–max)`, or the one value; `–` where no seed reached the figure."""
    if figure is None:
        return "–"
    if figure["n"] == 1:
        return f"{figure['mean']:.{digits}f}"
    return f"{figure['mean']:.{digits}f} ({figure['min']:.{digits}f}–{figure['max']:.{digits}f})"


def summary_rows(summary: dict) -> list[list[str]]:
    name, runs = summary["competition"], summary["runs"]
    rows = []
    for stage, figures in summary["stages"].items():
        count = figures["valid_accuracy"]["n"] if figures["valid_accuracy"] else 0
        rows.append(
            [
                name,
                stage,
                f"{count}/{runs}",
                shown(figures["valid_log_loss"], 4),
                shown(figures["valid_accuracy"], 3),
                "",
                "",
                shown(figures["seconds"], 1),
            ]
        )
    test, baseline = summary["submission"], summary["baseline"]
    count = test["test_accuracy"]["n"] if test["test_accuracy"] else 0
    rows.append(
        [
            name,
            f"submission ({test['kind'] or 'not made'})",
            f"{count}/{runs}",
            "",
            "",
            shown(test["test_log_loss"], 4),
            shown(test["test_accuracy"], 3),
            shown(test["seconds"], 1),
        ]
    )
    count = baseline["test_accuracy"]["n"] if baseline["test_accuracy"] else 0
    rows.append(
        [
            name,
            "baseline: logistic regression",
            f"{count}/{runs}",
            shown(baseline["valid_log_loss"], 4),
            shown(baseline["valid_accuracy"], 3),
            shown(baseline["test_log_loss"], 4),
            shown(baseline["test_accuracy"], 3),
            shown(baseline["fit_seconds"], 1),
        ]
    )
    ok = summary["repro_seconds"]["n"] if summary["repro_seconds"] else 0
    rows.append(
        [name, "dvc repro (whole run)", f"{ok}/{runs}", "", "", "", "", shown(summary["repro_seconds"], 1)]
    )
    return rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def competition_rows(
    entries: Sequence[suite.SuiteCompetition], counts: Mapping[str, dict]
) -> list[list[str]]:
    rows = []
    for entry in entries:
        found = counts[entry.name]
        overrides = ", ".join(f"{key}={json.dumps(value)}" for key, value in entry.overrides.items()) or "–"
        rows.append(
            [
                entry.name,
                entry.layout,
                found["classes"],
                found["train"],
                found["test"],
                overrides,
                entry.about,
            ]
        )
    return rows


def failure_lines(records: Sequence[RunRecord]) -> list[str]:
    lines = []
    for record in records:
        if record.returncode != 0:
            lines.append(
                f"- {record.competition}, seed {record.seed}: {record.failed_stage} failed: `{record.error}`"
            )
        lines += [f"- {record.competition}, seed {record.seed}: {problem}" for problem in record.problems]
    return lines


def render_markdown(
    report: dict, entries: Sequence[suite.SuiteCompetition], records: Sequence[RunRecord]
) -> str:
    header = [
        "competition",
        "stage",
        "runs",
        "valid log loss",
        "valid accuracy",
        "test log loss",
        "test accuracy",
        "seconds",
    ]
    rows = [row for summary in report["summary"] for row in summary_rows(summary)]
    parts = [
        f"## Recipe benchmark: {report['repo']} at {report['commit']}",
        "",
        f"{report['date']}; machine: {report['machine']}.",
        f"Seeds (base.seed) {', '.join(map(str, report['seeds']))}; params: {report['params']}; "
        f"--set: {report['set'] or 'none'}; total wall time {report['total_seconds']:.0f} s "
        f"(other work on the machine meanwhile: {report['other_cores']:.2f} cores on average).",
        "",
        markdown_table(
            ["competition", "layout", "classes", "train", "test", "overrides", "what"],
            competition_rows(entries, report["counts"]),
        ),
        "",
        "Figures are the mean (min–max) over the seeds that reached them; `runs` counts those seeds. Valid figures "
        "are the pipeline's (dvclive/<stage>/metrics.json); test figures score data/submission.csv against the kept-aside "
        "labels as Kaggle would (binary: log loss of the positive class). The baseline is StandardScaler + "
        "LogisticRegressionCV (L2, C in 1e-4..1000 by 3-fold log loss on the training split) on the pipeline's "
        "precomputed activations; its `seconds` is the fit. Stage seconds come from dvc repro's log.",
        "",
        markdown_table(header, rows),
    ]
    failures = failure_lines(records)
    if failures:
        parts += ["", f"Failures ({len(failures)}):", "", *failures]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------------------
# The command


def describe_commit(repo: Path) -> str:
    def git(*arguments: str) -> str:
        return subprocess.run(["git", *arguments], cwd=repo, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "no commit"
    return commit + (" plus uncommitted changes" if git("status", "--porcelain") else "")


def competition_counts(prepared: suite.Prepared) -> dict:
    from kagglecls.competition import load_competition

    found = load_competition(prepared.competition_dir)
    return {"classes": len(found.classes), "train": len(found.train_files), "test": len(found.test_ids)}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--quick", action="store_true", help=f"seeds {QUICK_SEEDS} (default {FULL_SEEDS})")
    seeds.add_argument("--seeds", type=int, nargs="+", default=None, help="base.seed values to run")
    parser.add_argument(
        "--competitions", nargs="+", choices=suite.SUITE_NAMES, default=list(suite.SUITE_NAMES)
    )
    parser.add_argument(
        "--repo", type=Path, default=common.REPO_ROOT, help="repository whose files each run copies"
    )
    parser.add_argument(
        "--params", type=Path, default=None, help="params file to run with (default: the repo's)"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="params overrides (YAML values)"
    )
    parser.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help="competitions (kept, reused) and runs"
    )
    parser.add_argument("--markdown", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--keep", action="store_true", help="keep each run's repository copy")
    common.add_shared_arguments(parser, wait_per="before each pipeline run")
    parser.set_defaults(
        max_wait=0
    )  # figures first: the seconds are a side result, so no waiting unless asked
    return parser.parse_args()


def settings_from(arguments: argparse.Namespace) -> Settings:
    set_overrides = common.parse_overrides(arguments.set)
    for key in BENCH_KEYS:
        if key in set_overrides:
            raise SystemExit(f"--set {key}: the bench sets it for each run (use --seeds or --competitions)")
    seeds = arguments.seeds or (QUICK_SEEDS if arguments.quick else FULL_SEEDS)
    return Settings(
        repo=arguments.repo.resolve(),
        params_file=arguments.params.resolve() if arguments.params else None,
        set_overrides=set_overrides,
        seeds=tuple(seeds),
        work=arguments.work.resolve(),
        keep=arguments.keep,
    )


def main() -> int:
    arguments = parse_arguments()
    common.start()
    settings = settings_from(arguments)
    base_params = yaml.safe_load((settings.params_file or settings.repo / "params.yaml").read_text())
    entries = [suite.by_name(name) for name in arguments.competitions]
    report = {
        "machine": common.machine_description(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "repo": str(settings.repo),
        "commit": describe_commit(settings.repo),
        "params": str(settings.params_file or "the repo's params.yaml"),
        "set": " ".join(arguments.set),
        "seeds": list(settings.seeds),
        "suite": [
            {"name": entry.name, "overrides": entry.overrides, "about": entry.about} for entry in entries
        ],
    }
    started = time.perf_counter()
    records: list[RunRecord] = []
    for entry in entries:
        for seed in settings.seeds:
            if arguments.max_wait > 0:
                common.wait_for_quiet(max_wait_seconds=arguments.max_wait)
            records.append(run_one(entry, seed, settings=settings, base_params=base_params))
            if arguments.json is not None:  # after every run: a long bench that stops keeps what it measured
                common.write_json({**report, "runs": records}, arguments.json)
    sample_params = merged_params(base_params, settings.set_overrides)["data"]["sample"]
    counts = {
        entry.name: competition_counts(
            suite.prepare(
                entry, settings.work / "competitions", seed=settings.seeds[0], sample_params=sample_params
            )
        )
        for entry in entries
    }
    report.update(
        counts=counts,
        total_seconds=time.perf_counter() - started,
        other_cores=float(np.mean([record.other_cores for record in records])),
        summary=[summarise(entry, [r for r in records if r.competition == entry.name]) for entry in entries],
    )
    markdown = render_markdown(report, entries, records)
    common.report(markdown)
    if arguments.markdown is not None:
        arguments.markdown.parent.mkdir(parents=True, exist_ok=True)
        arguments.markdown.write_text(markdown)
    if arguments.json is not None:
        runs = [{**asdict(record), "ok": record.ok} for record in records]
        common.write_json({**report, "runs": runs}, arguments.json)
    return 0 if all(record.ok for record in records) else 1


if __name__ == "__main__":
    sys.exit(main())
