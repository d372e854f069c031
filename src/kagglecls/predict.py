"""Stage predict_tta: test-time augmentation, and interpretation (confusion matrix, most confused pairs, top
losses). Also the `kagglecls predict` command (`python -m kagglecls.predict MODEL IMAGES...`): the exported
model's classes for image files, with or without the same TTA."""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from kagglecls import images, plots
from kagglecls.atomic import write_csv, write_file
from kagglecls.data import EvalPreset, ImageDataset, Normalisation, TrainPreset, TtaViews, make_loader
from kagglecls.device import StepSettings, pick_device, seed_everything
from kagglecls.errors import UserError
from kagglecls.export import ExportInfo, load_export
from kagglecls.loading import (
    ALL_DATA,
    Split,
    fold_count,
    fold_model,
    image_loader,
    load_classifier,
    load_splits,
    presets,
    step_settings,
    to_device,
    trained_augmentation,
)
from kagglecls.params import Params
from kagglecls.tracking import StageLive
from kagglecls.training import accuracy, log_loss, predict_probabilities

log = logging.getLogger(__name__)

TTA_SEED_OFFSET = 1000  # TTA's augmented views are seeded from base.seed + this and each image's position
VIEWS_PER_BATCH = 128  # about precompute.batch_size's default: views in one forward pass of the command


@dataclass
class FoldPredictions:
    """What predict_tta's models predicted: the held-out images (with folds, out-of-fold) and test."""

    held_out: Split  # the images, in the order of the rows below
    tta: np.ndarray
    plain: np.ndarray  # the plain pass alone, without TTA
    test: Split
    test_folds: list[np.ndarray]  # each fold's test probabilities
    classes: list[str]


def predict_tta(
    *,
    params: Params,
    reorganised: Path,
    cache_dir: Path,
    model_path: Path,
    live_dir: Path,
    predictions: Path,
    model_folds: Path,
    valid_predictions: Path | None = None,
) -> None:
    """TTA of each fold's model (`model_path`, or model_folds/fold<k>.pt) on the images it held out, and on
    test. The held-out predictions give the metrics (with k > 1 folds: out-of-fold, the CV figures over every
    labelled image), confusion matrix, most confused pairs and top losses, in dvclive's folder `live_dir`, and
    their probabilities in `valid_predictions`, for `kagglecls ensemble`. The test probabilities go to
    `predictions` (`submitted_probabilities`)."""
    seed_everything(params.base.seed)
    settings = step_settings(params, pick_device(params.base.device))
    live = StageLive("predict_tta", live_dir)
    folds = fold_count(reorganised)
    predicted = _fold_predictions(params, reorganised, cache_dir, model_path, model_folds, folds, settings)
    valid, targets, classes = predicted.tta, predicted.held_out.labels, predicted.classes
    report = {
        "log_loss": log_loss(valid, targets),
        "accuracy": accuracy(valid, targets),
        "log_loss_no_tta": log_loss(predicted.plain, targets),
        "accuracy_no_tta": accuracy(predicted.plain, targets),
        **({"folds": folds} if folds > 1 else {}),
    }
    subset = "out-of-fold" if folds > 1 else "valid"
    _interpret(params, valid, predicted.held_out, classes, reorganised, live, subset=subset)
    if valid_predictions is not None:
        with write_file(valid_predictions) as temporary:
            np.savez(
                temporary,
                ids=np.array([row.id for row in predicted.held_out.rows], dtype=str),
                probabilities=valid.astype(np.float64),
                targets=targets,
                classes=np.array(classes, dtype=str),
            )
    live.summarise(**report)
    live.end()
    all_data_model = fold_model(model_path, model_folds, ALL_DATA)
    submitted, saved = submitted_probabilities(
        params, predicted, all_data_model, reorganised=reorganised, cache_dir=cache_dir, settings=settings
    )
    with write_file(predictions) as temporary:
        ids = np.array([row.id for row in predicted.test.rows], dtype=str)
        np.savez(temporary, ids=ids, probabilities=submitted.astype(np.float64), **saved)
    log.info(
        "predict_tta: %s log loss %.4f accuracy %.4f (TTA, %d augmented passes)",
        f"{subset} ({folds} folds)" if folds > 1 else subset,
        report["log_loss"],
        report["accuracy"],
        params.predict_tta.n_aug,
    )


