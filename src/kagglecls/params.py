"""Typed, validated params: `params.yaml` loads into frozen dataclasses, one per section; an unknown key, a
wrong type or a value out of range is a one-line ParamsError naming the key, before any work starts."""

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


def ranged(default: Any, allowed: str, says: str | None = None) -> Any:
    """A field whose value (each item, for a tuple; not None or "auto") must lie in `allowed`: ">= 1", "> 0",
    "[0, 1)"; an error says `says`, or `allowed`. _Section.__post_init__ checks it."""
    return field(default=default, metadata={"allowed": allowed, "says": says or allowed})


def _in_range(value: float, allowed: str) -> bool:
    if allowed.startswith(">"):
        operator, bound = allowed.split()
        return value >= float(bound) if operator == ">=" else value > float(bound)
    low, high = (float(bound) for bound in allowed[1:-1].split(","))
    above = low <= value if allowed[0] == "[" else low < value
    return above and (value <= high if allowed[-1] == "]" else value < high)


class _Section:
    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value, allowed = getattr(self, item.name), item.metadata.get("allowed")
            values = value if isinstance(value, tuple) else (value,)
            numbers = [number for number in values if number is not None and number != "auto"]
            if allowed and not all(_in_range(number, allowed) for number in numbers):
                shown = list(value) if isinstance(value, tuple) else value
                _check(False, item.name, shown, item.metadata["says"])


@dataclass(frozen=True)
class BaseParams(_Section):
    seed: int = 42
    device: str = "auto"
    image_size: int = ranged(64, f">= {MIN_IMAGE_SIZE}")
    batch_size: int = ranged(64, ">= 1")
    num_workers: int | Literal["auto"] = ranged("auto", ">= 0")
    decoded_cache_mb: int = ranged(2048, ">= 0")
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    nproc: int = ranged(1, ">= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        allowed = self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        _check(allowed, "device", self.device, "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class SampleParams(_Section):
    n_classes: int = ranged(10, "[2, 10]", "2..10 (digits)")
    train_per_class: int = ranged(60, ">= 2")
    n_test: int = ranged(100, ">= 1")
    image_size: int = ranged(96, ">= 16")


@dataclass(frozen=True)
class DataParams(_Section):
    source: str = "sample"
    competition: str = "dog-breed-identification"
    valid_pct: float = ranged(0.2, "(0, 1)", "a fraction in (0, 1)")
    layout: Literal["auto", "labels_csv", "class_folders", "filename"] = "auto"
    labels_file: str | None = None
    id_column: str | None = None
    label_column: str | None = None
    max_bad_fraction: float = ranged(0.05, "[0, 1)")
    resize_factor: float = ranged(1.3, ">= 1")
    sample: SampleParams = field(default_factory=SampleParams)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(bool(self.source), "source", self.source, "sample, kaggle or a path")


@dataclass(frozen=True)
class ModelParams(_Section):
    arch: str = "efficientnet_lite0"  # or a torchvision classification model's name, or timm/<name>
    pretrained: bool = True
    weights: str = "DEFAULT"  # a torchvision weights entry of the arch (IMAGENET1K_V2, ...)
    weights_file: str | None = None
    head_hidden: tuple[int, ...] = ranged((), ">= 1")
    head_dropout: tuple[float, ...] = ranged((0.25,), "[0, 1)")
    frozen_bn: Literal["eval", "train"] = "eval"

    def __post_init__(self) -> None:
        wanted = len(self.head_hidden) + 1
        _check(
            len(self.head_dropout) == wanted,
            "head_dropout",
            list(self.head_dropout),
            f"{wanted} values, one per linear layer of the head",
        )
        super().__post_init__()


@dataclass(frozen=True)
class CvParams(_Section):
    """The pipeline's cross-validation (train_head.cv_folds is only the logistic head's choice of L2)."""

    folds: int = ranged(1, ">= 1")  # 1: one train/valid split (data.valid_pct); k: stratified k-fold
    # How the folds' test probabilities are combined: their mean, or the softmax of the mean of their logs
    ensemble: Literal["probabilities", "logits"] = "logits"


@dataclass(frozen=True)
class FinalParams(_Section):
    train_on_all: bool = False  # one more model on every labelled image, the same schedule
    # With train_on_all, the submission is that model's (all) or that model averaged with the folds'
    submit: Literal["all", "all_and_folds"] = "all"


@dataclass(frozen=True)
class PrecomputeParams(_Section):
    batch_size: int = ranged(128, ">= 1")


@dataclass(frozen=True)
class LrFindParams(_Section):
    start_lr: float = ranged(1e-5, "> 0")
    end_lr: float = 10.0
    num_steps: int = ranged(100, ">= 10")
    suggestion: Literal["valley", "minimum", "steep"] = "valley"
    fallback_lr: float = ranged(1e-3, "> 0")  # used, with a warning, when the curve gives no suggestion

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.end_lr > self.start_lr, "end_lr", self.end_lr, f"> start_lr ({self.start_lr})")


