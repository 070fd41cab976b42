"""The command line is checked before the heavy imports: importing the schemas (her2exp.config,
her2exp.config.commands) or any command module (her2exp.cli.*) loads no torch, timm or mlflow.

import-linter's `light-config` and `light-cli` contracts hold the import graph; this test holds
what an interpreter really does (a module-level side effect, a plugin, an import the graph does
not see), in a fresh process so that nothing this test session already imported hides it.
"""

from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys

import her2exp.cli

HEAVY = ("torch", "timm", "mlflow")


def light_modules() -> list[str]:
    cli = [f"her2exp.cli.{m.name}" for m in pkgutil.iter_modules(her2exp.cli.__path__)]
    return ["her2exp.config", "her2exp.config.commands", "her2exp.cli", *sorted(cli)]


def test_config_and_every_command_module_import_no_torch_timm_or_mlflow() -> None:
    modules = light_modules()
    assert "her2exp.cli.train" in modules and "her2exp.cli.common" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    # PYTHONPATH is inherited: the interpreter imports the tree under test.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stdout
