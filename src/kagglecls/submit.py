"""`make submit MESSAGE="..."`: validate data/submission.csv against the sample, then submit it to Kaggle with
the commit, experiment and valid log loss in its description, record it in submissions/history.csv and, with
--wait, wait for its public score. Never a DVC stage: it spends the day's quota.
`kagglecls submissions`: that history beside what Kaggle reports."""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from kagglecls.atomic import write_csv
from kagglecls.errors import UserError
from kagglecls.kaggle_io import (
    KaggleError,
    Scored,
    ScoreWaitTimeout,
    list_submissions,
    submit,
    wait_for_score,
)
from kagglecls.params import load_params
from kagglecls.submission import SubmissionError, read_sample_submission, validate_submission

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
HISTORY = Path("submissions/history.csv")
HISTORY_COLUMNS = (
    "submitted_at", "competition", "ref", "commit", "experiment", "valid_log_loss", "message", "status",
    "public_score", "error",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kagglecls-submit", description=__doc__.splitlines()[0])
    parser.add_argument("--submission", type=Path, default=Path("data/submission.csv"))
    parser.add_argument("--sample", type=Path, default=Path("data/raw/sample_submission.csv"))
    parser.add_argument("--competition", default=None, help="default: data.competition in --params")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--metrics",
        type=Path,
        default=None,
        help="the valid figure's file (default: the submission's .json beside it, written by kagglecls ensemble, "
        "else dvclive/predict_tta/metrics.json)",
    )
    parser.add_argument("--message", default="", help="what this submission tries")
    parser.add_argument(
        "--history", type=Path, default=HISTORY, help=f"where submissions are recorded ({HISTORY})"
    )
    parser.add_argument(
        "--wait", action="store_true", help="wait until Kaggle scores it, then record the score"
    )
    parser.add_argument("--wait-timeout", type=float, default=900, help="seconds to wait at most (900)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        competition = args.competition or load_params(args.params).data.competition
        _validate(args.submission, args.sample)
        beside = args.submission.with_suffix(".json")
        metrics = args.metrics or (beside if beside.is_file() else Path("dvclive/predict_tta/metrics.json"))
        provenance = Provenance.of(message=args.message, metrics_path=metrics)
        uploaded = submit(
            submission_csv=args.submission, competition=competition, message=provenance.description()
        )
        _append_history(args.history, competition=competition, ref=uploaded.ref, provenance=provenance)
        logger.info("Kaggle says: %s", uploaded.message)
        if args.wait:
            try:
                scored = wait_for_score(
                    competition=competition, ref=uploaded.ref, timeout_s=args.wait_timeout
                )
            except ScoreWaitTimeout as timeout:  # the upload went through: nothing to redo
                print(f"{parser.prog}: warning: {timeout}", file=sys.stderr)
                return 0
            _update_history(args.history, [scored])
            if scored.status == "error":
                raise KaggleError(
                    f"Kaggle could not score submission {scored.ref}: {scored.error or 'no reason given'}"
                )
            print(f"public score {scored.public_score}: submission {scored.ref}, {provenance.description()}")
    except UserError as error:  # bad params, sample, submission or Kaggle answer: one line, no traceback
        parser.exit(EXIT_USER_ERROR, f"{parser.prog}: error: {error}\n")
    return 0


@dataclass(frozen=True)
class Provenance:
    """What a submission came from: the user's message, the git commit, the DVC experiment, the valid figure."""

    message: str
    commit: str | None
    experiment: str | None
    valid_log_loss: float | None

    @classmethod
    def of(cls, *, message: str, metrics_path: Path) -> Provenance:
        """`metrics_path`: predict_tta's metrics.json, or kagglecls ensemble's summary (which names its
        experiments)."""
        figures = _figures(metrics_path)
        log_loss = figures.get("log_loss")
        return cls(
            message=message.strip() or "kagglecls",
            commit=_git_commit(),
            experiment=os.environ.get("DVC_EXP_NAME") or figures.get("experiments"),
            valid_log_loss=float(log_loss) if isinstance(log_loss, int | float) else None,
        )

    def description(self) -> str:
        """`message | commit 1a2b3c4 | experiment exp-x | valid log loss 0.4321`, leaving out what is unknown."""
        parts = [self.message]
        if self.commit:
            parts.append(f"commit {self.commit}")
        if self.experiment:
            parts.append(f"experiment {self.experiment}")
        if self.valid_log_loss is not None:
            parts.append(f"valid log loss {self.valid_log_loss:.4f}")
        return " | ".join(parts)


def submission_description(*, message: str, metrics_path: Path) -> str:
    return Provenance.of(message=message, metrics_path=metrics_path).description()


# ---- submissions/history.csv: one row a submission, tracked in git ----


def _read_history(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _write_history(path: Path, rows: list[dict[str, str]]) -> None:
    write_csv(rows, path, columns=HISTORY_COLUMNS)


@contextlib.contextmanager
def _history_lock(path: Path) -> Iterator[None]:
    """One read-modify-write of the history at a time (a `make submit --wait` beside `kagglecls submissions`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _append_history(path: Path, *, competition: str, ref: int, provenance: Provenance) -> None:
    row = {
        "submitted_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "competition": competition,
        "ref": str(ref),
        "commit": provenance.commit or "",
        "experiment": provenance.experiment or "",
        "valid_log_loss": "" if provenance.valid_log_loss is None else f"{provenance.valid_log_loss:.4f}",
        "message": provenance.message,
        "status": "pending",
    }
    with _history_lock(path):
        _write_history(path, [*_read_history(path), row])
    logger.info("recorded submission %d in %s", ref, path)


def _update_history(path: Path, listed: Sequence[Scored]) -> list[dict[str, str]]:
    """The history with status, public score and error taken from Kaggle's list; written back if any changed."""
    by_ref = {str(item.ref): item for item in listed}
    with _history_lock(path):
        rows, changed = _read_history(path), False
        for row in rows:
            item = by_ref.get(row["ref"])
            if item is None:
                continue
            known = {
                "status": item.status,
                "public_score": item.public_score or "",
                "error": item.error or "",
            }
            if any(row.get(key, "") != value for key, value in known.items()):
                row.update(known)
                changed = True
        if changed:
            _write_history(path, rows)
    return rows


def add_submissions_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--competition", default=None, help="default: data.competition in --params")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--history", type=Path, default=HISTORY)


def run_submissions(arguments: argparse.Namespace) -> int:
    """`kagglecls submissions`: the history's rows, their status and public score refreshed from Kaggle, then
    Kaggle's latest submissions that the history does not hold."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        competition = arguments.competition or load_params(arguments.params).data.competition
        listed = list_submissions(competition=competition)
    except UserError as error:
        print(f"kagglecls submissions: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    rows = [row for row in _update_history(arguments.history, listed) if row["competition"] == competition]
    known = {row["ref"] for row in rows}
    rows += [
        {"ref": str(item.ref), "status": item.status, "public_score": item.public_score or "",
         "error": item.error or "", "message": f"(not in {arguments.history}) {item.description}"}
        for item in listed
        if str(item.ref) not in known
    ]  # fmt: skip
    columns = [
        "ref",
        "submitted_at",
        "status",
        "public_score",
        "valid_log_loss",
        "commit",
        "experiment",
        "message",
    ]
    if not rows:
        print(f"no submissions to {competition} yet")
        return 0
    table = pd.DataFrame([{column: row.get(column, "") for column in columns} for row in rows])
    print(table.to_string(index=False))
    return 0


def _git_commit() -> str | None:
    """Short hash of HEAD, with -dirty when tracked files differ from it (submissions/history.csv aside: it is
    written by each submission before its row is committed); None outside a git checkout."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){HISTORY}")
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if changed else commit


