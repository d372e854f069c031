"""Typed params: params.yaml loads whole; unknown keys, wrong types and out-of-range values are one-line errors."""

from pathlib import Path

import pytest
import yaml

from kagglecls.errors import UserError
from kagglecls.params import (
    FinetuneParams,
    HeadParams,
    Params,
    ParamsError,
    load_params,
    params_from_mapping,
)

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"


def _leaves(mapping: dict, prefix: str = "") -> dict[str, object]:
    """Dotted key -> value for every scalar or list in a nested mapping."""
    leaves = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            leaves.update(_leaves(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def _loaded_value(params: Params, dotted: str) -> object:
    value = params
    for part in dotted.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple) else value


def _error(raw: dict) -> str:
    with pytest.raises(ParamsError) as caught:
        params_from_mapping(raw)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_params_yaml_loads_every_key_with_its_value():
    params = load_params(PARAMS_FILE)
    raw = yaml.safe_load(PARAMS_FILE.read_text())
    leaves = _leaves(raw)
    assert len(leaves) > 40
    for dotted, value in leaves.items():
        assert _loaded_value(params, dotted) == value, dotted


def test_params_yaml_values_load_as_their_types():
    """Types only: `dvc exp run -S` rewrites params.yaml's values, and `make test` must pass after it."""
    params = load_params(PARAMS_FILE)
    assert isinstance(params.finetune, FinetuneParams)
    assert isinstance(params.train_head.lr_find.start_lr, float)  # YAML's 1.0e-05
    assert isinstance(params.base.seed, int)
    assert params.train_head.lr == "auto" or isinstance(params.train_head.lr, float)
    assert params.finetune.lr == "auto" or isinstance(params.finetune.lr, float)
    assert params.train_head.method in ("lbfgs", "epochs")
    assert isinstance(params.model.head_hidden, tuple)
    assert all(isinstance(p, float) for p in params.model.head_dropout)


def test_empty_mapping_gives_the_dataclass_defaults():
    assert params_from_mapping({}) == Params()
    assert params_from_mapping({"train_head": {"lr": 0.01}}).train_head == HeadParams(lr=0.01)


def test_a_hidden_layer_needs_the_epochs_head():
    assert "set model.head_hidden: []" in _error(
        {"model": {"head_hidden": [512], "head_dropout": [0.25, 0.5]}}
    )
    chosen = {
        "model": {"head_hidden": [512], "head_dropout": [0.25, 0.5]},
        "train_head": {"method": "epochs"},
    }
    assert params_from_mapping(chosen).model.head_hidden == (512,)


def test_params_errors_are_user_errors_and_value_errors():
    assert issubclass(ParamsError, UserError)
    assert issubclass(ParamsError, ValueError)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"train_head": {"lrr": 0.1}}, "train_head.lrr"),
        ({"train_head": {"lr_find": {"start": 1e-5}}}, "train_head.lr_find.start"),
        ({"bases": {"seed": 1}}, "bases"),
    ],
)
def test_unknown_key_names_the_full_key(raw, key):
    message = _error(raw)
    assert "unknown key" in message
    assert key in message


