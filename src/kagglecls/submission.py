"""Stage submission: the Kaggle file in the format of sample_submission.csv: `probabilities` (a column per
class), `label` (class names) or `binary` (the probability of `positive_class`: unless set, the class the
column names, `is_dog` -> `dog`, else the class whose name sorts last, as Dogs vs. Cats Redux scores dog)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import numpy as np
import pandas as pd

from kagglecls.atomic import write_file
from kagglecls.competition import read_sample_table
from kagglecls.errors import UserError, examples
from kagglecls.manifest import read_class_info
from kagglecls.params import Params

logger = logging.getLogger(__name__)

ROW_SUM_TOLERANCE = 1e-4  # how far a row of probabilities may sum from 1


class SubmissionError(UserError):
    """A submission or sample submission that does not fit; the message is one line."""


@dataclass(frozen=True)
class SubmissionFormat:
    kind: str  # "probabilities" | "label" | "binary"
    id_column: str
    value_columns: tuple[str, ...]  # columns after the id, in the sample's order
    ids: tuple[str, ...]  # the sample's ids, in order
    positive_class: str | None  # for "binary": the class whose probability the column holds


# ------------------------------------------------------------------------------------------------------------
# Reading the sample


def read_sample_submission(
    path: Path, *, classes: tuple[str, ...] | None = None, positive_class: str | None = None
) -> SubmissionFormat:
    """The format of `path`; with `classes` (the training labels) it is also checked against them."""
    path = Path(path)
    table = read_sample_table(path)  # a CompetitionError names what is wrong with the sample
    id_column, *value_columns = table.columns
    ids = table[id_column]
    kind = _sample_kind(table, path=path, classes=classes)
    chosen_positive = None
    if kind == "probabilities" and classes is not None:
        _check_class_columns(tuple(value_columns), classes, source=str(path))
    if kind == "binary":
        chosen_positive = _positive_class(
            value_columns[0], classes=classes, positive_class=positive_class, source=str(path)
        )
    fmt = SubmissionFormat(
        kind=kind,
        id_column=id_column,
        value_columns=tuple(value_columns),
        ids=tuple(ids),
        positive_class=chosen_positive,
    )
    logger.info("%s: %s submission, %d ids, columns %s", path, kind, len(fmt.ids), examples(table.columns))
    return fmt


def _sample_kind(table: pd.DataFrame, *, path: Path, classes: tuple[str, ...] | None) -> str:
    value_columns = list(table.columns[1:])
    numbers = table[value_columns].apply(pd.to_numeric, errors="coerce")
    if len(value_columns) >= 2:
        not_numeric = [column for column in value_columns if numbers[column].isna().any()]
        if not_numeric:
            raise SubmissionError(
                f"{path}: expected one probability column per class, but columns {examples(not_numeric)} "
                "hold values that are not numbers"
            )
        return "probabilities"
    values = table[value_columns[0]]
    column_numbers = numbers[value_columns[0]]
    if classes is not None and values.isin(classes).all():
        return "label"  # the sample shows a class name, even if it reads as a number (classes 0..4)
    if column_numbers.notna().all() and column_numbers.between(0, 1).all():
        return "binary"
    return "label"


def _check_class_columns(value_columns: tuple[str, ...], classes: Sequence[str], *, source: str) -> None:
    lacking = [column for column in value_columns if column not in classes]
    excess = [name for name in classes if name not in value_columns]
    if lacking or excess:
        raise SubmissionError(
            f"{source}: the probability columns and the training classes differ: the training labels lack "
            f"{len(lacking)} ({examples(lacking) or 'none'}) and have {len(excess)} in excess "
            f"({examples(excess) or 'none'})"
        )


def _positive_class(
    column: str, *, classes: Sequence[str] | None, positive_class: str | None, source: str
) -> str | None:
    """The class whose probability a single numeric column holds (see the module docstring)."""
    if positive_class is not None:
        if classes is not None and positive_class not in classes:
            raise SubmissionError(
                f"{source}: positive_class {positive_class!r} is not a training class; expected one of "
                f"{examples(classes)}"
            )
        return positive_class
    if classes is None:
        return None
    if len(classes) != 2:
        raise SubmissionError(
            f"{source}: a single probability column {column!r} needs exactly 2 classes, the training labels "
            f"have {len(classes)} ({examples(sorted(classes))})"
        )
    words = set(re.split(r"[^0-9a-z]+", column.lower()))
    named = [name for name in classes if name.lower() in words]
    return named[0] if len(named) == 1 else sorted(classes)[-1]


# ------------------------------------------------------------------------------------------------------------
# Building, validating and writing


def build_submission(
    fmt: SubmissionFormat, *, classes: tuple[str, ...], probabilities: np.ndarray
) -> pd.DataFrame:
    """The submission in the sample's columns, from class probabilities with one row per sample id, in order."""
    rows = np.asarray(probabilities, dtype=np.float64)
    if rows.shape != (len(fmt.ids), len(classes)):
        raise SubmissionError(
            f"probabilities: expected shape ({len(fmt.ids)}, {len(classes)}) for {len(fmt.ids)} ids and "
            f"{len(classes)} classes, found {rows.shape}"
        )
    column_of = {name: index for index, name in enumerate(classes)}
    if fmt.kind == "probabilities":
        _check_class_columns(fmt.value_columns, classes, source="sample submission")
        values = {column: rows[:, column_of[column]] for column in fmt.value_columns}
    elif fmt.kind == "label":
        values = {fmt.value_columns[0]: [classes[index] for index in rows.argmax(axis=1)]}
    else:  # binary
        positive = _positive_class(
            fmt.value_columns[0],
            classes=classes,
            positive_class=fmt.positive_class,
            source="sample submission",
        )
        values = {fmt.value_columns[0]: rows[:, column_of[positive]]}
    return pd.DataFrame({fmt.id_column: list(fmt.ids), **values}, columns=[fmt.id_column, *fmt.value_columns])


