"""Checkpoints a fit saves each epoch and resumes from, the snapshots it may keep, and saving weights."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from kagglecls.atomic import write_file
from kagglecls.device import unwrapped

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    record: dict[str, float]  # epoch and valid figures
    state: dict[str, torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, record: dict[str, float]) -> Snapshot:
        # On the CPU, so a snapshot takes no GPU memory the training needs.
        state = {
            key: value.detach().to("cpu", copy=True) for key, value in unwrapped(model).state_dict().items()
        }
        return cls(record=dict(record), state=state)


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    history: list[dict[str, float]],
    fingerprint: str,
    best: Snapshot | None = None,
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history_json": json.dumps(history),
        "fingerprint": fingerprint,
    }
    if best is not None:
        state.update(best_record_json=json.dumps(best.record), best_model=best.state)
    save_atomic(state, path)


def save_atomic(state: dict, path: Path) -> None:
    """torch.save through atomic.write_file. Through a file object the archive's inner folder is always
    "archive" (not named after the temporary file), so the same weights give the same bytes for DVC."""
    with write_file(path) as temporary, open(temporary, "wb") as handle:
        torch.save(state, handle)


def resume(
    checkpoint: Path | None, fingerprint: str, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[list[dict[str, float]], int, Snapshot | None]:
    """(history, epochs done, kept snapshot) from `checkpoint` if it was saved by this fingerprint, else a
    fresh start; model and optimizer are loaded from it."""
    if checkpoint is None or not checkpoint.is_file():
        return [], 0, None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        log.info("checkpoint %s is from other inputs, params or code: starting over", checkpoint)
        return [], 0, None
    unwrapped(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    log.info("resuming from %s after epoch %d", checkpoint, state["epoch"])
    best = None
    if "best_model" in state:
        best = Snapshot(record=json.loads(state["best_record_json"]), state=state["best_model"])
    return json.loads(state["history_json"]), int(state["epoch"]), best


def fingerprint_of(*parts: object) -> str:
    """A short hash of the parts (params, input hashes) and the code (this package and the running script):
    a checkpoint left by other inputs or code is never resumed."""
    digest = hashlib.sha256(json.dumps([str(part) for part in parts]).encode())
    script = Path(sys.argv[0])
    sources = sorted(Path(__file__).parent.glob("*.py")) + ([script] if script.suffix == ".py" else [])
    for path in sources:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
