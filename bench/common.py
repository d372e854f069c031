"""What the benchmarks share: measured subprocesses, temporary repo copies, params overrides, generated
competitions, the fastai overlay venv and the printed tables. Not a test module: nothing here asserts."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import yaml
from PIL import Image

log = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
MAIN_VENV = REPO_ROOT / ".venv"
# fastai lives in an overlay venv inside .venv (ignored by git with it), never in .venv itself.
FASTAI_VENV = Path(os.environ.get("KAGGLECLS_BENCH_VENV", MAIN_VENV / "fastai-bench"))
BENCH_REQUIREMENTS = REPO_ROOT / "requirements-bench.txt"
MEGABYTE = 1024 * 1024


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")


def report(text: str = "") -> None:
    """The one place benchmark figures go out: stdout, flushed (progress and messages go through logging)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def add_shared_arguments(parser: argparse.ArgumentParser, *, wait_per: str) -> None:
    """--max-wait and --json, which every timed benchmark takes (run_all.py passes both)."""
    parser.add_argument(
        "--max-wait", type=float, default=600, help=f"seconds to wait for a quiet machine {wait_per}"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")


def start() -> None:
    """Logging set up and the machine named first in the report, as every benchmark begins."""
    setup_logging()
    report(f"machine: {machine_description()}")


def save_results(results: Sequence[dict], path: Path | None) -> None:
    """The figures, with the machine they were measured on, to --json's path when one was given."""
    if path is not None:
        write_json({"machine": machine_description(), "results": list(results)}, path)


def main_python() -> Path:
    candidate = MAIN_VENV / "bin" / "python"
    return candidate if candidate.exists() else Path(sys.executable)


def machine_description() -> str:
    import torch

    memory_gib = psutil.virtual_memory().total / 1024**3
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM, {cuda}; Python {platform.python_version()}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )


# ------------------------------------------------------------------------------------------------------------
# Measured subprocesses


@dataclass(frozen=True)
class Measured:
    wall_seconds: float
    cpu_seconds: (
        float  # user + system time of the whole tree: less sensitive than wall time to a busy machine
    )
    max_rss_mb: float  # ru_maxrss of the biggest single process of the tree (getrusage of the waited child)
    peak_tree_rss_mb: float  # largest sum of RSS over the whole tree, sampled every `interval` seconds
    other_cores: float  # CPU the rest of the machine used meanwhile, in cores on average: a busy-machine flag
    returncode: int
    log_path: str


def stage_metrics(repo: Path, stage: str) -> dict[str, float] | None:
    """A pipeline stage's valid figures in a repository copy, as {valid_log_loss, valid_accuracy}: read from
    dvclive/<stage>/metrics.json, or from metrics/<stage>.json in commits before dvclive; None if absent."""
    live = repo / "dvclive" / stage / "metrics.json"
    if live.is_file():
        figures = json.loads(live.read_text())[stage]
        return {"valid_log_loss": figures["log_loss"], "valid_accuracy": figures["accuracy"]}
    old = repo / "metrics" / f"{stage}.json"
    if old.is_file():
        figures = json.loads(old.read_text())
        return {key: figures[key] for key in ("valid_log_loss", "valid_accuracy")}
    return None


