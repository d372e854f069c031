"""The GPU check (issue 18): training throughput, GPU utilisation, peak memory and mixed precision's loss.

On a generated Dog-Breed-sized competition (120 classes, 10,222 training jpgs of 500x375; each class a
pattern of its own under per-image noise and shifts, so the loss can fall), at 224 px:
- this pipeline's training step (kagglecls's loaders, StepSettings, AdamW, the whole network unfrozen) for
  each arch in --archs and each precision: fp32, bf16 (only where the GPU computes it natively) and fp16
  with GradScaler;
- fastai 2 on the same images, arch, batch size and GPU (vision_learner, unfrozen, to_fp16) beside it.
Each run trains --steps steps from the same random weights (nothing to download) and prints images/s after
--warmup steps, the GPU's mean utilisation (nvidia-smi, sampled), the peak memory torch allocated, and the
mean loss of the last fifth of the steps; mixed precision passes when that loss is within --tolerance of
fp32's.

Run on a machine with CUDA, from the repository root:
    .venv/bin/python bench/gpu_check.py [--archs resnet34 convnext_tiny] [--steps 300] [--json out.json]
`--device cpu --scale 0.03 --size 64 --steps 6 --warmup 2` runs the same code on a CPU as a check of itself
(fp32 only: autocast is CUDA's here).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger("bench.gpu_check")
N_TRAIN, N_TEST, N_CLASSES, WIDTH, HEIGHT = 10_222, 16, 120, 500, 375


# ------------------------------------------------------------------------------------------------------------
# The competition: Dog Breed's shape, learnable


def generate(dest: Path, *, scale: float) -> Path:
    """labels.csv (id,breed), train/, test/, sample_submission.csv; reused when already there."""
    n_train = max(2 * N_CLASSES, round(N_TRAIN * scale))
    marker = dest / ".done"
    if marker.is_file() and marker.read_text() == str(n_train):
        return dest
    (dest / "train").mkdir(parents=True, exist_ok=True)
    (dest / "test").mkdir(exist_ok=True)
    classes = [f"breed_{index:03d}" for index in range(N_CLASSES)]
    rows = [(f"{index:08x}", classes[index % N_CLASSES]) for index in range(n_train)]
    jobs = [
        (dest / "train" / f"{name}.jpg", index % N_CLASSES, index) for index, (name, _) in enumerate(rows)
    ]
    jobs += [
        (dest / "test" / f"t{index:07x}.jpg", index % N_CLASSES, n_train + index) for index in range(N_TEST)
    ]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor() as executor:
        list(executor.map(_write_photo, jobs, chunksize=64))
    (dest / "labels.csv").write_text("id,breed\n" + "".join(f"{name},{label}\n" for name, label in rows))
    uniform = ",".join([f"{1 / N_CLASSES:.6f}"] * N_CLASSES)
    tests = "".join(f"t{index:07x},{uniform}\n" for index in range(N_TEST))
    (dest / "sample_submission.csv").write_text("id," + ",".join(classes) + "\n" + tests)
    marker.write_text(str(n_train))
    return dest


def _write_photo(job: tuple[Path, int, int]) -> None:
    """The class's smooth colour pattern, shifted and mixed with the image's own noise."""
    from PIL import Image

    path, label, index = job
    pattern = np.random.default_rng([1, label]).integers(0, 256, size=(12, 16, 3)).astype(np.float32)
    rng = np.random.default_rng([2, index])
    mixed = 0.6 * np.roll(pattern, rng.integers(0, 3, size=2), axis=(0, 1)) + 0.4 * rng.integers(
        0, 256, size=pattern.shape
    )
    picture = Image.fromarray(mixed.astype(np.uint8)).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
    picture.save(path, format="JPEG", quality=90)


def reorganise(raw: Path, work: Path, params_path: Path) -> Path:
    """The pipeline's reorganise stage on `raw`; redone when `raw` was generated at another scale."""
    out, marker = work / "reorganised", work / "reorganised.from"
    if (
        not (out / "manifest.csv").is_file()
        or not marker.is_file()
        or marker.read_text() != (raw / ".done").read_text()
    ):
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)
        script = common.REPO_ROOT / "stages" / "reorganise.py"
        command = [common.main_python(), script, "--raw", raw, "--out", out, "--params", params_path]
        subprocess.run([str(part) for part in command], check=True, env=common.pipeline_env(common.REPO_ROOT))
        marker.write_text((raw / ".done").read_text())
    return out


# ------------------------------------------------------------------------------------------------------------
# This pipeline's training step


