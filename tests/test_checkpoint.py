"""Checkpoints: atomic replace, weights_only loading, RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from her2exp import checkpoint


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
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left


def test_load_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"obj": Path("/etc")}, path)  # an arbitrary class: not allowed by weights_only
    with pytest.raises(RuntimeError, match=f"checkpoint {path} could not be loaded"):
        checkpoint.load(path)


def test_missing_checkpoint_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt does not exist"):
        checkpoint.load(tmp_path / "nope.pt")