def test_unknown_key_lists_the_allowed_keys():
    message = _error({"predict_tta": {"naug": 2}})
    assert "allowed: beta, n_aug, top_losses" in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"base": {"seed": "x"}}, "base.seed: 'x' is not allowed; expected an integer"),
        ({"base": {"batch_size": True}}, "base.batch_size: True is not allowed; expected an integer"),
        ({"base": {"amp": "yes"}}, "base.amp: 'yes' is not allowed; expected true/false"),
        ({"data": {"valid_pct": "0.2"}}, "data.valid_pct: '0.2' is not allowed; expected a number"),
        ({"train_head": {"lr": "fast"}}, "train_head.lr: 'fast' is not allowed; expected a number or auto"),
        ({"finetune": {"sizes": 64}}, "finetune.sizes: 64 is not allowed; expected a list"),
        (
            {"finetune": {"n_cycle": 2.5}},
            "finetune.n_cycle: 2.5 is not allowed; expected an integer or a list of integers",
        ),
        ({"base": []}, "base: expected a mapping, found []"),
    ],
)
def test_wrong_type_names_key_value_and_type(raw, expected):
    assert expected in _error(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"data": {"valid_pct": 1.5}}, "data.valid_pct: 1.5 is out of range; allowed: a fraction in (0, 1)"),
        (
            {"train_head": {"lr": -0.1}},
            "train_head.lr: -0.1 is out of range; allowed: a positive number or auto",
        ),
        ({"train_head": {"cycle_mult": 0.5}}, "train_head.cycle_mult: 0.5 is out of range; allowed: >= 1"),
        ({"base": {"image_size": 16}}, "base.image_size: 16 is out of range; allowed: >= 32"),
        (
            {"data": {"sample": {"n_classes": 11}}},
            "data.sample.n_classes: 11 is out of range; allowed: 2..10 (digits)",
        ),
        (
            {"data": {"sample": {"image_size": 8}}},
            "data.sample.image_size: 8 is out of range; allowed: >= 16",
        ),
        (
            {"model": {"arch": 16}},
            "model.arch: 16 is not",
        ),
        (
            {"train_augmented": {"augmentation": "spin"}},
            "train_augmented.augmentation: 'spin' is not allowed; expected one of auto, side_on, top_down, basic, none",
        ),
        (
            {"train_head": {"lr_find": {"start_lr": 0}}},
            "train_head.lr_find.start_lr: 0.0 is out of range; allowed: > 0",
        ),
        ({"predict_tta": {"beta": 2}}, "predict_tta.beta: 2.0 is out of range; allowed: [0, 1]"),
        ({"finetune": {"n_cycle": [2, 0]}}, "finetune.n_cycle: [2, 0] is out of range; allowed: >= 1"),
        (
            {"finetune": {"n_cycle": []}},
            "finetune.n_cycle: [] is out of range; allowed: an integer, or a list",
        ),
        (
            {"model": {"head_hidden": [512, 256]}},
            "model.head_dropout: [0.25] is out of range; allowed: 3 values, one per linear layer",
        ),
    ],
)
def test_out_of_range_names_key_value_and_what_is_allowed(raw, expected):
    assert expected in _error(raw)


def test_load_params_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("base:\n  image_size: 8\n")
    with pytest.raises(ParamsError, match=r"params\.yaml: base\.image_size: 8 is out of range"):
        load_params(path)
    path.write_text("base: [unclosed\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    path.write_text("")
    assert load_params(path) == Params()


def test_decoded_cache_mb_is_a_size():
    assert Params().base.decoded_cache_mb == 2048
    assert params_from_mapping({"base": {"decoded_cache_mb": 0}}).base.decoded_cache_mb == 0
    assert "base.decoded_cache_mb" in _error({"base": {"decoded_cache_mb": -5}})


def test_num_workers_is_auto_or_a_count():
    assert params_from_mapping({"base": {"num_workers": "auto"}}).base.num_workers == "auto"
    assert params_from_mapping({"base": {"num_workers": 3}}).base.num_workers == 3
    assert "base.num_workers: 'many' is not allowed" in _error({"base": {"num_workers": "many"}})
    assert "base.num_workers" in _error({"base": {"num_workers": -1}})


@pytest.mark.parametrize(
    ("sizes", "n_cycle", "per_size"),
    [
        ([64, 96], [2, 3], [2, 3]),
        ([128], [2, 3], [3]),  # one size: the last value
        ([48, 64, 96], [2, 3], [2, 2, 3]),  # more sizes than values: the first value repeats
        ([64, 96], 3, [3, 3]),  # one number: every size
    ],
)
def test_finetune_n_cycle_per_size_counts_from_the_last_size(sizes, n_cycle, per_size):
    finetune = params_from_mapping({"finetune": {"sizes": sizes, "n_cycle": n_cycle}}).finetune
    assert [finetune.for_round(index).n_cycle for index in range(len(sizes))] == per_size
    assert params_from_mapping({"train_augmented": {"n_cycle": 2}}).train_augmented.for_round(0).n_cycle == 2
