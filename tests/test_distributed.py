"""DistributedDataParallel on CPU: 2 processes (gloo) started by torchrun, as a user would on several GPUs.

The library's own fit / init_distributed / SeededSampler train a tiny network on 2 ranks; both end with the
same weights, equal to one process training on the two ranks' batches together. Then `dvc repro` with
base.nproc 2 runs train_augmented and finetune as 2 torchrun processes each on a tiny project, and each
stage writes its files once.

This file is also the torchrun worker: `python -m torch.distributed.run ... tests/test_distributed.py IMAGES OUT`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from project_fixture import REPO, TINY_PARAMS, environment_for, make_project, merge, run, stages_run
from torch import nn

from kagglecls.data import EvalPreset, ImageDataset, Normalisation, SeededSampler, TrainPreset, make_loader
from kagglecls.device import SINGLE_PROCESS, DistributedContext, StepSettings, init_distributed
from kagglecls.fitting import make_optimizer
from kagglecls.loading import load_classifier
from kagglecls.params import load_params
from kagglecls.schedule import make_schedule
from kagglecls.training import FitPlan, fit

N_ITEMS = 24  # a multiple of 2 ranks x 4 per batch: no rank pads and no batch is dropped
PER_RANK_BATCH = 4
EPOCHS = 2
IMAGE_SIZE = 16  # px
NORMALISATION = Normalisation(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


# ---------------------------------------------------------------- what each rank runs


def _write_images(folder: Path) -> None:
    """N_ITEMS 20x20 PNGs named <index>_<label>.png; the label brightens one colour channel."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for index in range(N_ITEMS):
        label = index % 3
        pixels = generator.integers(0, 60, size=(20, 20, 3))
        pixels[..., label] += 150
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{index:02d}_{label}.png")


def _tiny_network(seed: int) -> nn.Module:
    # No BatchNorm and no dropout: then 2 ranks of 4 are exactly 1 process of 8 (batch statistics would differ).
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, kernel_size=3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _train(
    images: Path, *, context: DistributedContext, batch_size: int, checkpoint: Path | None
) -> tuple[nn.Module, list[dict], list[int]]:
    """Weights, history and this rank's epoch-0 sampler indices after EPOCHS epochs of the library's fit."""
    files = sorted(images.glob("*.png"))
    labels = [int(path.stem.split("_")[1]) for path in files]
    augmentation = TrainPreset(
        size=IMAGE_SIZE, augmentation="side_on", max_zoom=1.1, normalisation=NORMALISATION
    )
    train_loader = make_loader(
        ImageDataset(files, labels, augmentation),
        batch_size=batch_size,
        shuffle=True,
        seed=3,
        num_workers=0,
        drop_last=True,
        rank=context.rank,
        world_size=context.world_size,
    )
    valid_loader = make_loader(
        ImageDataset(files, labels, EvalPreset(size=IMAGE_SIZE, normalisation=NORMALISATION)),
        batch_size=8,
        shuffle=False,
        seed=3,
        num_workers=0,
    )
    model = _tiny_network(seed=context.rank)  # each rank starts apart: DDP must broadcast rank 0's weights
    trained = nn.parallel.DistributedDataParallel(model) if context.enabled else model
    optimizer = make_optimizer([list(model.parameters())], [0.01], kind="adam", weight_decay=0.01)
    steps = len(train_loader)
    schedule = make_schedule(
        "sgdr", steps_per_epoch=steps, n_cycle=1, cycle_len=EPOCHS, cycle_mult=1, warmup=False
    )
    result = fit(
        trained,
        optimizer,
        plan=FitPlan(epochs=EPOCHS, steps_per_epoch=steps, schedule=schedule, seed=3),
        train_loader=train_loader,
        valid_loader=valid_loader,
        settings=StepSettings(device=torch.device("cpu")),
        checkpoint=checkpoint,
        fingerprint="ddp test",
        context=context,
    )
    train_loader.sampler.set_epoch(0)
    return model, result.history, [index for index, _ in train_loader.sampler]


def _worker(images: Path, out: Path) -> None:
    """One torchrun rank: train, then save this rank's weights, history and shard for the test to compare."""
    context = init_distributed("cpu")
    model, history, indices = _train(
        images, context=context, batch_size=PER_RANK_BATCH, checkpoint=out / "checkpoint.pt"
    )
    torch.save(model.state_dict(), out / f"rank{context.rank}.pt")
    record = {"history": history, "indices": indices, "world_size": context.world_size}
    (out / f"rank{context.rank}.json").write_text(json.dumps(record))
    torch.distributed.destroy_process_group()