def run_measured(
    command: Sequence[str | Path],
    *,
    cwd: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    interval: float = 0.2,
) -> Measured:
    """Run `command` to completion, its output to `log_path` with each line stamped with the elapsed seconds;
    wall time and peak memory of its process tree.

    os.wait4 returns the child's rusage, in which the kernel folds every descendant it waited for, so
    ru_maxrss is the biggest resident set any process of the tree reached. The sampled sum adds the
    processes alive together (data loader workers, dvc's stage processes), counting shared pages twice.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    busy_before = _machine_busy_seconds()
    start = time.perf_counter()
    process = subprocess.Popen(
        [str(part) for part in command],
        cwd=cwd,
        env=dict(env or os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    copier = threading.Thread(target=_copy_stamped, args=(process.stdout, log_path, start), daemon=True)
    copier.start()
    peak_tree = 0
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        peak_tree = max(peak_tree, _tree_rss(process.pid))
        time.sleep(interval)
    wall = time.perf_counter() - start
    busy = _machine_busy_seconds() - busy_before
    copier.join()
    returncode = os.waitstatus_to_exitcode(status)
    process.returncode = returncode  # reaped by wait4: tell Popen so it does not wait again
    max_rss_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    return Measured(
        wall_seconds=wall,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        other_cores=max(0.0, busy - usage.ru_utime - usage.ru_stime) / wall,
        max_rss_mb=max_rss_mb,
        peak_tree_rss_mb=max(peak_tree / MEGABYTE, max_rss_mb),
        returncode=returncode,
        log_path=str(log_path),
    )


def _machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def wait_for_quiet(*, max_wait_seconds: float = 600, busy_percent: float = 20) -> float:
    """Wait (up to `max_wait_seconds`) until the machine's CPU use over 3 s falls under `busy_percent`, so a
    timing is not shared with someone else's job; returns the CPU percent seen last."""
    deadline = time.monotonic() + max_wait_seconds
    while True:
        percent = psutil.cpu_percent(interval=3)
        if percent < busy_percent or time.monotonic() > deadline:
            if percent >= busy_percent:
                log.warning(
                    "machine still %.0f%% busy after %.0f s: timing anyway", percent, max_wait_seconds
                )
            return percent
        log.info("machine %.0f%% busy with other work: waiting before timing", percent)
        time.sleep(20)


def _copy_stamped(stream, log_path: Path, start: float) -> None:  # noqa: ANN001 - a binary pipe
    with open(log_path, "wb") as output:
        for line in stream:
            output.write(f"[{time.perf_counter() - start:8.1f}s] ".encode() + line)
            output.flush()


def stage_seconds(log_path: Path) -> dict[str, float]:
    """Seconds per stage of a `dvc repro` log written by run_measured (from one "Running stage" to the next)."""
    marks: list[tuple[str, float]] = []
    last = 0.0
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if not line.startswith("[") or "s] " not in line:
            continue
        stamp, _, text = line.partition("s] ")
        last = float(stamp.strip("[ "))
        if text.startswith("Running stage '"):
            marks.append((text.split("'")[1], last))
    ends = [mark[1] for mark in marks[1:]] + [last]
    return {name: end - begin for (name, begin), end in zip(marks, ends, strict=True)}


def _tree_rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.Error:
            continue
    return total


def require_success(measured: Measured, *, what: str) -> None:
    if measured.returncode != 0:
        tail = Path(measured.log_path).read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{what} exited {measured.returncode}; last output ({measured.log_path}):\n{tail}")


def pipeline_env(repo: Path) -> dict[str, str]:
    """The environment `make run` gives dvc: .venv first on PATH, the copy's own src importable."""
    env = dict(os.environ)
    env["PATH"] = f"{MAIN_VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(repo / "src")
    env["PYTHONUNBUFFERED"] = "1"
    env["TQDM_MININTERVAL"] = "5"  # bars in a log file: a line every 5 s, not every batch
    return env


# ------------------------------------------------------------------------------------------------------------
# Repository copies and params