def _git(*arguments: str) -> str:
    return subprocess.run(["git", *arguments], capture_output=True, text=True, check=True).stdout.strip()


def _figures(metrics_path: Path) -> dict:
    """The "predict_tta" or "ensemble" section of `metrics_path`; {} when there is none."""
    try:
        data = json.loads(metrics_path.read_text())
    except (OSError, ValueError):
        return {}
    section = data.get("predict_tta", data.get("ensemble")) if isinstance(data, dict) else None
    return section if isinstance(section, dict) else {}


def _validate(submission_csv: Path, sample_csv: Path) -> None:
    """The pipeline's own validator: the sample's columns and ids in order, finite values, rows summing to 1."""
    fmt = read_sample_submission(sample_csv)
    try:
        frame = pd.read_csv(
            submission_csv, dtype={fmt.id_column: str}, keep_default_na=False, encoding="utf-8-sig"
        )
    except FileNotFoundError:
        raise SubmissionError(
            f"{submission_csv}: no such file; expected the submission (dvc repro builds it)"
        ) from None
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SubmissionError(f"{submission_csv}: cannot read it as CSV ({first_line})") from None
    try:
        validate_submission(frame, fmt)
    except SubmissionError as error:
        raise SubmissionError(f"{submission_csv}: {error}") from None


if __name__ == "__main__":
    raise SystemExit(main())
