"""Stage submission: the Kaggle file from the test predictions. Imports no torch, so it starts fast."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kagglecls import submission
from kagglecls.manifest import read_class_info
from kagglecls.params import Params

log = logging.getLogger(__name__)


def make_submission(
    *, params: Params, raw_dir: Path, reorganised: Path, predictions: Path, out_csv: Path
) -> None:
    """The Kaggle file: the sample's columns and id order; ids without a readable image get the class prior."""
    info = read_class_info(reorganised)
    classes = tuple(info.classes)
    fmt = submission.read_sample_submission(
        raw_dir / "sample_submission.csv", classes=classes, positive_class=params.submission.positive_class
    )
    saved = np.load(predictions)
    by_id = dict(zip(saved["ids"].tolist(), saved["probabilities"], strict=True))
    prior = np.asarray(info.prior, dtype=np.float64)
    missing = [item for item in fmt.ids if item not in by_id]
    if missing:
        log.warning(
            "submission: %d ids without a readable test image get the class prior, e.g. %s",
            len(missing),
            ", ".join(missing[:5]),
        )
    probabilities = (
        np.stack([by_id.get(item, prior) for item in fmt.ids]) if fmt.ids else np.zeros((0, len(classes)))
    )
    frame = submission.build_submission(fmt, ids=fmt.ids, classes=classes, probabilities=probabilities)
    submission.validate_submission(frame, fmt)
    submission.write_submission(frame, out_csv)
    log.info("submission: %s (%d rows, %d columns)", out_csv, len(frame), len(frame.columns))
