"""Cross-validation's pieces: stratified folds, each fold's splits and its rows of the precomputed
activations, the folds' test predictions combined, and a stage's summary over its folds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kagglecls.features import split_features
from kagglecls.fitting import StageOutputs, each_fold
from kagglecls.loading import fold_count, load_splits
from kagglecls.manifest import DataError, ManifestRow, stratified_folds, write_manifest
from kagglecls.predict import combine_folds

LABELS = ["a"] * 10 + ["b"] * 7 + ["c"] * 3


def test_folds_are_stratified_and_balanced():
    folds = stratified_folds(LABELS, folds=3, seed=0)
    assert sorted(set(folds)) == [1, 2, 3]
    sizes = Counter(folds)
    assert max(sizes.values()) - min(sizes.values()) <= 1  # 20 images: 7, 7, 6
    for label, count in Counter(LABELS).items():
        per_fold = Counter(fold for fold, item in zip(folds, LABELS, strict=True) if item == label)
        assert max(per_fold.values()) - min(per_fold.get(fold, 0) for fold in (1, 2, 3)) <= 1, label
        assert sum(per_fold.values()) == count


def test_folds_depend_on_the_seed_only():
    assert stratified_folds(LABELS, folds=4, seed=1) == stratified_folds(LABELS, folds=4, seed=1)
    assert len({tuple(stratified_folds(LABELS, folds=4, seed=seed)) for seed in range(5)}) == 5


def test_folds_refuse_more_folds_than_images_and_a_class_of_one():
    with pytest.raises(DataError, match="cv.folds: 21 folds but only 20 training images"):
        stratified_folds(LABELS, folds=21, seed=0)
    with pytest.raises(DataError, match="class 'z' has 1 image"):
        stratified_folds([*LABELS, "z"], folds=3, seed=0)


def _reorganised(tmp_path: Path, rows: list[ManifestRow]) -> Path:
    write_manifest(rows, tmp_path / "manifest.csv")
    (tmp_path / "classes.json").write_text(
        json.dumps({"classes": ["a", "b"], "prior": [0.5, 0.5], "warnings": []})
    )
    return tmp_path


def _row(name: str, label: str, split: str, fold: int) -> ManifestRow:
    return ManifestRow(f"{split}/{name}.png", label, split, name, "0" * 32, 8, 8, fold)


def test_each_fold_holds_out_its_images_and_slices_the_precomputed_rows(tmp_path):
    """cv.folds 3: every labelled image in train/, its fold in the manifest; precompute's train.npy holds them
    in the manifest's order. Fold 2 validates on its own images and trains on the others, rows sliced to match."""
    labels = ["a", "b", "a", "b", "a", "b"]
    folds = [1, 2, 3, 2, 1, 3]
    rows = [
        _row(f"i{n}", label, "train", fold) for n, (label, fold) in enumerate(zip(labels, folds, strict=True))
    ]
    rows.append(_row("t0", "", "test", 0))
    reorganised = _reorganised(tmp_path, rows)
    features = tmp_path / "features"
    features.mkdir()
    np.save(
        features / "train.npy", np.arange(6, dtype=np.float16)[:, None] * np.ones((1, 4), dtype=np.float16)
    )
    np.save(features / "test.npy", np.full((1, 4), 9, dtype=np.float16))

    assert fold_count(reorganised) == 3
    splits, classes = load_splits(reorganised, fold=2)
    assert [row.id for row in splits["valid"].rows] == ["i1", "i3"]
    assert [row.id for row in splits["train"].rows] == ["i0", "i2", "i4", "i5"]
    assert splits["valid"].labels.tolist() == [1, 1] and splits["train"].labels.tolist() == [0, 0, 0, 1]
    assert split_features(features, splits["valid"])[:, 0].tolist() == [1, 3]
    assert split_features(features, splits["train"])[:, 0].tolist() == [0, 2, 4, 5]
    assert split_features(features, splits["test"])[:, 0].tolist() == [9]
    stored, _ = load_splits(reorganised, fold=None)  # what precompute runs over
    assert [len(stored[name].rows) for name in ("train", "valid", "test")] == [6, 0, 1]


def test_one_split_is_fold_one(tmp_path):
    """cv.folds 1: the valid folder's images are fold 1's, the train folder's 0; rows come from each file."""
    rows = [_row("t", "a", "train", 0), _row("u", "b", "train", 0), _row("v", "a", "valid", 1)]
    reorganised = _reorganised(tmp_path, rows)
    assert fold_count(reorganised) == 1
    splits, _ = load_splits(reorganised)
    assert [row.id for row in splits["train"].rows] == ["t", "u"]
    assert [(name, rows.tolist()) for name, rows in splits["train"].parts] == [("train", [0, 1])]
    assert [row.id for row in splits["valid"].rows] == ["v"]
    assert [(name, rows.tolist()) for name, rows in splits["valid"].parts] == [("valid", [0])]


def test_combine_folds_by_probabilities_and_by_logits():
    first = np.array([[0.9, 0.1], [0.5, 0.5]])
    second = np.array([[0.5, 0.5], [0.2, 0.8]])
    np.testing.assert_allclose(combine_folds([first, second], "probabilities"), [[0.7, 0.3], [0.35, 0.65]])
    geometric = np.sqrt(first * second)
    np.testing.assert_allclose(
        combine_folds([first, second], "logits"), geometric / geometric.sum(axis=1, keepdims=True)
    )
    assert combine_folds([first], "logits") is first


def test_a_stage_over_folds_summarises_their_mean(tmp_path):
    rows = [_row(f"i{n}", "ab"[n % 2], "train", n % 2 + 1) for n in range(4)]
    (tmp_path / "reorganised").mkdir()
    reorganised = _reorganised(tmp_path / "reorganised", rows)
    outputs = StageOutputs(model=tmp_path / "head.pt", live=tmp_path / "live", folds=tmp_path / "folds")
    (tmp_path / "live").mkdir()
    seen = []

    def train_fold(fold: int, fold_outputs: StageOutputs) -> dict:
        seen.append((fold, fold_outputs.model, fold_outputs.live))
        return {"log_loss": 0.2 * fold, "accuracy": 1.0 - 0.1 * fold}

    each_fold("train_head", reorganised, outputs, train_fold)
    assert seen == [
        (1, tmp_path / "head.pt", tmp_path / "live"),
        (2, tmp_path / "folds" / "fold2.pt", tmp_path / "folds" / "fold2"),
    ]
    summary = json.loads((tmp_path / "live" / "metrics.json").read_text())["train_head"]
    assert summary == pytest.approx({"log_loss": 0.3, "accuracy": 0.85, "folds": 2})
    per_fold = json.loads((tmp_path / "folds" / "folds.json").read_text())["folds"]
    assert [each["fold"] for each in per_fold] == [1, 2] and per_fold[1]["log_loss"] == pytest.approx(0.4)
