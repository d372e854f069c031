"""Other backbones through the whole pipeline, as a user tries them: `dvc exp run -S model.arch=<name>
-S model.pretrained=false` on a tiny project (random weights: tests stay offline), each ending with a
submission in sample_submission.csv's shape whose rows are probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from project_fixture import ALL_STAGES, TINY_PARAMS, make_project, run, stages_run

pytestmark = pytest.mark.slow  # runs `dvc exp run` four times

BACKBONES = [
    ("convnext_tiny", 32),
    ("efficientnet_v2_s", 32),
    ("regnet_y_400mf", 32),
    ("vit_b_16", 224),  # its position embedding fixes the image size
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_project(tmp_path_factory.mktemp("backbones"), TINY_PARAMS)


@pytest.mark.parametrize(("arch", "size"), BACKBONES)
def test_exp_run_with_another_backbone_ends_with_a_valid_submission(
    project: Path, arch: str, size: int
) -> None:
    settings = [f"model.arch={arch}", "model.pretrained=false"]
    if size != TINY_PARAMS["base"]["image_size"]:
        settings += [f"base.image_size={size}", f"finetune.sizes=[{size}]"]
    output = run(["dvc", "exp", "run", *[part for setting in settings for part in ("-S", setting)]], project)
    ran = stages_run(output)
    assert ran[-1] == "submission" and set(ran) <= set(ALL_STAGES)
    assert ran[0] in ("download", "precompute")  # the first run makes the data; later ones start at the body
    sample = pd.read_csv(project / "data" / "raw" / "sample_submission.csv")
    submission = pd.read_csv(project / "data" / "submission.csv")
    assert list(submission.columns) == list(sample.columns)
    assert list(submission["id"]) == list(sample["id"])
    probabilities = submission.drop(columns="id").to_numpy()
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
