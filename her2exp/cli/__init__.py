"""The console scripts, one module per command; `common.hydra_command` is their convention.

What the package owns: parsing a command line (Hydra over the command's schema in
her2exp.config), the one-line user errors and exit codes (common.py), calling one app and
printing its result. The work itself lives below: her2exp.apps (eval, predict, export, tile,
prepare, compare, server, rerun), her2exp.training (train), her2exp.tracking (sync, promote).

What it may import: every floor below it (apps, training, evaluation, ... config, core), but
torch, timm and mlflow never at import time, itself or through a module it imports at the top
(the `light-cli` contract; tests/cli/test_light_imports.py): a module composes and checks its
config first (her2exp.config), then imports the app inside `main`, so a mistake in a command
line is one line in a second, before any heavy import. Nothing imports cli (bench, its sibling,
calls the apps and config directly). docs/architecture.md, "Commands", describes the convention.
"""
