"""The tree stays clean: ruff check and ruff format pass (CI runs this through `make test`)."""

from __future__ import annotations

import subprocess

from conftest import BIN, REPO


def test_ruff_check_and_format() -> None:
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([str(BIN / "ruff"), *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, f"ruff {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
