"""Checkpoints: atomic replace, weights_only loading, RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from her2exp.core import checkpoint


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    path = checkpoint.save({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")
    first = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(checkpoint.load(path)["rng"])
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1]
    torch.testing.assert_close(first[2], second[2])


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while writing")


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    checkpoint.save({"epoch": 1, "w": torch.ones(4)}, path)
    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.save({"epoch": 2, "w": torch.zeros(4), "bad": Unpicklable()}, path)
    state = checkpoint.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(4))
    # no temp file left; the checksum sidecar still describes the intact file
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt", "last.pt.sha256"]


def test_load_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": Path("/etc")}, path)  # an arbitrary class: not allowed by weights_only
    with pytest.raises(RuntimeError, match=f"checkpoint {path} could not be loaded"):
        checkpoint.load(path)


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        checkpoint.load(tmp_path / "nope.pt")


def test_checksum_sidecar_is_verified_on_load(tmp_path: Path) -> None:
    path = checkpoint.save({"epoch": 3, "w": torch.arange(1000.0)}, tmp_path / "last.pt")
    sidecar = checkpoint.checksum_path(path)
    digest, name = sidecar.read_text().split()
    assert name == "last.pt" and digest == checkpoint.sha256_file(path)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle of the tensor data
    path.write_bytes(bytes(raw))
    with pytest.raises(
        checkpoint.CheckpointCorruptError, match=f"checkpoint {path} does not match"
    ):
        checkpoint.load(path)


def test_every_instant_of_a_save_leaves_a_loadable_checkpoint(tmp_path: Path, monkeypatch) -> None:
    """Stop a second save at each step (after the data, after the widened sidecar, after the
    replace): what is on disk then always loads and matches its sidecar."""
    path = checkpoint.save({"epoch": 1}, tmp_path / "last.pt")
    real_replace = checkpoint.os.replace
    for stop_after in range(1, 4):  # replaces done by save(): sidecar, checkpoint, sidecar
        calls = []

        class Killed(BaseException):
            pass

        def replace(src, dst, calls=calls, stop_after=stop_after):
            real_replace(src, dst)
            calls.append(dst)
            if len(calls) == stop_after:
                raise Killed

        monkeypatch.setattr(checkpoint.os, "replace", replace)
        with pytest.raises(Killed):
            checkpoint.save({"epoch": 1 + stop_after}, path)
        monkeypatch.setattr(checkpoint.os, "replace", real_replace)
        epoch = checkpoint.load(path)["epoch"]
        assert epoch == (1 if stop_after == 1 else 1 + stop_after), stop_after
        checkpoint.save({"epoch": 1}, path)  # back to the starting point
