"""How the training stages choose their lr (fixed, lr_find's suggestion, or the documented fallback), and which
epochs they validate."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from kagglecls import fitting
from kagglecls.features import PIXEL_GRID
from kagglecls.loading import trained_augmentation
from kagglecls.lr_find import LrFindResult
from kagglecls.manifest import ManifestRow, write_manifest
from kagglecls.params import FinetuneParams, FitParams, LrFindParams


def test_choose_lr_falls_back_with_a_warning_where_the_sweep_cannot_suggest(monkeypatch, caplog):
    stopped_early = LrFindResult(lrs=[1e-5, 1e-4, 1e-3], losses=[1.0, 1.2, 9.0])  # diverged at step 3
    monkeypatch.setattr(fitting, "lr_find", lambda *arguments, **options: stopped_early)
    fit_params = FitParams(lr="auto", lr_find=LrFindParams(fallback_lr=3e-4))
    chosen = fitting.choose_lr(fit_params, model=None, optimizer=None, loader=None, settings=None, live=None)
    assert chosen == (3e-4, "fallback")
    assert "no suggestion (the sweep stopped after 3 steps, too few to read)" in caplog.text
    assert fitting.choose_lr(
        FitParams(lr=0.01), model=None, optimizer=None, loader=None, settings=None, live=None
    ) == (0.01, "fixed")


def test_plan_fit_validates_the_cycle_ends_unless_asked_for_every_epoch():
    finetune = FinetuneParams(n_cycle=3, cycle_len=1, cycle_mult=2)  # 1 + 2 + 4 epochs
    plan = fitting.plan_fit(finetune, steps_per_epoch=5, seed=1)
    assert plan.epochs == 7
    assert plan.snapshot_epochs == (0, 1, 3, 7)
    assert plan.valid_epochs == (1, 3, 7)
    last = fitting.plan_fit(replace(finetune, keep="last_epoch"), steps_per_epoch=5, seed=1)
    assert (last.snapshot_epochs, last.valid_epochs) == ((), (1, 3, 7))
    every = fitting.plan_fit(replace(finetune, validate="every_epoch"), steps_per_epoch=5, seed=1)
    assert (every.snapshot_epochs, every.valid_epochs) == ((0, 1, 3, 7), None)
    one_cycle = fitting.plan_fit(replace(finetune, schedule="one_cycle"), steps_per_epoch=5, seed=1)
    assert (one_cycle.snapshot_epochs, one_cycle.valid_epochs) == ((0, 7), (7,))
    # The head's epochs (no keep, no validate): every epoch, the last kept.
    head = fitting.plan_fit(FitParams(n_cycle=2, cycle_len=1, cycle_mult=2), steps_per_epoch=5, seed=1)
    assert (head.epochs, head.snapshot_epochs, head.valid_epochs) == (3, (), None)


def test_plan_fit_of_each_size_takes_that_sizes_n_cycle():
    finetune = FinetuneParams(sizes=(64, 96), n_cycle=(2, 3), cycle_len=1, cycle_mult=2)
    small, large = (
        fitting.plan_fit(finetune.for_round(index), steps_per_epoch=5, seed=1) for index in (0, 1)
    )
    assert (small.epochs, small.snapshot_epochs) == (3, (0, 1, 3))  # 1 + 2 epochs at 64 px
    assert (large.epochs, large.snapshot_epochs) == (7, (0, 1, 3, 7))  # 1 + 2 + 4 at 96 px


def test_augmentation_auto_drops_flips_where_a_mirror_raises_the_valid_log_loss():
    assert fitting.augmentation_for(0.50, 0.52) == "side_on"  # photos: a mirror keeps the class
    assert fitting.augmentation_for(0.50, 0.50 * fitting.MIRROR_TOLERANCE) == "side_on"
    assert fitting.augmentation_for(0.50, 0.50 * fitting.MIRROR_TOLERANCE + 1e-6) == "basic"
    assert fitting.augmentation_for(0.60, 1.90) == "basic"  # digits: a mirrored 2 is no 2


def _pixel_competition(tmp_path, bright_half) -> tuple:
    """A reorganised folder of 40 training and 20 valid images, two classes, and precompute's pixel grids:
    each image noise, brighter over the half of the grid `bright_half(label)` gives."""
    rng = np.random.default_rng(0)
    rows, grids = [], {"train": [], "valid": []}
    for split, count in (("train", 40), ("valid", 20)):
        for index in range(count):
            label = "ab"[index % 2]
            rows.append(
                ManifestRow(
                    f"{split}/{split}{index}.png",
                    label,
                    split,
                    f"{split}{index}",
                    "0" * 32,
                    8,
                    8,
                    int(split == "valid"),
                )
            )
            grid = rng.normal(size=(3, PIXEL_GRID, PIXEL_GRID))
            grid[bright_half(label)] += 1.5
            grids[split].append(grid.ravel())
    write_manifest(rows, tmp_path / "manifest.csv")
    (tmp_path / "classes.json").write_text(
        json.dumps({"classes": ["a", "b"], "prior": [0.5, 0.5], "warnings": []})
    )
    features = tmp_path / "features"
    features.mkdir()
    for split, values in grids.items():
        np.save(features / f"{split}_pixels.npy", np.array(values, dtype=np.float16))
    return tmp_path, features


@pytest.mark.parametrize(
    ("bright_half", "expected"),
    [
        (lambda label: np.s_[:, :, :8] if label == "a" else np.s_[:, :, 8:], "basic"),  # left or right
        (lambda label: np.s_[:, :8, :] if label == "a" else np.s_[:, 8:, :], "side_on"),  # top or bottom
    ],
    ids=["left_or_right", "top_or_bottom"],
)
def test_choose_augmentation_drops_flips_only_where_the_class_is_left_or_right(
    tmp_path, bright_half, expected
):
    reorganised, features = _pixel_competition(tmp_path, bright_half)
    augmentation, figures = fitting.choose_augmentation(reorganised, features)
    assert augmentation == expected
    assert figures["mirror_check_log_loss"] < 0.3  # the check's classifier tells the classes apart
    ratio = figures["mirror_check_log_loss_mirrored"] / figures["mirror_check_log_loss"]
    assert ratio > 3 if expected == "basic" else ratio < 1.2


def test_trained_augmentation_is_the_stages_own_or_else_the_models(tmp_path):
    chosen, silent = tmp_path / "chosen.pt", tmp_path / "silent.pt"
    torch.save({"model": {}, "classes": ["a"], "augmentation": "basic"}, chosen)
    torch.save({"model": {}, "classes": ["a"]}, silent)
    auto, top_down = FinetuneParams(augmentation="auto"), FinetuneParams(augmentation="top_down")
    assert trained_augmentation(auto, chosen) == "basic"
    assert trained_augmentation(auto, silent) == "side_on"  # a model saved before the choice was recorded
    assert trained_augmentation(top_down, chosen) == "top_down"
