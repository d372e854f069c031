"""glibc's malloc as it comes against freed memory kept for reuse (kagglecls.memory.keep_freed_memory), which
every stage sets up before it runs (issue 6).

Each case runs in a fresh process per allocator setting, on random images (what is timed is the network,
not the data): EfficientNet-Lite0's frozen body forward as precompute and train_augmented run it (float32,
BatchNorm in eval mode, no gradients), and a whole training step as finetune runs it (all groups trainable,
BatchNorm statistics frozen, AdamW). Reported: seconds a batch (best of --repeats after a warm-up batch),
images a second, the ratio, and the process's peak memory. Outputs are not compared here: tests/test_cli.py
checks that the setting changes how memory is served, and a `dvc repro` with it gives the same output
bytes. Nothing is asserted.

Run from the repository root:
    .venv/bin/python bench/bench_allocator.py [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

log = logging.getLogger("bench.allocator")
# (what, image size px, batch size): the precompute batch at the sample's size and at Dog Breed's, and
# finetune's step at the sample's second size and at Dog Breed's.
CASES = (("forward", 64, 128), ("forward", 224, 32), ("train", 96, 64), ("train", 224, 16))
SETTINGS = ("glibc default", "freed memory kept")


def measure_in_this_process(what: str, size: int, batch: int, *, keep: bool, repeats: int) -> dict:
    if keep:
        from kagglecls.memory import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("keep_freed_memory: not glibc, nothing to compare")
    import torch

    from kagglecls.models import build_classifier, freeze_to, set_train_mode, unfreeze
    from kagglecls.training import make_optimizer

    torch.manual_seed(0)
    model = build_classifier("efficientnet_lite0", n_classes=120, pretrained=True)
    model = model.to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 120, (batch,))
    if what == "forward":
        freeze_to(model, -1)
        model.eval()

        def step() -> None:
            with torch.no_grad():
                model.features(images)

    else:
        unfreeze(model)
        set_train_mode(model, frozen_bn="eval", bn_statistics="frozen")
        optimizer = make_optimizer([list(model.parameters())], [1e-4], kind="adam", weight_decay=0.01)

        def step() -> None:
            loss = torch.nn.functional.cross_entropy(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    step()  # warm-up: oneDNN picks its kernels, the heap grows to its working size
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - started)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds_per_batch": best, "images_per_second": batch / best, "peak_mb": peak_mb}


def measure(what: str, size: int, batch: int, *, keep: bool, repeats: int) -> dict:
    """The case in a fresh process, so each allocator setting starts from an empty heap."""
    command = [
        str(common.main_python()),
        __file__,
        "--child",
        json.dumps({"what": what, "size": size, "batch": batch, "keep": keep, "repeats": repeats}),
    ]
    completed = subprocess.run(
        command,
        cwd=common.REPO_ROOT,
        env=common.pipeline_env(common.REPO_ROOT),
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        raise SystemExit(f"{what} {size} px: the measuring process failed:\n{completed.stderr}")
    return json.loads(completed.stdout.splitlines()[-1])


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="batches timed per case; the best is reported")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    common.add_shared_arguments(parser, wait_per="per case")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.child:
        case = json.loads(arguments.child)
        print(json.dumps(measure_in_this_process(**case)))
        return
    common.start()
    results = []
    for what, size, batch in CASES:
        busy = common.wait_for_quiet(max_wait_seconds=arguments.max_wait)
        default, kept = (
            measure(what, size, batch, keep=keep, repeats=arguments.repeats) for keep in (False, True)
        )
        results.append(
            {
                "case": what,
                "image_size": size,
                "batch_size": batch,
                "default": default,
                "kept": kept,
                "speedup": default["seconds_per_batch"] / kept["seconds_per_batch"],
                "memory_ratio": kept["peak_mb"] / default["peak_mb"],
                "machine_busy_percent_before": busy,
            }
        )
    rows = [
        [
            f"{r['case']} {r['image_size']} px x {r['batch_size']}",
            f"{r['default']['images_per_second']:.0f}",
            f"{r['kept']['images_per_second']:.0f}",
            f"{r['speedup']:.2f}x",
            f"{r['default']['peak_mb']:.0f}",
            f"{r['kept']['peak_mb']:.0f}",
        ]
        for r in results
    ]
    header = [
        "case",
        *(f"images/s ({setting})" for setting in SETTINGS),
        "speed-up",
        *(f"peak MB ({setting})" for setting in SETTINGS),
    ]
    common.report(common.format_table(rows, header))
    common.save_results(results, arguments.json)


if __name__ == "__main__":
    main()