def _fold_predictions(
    params, reorganised, cache_dir, model_path, model_folds, folds, settings
) -> FoldPredictions:
    """Each fold's model with TTA on the images it holds out and on test."""
    size = params.finetune.sizes[-1]
    held_out, tta, plain, test_folds = [], [], [], []
    for fold in range(1, folds + 1):
        splits, classes = load_splits(reorganised, fold)
        path = fold_model(model_path, model_folds, fold)
        model = to_device(load_classifier(params, head_path=path, weights_key="model")[0], settings)
        augmentation = trained_augmentation(params.finetune, path)
        valid, valid_plain = _tta(
            params,
            model,
            reorganised,
            cache_dir,
            splits["valid"],
            size=size,
            settings=settings,
            augmentation=augmentation,
        )
        held_out.append(splits["valid"])
        tta.append(valid)
        plain.append(valid_plain)
        test_folds.append(
            _test_tta(
                params, model, reorganised, cache_dir, splits["test"], len(classes), settings, augmentation
            )
        )
        if folds > 1:
            fold_loss = log_loss(valid, splits["valid"].labels)
            log.info("predict_tta: fold %d valid log loss %.4f (TTA)", fold, fold_loss)
    held = Split(
        [row for split in held_out for row in split.rows],
        np.concatenate([split.labels for split in held_out]),
    )
    return FoldPredictions(
        held, np.concatenate(tta), np.concatenate(plain), splits["test"], test_folds, classes
    )


def _test_tta(
    params, model, reorganised, cache_dir, test: Split, n_classes: int, settings, augmentation: str
) -> np.ndarray:
    if not test.rows:
        return np.zeros((0, n_classes))
    size = params.finetune.sizes[-1]
    return _tta(
        params, model, reorganised, cache_dir, test, size=size, settings=settings, augmentation=augmentation
    )[0]


