"""A Dog-Breed-sized competition through reorganise, the resize cache and precompute (issue 6).

Generates labels.csv-layout competitions (default at scale 1: 10,000 train and 10,000 test jpgs of 500x375,
120 classes; `--scales` multiplies the counts) and runs each step as its own process, the way dvc runs the
stages (the stage scripts with a params file; the cache through the library's `resized_files`, which
precompute would otherwise call first), with `--workers` loader/cache processes on the machine's cores.
Reports wall time, images per second and peak memory per step and scale: the peak must stay flat as the
dataset grows (bounded by the batch: activations stream to float16 memory-mapped arrays).

Run from the repository root:
    .venv/bin/python bench/bench_scale.py [--scales 0.1 0.5 1] [--image-size 64] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import yaml  # noqa: E402

log = logging.getLogger("bench.scale")
STEPS = ("reorganise", "cache", "precompute")


def write_params(path: Path, *, image_size: int, workers: int) -> dict:
    """The lead's params.yaml with the benchmark's image size and worker count."""
    params = yaml.safe_load((common.REPO_ROOT / "params.yaml").read_text())
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return common.override_params(path, {"base.image_size": image_size, "base.num_workers": workers})


def step_commands(work: Path, raw: Path, params: Path) -> dict[str, list[str | Path]]:
    python, stages = common.main_python(), common.REPO_ROOT / "stages"
    reorganised, cache = work / "reorganised", work / "cache"
    return {
        "reorganise": [
            python,
            stages / "reorganise.py",
            "--raw",
            raw,
            "--out",
            reorganised,
            "--params",
            params,
        ],
        "cache": [
            python,
            Path(__file__).resolve(),
            "--cache-only",
            "--reorganised",
            reorganised,
            "--cache",
            cache,
            "--params",
            params,
        ],
        "precompute": [
            python,
            stages / "precompute.py",
            "--reorganised",
            reorganised,
            "--cache",
            cache,
            "--out",
            work / "features",
            "--params",
            params,
        ],
    }


def build_cache(*, reorganised: Path, cache: Path, params_path: Path) -> None:
    """The pre-resized cache of every split at the precompute size, as kagglecls.loading.image_loader makes it."""
    from kagglecls.data import cache_short_side, resized_files
    from kagglecls.images import image_workers
    from kagglecls.loading import load_splits
    from kagglecls.params import load_params

    common.setup_logging()
    params = load_params(params_path)
    splits, _ = load_splits(reorganised)
    short_side = cache_short_side(params.base.image_size, params.data.resize_factor)
    for split in splits.values():
        resized_files(
            split.rows,
            root=reorganised,
            cache_dir=cache,
            short_side=short_side,
            workers=image_workers(),
        )


def run_scale(scale: float, *, root: Path, arguments: argparse.Namespace) -> dict:
    spec = common.scaled_photo_spec(scale)
    started = time.perf_counter()
    raw = common.generate_photo_competition(root / f"competition-{scale:g}", spec, workers=arguments.workers)
    generated_seconds = time.perf_counter() - started
    work = root / f"run-{scale:g}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = work / "params.yaml"
    write_params(params, image_size=arguments.image_size, workers=arguments.workers)
    env = common.pipeline_env(common.REPO_ROOT)
    steps = {}
    for name, command in step_commands(work, raw, params).items():
        log.info("scale %g: %s (%d train + %d test images)", scale, name, spec.n_train, spec.n_test)
        common.wait_for_quiet(max_wait_seconds=arguments.max_wait)
        measured = common.run_measured(command, cwd=work, env=env, log_path=work / f"{name}.log")
        common.require_success(measured, what=f"{name} at scale {scale:g}")
        steps[name] = vars(measured)
        log.info(
            "scale %g: %s took %.1f s, max RSS %.0f MB",
            scale,
            name,
            measured.wall_seconds,
            measured.max_rss_mb,
        )
    return {
        "scale": scale,
        "n_train": spec.n_train,
        "n_test": spec.n_test,
        "images": spec.n_train + spec.n_test,
        "generate_seconds": generated_seconds,
        "features_mb": sum(path.stat().st_size for path in (work / "features").glob("*.npy"))
        / common.MEGABYTE,
        "steps": steps,
    }


def print_results(results: list[dict], *, image_size: int, workers: int) -> None:
    rows = []
    for result in results:
        for name in STEPS:
            step = result["steps"][name]
            rate = result["images"] / step["wall_seconds"]
            rows.append(
                [
                    f"{result['scale']:g}",
                    result["images"],
                    name,
                    step["wall_seconds"],
                    f"{rate:.0f}",
                    step["max_rss_mb"],
                    step["peak_tree_rss_mb"],
                    step["other_cores"],
                ]
            )
    header = ["scale", "images", "step", "wall s", "images/s", "max RSS MB", "tree RSS MB", "others' cores"]
    common.report(f"image size {image_size}, {workers} workers; images = train + test jpgs of 500x375")
    common.report(common.format_table(rows, header))
    if len(results) > 1:
        small, large = results[0], results[-1]
        growth = large["images"] / small["images"]
        for name in STEPS:
            ratio = large["steps"][name]["max_rss_mb"] / small["steps"][name]["max_rss_mb"]
            common.report(
                f"{name}: {growth:.0f}x the images -> {ratio:.2f}x the peak RSS of its biggest process"
            )
        features = ", ".join(f"{r['features_mb']:.0f} MB at scale {r['scale']:g}" for r in results)
        common.report(f"precomputed activations on disk (float16): {features}")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scales", type=float, nargs="+", default=[0.02, 0.05, 0.1], help="fractions of Dog Breed's size"
    )
    parser.add_argument(
        "--image-size", type=int, default=64, help="precompute size (px); the cache is 1.3x that"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (base.num_workers)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep data here (reused across runs of the same scale)"
    )
    common.add_shared_arguments(parser, wait_per="per step")
    parser.add_argument("--cache-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reorganised", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--params", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.cache_only:
        build_cache(reorganised=arguments.reorganised, cache=arguments.cache, params_path=arguments.params)
        return
    common.start()
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as temporary:
        root = arguments.workdir or Path(temporary)
        results = [run_scale(scale, root=root, arguments=arguments) for scale in arguments.scales]
    print_results(results, image_size=arguments.image_size, workers=arguments.workers)
    common.save_results(results, arguments.json)


if __name__ == "__main__":
    main()
