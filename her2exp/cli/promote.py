"""`her2exp-promote`: point a registered model's alias at a version that passed its checklist.

    her2exp-promote name=her2 version=3                      # alias=champion
    her2exp-promote name=her2 version=3 alias=staging tracking.uri=http://127.0.0.1:5000
    her2exp-promote name=her2 version=4 force=true reason='accepted by the review of 2026-12-01'

The checklist (her2exp/tracking/registry.py): the version's training run finished, and its test
sensitivity at the run's frozen decision point reaches the run's evaluation.target_sensitivity.
A version that fails it is refused (one `her2exp: ...` line, exit 2, nothing changed) unless
force=true, which tags the version `her2exp.promoted_with_force=true` with the reason. Then
`her2exp-predict 'model_uri=models:/her2@champion' input=...` scores with that version's run.
"""

from __future__ import annotations

from omegaconf import DictConfig

from her2exp.cli.common import UserError, hydra_command
from her2exp.config import ConfigError
from her2exp.config import commands as schemas


@hydra_command("promote")
def main(cfg: DictConfig) -> None:
    """Check, set the alias, tag the version, print what was checked."""
    from her2exp.tracking.registry import promote

    schemas.check_promote(cfg)
    try:
        done = promote(
            str(cfg.name), cfg.version, str(cfg.alias), cfg.tracking.uri, cfg.force, cfg.reason
        )
    except ConfigError as exc:  # a refusal of the registry's, not a bad configuration value
        raise UserError(str(exc)) from None
    for c in done.checks:
        print(f"  {'PASS' if c.passed else 'FAIL'} {c.item}: {c.evidence}")
    moved = f" (was version {done.previous})" if done.previous not in (None, done.version) else ""
    forced = " WITH FORCE (recorded on the version)" if done.forced else ""
    print(
        f"her2exp: models:/{done.name}@{done.alias} -> version {done.version} "
        f"(run {done.run_id}){moved}{forced}"
    )


if __name__ == "__main__":
    main()
