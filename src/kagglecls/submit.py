"""Validate data/submission.csv against the competition's sample, then submit it to Kaggle.

Run from the project root:

    make submit MESSAGE="resnet34, 3 cycles"
    kagglecls-submit --message "resnet34, 3 cycles"

Never a DVC stage: a submission spends one of the day's allowance and the leaderboard is not an artifact.
The description sent to Kaggle names the git commit, the DVC experiment (env DVC_EXP_NAME) if any, and the
validation log loss from metrics/predict_tta.json. Errors are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kagglecls.kaggle_io import KaggleError, submit
from kagglecls.params import ParamsError, load_params

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


class SubmissionError(ValueError):
    """A submission file that Kaggle would reject; the message is one line naming the file, row and column."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _argument_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        competition = args.competition or load_params(args.params).data.competition
        _validate(args.submission, args.sample)
        description = submission_description(message=args.message, metrics_path=args.metrics)
        server_message = submit(submission_csv=args.submission, competition=competition, message=description)
    except (KaggleError, SubmissionError, ParamsError) as error:
        parser.exit(EXIT_USER_ERROR, f"{parser.prog}: error: {error}\n")
    logger.info("Kaggle says: %s", server_message)
    return 0


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kagglecls-submit", description=__doc__.splitlines()[0])
    parser.add_argument("--submission", type=Path, default=Path("data/submission.csv"))
    parser.add_argument("--sample", type=Path, default=Path("data/raw/sample_submission.csv"))
    parser.add_argument("--competition", default=None, help="default: data.competition in --params")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/predict_tta.json"))
    parser.add_argument("--message", default="", help="what this submission tries")
    return parser


def submission_description(*, message: str, metrics_path: Path) -> str:
    """`message | commit 1a2b3c4 | experiment exp-x | valid log loss 0.4321`, leaving out what is unknown."""
    parts = [message.strip() or "kagglecls"]
    commit = _git_commit()
    if commit:
        parts.append(f"commit {commit}")
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        parts.append(f"experiment {experiment}")
    log_loss = _valid_log_loss(metrics_path)
    if log_loss is not None:
        parts.append(f"valid log loss {log_loss:.4f}")
    return " | ".join(parts)


def _git_commit() -> str | None:
    """Short hash of HEAD, with -dirty when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _valid_log_loss(metrics_path: Path) -> float | None:
    try:
        value = json.loads(metrics_path.read_text()).get("valid_log_loss")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None


def _validate(submission_csv: Path, sample_csv: Path) -> None:
    """Same header as the sample, same ids in the same order, every value filled (finite where numeric)."""
    sample_header, sample_rows = _read_csv(
        sample_csv, what="sample submission (the download stage writes it)"
    )
    header, rows = _read_csv(submission_csv, what="submission (dvc repro builds it)")
    if header != sample_header:
        difference = _header_difference(header, sample_header)
        raise SubmissionError(f"{submission_csv}: header differs from the one in {sample_csv}: {difference}")
    if len(rows) != len(sample_rows):
        raise SubmissionError(
            f"{submission_csv}: {len(rows)} rows, expected {len(sample_rows)} as in {sample_csv}"
        )
    numeric = [_is_finite_number(value) for value in sample_rows[0][1:]] if sample_rows else []
    for line, (row, sample_row) in enumerate(zip(rows, sample_rows, strict=True), start=2):
        _check_row(row, sample_row, header=header, numeric=numeric, where=f"{submission_csv} line {line}")


def _check_row(
    row: list[str], sample_row: list[str], *, header: list[str], numeric: list[bool], where: str
) -> None:
    if len(row) != len(header):
        raise SubmissionError(f"{where}: {len(row)} fields, expected {len(header)}")
    if row[0] != sample_row[0]:
        raise SubmissionError(
            f"{where}: id {row[0]!r}, expected {sample_row[0]!r} (the sample's ids and order)"
        )
    for column, value, is_numeric in zip(header[1:], row[1:], numeric, strict=True):
        if is_numeric and not _is_finite_number(value):
            raise SubmissionError(f"{where}, column {column!r}: expected a finite number, found {value!r}")
        if not value.strip():
            raise SubmissionError(f"{where}, column {column!r}: expected a value, found an empty field")


def _read_csv(path: Path, *, what: str) -> tuple[list[str], list[list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            rows = list(csv.reader(file))
    except FileNotFoundError:
        raise SubmissionError(f"{path}: no such file; expected the {what}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SubmissionError(f"{path}: cannot read it as CSV ({error})") from None
    if not rows:
        raise SubmissionError(f"{path}: empty file; expected a header line and one line per id")
    return rows[0], rows[1:]


def _is_finite_number(value: str) -> bool:
    try:
        return math.isfinite(float(value))
    except ValueError:
        return False


def _header_difference(header: list[str], sample_header: list[str]) -> str:
    for index, (found, expected) in enumerate(zip(header, sample_header, strict=False)):  # lengths may differ
        if found != expected:
            return f"column {index + 1} is {found!r}, expected {expected!r}"
    return f"{len(header)} columns, expected {len(sample_header)}"


if __name__ == "__main__":
    raise SystemExit(main())
