"""`make submit MESSAGE="..."`: validate data/submission.csv against the sample, then submit it to Kaggle with
the commit, experiment and valid log loss in its description. Never a DVC stage: it spends the day's quota."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from kagglecls.errors import UserError
from kagglecls.kaggle_io import submit
from kagglecls.params import load_params
from kagglecls.submission import SubmissionError, read_sample_submission, validate_submission

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kagglecls-submit", description=__doc__.splitlines()[0])
    parser.add_argument("--submission", type=Path, default=Path("data/submission.csv"))
    parser.add_argument("--sample", type=Path, default=Path("data/raw/sample_submission.csv"))
    parser.add_argument("--competition", default=None, help="default: data.competition in --params")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--metrics", type=Path, default=Path("dvclive/predict_tta/metrics.json"))
    parser.add_argument("--message", default="", help="what this submission tries")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        competition = args.competition or load_params(args.params).data.competition
        _validate(args.submission, args.sample)
        description = submission_description(message=args.message, metrics_path=args.metrics)
        server_message = submit(submission_csv=args.submission, competition=competition, message=description)
    except UserError as error:  # bad params, sample, submission or Kaggle answer: one line, no traceback
        parser.exit(EXIT_USER_ERROR, f"{parser.prog}: error: {error}\n")
    logger.info("Kaggle says: %s", server_message)
    return 0


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
    command = ["git", "describe", "--always", "--dirty", "--exclude=*"]  # every tag excluded: the hash
    try:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _valid_log_loss(metrics_path: Path) -> float | None:
    try:
        value = json.loads(metrics_path.read_text())["predict_tta"]["log_loss"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) else None


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
