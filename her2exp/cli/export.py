"""`her2exp-export`: a trained run as an ONNX or TorchScript graph (her2exp/apps/export.py).

    her2exp-export run_id=<MLflow run id> format=onnx        # -> <run dir>/export/model.onnx
    her2exp-export checkpoint=.../checkpoints/best.pt format=torchscript   # -> .../export/model.ts
    her2exp-export run_id=<id> format=onnx out=her2.onnx overwrite=true

In: uint8 RGB patches (N, 3, H, W) at the run's data.image_size, any N; out: P(HER2+) per patch,
the score the run's frozen thresholds apply to (mean/std, the run's TTA views and its temperature
are inside the graph; the thresholds travel in the file's metadata). Resize and stain
normalisation stay outside: a Macenko run is warned about. The file is checked against
her2exp's own scoring on the run's test patches (max |diff| <= 1e-4, onnxruntime on the CPU)
before it is written and logged to the run (artifacts export/, tags export.<format>.*, metric
export_<format>_max_abs_diff). An earlier export at out= (her2exp's metadata inside it) is
replaced only with overwrite=true; any other file there is never replaced.
"""

from __future__ import annotations

from omegaconf import DictConfig

from her2exp.cli.common import UserError, hydra_command
from her2exp.config import commands as schemas


@hydra_command("export")
def main(cfg: DictConfig) -> str:
    """Export, check, write, log; print where it went. Returns the file's path."""
    from her2exp.apps.export import ExportCheckError, export_run

    schemas.check_export(cfg)
    try:
        done = export_run(cfg)
    except ExportCheckError as exc:
        raise UserError(str(exc)) from exc
    print(
        f"her2exp: {done.fmt} export -> {done.path} (max |diff| from her2exp's scoring "
        f"{done.max_abs_diff:.2g} on {done.n_checked} test patches, batch {done.n_checked} and 1; "
        f"tta {done.tags[f'export.{done.fmt}.tta']}, temperature "
        f"{done.tags[f'export.{done.fmt}.temperature']})"
    )
    for note in done.warnings:
        print(f"her2exp: note: {note}")
    if done.logged_to is None:
        print("her2exp: not logged to MLflow (log=false, or no mlflow_run.json in the run dir)")
    else:
        run_id, uri = done.logged_to
        print(
            f"her2exp: logged to MLflow run {run_id} in {uri}: artifact export/, tags "
            f"export.{done.fmt}.*, metric export_{done.fmt}_max_abs_diff"
        )
    return str(done.path)


if __name__ == "__main__":
    main()