def validate_submission(frame: pd.DataFrame, fmt: SubmissionFormat) -> None:
    """Raise SubmissionError unless `frame` has every sample id once and in order, the sample's columns, and
    values that fit: probabilities in [0, 1] summing to 1 per row, a label in every row."""
    _check_columns(list(frame.columns), fmt)
    _check_ids([str(value) for value in frame[fmt.id_column]], fmt)
    if fmt.kind == "label":
        _check_labels(frame[fmt.value_columns[0]], ids=fmt.ids)
    else:
        _check_probabilities(frame[list(fmt.value_columns)], fmt=fmt)


def _first_difference(found: list, expected: Sequence) -> tuple[int, object, object, int] | None:
    """(position, found item, expected item, how many positions differ) of two lists, or None if equal."""
    differing = [
        (index, *pair) for index, pair in enumerate(zip_longest(found, expected)) if pair[0] != pair[1]
    ]
    return (*differing[0], len(differing)) if differing else None


def _check_columns(found: list[object], fmt: SubmissionFormat) -> None:
    expected = [fmt.id_column, *fmt.value_columns]
    difference = _first_difference(found, expected)
    if difference:
        position, found_name, expected_name, count = difference
        found_text = "nothing" if found_name is None else repr(found_name)
        expected_text = "none" if expected_name is None else repr(expected_name)
        raise SubmissionError(
            f"submission column {position + 1} is {found_text} where the sample has {expected_text} "
            f"({count} of {len(expected)} column positions differ; expected the sample's columns in order)"
        )


def _check_ids(found: list[str], fmt: SubmissionFormat) -> None:
    difference = _first_difference(found, fmt.ids)
    if difference:
        row, found_id, expected_id, count = difference
        found_text = "missing" if found_id is None else f"id {found_id!r}"
        expected_text = "no row" if expected_id is None else f"id {expected_id!r}"
        raise SubmissionError(
            f"submission row {row + 1} is {found_text} where the sample has {expected_text} "
            f"({count} rows differ; {len(found)} rows, the sample has {len(fmt.ids)}; "
            "expected every sample id once, in the sample's order)"
        )


def _check_probabilities(values: pd.DataFrame, *, fmt: SubmissionFormat) -> None:
    numbers = values.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad_cells = ~np.isfinite(numbers) | (numbers < 0) | (numbers > 1)
    bad_sums = np.zeros(len(numbers), dtype=bool)
    if fmt.kind == "probabilities":
        with np.errstate(invalid="ignore"):
            bad_sums = ~(np.abs(numbers.sum(axis=1) - 1) <= ROW_SUM_TOLERANCE)
    bad_rows = bad_cells.any(axis=1) | bad_sums
    if not bad_rows.any():
        return
    row = int(np.flatnonzero(bad_rows)[0])
    where = f"submission row {row + 1} (id {fmt.ids[row]!r})"
    count = f"{int(bad_rows.sum())} bad rows"
    if bad_cells[row].any():
        column_index = int(np.flatnonzero(bad_cells[row])[0])
        value = values.iloc[row, column_index]
        shown = str(float(value)) if isinstance(value, int | float | np.number) else repr(value)
        raise SubmissionError(
            f"{where}: column {fmt.value_columns[column_index]!r} is {shown}, "
            f"expected a finite probability in [0, 1] ({count})"
        )
    raise SubmissionError(
        f"{where}: probabilities sum to {numbers[row].sum():.6g}, "
        f"expected 1 within {ROW_SUM_TOLERANCE} ({count})"
    )


def _check_labels(values: pd.Series, *, ids: tuple[str, ...]) -> None:
    bad_rows = [row for row, value in enumerate(values) if pd.isna(value) or not str(value)]
    if bad_rows:
        row = bad_rows[0]
        raise SubmissionError(
            f"submission row {row + 1} (id {ids[row]!r}): label {values.iloc[row]!r} is not a class name "
            f"({len(bad_rows)} bad rows)"
        )


def write_submission(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` as CSV to `path` through atomic.write_file, synced: never a half-made `path`."""
    with write_file(path, sync=True) as temporary:
        frame.to_csv(temporary, index=False, lineterminator="\n", encoding="utf-8")
    logger.info("wrote %s (%d rows, %d columns)", path, len(frame), len(frame.columns))


def make_submission(
    *, params: Params, raw_dir: Path, reorganised: Path, predictions: Path, out_csv: Path
) -> None:
    """The Kaggle file: the sample's columns and id order; ids without a readable image get the class prior."""
    info = read_class_info(reorganised)
    classes = tuple(info.classes)
    fmt = read_sample_submission(
        raw_dir / "sample_submission.csv", classes=classes, positive_class=params.submission.positive_class
    )
    saved = np.load(predictions)
    by_id = dict(zip(saved["ids"].tolist(), saved["probabilities"], strict=True))
    prior = np.asarray(info.prior, dtype=np.float64)
    missing = [item for item in fmt.ids if item not in by_id]
    if missing:
        logger.warning(
            "submission: %d ids without a readable test image get the class prior, e.g. %s",
            len(missing),
            ", ".join(missing[:5]),
        )
    probabilities = np.stack([by_id.get(item, prior) for item in fmt.ids])  # a sample has at least one id
    frame = build_submission(fmt, classes=classes, probabilities=probabilities)
    validate_submission(frame, fmt)
    write_submission(frame, out_csv)
