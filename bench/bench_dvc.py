"""DVC's own overhead on a Dog-Breed-sized competition: a no-op `dvc repro` and `dvc status` (issue 6).

Generates the labels.csv competition of bench_scale.py (scale 1: 10,000 train + 10,000 test jpgs of 500x375,
120 classes), runs the whole pipeline once in a temporary copy of the repository with the cheapest training
params (image size 32, one epoch per stage, fixed lrs, no TTA passes: the figures here are DVC's, not
training's), then times:
  - `dvc repro` with nothing to do (every stage up to date), best of --repeats and the first;
  - `dvc status` with DVC's state database warm, and cold (site cache deleted, so every file of every
    output and dependency is hashed again, as after a fresh clone + `dvc pull`, or a new machine).
The file counts of the outputs (data/raw and data/reorganised hold one file per image) are printed beside.

Run from the repository root:
    .venv/bin/python bench/bench_dvc.py [--scale 0.1] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

log = logging.getLogger("bench.dvc")
CHEAP_TRAINING = {
    "base.image_size": 32,
    "train_head.lr": 0.001,
    "train_head.n_cycle": 1,
    "train_head.cycle_len": 1,
    "train_head.cycle_mult": 1,
    "train_augmented.lr": 0.001,
    "train_augmented.n_cycle": 1,
    "train_augmented.cycle_len": 1,
    "train_augmented.cycle_mult": 1,
    "finetune.lr": 0.0001,
    "finetune.n_cycle": 1,
    "finetune.cycle_len": 1,
    "finetune.cycle_mult": 1,
    "finetune.sizes": [32],
    "predict_tta.n_aug": 0,
}


def dvc(*arguments: str) -> list[str | Path]:
    return [common.MAIN_VENV / "bin" / "dvc", *arguments]


def timed(
    repo: Path, name: str, arguments: list[str], *, repeats: int, max_wait: float
) -> list[common.Measured]:
    runs = []
    for index in range(repeats):
        common.wait_for_quiet(max_wait_seconds=max_wait)
        measured = common.run_measured(
            dvc(*arguments),
            cwd=repo,
            env=common.pipeline_env(repo),
            log_path=repo.parent / f"{name}-{index}.log",
        )
        common.require_success(measured, what=f"dvc {' '.join(arguments)}")
        runs.append(measured)
    return runs


def prepare(root: Path, *, scale: float, workers: int) -> tuple[Path, dict]:
    spec = common.scaled_photo_spec(scale)
    raw = common.generate_photo_competition(root / f"competition-{scale:g}", spec, workers=workers)
    repo = root / f"dvc-{scale:g}" / "repo"
    shutil.rmtree(repo.parent, ignore_errors=True)
    common.copy_repository(repo)
    common.override_params(
        repo / "params.yaml", {**CHEAP_TRAINING, "data.source": str(raw), "base.num_workers": workers}
    )
    log.info("scale %g: first dvc repro (%d train + %d test images)", scale, spec.n_train, spec.n_test)
    first = common.run_measured(
        dvc("repro"), cwd=repo, env=common.pipeline_env(repo), log_path=repo.parent / "repro-first.log"
    )
    common.require_success(first, what="the first dvc repro")
    return repo, {
        "first_repro": vars(first),
        "first_repro_stages": common.stage_seconds(Path(first.log_path)),
        "images": spec.n_train + spec.n_test,
    }


def run_scale(root: Path, *, scale: float, repeats: int, workers: int, max_wait: float) -> dict:
    repo, result = prepare(root, scale=scale, workers=workers)
    no_op = timed(repo, "repro-noop", ["repro"], repeats=repeats, max_wait=max_wait)
    for run in no_op:
        if "Running stage" in Path(run.log_path).read_text():
            log.warning("the no-op dvc repro ran a stage: see %s", run.log_path)
    status_warm = timed(repo, "status-warm", ["status"], repeats=repeats, max_wait=max_wait)
    status_cold = []
    for index in range(repeats):
        shutil.rmtree(repo / ".dvc" / "site", ignore_errors=True)
        status_cold += timed(repo, f"status-cold-{index}", ["status"], repeats=1, max_wait=max_wait)
    counts = {
        folder: common.folder_file_count(repo / "data" / folder)
        for folder in ("raw", "reorganised", "cache", "features")
    }
    counts["dvc cache"] = common.folder_file_count(repo / ".dvc" / "cache")
    return {
        **result,
        "scale": scale,
        "files": counts,
        "tracked_files": counts["raw"] + counts["reorganised"] + counts["features"],
        "noop_repro_seconds": [run.wall_seconds for run in no_op],
        "status_warm_seconds": [run.wall_seconds for run in status_warm],
        "status_cold_seconds": [run.wall_seconds for run in status_cold],
    }


def print_results(results: list[dict]) -> None:
    rows = []
    for r in results:
        rows.append([
            f"{r['scale']:g}", r["images"], r["tracked_files"], r["first_repro"]["wall_seconds"],
            min(r["noop_repro_seconds"]), r["noop_repro_seconds"][0], min(r["status_warm_seconds"]), min(r["status_cold_seconds"]),
        ])  # fmt: skip
    header = [
        "scale",
        "images",
        "files in outs",
        "first repro s",
        "no-op repro s",
        "(first no-op)",
        "status s (warm)",
        "status s (cold)",
    ]
    common.report(common.format_table(rows, header))
    for r in results:
        stages = ", ".join(f"{name} {seconds:.0f}" for name, seconds in r["first_repro_stages"].items())
        files = ", ".join(f"{name} {count}" for name, count in r["files"].items())
        common.report(f"scale {r['scale']:g}: first repro seconds per stage: {stages}")
        common.report(f"scale {r['scale']:g}: files: {files}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[0.1], help="fractions of Dog Breed's size"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep data here (shared with bench_scale.py)"
    )
    common.add_shared_arguments(parser, wait_per="per timing")
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    common.start()
    with tempfile.TemporaryDirectory(prefix="bench_dvc_") as temporary:
        root = arguments.workdir or Path(temporary)
        results = [
            run_scale(
                root,
                scale=scale,
                repeats=arguments.repeats,
                workers=arguments.workers,
                max_wait=arguments.max_wait,
            )
            for scale in arguments.scales
        ]
    print_results(results)
    common.save_results(results, arguments.json)


if __name__ == "__main__":
    main()