# ---------------------------------------------------------------- two ranks of the library's fit


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where both torchrun ranks left rank<r>.pt, rank<r>.json and rank 0 the checkpoint."""
    root = tmp_path_factory.mktemp("ddp")
    _write_images(root / "images")
    (root / "out").mkdir()
    run([*TORCHRUN, str(Path(__file__)), str(root / "images"), str(root / "out")], REPO)
    return root


def _record(ranks: Path, rank: int) -> dict:
    return json.loads((ranks / "out" / f"rank{rank}.json").read_text())


def test_both_ranks_end_with_the_same_weights(ranks: Path) -> None:
    weights = [torch.load(ranks / "out" / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert list(weights[0]) == ["0.weight", "0.bias", "4.weight", "4.bias"]
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    # Not trivially equal: the ranks started from different weights, and training moved them.
    start = [_tiny_network(seed=rank).state_dict() for rank in (0, 1)]
    assert not torch.equal(start[0]["0.weight"], start[1]["0.weight"])
    for name in weights[0]:
        assert (weights[0][name] - start[0][name]).abs().max() > 1e-3, name


def test_two_ranks_of_four_equal_one_process_of_eight(ranks: Path) -> None:
    """Gradients averaged over ranks: the same steps as one process on both ranks' batches together."""
    model, history, _ = _train(
        ranks / "images", context=SINGLE_PROCESS, batch_size=2 * PER_RANK_BATCH, checkpoint=None
    )
    distributed = torch.load(ranks / "out" / "rank0.pt", weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(distributed[name], value, atol=1e-5, rtol=1e-4)
    distributed_history = _record(ranks, 0)["history"]
    for ours, theirs in zip(distributed_history, history, strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert ours["valid_log_loss"] == pytest.approx(theirs["valid_log_loss"], abs=1e-5)


def test_train_loss_is_reduced_over_ranks_and_only_rank_zero_evaluates(ranks: Path) -> None:
    histories = [_record(ranks, rank)["history"] for rank in (0, 1)]
    assert [record["epoch"] for record in histories[0]] == [1, 2]
    assert [record["train_loss"] for record in histories[0]] == [
        record["train_loss"] for record in histories[1]
    ]
    assert all("valid_log_loss" in record for record in histories[0])
    assert not any("valid_log_loss" in record for record in histories[1])


def test_only_rank_zero_writes_the_checkpoint(ranks: Path) -> None:
    written = sorted(path.name for path in (ranks / "out").iterdir())
    assert written == ["checkpoint.pt", "rank0.json", "rank0.pt", "rank1.json", "rank1.pt"]
    state = torch.load(ranks / "out" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == EPOCHS
    final = torch.load(ranks / "out" / "rank0.pt", weights_only=True)
    for name, value in final.items():
        assert torch.equal(state["model"][name], value), name


def test_the_ranks_shards_are_disjoint_and_cover_the_data(ranks: Path) -> None:
    shards = [_record(ranks, rank)["indices"] for rank in (0, 1)]
    assert [len(shard) for shard in shards] == [N_ITEMS // 2, N_ITEMS // 2]
    assert set(shards[0]).isdisjoint(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(N_ITEMS))


def test_sampler_shards_pad_an_odd_count_like_distributed_sampler() -> None:
    samplers = [SeededSampler(25, shuffle=True, seed=7, rank=rank, world_size=2) for rank in (0, 1)]
    shards = [list(sampler) for sampler in samplers]
    assert [len(sampler) for sampler in samplers] == [13, 13]
    assert [len(shard) for shard in shards] == [13, 13]
    indices = [index for shard in shards for index, _ in shard]
    assert sorted(set(indices)) == list(range(25))
    # 26 slots for 25 items: only the permutation's first item comes twice, once on each rank.
    single = [index for index, _ in SeededSampler(25, shuffle=True, seed=7)]
    assert [index for index in set(indices) if indices.count(index) > 1] == [single[0]]
    assert shards[0][0] == shards[1][-1]  # same item, same augmentation seed on both ranks
    # Sharding changes who sees an item, not the item's augmentation seed.
    seeds = dict(SeededSampler(25, shuffle=True, seed=7))
    assert all(seeds[index] == seed for shard in shards for index, seed in shard)


# ---------------------------------------------------------------- a stage under torchrun


@pytest.fixture(scope="module")
def distributed_finetune(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny project reproduced with base.nproc 2: train_augmented and finetune each run as 2 processes.

    finetune uses `lr: auto`, so lr_find runs under DDP too, and 3 epochs, so checkpoints are written.
    """
    overrides = merge(
        TINY_PARAMS,
        {
            "base": {"nproc": 2},
            "finetune": {"lr": "auto", "n_cycle": 2, "lr_find": {"num_steps": 20, "end_lr": 0.1}},
        },
    )
    root = make_project(tmp_path_factory.mktemp("project"), overrides)
    output = run(["dvc", "repro", "finetune"], root)
    assert stages_run(output) == [
        "download",
        "reorganise",
        "precompute",
        "train_head",
        "train_augmented",
        "finetune",
    ]
    for stage in ("train_augmented", "finetune"):
        assert output.count(f"running {stage} as 2 torchrun processes") == 1
    assert "running train_head as" not in output  # the head trains on the activations, in one process
    return root, output


def test_a_failing_process_under_torchrun_ends_with_one_line_and_its_exit_code(tmp_path: Path) -> None:
    """Each rank's own one-line error reaches the user, then one line from the launcher; no traceback."""
    root = make_project(tmp_path / "project", merge(TINY_PARAMS, {"base": {"nproc": 2}}))
    torch.save({"classes": ["a", "b"], "model": {}}, root / "input.pt")
    arguments = ["--reorganised", "r", "--cache", "c", "--input", "input.pt", "--input-folds", "folds_in"]
    arguments += ["--model", "out.pt", "--folds", "folds"]
    result = subprocess.run(
        [sys.executable, "stages/finetune.py", *arguments, "--checkpoint", "checkpoint.pt", "--live", "live"],
        cwd=root,
        env=environment_for(root),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert re.fullmatch(
        r"finetune: error: torchrun process [01] of 2 failed with exit code 2 \(its message is above\); "
        r"the others were stopped",
        lines[-1],
    )
    # the folds come first, from the manifest: here there is none
    assert any(line.startswith("finetune: error: r/manifest.csv: not found") for line in lines[:-1])
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_finetune_under_torchrun_writes_each_output_once(distributed_finetune: tuple[Path, str]) -> None:
    root, _ = distributed_finetune
    assert sorted(path.name for path in (root / "dvclive").iterdir()) == [
        "finetune",
        "train_augmented",
        "train_head",
    ]
    assert sorted(path.name for path in (root / "models").iterdir()) == [
        "augmented.pt",
        "checkpoints",
        "finetune.pt",
        "folds",
        "head.pt",
    ]
    # one split: each folds folder holds only folds.json, written once
    assert [path.name for path in (root / "models" / "folds" / "finetune").iterdir()] == ["folds.json"]
    # Written once an epoch by rank 0 while it ran, removed once finetune finished.
    assert sorted(path.name for path in (root / "models" / "checkpoints").iterdir()) == []
    # rank 0 alone logged: the starting weights, then each cycle end (n_cycle 2, cycle_len 1, cycle_mult 2:
    # epochs 1 and 3; epoch 2 trains without a valid pass), and one lr_find curve
    live = root / "dvclive" / "finetune"
    header, *rows = (live / "plots" / "metrics" / "valid_log_loss.tsv").read_text().splitlines()
    assert header == "step\tvalid_log_loss"
    assert [int(row.split("\t")[0]) for row in rows] == [0, 1, 3]
    assert len((live / "plots" / "metrics" / "train_loss.tsv").read_text().splitlines()) == 1 + 3
    assert sorted(path.name for path in (live / "plots" / "custom").iterdir()) == ["lr_find.json"]
    summary = json.loads((live / "metrics.json").read_text())["finetune"]
    assert 0 <= summary["accuracy"] <= 1 and summary["log_loss"] > 0


@pytest.mark.slow
def test_finetune_model_from_torchrun_loads_and_ranks_agree_on_the_lr(
    distributed_finetune: tuple[Path, str],
) -> None:
    root, output = distributed_finetune
    model, classes = load_classifier(
        load_params(root / "params.yaml"), head_path=root / "models/finetune.pt", weights_key="model"
    )
    assert classes == ["one", "two", "zero"]
    with torch.inference_mode():
        probabilities = torch.softmax(model.eval()(torch.zeros(2, 3, 32, 32)), dim=1)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))
    # Both ranks ran lr_find; each must train with the same lr or their replicas drift apart.
    suggested = re.findall(r" finetune INFO lr_find \(valley\): suggested lr (\S+)", output)
    assert len(suggested) == 2 and suggested[0] == suggested[1]
    summary = json.loads((root / "dvclive" / "finetune" / "metrics.json").read_text())["finetune"]
    assert summary["lr_used"] == pytest.approx(float(suggested[0]), rel=1e-2)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))
