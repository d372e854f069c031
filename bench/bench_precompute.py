"""An epoch of head training on precomputed activations against an epoch through the frozen body (issue 6).

Same images (the embedded digits sample, through the pre-resized cache), same head, same optimizer (AdamW,
as the stages use), same batch size; the frozen body runs as train_augmented runs it (frozen_bn: eval). Also
reported: the one-off cost of precomputing the activations, and after how many head epochs it has paid for
itself. The body epoch uses the eval transform, so the only difference between the two is the body; with
augmentation (train_augmented) the body epoch costs a little more still. Nothing is asserted.

Run from the repository root:
    .venv/bin/python bench/bench_precompute.py [--sizes 64 128] [--train-per-class 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # read when tqdm is first imported

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kagglecls.competition import build_sample_competition, load_competition  # noqa: E402
from kagglecls.data import EvalPreset, ImageDataset, Normalisation, cache_short_side, make_loader  # noqa: E402
from kagglecls.device import StepSettings, seed_everything  # noqa: E402
from kagglecls.features import FeatureBatches, write_features  # noqa: E402
from kagglecls.fitting import make_optimizer  # noqa: E402
from kagglecls.images import write_resized_cache  # noqa: E402
from kagglecls.models import build_classifier, freeze_to, set_train_mode, weights_mean_std  # noqa: E402
from kagglecls.schedule import make_schedule  # noqa: E402
from kagglecls.training import train_one_epoch  # noqa: E402

log = logging.getLogger("bench.precompute")
ARCH = "efficientnet_lite0"


def best_of(repeats: int, run_once: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run_once()
        best = min(best, time.perf_counter() - started)
    return best


def one_epoch(model: torch.nn.Module, loader, *, settings: StepSettings) -> Callable[[], object]:  # noqa: ANN001
    """A closure running one training epoch of `model`'s trainable parameters (the head's) over `loader`."""
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = make_optimizer([trainable], [1e-3], kind="adam", weight_decay=0.01)
    schedule = make_schedule(
        "sgdr", steps_per_epoch=len(loader), n_cycle=1, cycle_len=1, cycle_mult=1, warmup=False
    )
    return lambda: train_one_epoch(
        model, loader, optimizer, schedule=schedule, first_step=0, settings=settings, description="epoch"
    )


def measure_size(
    files: list[Path],
    labels: list[int],
    n_classes: int,
    *,
    size: int,
    work: Path,
    arguments: argparse.Namespace,
) -> dict:
    common.wait_for_quiet(max_wait_seconds=arguments.max_wait)
    seed_everything(0)
    cached = [work / f"cache{size}" / f"{index:06d}.jpg" for index in range(len(files))]
    write_resized_cache(files, cached, short_side=cache_short_side(size, 1.3), workers=arguments.workers)
    normalisation = Normalisation(*weights_mean_std(ARCH))
    dataset = ImageDataset(cached, labels, EvalPreset(size=size, normalisation=normalisation))
    model = build_classifier(ARCH, n_classes=n_classes, pretrained=True)
    freeze_to(model, -1, frozen_bn="eval")
    plain = StepSettings(device=torch.device("cpu"))
    frozen_body = StepSettings(
        device=torch.device("cpu"), train_mode=lambda wrapped: set_train_mode(wrapped, frozen_bn="eval")
    )

    def loader(shuffle: bool):  # noqa: ANN202
        return make_loader(
            dataset,
            batch_size=arguments.batch_size,
            shuffle=shuffle,
            seed=0,
            num_workers=arguments.workers,
            drop_last=shuffle,
        )

    features = work / f"features{size}.npy"
    started = time.perf_counter()
    write_features(
        model, loader(False), n_items=len(files), path=features, settings=plain, description="precompute"
    )
    precompute_seconds = time.perf_counter() - started
    head_loader = FeatureBatches(
        features, np.asarray(labels, dtype=np.int64), batch_size=arguments.batch_size, shuffle=True, seed=0
    )
    head_seconds = best_of(arguments.repeats, one_epoch(model.head, head_loader, settings=plain))
    body_seconds = best_of(1, one_epoch(model, loader(True), settings=frozen_body))
    log.info("size %d: head epoch %.3f s, body epoch %.1f s", size, head_seconds, body_seconds)
    return {
        "image_size": size,
        "images": len(files),
        "head_epoch_seconds": head_seconds,
        "body_epoch_seconds": body_seconds,
        "ratio": body_seconds / head_seconds,
        "precompute_seconds": precompute_seconds,
        "break_even_epochs": precompute_seconds / max(body_seconds - head_seconds, 1e-9),
    }


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128], help="image sizes (px)")
    parser.add_argument("--train-per-class", type=int, default=150, help="digits per class (10 classes)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="loader and cache worker processes")
    parser.add_argument("--repeats", type=int, default=3, help="head epochs timed; the best is reported")
    common.add_shared_arguments(parser, wait_per="per size")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    common.start()
    with tempfile.TemporaryDirectory(prefix="bench_precompute_") as temporary:
        work = Path(temporary)
        build_sample_competition(
            work / "raw", train_per_class=arguments.train_per_class, n_test=1, image_size=96
        )
        competition = load_competition(work / "raw")
        classes = list(competition.classes)
        labels = [classes.index(label) for label in competition.train_labels]
        files = list(competition.train_files)
        results = [
            measure_size(files, labels, len(classes), size=size, work=work, arguments=arguments)
            for size in arguments.sizes
        ]
    rows = [
        [
            r["image_size"],
            r["images"],
            r["head_epoch_seconds"],
            r["body_epoch_seconds"],
            f"{r['ratio']:.0f}x",
            r["precompute_seconds"],
            r["break_even_epochs"],
        ]
        for r in results
    ]
    header = [
        "size px",
        "images",
        "head epoch s (features)",
        "epoch s (frozen body)",
        "ratio",
        "precompute s (once)",
        "break-even epochs",
    ]
    common.report(common.format_table(rows, header))
    for result in results:
        met = "met" if result["ratio"] > 10 else "NOT met"
        common.report(
            f"size {result['image_size']}: ratio {result['ratio']:.0f}x; expectation (well over 10x): {met}"
        )
    common.save_results(results, arguments.json)


if __name__ == "__main__":
    main()
