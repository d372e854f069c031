"""Typed, validated params: `params.yaml` loads into frozen dataclasses, one per section.

An unknown or misspelt key, a wrong type or a value out of range is a `ParamsError` whose one line names the
key, the value and what is allowed, raised before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kagglecls.errors import UserError


class ParamsError(UserError, ValueError):
    """A param that is unknown, of the wrong type or out of range."""


# The smallest square side the archs' five stride-2 stages can take and still leave a 1x1 map.
MIN_IMAGE_SIZE = 32


@dataclass(frozen=True)
class BaseParams:
    seed: int = 42
    device: str = "auto"
    image_size: int = 64
    batch_size: int = 64
    num_workers: int | Literal["auto"] = "auto"
    decoded_cache_mb: int = 2048
    amp: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        _check(self.image_size >= MIN_IMAGE_SIZE, "image_size", self.image_size, f">= {MIN_IMAGE_SIZE}")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(
            self.num_workers == "auto" or self.num_workers >= 0,
            "num_workers",
            self.num_workers,
            "auto or >= 0",
        )
        _check(self.decoded_cache_mb >= 0, "decoded_cache_mb", self.decoded_cache_mb, ">= 0")
        allowed = self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        _check(allowed, "device", self.device, "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class SampleParams:
    n_classes: int = 10
    train_per_class: int = 60
    n_test: int = 100
    image_size: int = 96

    def __post_init__(self) -> None:
        _check(2 <= self.n_classes <= 10, "n_classes", self.n_classes, "2..10 (digits)")
        _check(self.train_per_class >= 2, "train_per_class", self.train_per_class, ">= 2")
        _check(self.n_test >= 1, "n_test", self.n_test, ">= 1")
        _check(self.image_size >= 8, "image_size", self.image_size, ">= 8")


@dataclass(frozen=True)
class DataParams:
    source: str = "sample"
    competition: str = "dog-breed-identification"
    valid_pct: float = 0.2
    layout: Literal["auto", "labels_csv", "class_folders", "filename"] = "auto"
    labels_file: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    max_bad_fraction: float = 0.05
    resize_factor: float = 1.3
    sample: SampleParams = field(default_factory=SampleParams)

    def __post_init__(self) -> None:
        _check(0 < self.valid_pct < 1, "valid_pct", self.valid_pct, "a fraction in (0, 1)")
        _check(0 <= self.max_bad_fraction < 1, "max_bad_fraction", self.max_bad_fraction, "[0, 1)")
        _check(self.resize_factor >= 1, "resize_factor", self.resize_factor, ">= 1")
        _check(bool(self.source), "source", self.source, "sample, kaggle or a path")


@dataclass(frozen=True)
class ModelParams:
    arch: Literal["efficientnet_lite0", "resnet34", "resnext50_32x4d", "resnext101_32x8d"] = (
        "efficientnet_lite0"
    )
    pretrained: bool = True
    weights_file: str | None = None
    head_hidden: tuple[int, ...] = ()
    head_dropout: tuple[float, ...] = (0.25,)
    frozen_bn: Literal["eval", "train"] = "eval"

    def __post_init__(self) -> None:
        wanted = len(self.head_hidden) + 1
        _check(
            len(self.head_dropout) == wanted,
            "head_dropout",
            list(self.head_dropout),
            f"{wanted} values, one per linear layer of the head",
        )
        for probability in self.head_dropout:
            _check(0 <= probability < 1, "head_dropout", list(self.head_dropout), "values in [0, 1)")
        for size in self.head_hidden:
            _check(size >= 1, "head_hidden", list(self.head_hidden), "positive sizes")


@dataclass(frozen=True)
class PrecomputeParams:
    batch_size: int = 128

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


@dataclass(frozen=True)
class LrFindParams:
    start_lr: float = 1e-5
    end_lr: float = 10.0
    num_steps: int = 100
    suggestion: Literal["valley", "minimum", "steep"] = "valley"
    fallback_lr: float = 1e-3  # used, with a warning, when the curve gives no suggestion

    def __post_init__(self) -> None:
        _check(self.start_lr > 0, "start_lr", self.start_lr, "> 0")
        _check(self.fallback_lr > 0, "fallback_lr", self.fallback_lr, "> 0")
        _check(self.end_lr > self.start_lr, "end_lr", self.end_lr, f"> start_lr ({self.start_lr})")
        _check(self.num_steps >= 10, "num_steps", self.num_steps, ">= 10")


@dataclass(frozen=True)
class FitParams:
    """How one training stage fits: lr, schedule and optimizer."""

    lr: float | Literal["auto"] = "auto"
    lr_find: LrFindParams = field(default_factory=LrFindParams)
    schedule: Literal["sgdr", "one_cycle"] = "sgdr"
    n_cycle: int = 1
    cycle_len: float = 1.0
    cycle_mult: float = 1.0
    warmup: bool = False
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = 0.01
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.lr != "auto":
            _check(self.lr > 0, "lr", self.lr, "a positive number or auto")
        _check(self.n_cycle >= 1, "n_cycle", self.n_cycle, ">= 1")
        _check(self.cycle_len > 0, "cycle_len", self.cycle_len, "> 0")
        _check(self.cycle_mult >= 1, "cycle_mult", self.cycle_mult, ">= 1")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        if self.batch_size is not None:
            _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")


@dataclass(frozen=True)
class HeadParams(FitParams):
    """train_head: `lbfgs` fits a linear head (logistic regression) full-batch, its L2 penalty `l2` chosen by
    `cv_folds`-fold cross-validation on the training rows; `epochs` trains any head with lr and schedule."""

    method: Literal["lbfgs", "epochs"] = "lbfgs"
    l2: float | Literal["auto"] = "auto"
    cv_folds: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l2 != "auto":
            _check(self.l2 > 0, "l2", self.l2, "a positive number or auto")
        _check(self.cv_folds >= 2, "cv_folds", self.cv_folds, ">= 2")


@dataclass(frozen=True)
class AugmentedFitParams(FitParams):
    augmentation: Literal["side_on", "top_down", "none"] = "side_on"
    max_zoom: float = 1.1
    # best_cycle_end: the weights at the cycle end (or the start) with the lowest valid log loss; last_epoch
    keep: Literal["best_cycle_end", "last_epoch"] = "best_cycle_end"
    label_smoothing: float = 0.0  # of the training targets: caps the model's confidence

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.max_zoom >= 1, "max_zoom", self.max_zoom, ">= 1")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "[0, 1)")


@dataclass(frozen=True)
class FinetuneParams(AugmentedFitParams):
    lr_ratio: float = 3.0
    bn_statistics: Literal["frozen", "batch"] = "frozen"
    sizes: tuple[int, ...] = (64,)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.lr_ratio >= 1, "lr_ratio", self.lr_ratio, ">= 1")
        _check(len(self.sizes) >= 1, "sizes", list(self.sizes), "at least one size")
        for size in self.sizes:
            _check(size >= MIN_IMAGE_SIZE, "sizes", list(self.sizes), f"sizes >= {MIN_IMAGE_SIZE}")


@dataclass(frozen=True)
class PredictParams:
    n_aug: int = 4
    beta: float = 0.25
    top_losses: int = 16
    calibration: Literal["none", "temperature"] = "none"  # temperature: one T fitted on valid (log loss)

    def __post_init__(self) -> None:
        _check(self.n_aug >= 0, "n_aug", self.n_aug, ">= 0")
        _check(0 <= self.beta <= 1, "beta", self.beta, "[0, 1]")
        _check(self.top_losses >= 0, "top_losses", self.top_losses, ">= 0")


@dataclass(frozen=True)
class SubmissionParams:
    positive_class: str | None = None


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    precompute: PrecomputeParams = field(default_factory=PrecomputeParams)
    train_head: HeadParams = field(default_factory=HeadParams)
    train_augmented: AugmentedFitParams = field(default_factory=AugmentedFitParams)
    finetune: FinetuneParams = field(default_factory=FinetuneParams)
    predict_tta: PredictParams = field(default_factory=PredictParams)
    submission: SubmissionParams = field(default_factory=SubmissionParams)

    def __post_init__(self) -> None:
        if self.train_head.method == "lbfgs" and self.model.head_hidden:
            raise ParamsError(
                f"model.head_hidden: {list(self.model.head_hidden)} but train_head.method lbfgs fits a linear "
                "head; set model.head_hidden: [] (and one head_dropout), or train_head.method: epochs"
            )


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate the whole params file; a bad key or value raises ParamsError naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ParamsError(f"{path}: cannot read params: {error}".splitlines()[0]) from None
    return params_from_mapping(raw, source=str(path))


def params_from_mapping(raw: Any, *, source: str = "params") -> Params:
    try:
        return _build(Params, raw, prefix="")
    except ParamsError as error:
        raise ParamsError(f"{source}: {error}") from None


def _build(cls: type, raw: Any, *, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ParamsError(f"{prefix.rstrip('.') or 'params'}: expected a mapping, found {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {item.name for item in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ParamsError(f"unknown key '{prefix}{key}'; allowed: {', '.join(sorted(fields))}")
    values = {name: _convert(hints[name], raw[name], key=f"{prefix}{name}") for name in fields if name in raw}
    try:
        return cls(**values)
    except ParamsError as error:
        # Range checks in __post_init__ name the key within its section: give the full path.
        raise ParamsError(f"{prefix}{error}") from None


def _convert(hint: Any, value: Any, *, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (item for item in options if item is not type(None)):
            try:
                return _convert(option, value, key=key)
            except ParamsError as error:
                errors.append(str(error))
        raise ParamsError(f"{key}: {value!r} is not allowed; expected {_describe(hint)}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            allowed = ", ".join(str(item) for item in typing.get_args(hint))
            raise ParamsError(f"{key}: {value!r} is not allowed; expected one of {allowed}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: {value!r} is not allowed; expected a list")
        item_hint = typing.get_args(hint)[0]
        return tuple(_convert(item_hint, item, key=key) for item in value)
    return _scalar(hint, value, key=key)


def _scalar(hint: Any, value: Any, *, key: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    raise ParamsError(f"{key}: {value!r} is not allowed; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(str(item) for item in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ParamsError(f"{key}: {value!r} is out of range; allowed: {allowed}")
