"""dvc.yaml is the one place paths live, and each stage's deps name every library module its script imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

from kagglecls.params import Params, load_params

REPO = Path(__file__).resolve().parents[1]
LIBRARY = REPO / "src" / "kagglecls"
STAGES = ["download", "reorganise", "size_histogram", "precompute", "train_head",
          "train_augmented", "finetune", "export", "predict_tta", "submission"]  # fmt: skip


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kagglecls"):
            if node.module == "kagglecls":
                found |= {alias.name for alias in node.names}
            else:
                found.add(node.module.split(".")[1])
    return found


def _closure(script: Path) -> set[str]:
    seen: set[str] = set()
    pending = list(_imported_modules(script))
    while pending:
        module = pending.pop()
        if module not in seen:
            seen.add(module)
            pending += _imported_modules(LIBRARY / f"{module}.py")
    return seen


def _pipeline() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_stages_are_the_recipe_in_order() -> None:
    assert list(_pipeline()) == STAGES


def test_each_stage_depends_on_exactly_its_script_and_the_modules_it_imports() -> None:
    for name, stage in _pipeline().items():
        script = REPO / "stages" / f"{name}.py"
        expected = {f"src/kagglecls/{module}.py" for module in _closure(script)} | {f"stages/{name}.py"}
        code_deps = {dep for dep in stage["deps"] if dep.endswith(".py")}
        assert code_deps == expected, name


def test_stage_scripts_hold_no_paths() -> None:
    for name in STAGES:
        source = (REPO / "stages" / f"{name}.py").read_text().split('"""', 2)[2]  # past the docstring
        assert not re.search(r"[\"'](data|models|dvclive|plots)/", source), name


def test_params_keys_named_in_dvc_yaml_exist() -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, stage in _pipeline().items():
        for key in stage.get("params", []):
            node = raw
            for part in key.split("."):
                assert part in node, f"{name}: params key {key} is not in params.yaml"
                node = node[part]


def test_default_params_load() -> None:
    assert isinstance(load_params(REPO / "params.yaml"), Params)


# Knobs that change how fast a stage runs, never what it writes (features at any precompute batch size are the
# same bytes): no stage lists them, so changing one reruns nothing.
SPEED_KNOBS = ("base.num_workers", "base.decoded_cache_mb", "precompute.batch_size")


def test_no_stage_lists_a_speed_knob() -> None:
    for name, stage in _pipeline().items():
        for key in stage.get("params", []):
            for knob in SPEED_KNOBS:
                assert not knob.startswith(f"{key}."), f"{name}: params {key} covers the speed knob {knob}"
                assert key != knob, f"{name}: lists the speed knob {knob}"


def test_stages_list_keys_not_other_stages_sections() -> None:
    for name, stage in _pipeline().items():
        for key in stage.get("params", []):
            assert "." in key or key == name, f"{name}: lists the whole section {key}; list the keys it reads"


def test_only_the_stages_that_draw_import_plots_and_precompute_trains_nothing() -> None:
    # The training stages log numbers through dvclive and DVC draws them: a figure's look reruns no training.
    drawing = {name for name in STAGES if "plots" in _closure(REPO / "stages" / f"{name}.py")}
    assert drawing == {"size_histogram", "predict_tta"}
    assert not {"training", "lr_find", "checkpoints", "plots"} & _closure(REPO / "stages" / "precompute.py")
