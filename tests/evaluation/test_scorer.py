"""The one Scorer and the one decision rule: her2exp-eval, her2exp-predict and the served model
score a run alike (a bf16, channels-last run included); predict reads the files a training
folder reads; one place applies calibration and one turns scores into calls."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from conftest import SmokeRun, checkpoint_with, eval_config
from her2exp import evaluation
from her2exp.apps.predict import predict_folder
from her2exp.cli.common import compose
from her2exp.data.sources import IMAGE_SUFFIXES, image_files
from her2exp.evaluation.served import ServedRun

PACKAGE = Path(__file__).resolve().parents[2] / "her2exp"
N = 128  # patches, scored in one batch of 128 by every path


def test_bf16_channels_last_run_gets_one_probability_from_eval_predict_and_serving(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    """A run trained with `trainer.amp=bf16 model.channels_last=true` (the smoke run's weights,
    its config saying so; bf16 autocast runs on the CPU): the same 128 patches in one batch get
    the same probabilities, within 1e-6, from her2exp-eval, her2exp-predict and the served
    model. Before the one Scorer, predict and serving scored in fp32 (5e-4 apart here)."""
    changes = {"trainer.amp": "bf16", "model.channels_last": True, "data.eval_batch_size": N}
    ckpt = checkpoint_with(smoke_run, tmp_path, **changes)
    cohort = [f"checkpoint={ckpt}", "data.n_patients=16", "data.patches_per_patient=8"]
    ecfg = eval_config([*cohort, f"data.eval_batch_size={N}"], tmp_path / "eval")
    evaluation.evaluate_cohort(ecfg)
    by_eval = pd.read_csv(tmp_path / "eval" / "reports" / "predictions_external.csv")
    run = evaluation.load_run(ecfg)
    images = np.stack(list(evaluation.load_cohort(ecfg, run).bundle.view()))
    assert len(by_eval) == len(images) == N

    folder = tmp_path / "patches"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"p{i:03d}.png")  # lossless: the same pixels
    opts = compose("predict", [f"checkpoint={ckpt}", f"input={folder}", f"batch_size={N}"])
    by_predict = predict_folder(opts).tiles
    by_serving = ServedRun(ckpt).predict(images)

    expected = by_eval["prob_her2_pos"].to_numpy()
    np.testing.assert_allclose(by_predict["prob_her2_pos"], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(by_serving["prob_her2_pos"], expected, rtol=0, atol=1e-6)
    # The case has teeth: the run's precision really changes its scores.
    scorer = evaluation.build_scorer(run)
    assert scorer.autocast_dtype == torch.bfloat16 and scorer.preprocess.channels_last
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    fp32 = evaluation.build_scorer(run, "off").probabilities(x)
    assert np.abs(fp32 - expected).max() > 1e-6


def test_predict_scores_the_files_a_training_folder_reads(smoke_run: SmokeRun, tmp_path) -> None:
    """One suffix list and one walk: a .bmp, a .gif and hidden files (macOS `._p.png` copies, a
    hidden folder) are left out by both, every training suffix is read by both."""
    image = np.full((32, 32, 3), 150, dtype=np.uint8)
    folder = tmp_path / "cohort" / "her2_pos"
    (folder / ".cache").mkdir(parents=True)
    for i, suffix in enumerate([*IMAGE_SUFFIXES, ".bmp", ".gif"]):
        Image.fromarray(image).save(folder / f"p{i}{suffix}")
    Image.fromarray(image).save(folder / "._p0.png")
    Image.fromarray(image).save(folder / ".cache" / "p9.png")
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    opts = compose("predict", [f"checkpoint={ckpt}", f"input={tmp_path / 'cohort'}"])
    scored = sorted(Path(p).name for p in predict_folder(opts).tiles["path"])
    assert scored == sorted(p.name for p in image_files(folder))
    assert sorted(Path(p).suffix for p in scored) == sorted(IMAGE_SUFFIXES)


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(p.relative_to(PACKAGE.parent)), ast.parse(p.read_text(), str(p)))
        for p in sorted(PACKAGE.rglob("*.py"))
    ]


def _called_name(node: ast.Call) -> str:
    fn = node.func
    return fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")


def test_one_place_calibrates_scores_and_one_calls_them() -> None:
    """Calibration is applied (metrics.apply_calibration / apply_temperature) only by
    evaluation/scorer.py; TTA views are turned into probabilities only by the scoring pass and
    the Scorer; `>=` against a threshold only in metrics/decision.py (the export's graph folds
    the same formulas into ONNX/TorchScript and is checked against the Scorer instead)."""
    calibrating, averaging, comparing = set(), set(), set()
    for name, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                called = _called_name(node)
                if called in ("apply_calibration", "apply_temperature"):
                    calibrating.add(name)
                if called in ("view_logits", "mean_probability", "mean_class_probabilities"):
                    averaging.add(name)
            if isinstance(node, ast.Compare) and any(isinstance(o, ast.GtE) for o in node.ops):
                right = ast.unparse(node.comparators[0]).lower()
                if right in ("t", "thr") or "threshold" in right or "cut" in right:
                    comparing.add(name)
    own = {"her2exp/metrics/probabilities.py"}  # the formulas themselves
    assert calibrating - own == {"her2exp/evaluation/scorer.py"}
    assert averaging == {"her2exp/engine/scoring.py", "her2exp/evaluation/scorer.py"}
    assert comparing == {"her2exp/metrics/decision.py"}
