"""`her2exp-prepare`: stain-normalise a data set once (her2exp/apps/prepare.py).

    her2exp-prepare out=DIR data=folder data.root=/path/patches [stain.reference=ref.png]
    her2exp-prepare out=DIR data=manifest data.path=cohort.csv stain.rescale=all

Writes PNGs, a manifest that `data=manifest` reads, the fitted reference and prepare.json. `out`
must be new or empty; `overwrite=true` replaces an earlier her2exp-prepare output, once the new
one is complete.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from her2exp.cli.common import hydra_command
from her2exp.config import commands as schemas


@hydra_command("prepare")
def main(cfg: DictConfig) -> None:
    """Validate as training would, normalise, say how to train on the result."""
    from her2exp.apps.prepare import prepare

    full = schemas.check_prepare(cfg)
    out = Path(cfg.out)
    record = prepare(full, out, overwrite=cfg.overwrite)
    manifest = out / "manifest.csv"
    print(
        f"her2exp: {record['n_patches']} patches normalised ({record['n_left_unchanged']} left "
        f"unchanged) -> {manifest}; train with data=manifest data.path={manifest}"
    )


if __name__ == "__main__":
    main()