class GpuSampler:
    """Mean GPU utilisation from `nvidia-smi`, sampled every half second while running; None without it."""

    def __init__(self, device: str) -> None:
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True) if device.startswith("cuda") else None

    def _run(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self.stop.wait(0.5):
            try:
                self.samples.append(
                    float(subprocess.run(query, capture_output=True, text=True).stdout.split()[0])
                )
            except (OSError, ValueError, IndexError):
                return

    def __enter__(self) -> GpuSampler:
        if self.thread:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()

    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


def train_ours(
    arguments: argparse.Namespace, params_path: Path, work: Path, arch: str, precision: str
) -> dict:
    import torch
    from torch import nn

    from kagglecls.device import StepSettings, pick_device, seed_everything
    from kagglecls.fitting import make_optimizer
    from kagglecls.loading import build_model, image_loader, load_splits, presets, to_device
    from kagglecls.models import unfreeze
    from kagglecls.params import load_params

    class Precision(StepSettings):
        def amp_dtype(self):  # noqa: ANN202 - the dtype this run is told to use, whatever the GPU prefers
            return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    params = load_params(params_path)
    seed_everything(0)
    device = pick_device(arguments.device)
    splits, classes = load_splits(work / "reorganised")
    train_preset, _ = presets(params, params.finetune, arguments.size)
    loader = image_loader(
        params, work / "reorganised", work / "cache", splits["train"], transform=train_preset, shuffle=True,
        size=arguments.size, batch_size=arguments.batch_size,
    )  # fmt: skip
    settings = Precision(device=device, amp=precision != "fp32", channels_last=True)
    model = to_device(build_model(params, len(classes), pretrained=False), settings)
    unfreeze(model)
    model.train()
    optimizer = make_optimizer([list(model.parameters())], [arguments.lr], kind="adam", weight_decay=0.01)
    loss_function = nn.CrossEntropyLoss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, started = [], None
    with GpuSampler(arguments.device) as sampler:
        while len(losses) < arguments.steps:
            for inputs, targets in loader:
                if len(losses) == arguments.warmup:
                    _synchronize(device)
                    started = time.perf_counter()
                inputs, targets = settings.move(inputs), targets.to(device, non_blocking=True)
                with settings.autocast():
                    loss = loss_function(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                settings.backward_and_step(loss, optimizer)
                losses.append(loss.detach())
                if len(losses) == arguments.steps:
                    break
        _synchronize(device)
        seconds = time.perf_counter() - started
    return _figures("kagglecls", arch, precision, arguments, losses, seconds, sampler.mean(), device)


def _synchronize(device) -> None:  # noqa: ANN001 - a torch.device
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _figures(side, arch, precision, arguments, losses, seconds, utilisation, device) -> dict:  # noqa: ANN001
    import torch

    values = [float(loss) for loss in losses]
    tail = values[-max(1, len(values) // 5) :]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "side": side,
        "arch": arch,
        "precision": precision,
        "images_per_s": round((len(values) - arguments.warmup) * arguments.batch_size / seconds, 1),
        "gpu_utilisation_pct": utilisation,
        "peak_gpu_memory_gib": round(peak, 2) if peak is not None else None,
        "first_loss": round(values[0], 4),
        "final_loss": round(float(np.mean(tail)), 4),
    }


# ------------------------------------------------------------------------------------------------------------
# fastai 2 beside it


def train_fastai(arguments: argparse.Namespace, raw: Path, work: Path, arch: str) -> dict:
    spec = {**vars(arguments), "raw": str(raw), "arch": arch, "result": str(work / f"fastai_{arch}.json")}
    spec_path = work / f"fastai_{arch}_spec.json"
    spec_path.write_text(json.dumps(spec, default=str))
    python = common.ensure_fastai_venv()
    command = [str(python), str(Path(__file__).resolve()), "--fastai-child", str(spec_path)]
    subprocess.run(command, check=True, env=common.pipeline_env(common.REPO_ROOT))
    return json.loads(Path(spec["result"]).read_text())


def fastai_child(spec_path: Path) -> None:
    """Runs in the fastai overlay venv: vision_learner on the same images, unfrozen, fp16 as fastai's docs."""
    import pandas as pd
    import torch
    import torchvision
    from fastai.vision.all import (
        Callback,
        CancelFitException,
        ImageDataLoaders,
        Resize,
        aug_transforms,
        default_split,
        imagenet_stats,
        model_meta,
        set_seed,
        vision_learner,
    )

    spec = json.loads(spec_path.read_text())
    arguments = argparse.Namespace(**spec)
    device = torch.device(spec["device"])
    set_seed(0)
    labels = pd.read_csv(Path(spec["raw"]) / "labels.csv", dtype=str)
    dls = ImageDataLoaders.from_df(
        labels, spec["raw"], folder="train", suff=".jpg", valid_pct=0.05, item_tfms=Resize(spec["size"]),
        batch_tfms=aug_transforms(size=spec["size"]), bs=spec["batch_size"], device=device,
    )  # fmt: skip

    def network(pretrained: bool = False):  # noqa: ANN202 - fastai's `arch`: random weights, as our side
        return torchvision.models.get_model(spec["arch"], weights=None)

    model_meta[network] = {"cut": -2, "split": default_split, "stats": imagenet_stats}
    learn = vision_learner(dls, network, pretrained=False)
    learn.unfreeze()
    if device.type == "cuda":
        learn = learn.to_fp16()
        torch.cuda.reset_peak_memory_stats(device)
    losses, clock = [], {}

    class Clock(Callback):
        def after_batch(self) -> None:
            if not self.training:
                return
            losses.append(self.learn.loss.detach())
            if len(losses) == spec["warmup"]:
                _synchronize(device)
                clock["started"] = time.perf_counter()
            if len(losses) == spec["steps"]:
                _synchronize(device)
                clock["seconds"] = time.perf_counter() - clock["started"]
                raise CancelFitException()

    with GpuSampler(spec["device"]) as sampler:
        learn.fit(10_000, lr=spec["lr"], cbs=Clock())
    precision = "fp16" if device.type == "cuda" else "fp32"
    figures = _figures(
        "fastai", spec["arch"], precision, arguments, losses, clock["seconds"], sampler.mean(), device
    )
    Path(spec["result"]).write_text(json.dumps(figures))


# ------------------------------------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet34", "convnext_tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="fraction of Dog Breed's 10,222 training jpgs"
    )
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--warmup", type=int, default=30, help="steps left out of images/s (cuDNN's autotuning)"
    )
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--tolerance", type=float, default=0.05, help="relative: mixed precision's final loss"
    )
    parser.add_argument("--no-fastai", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kagglecls-gpu-check"))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--fastai-child", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.steps <= arguments.warmup:
        sys.exit(f"--steps ({arguments.steps}) must be more than --warmup ({arguments.warmup})")
    if arguments.fastai_child:
        fastai_child(arguments.fastai_child)
        return
    common.setup_logging()
    import torch

    arguments.work.mkdir(parents=True, exist_ok=True)
    raw = generate(arguments.work / "raw", scale=arguments.scale)
    params_path = arguments.work / "params.yaml"
    params_path.write_text((common.REPO_ROOT / "params.yaml").read_text())
    results = []
    for arch in arguments.archs:
        common.override_params(
            params_path,
            {"model.arch": arch, "base.image_size": arguments.size, "finetune.sizes": [arguments.size]},
        )
        reorganise(raw, arguments.work, params_path)
        precisions = ["fp32"]
        if arguments.device.startswith("cuda"):
            native_bf16 = torch.cuda.get_device_capability()[0] >= 8
            precisions += ["bf16", "fp16"] if native_bf16 else ["fp16"]
        for precision in precisions:
            results.append(train_ours(arguments, params_path, arguments.work, arch, precision))
            log.info("%s", results[-1])
        if not arguments.no_fastai:
            try:
                results.append(train_fastai(arguments, raw, arguments.work, arch))
                log.info("%s", results[-1])
            except subprocess.CalledProcessError as error:  # e.g. no network to install fastai
                log.warning("fastai side left out: %s", error)
                arguments.no_fastai = True
    fp32 = {
        row["arch"]: row["final_loss"]
        for row in results
        if row["side"] == "kagglecls" and row["precision"] == "fp32"
    }
    for row in results:
        reference = fp32[row["arch"]]
        row["loss_vs_fp32"] = round(row["final_loss"] / reference - 1, 4)
        row["loss_close"] = row["side"] == "fastai" or abs(row["loss_vs_fp32"]) <= arguments.tolerance
    gpu = torch.cuda.get_device_name() if arguments.device.startswith("cuda") else "CPU"
    common.report(
        f"GPU check, {time.strftime('%Y-%m-%d')}, {gpu}, {arguments.size} px, batch {arguments.batch_size}"
    )
    columns = list(results[0])
    common.report(common.format_table([[row[key] for key in columns] for row in results], columns))
    common.save_results(results, arguments.json)
    failed = [row for row in results if not row["loss_close"]]
    if failed:
        sys.exit(f"mixed precision's loss is not within {arguments.tolerance:.0%} of fp32's: {failed}")


if __name__ == "__main__":
    main()
