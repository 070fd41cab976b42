"""A model and a checkpoint logged by main before the layered package (58665b9) still load and
answer the same under today's layout (issue 28, item 4): the MLflow model's own code imports
`her2exp.serving`, and best.pt is scored again by `her2exp-eval`'s path at its frozen thresholds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict

from conftest import REPO
from her2exp import evaluation
from her2exp.cli.common import compose

FIXTURE = REPO / "tests" / "fixtures" / "model_58665b9"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy: loading a model may write beside it, and the fixture stays as committed."""
    return Path(shutil.copytree(FIXTURE, tmp_path_factory.mktemp("legacy") / "model"))


def test_the_logged_model_of_main_loads_and_answers_as_it_did(model_dir: Path) -> None:
    import mlflow

    assert "from her2exp.serving import" in (model_dir / "serving_model.py").read_text()
    expected = json.loads((FIXTURE / "expected_answers.json").read_text())
    model = mlflow.pyfunc.load_model(str(model_dir))
    images = pd.DataFrame({"image": expected["images"]})
    for params, want in (
        (None, expected["default"]),
        ({"operating_point": "sens90"}, expected["sens90"]),
    ):
        got = model.predict(images, params=params)
        np.testing.assert_allclose(got["prob_her2_pos"], want["prob_her2_pos"], rtol=1e-6)
        assert got["called_her2_pos"].tolist() == want["called_her2_pos"]
        np.testing.assert_allclose(got["threshold"], want["threshold"], rtol=1e-12)
        assert got["operating_point"].tolist() == want["operating_point"]
    assert 0 < sum(expected["default"]["called_her2_pos"]) < len(expected["images"])


def test_the_checkpoint_of_main_scores_its_test_split_as_recorded(
    model_dir: Path, tmp_path: Path
) -> None:
    recorded = json.loads((FIXTURE / "recorded.json").read_text())
    cfg = compose(
        "eval", ["tracking=off", f"checkpoint={model_dir}/artifacts/best.pt", "split=test"]
    )
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    run = evaluation.load_run(cfg)
    assert run.state["thresholds"] == recorded["thresholds"]
    result = evaluation.evaluate_cohort(cfg)
    assert result["evaluation"].auc.auc == pytest.approx(recorded["test_auc"], abs=1e-12)
