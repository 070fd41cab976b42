"""docs/python-api.md runs as it stands and does what it says.

Why: a notebook user copies the page's code; a renamed function, key or summary field would
break it without any other test noticing. The page's ```python blocks are run in order, as one
script, in a temporary working directory (its `tempfile.mkdtemp` lands there too), and what
the prose claims is checked on what they left behind: a refused config created nothing, a
finished training run with its test AUC, thresholds and card in MLflow, and an eval run
linked to it with the cohort's AUC. Trains one tiny run (experiment=smoke, one epoch): about
10 s on one quiet CPU core, imports included (16 s on a shared, loaded machine).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO

PAGE = REPO / "docs" / "python-api.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def page_script(markdown: str) -> str:
    """The page's python blocks joined in order: the script a reader would run."""
    return "\n".join(BLOCK.findall(markdown))


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The page's script run once; its namespace. Working directory and temporary folder are
    a fresh tmp dir, so nothing lands in the repository or in the real /tmp."""
    cwd = tmp_path_factory.mktemp("python_api")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        mp.setattr(tempfile, "tempdir", str(cwd))
        namespace: dict[str, Any] = {"__name__": "python_api_page"}
        exec(compile(page_script(PAGE.read_text()), str(PAGE), "exec"), namespace)
    return namespace | {"_cwd": cwd}


def test_the_page_has_one_script_in_several_blocks() -> None:
    blocks = BLOCK.findall(PAGE.read_text())
    assert len(blocks) >= 5
    compile(page_script(PAGE.read_text()), str(PAGE), "exec")  # a syntax error fails here


def test_a_refused_config_raises_and_creates_nothing(ran: dict[str, Any]) -> None:
    """The page's bad learning rate: ConfigError with the command line's message, before any
    run directory or MLflow store exists (the bad run's default store is ./mlflow.db)."""
    assert ran["refused"] == "trainer.lr=-1.0 is not allowed (a value > 0)"
    assert not (ran["work"] / "bad").exists()
    assert not (ran["_cwd"] / "mlflow.db").exists()


def test_training_leaves_a_finished_mlflow_run(ran: dict[str, Any]) -> None:
    import mlflow

    work: Path = ran["work"]
    summary = ran["summary"]
    assert Path(summary["run_dir"]) == (work / "train").resolve()
    assert (work / "train" / "checkpoints" / "best.pt").is_file()
    client = mlflow.MlflowClient(tracking_uri=ran["tracking_uri"])
    trained = client.get_run(ran["run_id"])
    assert trained.info.status == "FINISHED"
    metrics = trained.data.metrics
    assert metrics["test_auc"] == pytest.approx(summary["test_auc"])
    assert 0.0 <= metrics["test_auc"] <= 1.0
    frozen = summary["thresholds"]["tile"]["youden"]
    assert metrics["threshold_youden_val"] == pytest.approx(frozen)
    assert set(summary["thresholds"]) == {"tile", "slide", "patient"}
    assert ran["test_metrics"]["test_youden_sensitivity"] == pytest.approx(
        metrics["test_youden_sensitivity"]
    )
    assert ran["card"].read_text().startswith("# Model card: test_resnet")


def test_eval_scores_the_run_at_its_frozen_thresholds(ran: dict[str, Any]) -> None:
    import mlflow

    result = ran["result"]
    assert result["cohort"] == "external"
    assert result["evaluation"].thresholds == pytest.approx(ran["summary"]["thresholds"]["tile"])
    client = mlflow.MlflowClient(tracking_uri=ran["tracking_uri"])
    ev = client.get_run(result["mlflow_run_id"])
    assert ev.info.status == "FINISHED"
    assert ev.data.tags["source_run_id"] == ran["run_id"]
    assert ev.data.metrics["external_auc"] == pytest.approx(ran["external_auc"])
    assert [r.info.run_id for r in ran["evals"]] == [result["mlflow_run_id"]]
    report = Path(result["report_dir"])
    assert report == ran["work"] / "eval" / "reports"
    assert {"summary.md", "best.json", "model_card.md"} <= {p.name for p in report.iterdir()}
