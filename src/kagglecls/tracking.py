"""What a stage reports, through dvclive, in dvclive/<stage>/: each epoch's figures as they come
(plots/metrics/*.tsv, so they show while `dvc exp run` trains), the stage's summary under its own name
(metrics.json: what `dvc exp show` lists as `<stage>.log_loss`, ...), and its plots and images. Only the
process that writes (rank 0 under torchrun) opens one."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

# Each epoch's figures, logged as dvclive step metrics; x is the epoch (the stage's, counted across sizes).
EPOCH_FIGURES = ("train_loss", "valid_log_loss", "valid_accuracy", "lr", "image_size")


class StageLive:
    def __init__(self, stage: str, directory: Path) -> None:
        self.stage, self.directory = stage, directory
        from dvclive import Live  # here, not at import: `kagglecls predict` imports this module without DVC

        # No dvc.yaml of dvclive's (dvc.yaml declares these files) and no experiment of its own (DVC runs it).
        self.live = Live(dir=str(directory), dvcyaml=None, save_dvc_exp=False, report=None)

    def log_epoch(self, record: Mapping[str, float]) -> None:
        """One epoch's figures (epoch 0: the valid figures of the weights a stage starts from), and the summary
        so far: that epoch's valid figures (a model of all the data has none)."""
        self.live.step = int(record["epoch"])
        for name in EPOCH_FIGURES:
            if name in record:
                self.live.log_metric(name, record[name])
        if "valid_log_loss" in record:
            self.summarise(log_loss=record["valid_log_loss"], accuracy=record["valid_accuracy"])

    def summarise(self, **figures: float) -> None:
        """metrics.json: {stage: figures} (dvclive adds the last step)."""
        self.live.summary = {self.stage: figures}
        self.live.make_summary()

    def log_curve(self, name: str, rows: list[dict], *, x: str, y: str, title: str) -> None:
        """A curve that is not per epoch (lr_find's loss against lr): plots/custom/<name>.json."""
        self.live.log_plot(name, rows, x=x, y=y, title=title, x_label=x, y_label=y)

    def log_confusion(self, actual: Sequence[str], predicted: Sequence[str], *, title: str) -> None:
        """plots/sklearn/confusion_matrix.json: a row per item, for DVC's confusion template."""
        self.live.log_sklearn_plot("confusion_matrix", list(actual), list(predicted), title=title)

    def log_image(self, name: str, image: Image.Image) -> None:
        """plots/images/<name>."""
        self.live.log_image(name, image)

    def end(self) -> None:
        self.live.end()
