"""The command line is checked before the heavy imports: importing the schemas (her2exp.config,
her2exp.config.commands) or any command module (her2exp.cli.*) loads no torch, timm or mlflow,
and neither does her2exp-train answering a misspelt key or a value out of range.

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


#: her2exp-train's refused command lines and their one line each: a misspelt key (answered
#: before Hydra composes) and a value out of range (checked before the run directory's resolver,
#: which imports torch under torchrun, is resolved).
REFUSED = {
    "trainer.epoch=3": "her2exp: trainer.epoch is not a key of her2exp-train (did you mean "
    "trainer.epochs?)",
    "trainer.lr=-1": "her2exp: trainer.lr=-1.0 is not allowed (a value > 0)",
}


def test_config_and_every_command_module_import_no_torch_timm_or_mlflow(tmp_path) -> None:
    """Then, in the same interpreter, her2exp-train's refusals: one line each, exit 2, nothing
    written, and still none of the heavy modules loaded (issue 32: 5-9 s to answer a typo)."""
    modules = light_modules()
    assert "her2exp.cli.train" in modules and "her2exp.cli.common" in modules
    script = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)\n"
        "codes = []\n"
        f"for arg in {list(REFUSED)!r}:\n"
        "    sys.argv = ['her2exp-train', arg]\n"
        "    try:\n"
        "        importlib.import_module('her2exp.cli.train').main()\n"
        "    except SystemExit as exc:\n"
        "        codes.append(exc.code)\n"
        f"print(json.dumps([heavy, codes, sorted(m for m in {HEAVY!r} if m in sys.modules)]))\n"
    )
    # PYTHONPATH is inherited: the interpreter imports the tree under test.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    imported, codes, after_refusals = json.loads(done.stdout.strip().splitlines()[-1])
    assert imported == [], done.stdout
    assert codes == [2] * len(REFUSED) and after_refusals == [], done.stdout
    assert done.stderr.strip().splitlines() == list(REFUSED.values()), done.stderr
    assert not any(tmp_path.iterdir()), "a refused command line left files behind"
