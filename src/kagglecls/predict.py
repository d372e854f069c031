"""Stage predict_tta: test-time augmentation, and interpretation (confusion matrix, most confused pairs, top
losses)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kagglecls import images, plots
from kagglecls.atomic import write_csv, write_file, write_json
from kagglecls.data import TtaViews
from kagglecls.device import pick_device, seed_everything
from kagglecls.loading import (
    image_loader,
    load_classifier,
    load_splits,
    presets,
    step_settings,
    to_device,
)
from kagglecls.params import Params
from kagglecls.training import accuracy, log_loss, predict_probabilities

log = logging.getLogger(__name__)


def predict_tta(
    *,
    params: Params,
    reorganised: Path,
    cache_dir: Path,
    model_path: Path,
    metrics: Path,
    plots_dir: Path,
    predictions: Path,
) -> None:
    """TTA on valid (metrics, confusion matrix, top losses) and on test (class probabilities)."""
    seed_everything(params.base.seed)
    device = pick_device(params.base.device)
    splits, classes = load_splits(reorganised)
    model, _ = load_classifier(params, head_path=model_path, weights_key="model")
    settings = step_settings(params, device)
    model = to_device(model, settings)
    size = params.finetune.sizes[-1]
    valid, valid_plain = _tta(
        params, model, reorganised, cache_dir, splits["valid"], size=size, settings=settings
    )
    targets = splits["valid"].labels
    report = {
        "valid_log_loss": log_loss(valid, targets),
        "valid_accuracy": accuracy(valid, targets),
        "valid_log_loss_no_tta": log_loss(valid_plain, targets),
        "valid_accuracy_no_tta": accuracy(valid_plain, targets),
        "n_aug": params.predict_tta.n_aug,
    }
    _interpret(params, valid, splits["valid"], classes, reorganised, cache_dir, plots_dir)
    write_json(report, metrics)
    test = splits["test"]
    test_probabilities = (
        _tta(params, model, reorganised, cache_dir, test, size=size, settings=settings)[0]
        if test.rows
        else np.zeros((0, len(classes)))
    )
    with write_file(predictions) as temporary:
        ids = np.array([row.id for row in test.rows], dtype=str)
        np.savez(temporary, ids=ids, probabilities=test_probabilities.astype(np.float64))
    log.info(
        "predict_tta: valid log loss %.4f accuracy %.4f (TTA, %d augmented passes)",
        report["valid_log_loss"],
        report["valid_accuracy"],
        params.predict_tta.n_aug,
    )


def _tta(params, model, reorganised, cache_dir, split, *, size, settings) -> tuple[np.ndarray, np.ndarray]:
    """(TTA probabilities, plain-pass probabilities) for the split's images, in its order: one pass over the
    images, each decoded once into its plain view and n_aug augmented ones."""
    augmented, plain = presets(params, params.finetune, size)
    views = TtaViews(plain=plain, augmented=augmented, n_aug=params.predict_tta.n_aug)
    loader = image_loader(
        params,
        reorganised,
        cache_dir,
        split,
        transform=views,
        shuffle=False,
        size=size,
        # About precompute.batch_size images a forward pass, whatever the number of views.
        batch_size=max(1, params.precompute.batch_size // (1 + params.predict_tta.n_aug)),
        seed_offset=1000,
    )
    probabilities, _ = predict_probabilities(model, loader, settings=settings, description="tta", views=True)
    plain, augmented = probabilities[:, 0], list(probabilities[:, 1:].transpose(1, 0, 2))
    return combine_tta(plain, augmented, beta=params.predict_tta.beta), plain


def _interpret(params, probabilities, split, classes, reorganised, cache_dir, plots_dir: Path) -> None:
    targets = split.labels
    counts = confusion_matrix(targets, probabilities.argmax(axis=1), n_classes=len(classes))
    plots.plot_confusion(counts, classes, path=plots_dir / "confusion_matrix.png")
    write_csv(
        [
            {"actual": classes[t], "predicted": classes[p]}
            for t, p in zip(targets, probabilities.argmax(axis=1), strict=True)
        ],
        plots_dir / "confusion.csv",
        columns=("actual", "predicted"),
    )
    pairs = most_confused(counts, classes)
    write_csv(
        [asdict(pair) for pair in pairs],
        plots_dir / "most_confused.csv",
        columns=("actual", "predicted", "count"),
    )
    worst = top_losses(probabilities, targets, k=params.predict_tta.top_losses)
    pictures = [images.load_rgb(reorganised / split.rows[item.index].file, short_side=160) for item in worst]
    titles = [
        f"actual {classes[item.actual]}\npredicted {classes[item.predicted]} "
        f"(p={item.probability_of_predicted:.2f}, loss={item.loss:.2f})"
        for item in worst
    ]
    plots.plot_image_grid(pictures, titles, path=plots_dir / "top_losses.png")


def combine_tta(plain: np.ndarray, augmented: Sequence[np.ndarray], *, beta: float) -> np.ndarray:
    """fastai 2's tta: (1 - beta) x mean of the augmented passes + beta x the plain pass (or the plain
    alone)."""
    if not augmented:
        return plain
    return (1 - beta) * np.mean(np.stack(augmented), axis=0) + beta * plain


def confusion_matrix(targets: np.ndarray, predictions: np.ndarray, *, n_classes: int) -> np.ndarray:
    """counts[true, predicted]."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (targets, predictions), 1)
    return counts


@dataclass(frozen=True)
class ConfusedPair:
    actual: str
    predicted: str
    count: int


def most_confused(counts: np.ndarray, classes: Sequence[str], *, min_count: int = 1) -> list[ConfusedPair]:
    """Off-diagonal cells of the confusion matrix, largest first (ties by class order)."""
    pairs = [
        ConfusedPair(classes[actual], classes[predicted], int(counts[actual, predicted]))
        for actual in range(len(classes))
        for predicted in range(len(classes))
        if actual != predicted and counts[actual, predicted] >= min_count
    ]
    return sorted(pairs, key=lambda pair: -pair.count)


@dataclass(frozen=True)
class TopLoss:
    index: int
    loss: float
    actual: int
    predicted: int
    probability_of_predicted: float


def top_losses(
    probabilities: np.ndarray, targets: np.ndarray, *, k: int, eps: float = 1e-15
) -> list[TopLoss]:
    """The k items with the highest log loss, highest first."""
    losses = -np.log(np.clip(probabilities[np.arange(len(targets)), targets], eps, 1.0))
    order = np.argsort(-losses, kind="stable")[:k]
    predicted = probabilities.argmax(axis=1)
    return [
        TopLoss(
            index=int(index),
            loss=float(losses[index]),
            actual=int(targets[index]),
            predicted=int(predicted[index]),
            probability_of_predicted=float(probabilities[index, predicted[index]]),
        )
        for index in order
    ]
