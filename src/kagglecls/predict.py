"""Stages predict_tta and submission: TTA, interpretation, and the Kaggle file."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from kagglecls import images, inference, plots
from kagglecls.atomic import write_file
from kagglecls.data import EvalPreset, TrainPreset, TtaViews
from kagglecls.loading import (
    image_loader,
    load_classifier,
    load_splits,
    normalisation_for,
    step_settings,
    to_device,
)
from kagglecls.params import Params
from kagglecls.training import (
    accuracy,
    log_loss,
    pick_device,
    predict_probabilities,
    seed_everything,
)

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
    temperature = None
    if params.predict_tta.calibration == "temperature":
        # Fitted on valid, so the calibrated valid figure flatters; the test predictions get the same T.
        temperature = inference.fit_temperature(valid, targets)
        valid = inference.apply_temperature(valid, temperature)
        report.update(
            valid_log_loss_uncalibrated=report["valid_log_loss"],
            valid_log_loss=log_loss(valid, targets),
            temperature=temperature,
        )
    _interpret(params, valid, splits["valid"], classes, reorganised, cache_dir, plots_dir)
    plots.write_json(report, metrics)
    test = splits["test"]
    test_probabilities = (
        _tta(params, model, reorganised, cache_dir, test, size=size, settings=settings)[0]
        if test.rows
        else np.zeros((0, len(classes)))
    )
    if temperature is not None:
        test_probabilities = inference.apply_temperature(test_probabilities, temperature)
    _save_predictions(predictions, ids=[row.id for row in test.rows], probabilities=test_probabilities)
    log.info(
        "predict_tta: valid log loss %.4f accuracy %.4f (TTA, %d augmented passes)",
        report["valid_log_loss"],
        report["valid_accuracy"],
        params.predict_tta.n_aug,
    )


def _tta(params, model, reorganised, cache_dir, split, *, size, settings) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(TTA probabilities, plain-pass probabilities) for the split's images, in its order: one pass over the
    images, each decoded once into its plain view and n_aug augmented ones."""
    normalisation = normalisation_for(params.model.arch)
    views = TtaViews(
        plain=EvalPreset(size=size, normalisation=normalisation),
        augmented=TrainPreset(
            size=size,
            augmentation=params.finetune.augmentation,
            max_zoom=params.finetune.max_zoom,
            normalisation=normalisation,
        ),
        n_aug=params.predict_tta.n_aug,
    )
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
    return inference.combine_tta(plain, augmented, beta=params.predict_tta.beta), plain


def _interpret(params, probabilities, split, classes, reorganised, cache_dir, plots_dir: Path) -> None:  # noqa: ANN001
    targets = split.labels
    counts = inference.confusion_matrix(targets, probabilities.argmax(axis=1), n_classes=len(classes))
    plots.plot_confusion(counts, classes, path=plots_dir / "confusion_matrix.png")
    plots.write_csv(
        [
            {"actual": classes[t], "predicted": classes[p]}
            for t, p in zip(targets, probabilities.argmax(axis=1), strict=True)
        ],
        plots_dir / "confusion.csv",
        columns=("actual", "predicted"),
    )
    pairs = inference.most_confused(counts, classes)
    plots.write_csv(
        [asdict(pair) for pair in pairs],
        plots_dir / "most_confused.csv",
        columns=("actual", "predicted", "count"),
    )
    worst = inference.top_losses(probabilities, targets, k=params.predict_tta.top_losses)
    pictures = [images.load_rgb(reorganised / split.rows[item.index].file, short_side=160) for item in worst]
    titles = [
        f"actual {classes[item.actual]}\npredicted {classes[item.predicted]} "
        f"(p={item.probability_of_predicted:.2f}, loss={item.loss:.2f})"
        for item in worst
    ]
    plots.plot_image_grid(pictures, titles, path=plots_dir / "top_losses.png")


def _save_predictions(path: Path, *, ids: list[str], probabilities: np.ndarray) -> None:
    with write_file(path) as temporary:
        np.savez(temporary, ids=np.array(ids, dtype=str), probabilities=probabilities.astype(np.float64))