def copy_repository(dest: Path, *, source: Path = REPO_ROOT) -> list[str]:
    """Copy the files git knows of (tracked and untracked-but-not-ignored) into a fresh git repo at `dest`.

    dvc.lock is left out so every stage runs; DVC's state and site cache go inside the copy, so nothing is
    written under /var/tmp and a deleted copy leaves nothing behind.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        check=True,
        capture_output=True,
    ).stdout.decode()
    files = [name for name in listed.split("\0") if name and name != "dvc.lock" and (source / name).is_file()]
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, target)
    git = [
        "git",
        "-c",
        "user.name=bench",
        "-c",
        "user.email=bench@localhost",
        "-c",
        "init.defaultBranch=main",
    ]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    (dest / ".dvc").mkdir(exist_ok=True)
    (dest / ".dvc" / "config.local").write_text(f"[core]\n    site_cache_dir = {dest / '.dvc' / 'site'}\n")
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "benchmark copy"], cwd=dest, check=True)
    return files


def override_params(params_path: Path, overrides: Mapping[str, object]) -> dict:
    """Set dotted keys (`finetune.sizes`) in a params.yaml, atomically; returns the whole new mapping."""
    params = yaml.safe_load(params_path.read_text()) or {}
    for dotted, value in overrides.items():
        section = params
        *parents, last = dotted.split(".")
        for key in parents:
            section = section.setdefault(key, {})
        section[last] = value
    temporary = params_path.with_name(params_path.name + ".tmp")
    temporary.write_text(yaml.safe_dump(params, sort_keys=False))
    os.replace(temporary, params_path)
    return params


def parse_overrides(assignments: Sequence[str]) -> dict[str, object]:
    """`["finetune.n_cycle=2", "base.image_size=96"]` -> {"finetune.n_cycle": 2, ...}, values read as YAML."""
    overrides = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key:
            raise SystemExit(f"--set {assignment!r}: expected KEY=VALUE, e.g. finetune.n_cycle=2")
        overrides[key] = yaml.safe_load(value)
    return overrides


def write_json(data: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(temporary, path)


def _json_default(value: object) -> object:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


# ------------------------------------------------------------------------------------------------------------
# Generated competitions


@dataclass(frozen=True)
class PhotoSpec:
    """A Dog-Breed-shaped competition: labels.csv (id,breed), train/<id>.jpg, test/<id>.jpg, sample_submission."""

    n_train: int = 10_000
    n_test: int = 10_000
    n_classes: int = 120
    width: int = 500
    height: int = 375
    quality: int = 90
    seed: int = 0


def scaled_photo_spec(scale: float, *, n_train: int = 10_000, n_test: int = 10_000) -> PhotoSpec:
    """Dog Breed's size times `scale`, never fewer than 2 training images a class."""
    spec = PhotoSpec()
    return PhotoSpec(
        n_train=max(2 * spec.n_classes, round(n_train * scale)), n_test=max(1, round(n_test * scale))
    )