def submitted_probabilities(
    params: Params,
    predicted: FoldPredictions,
    all_data_model: Path,
    *,
    reorganised: Path,
    cache_dir: Path,
    settings: StepSettings,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The submission's test probabilities: the folds' combined as cv.ensemble says; with final.train_on_all,
    the model of all the data's (`all_data_model`) instead (final.submit: all), or with the folds'
    (all_and_folds: one more member). Also what is saved beside them to compare the ways of combining them:
    each fold's (`folds`) and the model of all the data's (`all`)."""
    test_folds = predicted.test_folds
    with_all = params.final.train_on_all
    saved = {"folds": np.stack(test_folds)} if len(test_folds) > 1 or with_all else {}
    if not with_all:
        return combine_folds(test_folds, params.cv.ensemble), saved
    model, _ = load_classifier(params, head_path=all_data_model, weights_key="model")
    model = to_device(model, settings)
    augmentation = trained_augmentation(params.finetune, all_data_model)
    saved["all"] = _test_tta(
        params, model, reorganised, cache_dir, predicted.test, len(predicted.classes), settings, augmentation
    )
    members = [saved["all"], *test_folds] if params.final.submit == "all_and_folds" else [saved["all"]]
    return combine_folds(members, params.cv.ensemble), saved


def combine_folds(probabilities: Sequence[np.ndarray], how: str) -> np.ndarray:
    """The folds' models' test probabilities combined (cv.ensemble): their mean, or the softmax of the mean
    of their logs (`logits`: a geometric mean, renormalised; the same as averaging logits)."""
    if len(probabilities) == 1:
        return probabilities[0]
    stacked = np.stack(probabilities)
    if how == "probabilities":
        return stacked.mean(axis=0)
    mean_log = np.log(np.clip(stacked, 1e-15, None)).mean(axis=0)
    combined = np.exp(mean_log - mean_log.max(axis=1, keepdims=True))
    return combined / combined.sum(axis=1, keepdims=True)


def _tta(
    params, model, reorganised, cache_dir, split, *, size, settings, augmentation: str
) -> tuple[np.ndarray, np.ndarray]:
    """(TTA probabilities, plain-pass probabilities) for the split's images, in its order: one pass over the
    images, each decoded once into its plain view and n_aug views augmented as the model was trained."""
    augmented, plain = presets(params, replace(params.finetune, augmentation=augmentation), size)
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
        seed_offset=TTA_SEED_OFFSET,
    )
    return tta_probabilities(model, loader, beta=params.predict_tta.beta, settings=settings)


def tta_probabilities(
    model: nn.Module, loader, *, beta: float, settings: StepSettings
) -> tuple[np.ndarray, np.ndarray]:
    """(TTA, plain) probabilities from a loader of TtaViews: the plain view first, then the augmented ones."""
    probabilities, _ = predict_probabilities(model, loader, settings=settings, description="tta", views=True)
    plain, augmented = probabilities[:, 0], list(probabilities[:, 1:].transpose(1, 0, 2))
    return combine_tta(plain, augmented, beta=beta), plain


def _interpret(params, probabilities, split, classes, reorganised, live: StageLive, *, subset: str) -> None:
    targets, predicted = split.labels, probabilities.argmax(axis=1)
    live.log_confusion(
        [classes[t] for t in targets],
        [classes[p] for p in predicted],
        title=f"confusion matrix ({subset}, TTA)",
    )
    counts = confusion_matrix(targets, predicted, n_classes=len(classes))
    write_csv(
        [asdict(pair) for pair in most_confused(counts, classes)],
        live.directory / "most_confused.csv",
        columns=("actual", "predicted", "count"),
    )
    worst = top_losses(probabilities, targets, k=params.predict_tta.top_losses)
    pictures = [images.load_rgb(reorganised / split.rows[item.index].file, short_side=160) for item in worst]
    titles = [
        f"actual {classes[item.actual]}\npredicted {classes[item.predicted]} "
        f"(p={item.probability_of_predicted:.2f}, loss={item.loss:.2f})"
        for item in worst
    ]
    live.log_image("top_losses.png", plots.image_grid(pictures, titles))


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


# The `kagglecls predict` command: the exported model on image files.


def predict_files(
    network: nn.Module, info: ExportInfo, files: Sequence[Path], *, tta: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, plain-pass probabilities), (images, classes) each, of the exported network for `files`,
    each prepared as predict_tta prepares an image: the resize cache's JPEG, the plain view and, with `tta`,
    n_aug augmented views seeded from the seed and the file's position, combined by combine_tta."""
    normalisation = Normalisation(mean=info.mean, std=info.std)
    n_aug = info.tta.n_aug if tta else 0
    views = TtaViews(
        plain=EvalPreset(size=info.image_size, normalisation=normalisation),
        augmented=TrainPreset(
            size=info.image_size,
            augmentation=info.tta.augmentation,
            max_zoom=info.tta.max_zoom,
            normalisation=normalisation,
        ),
        n_aug=n_aug,
    )
    with tempfile.TemporaryDirectory(prefix="kagglecls-predict-") as cache:
        resized = [Path(cache) / f"{index}.jpg" for index in range(len(files))]
        errors = images.write_resized_cache(
            files, resized, short_side=info.cache_short_side, workers=images.image_workers()
        )
        unreadable = [error for error in errors if error is not None]
        if unreadable:
            more = f" (and {len(unreadable) - 1} more unreadable)" if len(unreadable) > 1 else ""
            raise images.BadImageError(unreadable[0] + more)
        loader = make_loader(
            ImageDataset(resized, [-1] * len(resized), views),  # -1: unlabelled, as test rows
            batch_size=max(1, VIEWS_PER_BATCH // (1 + n_aug)),
            shuffle=False,
            seed=info.tta.seed + TTA_SEED_OFFSET,
            num_workers=0,
        )
        # On the CPU; predict_probabilities' BatchNorm fusion finds nothing left to fuse in the exported graph.
        settings = StepSettings(device=torch.device("cpu"))
        return tta_probabilities(network, loader, beta=info.tta.beta, settings=settings)


def image_files(paths: Sequence[Path]) -> list[Path]:
    """The files named, in order, and for each folder named the image files under it (any depth, by path,
    hidden ones skipped); a folder without any is an error."""
    readable = {suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(
                file
                for file in path.rglob("*")
                if file.is_file()
                and file.suffix.lower() in readable
                and not any(part.startswith(".") for part in file.relative_to(path).parts)
            )
            if not inside:
                raise UserError(f"{path}: no image files in this folder (expected .jpg, .png, ... files)")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return found


def top_k_lines(
    files: Sequence[Path], probabilities: np.ndarray, classes: Sequence[str], *, k: int
) -> list[str]:
    """One line per image: `file: class p, class p, ...`, the k most probable classes first."""
    lines = []
    for file, row in zip(files, probabilities, strict=True):
        best = np.argsort(-row, kind="stable")[:k]
        lines.append(f"{file}: " + ", ".join(f"{classes[index]} {row[index]:.4f}" for index in best))
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="the exported model: models/export.pt2 after dvc repro")
    parser.add_argument(
        "images", type=Path, nargs="+", help="image files and/or folders (searched at any depth)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes printed per image (default 5)")
    parser.add_argument(
        "--csv", type=Path, help="write a CSV instead: one row per image, file then each class's probability"
    )
    parser.add_argument(
        "--tta", action="store_true", help="test-time augmentation with the settings inside the model file"
    )


def run(arguments: argparse.Namespace) -> int:
    """The command's body: 0, or 2 after one line on stderr for an error a user can cause."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if arguments.top_k < 1:
        print(f"kagglecls predict: error: --top-k {arguments.top_k}, expected 1 or more", file=sys.stderr)
        return 2
    try:
        network, info = load_export(arguments.model)
        files = image_files(arguments.images)
        probabilities, _ = predict_files(network, info, files, tta=arguments.tta)
    except UserError as error:
        print(f"kagglecls predict: error: {error}", file=sys.stderr)
        return 2
    if arguments.csv is not None:
        rows = [
            {"file": str(file), **dict(zip(info.classes, row.tolist(), strict=True))}
            for file, row in zip(files, probabilities, strict=True)
        ]
        write_csv(rows, arguments.csv, columns=("file", *info.classes))
    else:
        print("\n".join(top_k_lines(files, probabilities, info.classes, k=arguments.top_k)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kagglecls.predict", description="The exported model's classes for image files."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
