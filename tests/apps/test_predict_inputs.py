"""Issue 31, item 5: `her2exp-predict` checks what it is given before it scores.

A groups table that puts one file (however it is spelled) in two slides or two patients is
refused as training refuses a duplicate path with a different label. Each command runs
in-process through its main() on the session's smoke run, on real PNG patches.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import SmokeRun
from her2exp.cli.common import compose
from her2exp.data import synthetic


def patches(folder: Path, n: int = 3) -> Path:
    """`n` real 32 px PNG patches, p0.png ...; the folder."""
    folder.mkdir(parents=True)
    data = synthetic.generate(n_patients=2, patches_per_patient=2, image_size=32, seed=3)
    for i in range(n):
        Image.fromarray(data.images[i]).save(folder / f"p{i}.png")
    return folder


def predict(smoke_run: SmokeRun, args: list[str]) -> None:
    from her2exp.cli.predict import main

    main(compose("predict", [f"checkpoint={smoke_run.run_dir / 'checkpoints' / 'best.pt'}", *args]))


def refused(smoke_run: SmokeRun, args: list[str], capsys: pytest.CaptureFixture) -> str:
    """her2exp-predict must exit 2 with one `her2exp: ` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        predict(smoke_run, args)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert err.startswith("her2exp: ") and err.count("\n") == 1, err
    return err.strip()


def groups_csv(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    pd.DataFrame(rows, columns=["path", "slide_id", "patient_id"]).to_csv(path, index=False)
    return path


# -- item 5: one file in two slides or two patients -----------------------------------------------
def test_a_file_in_two_patients_is_refused_whatever_its_spelling(
    smoke_run: SmokeRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder = patches(tmp_path / "tiles")
    out = tmp_path / "p.csv"
    rows = [("p0.png", "S1", "P1"), ("p1.png", "S1", "P1"), ("p2.png", "S2", "P2")]
    clash = groups_csv(tmp_path / "g.csv", [*rows, ("./p0.png", "S1", "P9")])
    err = refused(smoke_run, [f"input={folder}", f"out={out}", f"groups={clash}"], capsys)
    assert err.startswith(f"her2exp: groups={clash}: duplicate path with a different slide_id")
    p0 = (folder / "p0.png").resolve()
    assert f"{p0}: row 1 'p0.png' (slide_id S1, patient_id P1), row 4 './p0.png' " in err
    assert "(slide_id S1, patient_id P9)" in err
    # Its absolute path is the same file too; a slide clash is refused like a patient clash.
    clash = groups_csv(tmp_path / "g2.csv", [*rows, (str(folder / "p2.png"), "S3", "P2")])
    err = refused(smoke_run, [f"input={folder}", f"out={out}", f"groups={clash}"], capsys)
    assert f"row 3 'p2.png' (slide_id S2, patient_id P2), row 4 '{folder / 'p2.png'}' " in err
    assert "(slide_id S3, patient_id P2)" in err
    assert not out.exists()  # refused before anything was scored or written


def test_a_file_listed_twice_with_the_same_ids_is_scored_once(
    smoke_run: SmokeRun, tmp_path: Path
) -> None:
    """Rows that agree change no call (each file is scored once): accepted."""
    folder = patches(tmp_path / "tiles")
    out = tmp_path / "p.csv"
    rows = [("p0.png", "S1", "P1"), ("p1.png", "S1", "P1"), ("p2.png", "S2", "P2")]
    same = groups_csv(tmp_path / "g.csv", [*rows, ("./p0.png", "S1", "P1")])
    predict(smoke_run, [f"input={folder}", f"out={out}", f"groups={same}"])
    table = pd.read_csv(out)
    assert len(table) == 3 and table["path"].is_unique
    got = dict(zip(table["path"].map(lambda p: Path(p).name), table["patient_id"], strict=True))
    assert got == {"p0.png": "P1", "p1.png": "P1", "p2.png": "P2"}