def generate_photo_competition(dest: Path, spec: PhotoSpec, *, workers: int = 2) -> Path:
    """Write the competition to `dest` (skipped when `dest` already holds this spec); returns `dest`."""
    marker = dest / ".spec.json"
    if marker.is_file() and json.loads(marker.read_text()) == asdict(spec):
        log.info("reusing the generated competition in %s", dest)
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "train").mkdir(parents=True)
    (dest / "test").mkdir()
    classes = [f"breed_{index:03d}" for index in range(spec.n_classes)]
    train_ids = [f"{index:08x}{spec.seed:04x}train" for index in range(spec.n_train)]
    test_ids = [f"{index:08x}{spec.seed:04x}test" for index in range(spec.n_test)]
    labels = [classes[index % spec.n_classes] for index in range(spec.n_train)]
    jobs = [(dest / "train" / f"{name}.jpg", spec, index) for index, name in enumerate(train_ids)]
    jobs += [
        (dest / "test" / f"{name}.jpg", spec, spec.n_train + index) for index, name in enumerate(test_ids)
    ]
    started = time.perf_counter()
    chunk = max(1, len(jobs) // (workers * 16))
    with ProcessPoolExecutor(max_workers=workers) as executor:
        for done, _ in enumerate(executor.map(_write_photo, jobs, chunksize=chunk), start=1):
            if done % 2000 == 0 or done == len(jobs):
                log.info("generated %d/%d jpgs (%.0f s)", done, len(jobs), time.perf_counter() - started)
    lines = ["id,breed", *[f"{name},{label}" for name, label in zip(train_ids, labels, strict=True)]]
    (dest / "labels.csv").write_text("\n".join(lines) + "\n")
    uniform = ",".join([f"{1 / spec.n_classes:.6f}"] * spec.n_classes)
    rows = ["id," + ",".join(classes), *[f"{name},{uniform}" for name in test_ids]]
    (dest / "sample_submission.csv").write_text("\n".join(rows) + "\n")
    marker.write_text(json.dumps(asdict(spec)))
    return dest


def _write_photo(job: tuple[Path, PhotoSpec, int]) -> None:
    """A smooth random picture with sensor-like grain: unique bytes per index, photo-like JPEG size."""
    path, spec, index = job
    rng = np.random.default_rng([spec.seed, index])
    coarse = rng.integers(0, 256, size=(spec.height // 40 + 2, spec.width // 40 + 2, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((spec.width, spec.height), Image.Resampling.BILINEAR))
    grain = rng.integers(-8, 9, size=smooth.shape, dtype=np.int16)
    pixels = np.clip(smooth.astype(np.int16) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=spec.quality)


def rearrange_into_class_folders(raw: Path, dest: Path) -> int:
    """Turn a labels.csv competition into the class-folders layout: train/<label>/<file>, no labels.csv."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(raw / "test", dest / "test")
    shutil.copy2(raw / "sample_submission.csv", dest / "sample_submission.csv")
    lines = (raw / "labels.csv").read_text().splitlines()[1:]
    for line in lines:
        image_id, label = line.rsplit(",", 1)
        (dest / "train" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy2(raw / "train" / f"{image_id}.jpg", dest / "train" / label / f"{image_id}.jpg")
    return len(lines)


def folder_file_count(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


# ------------------------------------------------------------------------------------------------------------
# The fastai overlay venv


def ensure_fastai_venv(*, venv: Path = FASTAI_VENV, requirements: Path = BENCH_REQUIREMENTS) -> Path:
    """The python of an overlay venv holding requirements-bench.txt; created and installed when missing.

    The overlay's site-packages has a .pth line that adds .venv's site-packages (with its own .pth files),
    so fastai imports exactly .venv's torch and torchvision, while its ~45 extra packages never enter .venv.
    """
    python = venv / "bin" / "python"
    stamp = venv / ".installed-requirements"
    wanted = requirements.read_text()
    if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
        return python
    base_python = _base_python()
    log.info("creating the fastai benchmark venv %s (from %s)", venv, base_python)
    subprocess.run([str(base_python), "-m", "venv", str(venv)], check=True)
    overlay_site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    main_site = Path(
        subprocess.run(
            [str(main_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (overlay_site / "_kagglecls_main_venv.pth").write_text(
        f"import site; site.addsitedir({str(main_site)!r})\n"
    )
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    stamp.write_text(wanted)
    return python


def _base_python() -> Path:
    """The interpreter .venv was made from (its pyvenv.cfg `executable`), else this one's base."""
    config = MAIN_VENV / "pyvenv.cfg"
    if config.is_file():
        for line in config.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "executable" and Path(value.strip()).exists():
                return Path(value.strip())
    return Path(getattr(sys, "_base_executable", sys.executable))


# ------------------------------------------------------------------------------------------------------------
# Tables


def format_table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain-text table: numeric columns right-aligned, text columns left-aligned."""
    body = [[_cell(item) for item in row] for row in rows]
    cells = [[str(item) for item in header], *body]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    numeric = [all(_is_number(row[column]) for row in body) for column in range(len(header))]
    lines = []
    for index, row in enumerate(cells):
        padded = [
            cell.rjust(width) if is_numeric else cell.ljust(width)
            for cell, width, is_numeric in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(padded).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x"))
    except ValueError:
        return text == ""
    return True


def _cell(item: object) -> str:
    if isinstance(item, float):
        return f"{item:.3g}" if abs(item) < 100 else f"{item:.0f}"
    return str(item)