@dataclass(frozen=True)
class FitParams(_Section):
    """How one training stage fits: lr, schedule and optimizer."""

    lr: float | Literal["auto"] = ranged("auto", "> 0", "a positive number or auto")
    lr_find: LrFindParams = field(default_factory=LrFindParams)
    schedule: Literal["sgdr", "one_cycle"] = "sgdr"
    n_cycle: int = ranged(1, ">= 1")
    cycle_len: float = ranged(1.0, "> 0")
    cycle_mult: float = ranged(1.0, ">= 1")
    warmup: bool = False
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = ranged(0.01, ">= 0")
    batch_size: int | None = ranged(None, ">= 1")

    def for_round(self, index: int) -> FitParams:
        """The params of the fit at the `index`-th image size (finetune's sizes; one size elsewhere)."""
        return self


@dataclass(frozen=True)
class HeadParams(FitParams):
    """train_head: `lbfgs` fits a linear head (logistic regression) full-batch, its L2 penalty `l2` chosen by
    `cv_folds`-fold cross-validation on the training rows; `epochs` trains any head with lr and schedule."""

    method: Literal["lbfgs", "epochs"] = "lbfgs"
    l2: float | Literal["auto"] = ranged("auto", "> 0", "a positive number or auto")
    cv_folds: int = ranged(3, ">= 2")


@dataclass(frozen=True)
class AugmentedFitParams(FitParams):
    # auto: side_on, or basic (no flips) where a mirror changes the class (digits, text), by train_augmented's
    # mirror check (fitting.choose_augmentation); finetune's auto: what the model it starts from was trained with
    augmentation: Literal["auto", "side_on", "top_down", "basic", "none"] = "auto"
    max_zoom: float = ranged(1.1, ">= 1")
    # best_cycle_end: the weights at the cycle end (or the start) with the lowest valid log loss; last_epoch
    keep: Literal["best_cycle_end", "last_epoch"] = "best_cycle_end"
    # cycle_ends: valid figures at each cycle end (the only epochs keep can choose), the start and the last
    # epoch; every_epoch: after each epoch too, as fastai's table (costs a valid pass each)
    validate: Literal["cycle_ends", "every_epoch"] = "cycle_ends"
    label_smoothing: float = ranged(0.0, "[0, 1)")  # of the training targets: caps the model's confidence
    # Beta's alpha for mixing training images and targets (fastai: 0.4); 0: off
    mixup: float = ranged(0.0, ">= 0")


@dataclass(frozen=True)
class FinetuneParams(AugmentedFitParams):
    lr_ratio: float = ranged(3.0, ">= 1")
    # fastai's learn.freeze_to(n): the body groups before n stay frozen (0: the whole body trains)
    freeze_to: int = ranged(0, ">= 0")
    bn_statistics: Literal["frozen", "batch"] = "frozen"
    sizes: tuple[int, ...] = ranged((64,), f">= {MIN_IMAGE_SIZE}")
    # One number for every size, or one per size counted from the last: the last size takes the last value,
    # each earlier size the value before it, and sizes before the first value take the first.
    n_cycle: int | tuple[int, ...] = ranged(1, ">= 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.sizes) >= 1, "sizes", list(self.sizes), "at least one size")
        if isinstance(self.n_cycle, tuple):
            _check(len(self.n_cycle) >= 1, "n_cycle", [], "an integer, or a list of one or more")

    def for_round(self, index: int) -> FinetuneParams:
        """These params with the n_cycle of the `index`-th of the sizes (a plain number)."""
        if not isinstance(self.n_cycle, tuple):
            return self
        position = max(0, len(self.n_cycle) - len(self.sizes) + index)
        return dataclasses.replace(self, n_cycle=self.n_cycle[position])


@dataclass(frozen=True)
class PredictParams(_Section):
    n_aug: int = ranged(4, ">= 0")
    beta: float = ranged(0.25, "[0, 1]")
    top_losses: int = ranged(16, ">= 0")


@dataclass(frozen=True)
class SubmissionParams:
    positive_class: str | None = None


@dataclass(frozen=True)
class Params:
    base: BaseParams = field(default_factory=BaseParams)
    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    cv: CvParams = field(default_factory=CvParams)
    final: FinalParams = field(default_factory=FinalParams)
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
        for option in (item for item in options if item is not type(None)):
            try:
                return _convert(option, value, key=key)
            except ParamsError:
                pass
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


# The YAML types each scalar hint accepts; a bool is accepted only where a bool is wanted.
_SCALAR_TYPES = {bool: bool, int: int, float: int | float, str: str}


def _scalar(hint: Any, value: Any, *, key: str) -> Any:
    if isinstance(value, _SCALAR_TYPES.get(hint, ())) and (hint is bool or not isinstance(value, bool)):
        return float(value) if hint is float else value
    raise ParamsError(f"{key}: {value!r} is not allowed; expected {_describe(hint)}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(str(item) for item in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('an ').removeprefix('a ')}s"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check(condition: bool, key: str, value: Any, allowed: str) -> None:
    if not condition:
        raise ParamsError(f"{key}: {value!r} is out of range; allowed: {allowed}")
