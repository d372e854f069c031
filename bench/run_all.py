"""Every benchmark of issue 6 with one command, then a summary table of the headline figures.

Quick by default (about 20 minutes on an idle 2-core machine, plus about 20 for the recipe benchmark's two
seeds of six competitions); `--full` runs the Dog-Breed-sized data (20,000 jpgs), both fastai competitions,
image sizes up to 224 and the recipe benchmark's five seeds (about an hour, plus about 45 minutes). Each
timing first waits (up to --max-wait seconds) for the machine to be idle and reports the cores other work
used meanwhile. fastai is installed from requirements-bench.txt into .venv/fastai-bench when missing (never
into .venv); scikit-image, whose photos the recipe benchmark's suite uses, into .venv by bench/recipe.py.
Benchmarks print figures and whether a target was met; nothing here fails on a figure, only on a benchmark
that could not run (the recipe benchmark counts a failed pipeline run as one).

Run from the repository root:
    .venv/bin/python bench/run_all.py [--full] [--only images precompute fastai scale dvc recipe]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
NAMES = ("images", "precompute", "fastai", "scale", "dvc", "recipe")
SCRIPTS = {"recipe": "recipe.py"}  # the others are bench_<name>.py


def bench_arguments(name: str, *, full: bool, workdir: Path) -> list[str]:
    """Command-line arguments of each benchmark, quick or full; scale and dvc share the generated data."""
    quick_and_full = {
        "images": (["--count", "200", "--repeats", "2"], ["--count", "400", "--repeats", "3"]),
        "precompute": (["--sizes", "64"], ["--sizes", "64", "128", "224"]),
        "fastai": (["--competitions", "sample"], ["--competitions", "sample", "class_folders"]),
        "scale": (["--scales", "0.02", "0.05", "0.1"], ["--scales", "0.1", "0.5", "1"]),
        "dvc": (["--scales", "0.1"], ["--scales", "1"]),
        "recipe": (["--quick"], []),
    }
    arguments = quick_and_full[name][1 if full else 0]
    if name in ("scale", "dvc"):
        arguments = [*arguments, "--workdir", str(workdir / "generated")]
    return arguments


def run_bench(name: str, *, full: bool, workdir: Path, max_wait: float) -> dict:
    """Runs bench_<name>.py, its output passed through; returns its JSON figures (when it writes them)."""
    script = BENCH_DIR / SCRIPTS.get(name, f"bench_{name}.py")
    json_path = workdir / f"{name}.json"
    command = [str(common.main_python()), str(script), *bench_arguments(name, full=full, workdir=workdir)]
    if name != "images":  # bench_images.py prints its figures only and does not wait for a quiet machine
        command += ["--json", str(json_path), "--max-wait", str(max_wait)]
    common.report(f"\n===== {name}: {' '.join(command)}")
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=common.REPO_ROOT, stdout=subprocess.PIPE, text=True)
    common.report(completed.stdout.rstrip())
    figures = json.loads(json_path.read_text()) if json_path.is_file() else {}
    return {
        "name": name,
        "seconds": time.perf_counter() - started,
        "returncode": completed.returncode,
        "figures": figures,
        "stdout": completed.stdout,
    }


def headline_images(run: dict) -> str:
    """bench_images.py prints `<label> <images/s> <ratio>x ...`; the cache build with workers is the issue's
    figure (the first ratio on its line: images per second against the baseline)."""
    for line in run["stdout"].splitlines():
        if line.startswith("3b") and (match := re.search(r"\s([\d.]+)x(\s|$)", line)):
            met = "met" if float(match.group(1)) >= 3 else "NOT met"
            return f"resize cache with workers {match.group(1)}x plain PIL (target 3x: {met})"
    return "see its output above"


def headline_precompute(run: dict) -> str:
    return "; ".join(
        f"size {r['image_size']}: head epoch {r['head_epoch_seconds']:.2f} s vs {r['body_epoch_seconds']:.1f} s "
        f"through the body = {r['ratio']:.0f}x"
        for r in run["figures"]["results"]
    )


def headline_fastai(run: dict) -> str:
    parts = []
    for r in run["figures"]["results"]:
        ours, theirs = r["pipeline"], r["fastai"]
        ratio = ours["wall_seconds"] / theirs["wall_seconds"]
        met = ratio <= 0.5 and ours["valid_log_loss"] <= theirs["valid_log_loss"]
        parts.append(
            f"{r['competition']}: {ours['wall_seconds']:.0f} s vs {theirs['wall_seconds']:.0f} s ({ratio:.2f}x), "
            f"log loss {ours['valid_log_loss']:.3f} vs {theirs['valid_log_loss']:.3f}, "
            f"target {'met' if met else 'NOT met'}"
        )
    return "; ".join(parts)


def headline_scale(run: dict) -> str:
    results = run["figures"]["results"]
    largest = results[-1]
    peaks = ", ".join(f"{name} {step['max_rss_mb']:.0f} MB" for name, step in largest["steps"].items())
    seconds = ", ".join(f"{name} {step['wall_seconds']:.0f} s" for name, step in largest["steps"].items())
    growth = f"{largest['images'] / results[0]['images']:.0f}x images" if len(results) > 1 else ""
    flat = ", ".join(
        f"{name} x{step['max_rss_mb'] / results[0]['steps'][name]['max_rss_mb']:.2f}"
        for name, step in largest["steps"].items()
    )
    return f"{largest['images']} jpgs: {seconds}; peak RSS {peaks}; {growth} -> peak RSS {flat}"


def headline_recipe(run: dict) -> str:
    """Per competition: the pipeline's test log loss (its submission) against the logistic baseline's."""
    parts = []
    for summary in run["figures"]["summary"]:
        ours, baseline = summary["submission"]["test_log_loss"], summary["baseline"]["test_log_loss"]
        figures = " vs ".join(f"{figure['mean']:.3f}" if figure else "-" for figure in (ours, baseline))
        failed = f", {summary['failed']}/{summary['runs']} runs failed" if summary["failed"] else ""
        parts.append(f"{summary['competition']} {figures}{failed}")
    return "test log loss, pipeline vs logistic baseline: " + "; ".join(parts)


def headline_dvc(run: dict) -> str:
    return "; ".join(
        f"{r['tracked_files']} files in outs: no-op repro {min(r['noop_repro_seconds']):.1f} s, "
        f"status {min(r['status_warm_seconds']):.1f} s warm / {min(r['status_cold_seconds']):.1f} s cold"
        for r in run["figures"]["results"]
    )


HEADLINES: dict[str, Callable[[dict], str]] = {
    "images": headline_images,
    "precompute": headline_precompute,
    "fastai": headline_fastai,
    "scale": headline_scale,
    "dvc": headline_dvc,
    "recipe": headline_recipe,
}


def print_summary(runs: list[dict], *, full: bool) -> None:
    common.report(f"\n===== summary ({'full' if full else 'quick'}), {time.strftime('%Y-%m-%d %H:%M')}")
    common.report(f"machine: {common.machine_description()}")
    rows = []
    for run in runs:
        try:
            headline = (
                HEADLINES[run["name"]](run)
                if run["returncode"] == 0
                else f"FAILED (exit {run['returncode']})"
            )
        except (KeyError, IndexError, ZeroDivisionError) as error:
            headline = f"no figures ({type(error).__name__}: {error})"
        rows.append([run["name"], f"{run['seconds']:.0f}", headline])
    common.report(common.format_table(rows, ["benchmark", "wall s", "headline figures"]))


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="Dog-Breed-sized data, both fastai competitions")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), help="run only these")
    parser.add_argument(
        "--max-wait", type=float, default=600, help="seconds each timing may wait for an idle machine"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the JSON figures and data here")
    return parser.parse_args()


def main() -> int:
    arguments = parse_arguments()
    common.setup_logging()
    if "fastai" in arguments.only:
        common.ensure_fastai_venv()
    with tempfile.TemporaryDirectory(prefix="bench_all_") as temporary:
        workdir = arguments.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = [
            run_bench(name, full=arguments.full, workdir=workdir, max_wait=arguments.max_wait)
            for name in NAMES
            if name in arguments.only
        ]
    print_summary(runs, full=arguments.full)
    return 0 if all(run["returncode"] == 0 for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
