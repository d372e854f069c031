"""`kagglecls ensemble EXP EXP ...`: the test probabilities of several experiments averaged into one validated
submission, the weights fitted on their valid probabilities (or equal), and the ensemble's valid log loss.

Each EXP is a DVC experiment name, a git revision, or `workspace`; its predict_tta outputs
(data/predictions/valid.npz and test.npz) are read at that revision with dvc.api from DVC's cache."""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kagglecls.atomic import write_json
from kagglecls.errors import UserError
from kagglecls.manifest import read_class_info
from kagglecls.params import load_params
from kagglecls.submission import make_submission
from kagglecls.training import log_loss

log = logging.getLogger(__name__)

PREDICTIONS = "data/predictions/{split}.npz"


class EnsembleError(UserError):
    """Members that cannot be combined, or predictions that cannot be read."""


@dataclass(frozen=True)
class Member:
    name: str
    classes: tuple[str, ...]
    valid_ids: np.ndarray
    valid: np.ndarray  # probabilities, rows in valid_ids' order
    targets: np.ndarray
    test_ids: np.ndarray
    test: np.ndarray

    def valid_log_loss(self) -> float:
        return log_loss(self.valid, self.targets)


def read_member(name: str, *, repo: str | None = None) -> Member:
    """The predictions predict_tta saved in experiment (or revision) `name`; `workspace`: the files on disk."""
    import dvc.api
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    arrays = {}
    for split in ("valid", "test"):
        path = PREDICTIONS.format(split=split)
        try:
            with dvc.api.open(
                path, repo=repo, rev=None if name == "workspace" else name, mode="rb"
            ) as handle:
                arrays[split] = np.load(io.BytesIO(handle.read()))
        except (DvcException, SCMError, OSError, ValueError) as error:
            said = (str(error).splitlines() or [type(error).__name__])[0]
            raise EnsembleError(
                f"{name}: cannot read {path} ({said}); expected a DVC experiment name (dvc exp list), a git "
                "revision or `workspace`, whose predict_tta has run"
            ) from None
    valid, test = arrays["valid"], arrays["test"]
    order = np.argsort(valid["ids"])
    return Member(
        name=name,
        classes=tuple(valid["classes"].tolist()),
        valid_ids=valid["ids"][order],
        valid=valid["probabilities"][order],
        targets=valid["targets"][order],
        test_ids=test["ids"],
        test=test["probabilities"],
    )


def check_compatible(members: list[Member], *, need_valid: bool) -> None:
    first = members[0]
    for member in members[1:]:
        if member.classes != first.classes:
            raise EnsembleError(
                f"{member.name} and {first.name} have different classes; ensembles need the same"
            )
        if not np.array_equal(member.test_ids, first.test_ids):
            raise EnsembleError(f"{member.name} and {first.name} predicted different test ids")
        if need_valid and not np.array_equal(member.valid_ids, first.valid_ids):
            raise EnsembleError(
                f"{member.name} and {first.name} validate on different images (base.seed or data.valid_pct "
                "differ), so no weights can be fitted on them; use --weights equal"
            )


def fit_weights(members: list[Member]) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the valid log loss of the weighted mean of
    probabilities (softmax-parametrised, L-BFGS); never worse on valid than the best member alone."""
    from scipy.optimize import minimize

    stacked, targets = np.stack([member.valid for member in members]), members[0].targets

    def loss(logits: np.ndarray) -> float:
        weights = np.exp(logits - logits.max())
        return log_loss(np.tensordot(weights / weights.sum(), stacked, axes=1), targets)

    fitted = minimize(loss, np.zeros(len(members)), method="L-BFGS-B")
    own = [member.valid_log_loss() for member in members]
    best = int(np.argmin(own))
    if own[best] < fitted.fun:
        return np.eye(len(members))[best]
    weights = np.exp(fitted.x - fitted.x.max())
    return weights / weights.sum()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiments", nargs="+", help="DVC experiment names, git revisions or `workspace`")
    parser.add_argument(
        "--weights", choices=("fit", "equal"), default="fit", help="fit: on the valid probabilities (default)"
    )
    parser.add_argument("--out", type=Path, default=Path("data/ensemble_submission.csv"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--reorganised", type=Path, default=Path("data/reorganised"))


def run(arguments: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if len(set(arguments.experiments)) < 2:
            raise EnsembleError("name at least two different experiments")
        members = [read_member(name) for name in arguments.experiments]
        check_compatible(members, need_valid=arguments.weights == "fit")
        _check_workspace(members[0], arguments.reorganised, arguments.raw)
        weights = (
            fit_weights(members) if arguments.weights == "fit" else np.full(len(members), 1 / len(members))
        )
        test = np.tensordot(weights, np.stack([member.test for member in members]), axes=1)
        with tempfile.TemporaryDirectory() as folder:
            predictions = Path(folder) / "test.npz"
            np.savez(predictions, ids=members[0].test_ids, probabilities=test)
            make_submission(
                params=load_params(arguments.params),
                raw_dir=arguments.raw,
                reorganised=arguments.reorganised,
                predictions=predictions,
                out_csv=arguments.out,
            )
    except UserError as error:
        print(f"kagglecls ensemble: error: {error}", file=sys.stderr)
        return 2
    same_valid = all(np.array_equal(member.valid_ids, members[0].valid_ids) for member in members)
    for member, weight in zip(members, weights, strict=True):
        figure = f"valid log loss {member.valid_log_loss():.4f}" if same_valid else "its own valid images"
        print(f"{member.name}: weight {weight:.3f}, {figure}")
    ensemble = None
    if same_valid:
        stacked = np.stack([member.valid for member in members])
        ensemble = log_loss(np.tensordot(weights, stacked, axes=1), members[0].targets)
        fitted = " (weights fitted on these images: optimistic)" if arguments.weights == "fit" else ""
        print(f"ensemble: valid log loss {ensemble:.4f}{fitted}")
    # Beside the submission, for kagglecls-submit's description and submissions/history.csv.
    names = "+".join(member.name for member in members)
    summary = {"log_loss": ensemble, "experiments": names, "weights": weights.tolist()}
    write_json({"ensemble": summary}, arguments.out.with_suffix(".json"))
    print(f"wrote {arguments.out}: kagglecls-submit --submission {arguments.out} --message ...")
    return 0


def _check_workspace(member: Member, reorganised: Path, raw: Path) -> None:
    """The submission is built with the workspace's classes and sample: they must be the members'."""
    try:
        classes = tuple(read_class_info(reorganised).classes)
    except FileNotFoundError:
        raise EnsembleError(
            f"{reorganised}/classes.json not found: run `dvc repro` (or `dvc exp apply` one of the experiments) "
            "first, so the workspace holds the competition the members predicted"
        ) from None
    if classes != member.classes or not (raw / "sample_submission.csv").is_file():
        raise EnsembleError(
            f"the workspace's competition ({reorganised}, {raw}) is not the one {member.name} predicted "
            "(other classes, or no sample_submission.csv): check out or `dvc exp apply` one of the members first"
        )
