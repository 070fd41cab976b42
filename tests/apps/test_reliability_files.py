"""Nothing of the user's is lost (issue 15): file names from data stay in their folder, existing
outputs are refused unless overwrite=true, files respect the umask, her2exp-sync sends only the
run directory's own files, and no command writes outside its output folder."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, SmokeRun
from her2exp import reports
from her2exp.cli import manifest as manifest_cli
from her2exp.cli import prepare as prepare_cli
from her2exp.cli.common import compose
from her2exp.core import checkpoint, fileio
from her2exp.data import synthetic
from her2exp.tracking import offline

SIZE = 32
HOSTILE = ["../../../../../ESCAPED", "/abs", "a/b", "a_b", "", "é中", "..", ".", "a:b", "a b"]


def tree(root: Path) -> dict[str, float]:
    """Every path under `root` (files, folders, links) with its mtime: a before/after snapshot."""
    return {str(p.relative_to(root)): p.lstat().st_mtime for p in root.rglob("*")}


def command(module: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """A her2exp command of this checkout as a real process (the console scripts in the venv
    may point at another checkout)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", **env}
    full_env["PYTHONDONTWRITEBYTECODE"] = "1"
    argv = [sys.executable, "-m", f"her2exp.cli.{module}", *args]
    return subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300)


def exit_code(main, config: str, overrides: list[str]) -> int:
    """A command's main in this process on the composed config: its exit status."""
    try:
        main(compose(config, overrides))
    except SystemExit as exc:
        return int(exc.code)
    return 0


def hostile_manifest(folder: Path, ids: list[str] = HOSTILE) -> Path:
    """Real PNGs and a manifest whose patient ids try to leave the output folder or collide."""
    d = synthetic.generate(n_patients=6, patches_per_patient=2, image_size=SIZE, seed=3)
    folder.mkdir(parents=True)
    rows = []
    for i, (image, label) in enumerate(zip(d.images, d.frame["label"], strict=True)):
        Image.fromarray(image).save(folder / f"p{i}.png")
        rows.append({"path": f"p{i}.png", "label": int(label), "patient_id": ids[i % len(ids)]})
    pd.DataFrame(rows).to_csv(folder / "cohort.csv", index=False)
    return folder / "cohort.csv"


def prepare_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"out={out}",
        "data=manifest",
        f"data.path={manifest}",
        f"data.image_size={SIZE}",
        "data.patient_label=max",  # ids repeat across labels (a collision test, not biology)
        *extra,
    ]


def assert_prepared_inside(out: Path, n: int) -> None:
    written = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    assert len(written) == n and written["path"].is_unique
    files = sorted((out / "images").iterdir())
    assert len(files) == n and all(f.is_file() and f.suffix == ".png" for f in files)
    for rel in written["path"]:
        assert (out / rel).resolve().parent == (out / "images").resolve()


# --- 1. file names built from the user's data -----------------------------------------------------


def test_safe_name_keeps_ids_apart_and_inside_refuses_escapes(tmp_path: Path) -> None:
    names = [fileio.safe_name(x) for x in [*HOSTILE, "P0001", "a\x00b", "x" * 300]]
    assert len(set(names)) == len(names)  # "a/b", "a_b", "a:b", "a b" stay apart
    for name in names:
        assert name and "/" not in name and not name.startswith(".") and len(name) <= 80
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in name)
    assert fileio.safe_name("P0001-S0") == "P0001-S0"  # a clean id reads as given
    assert fileio.inside(tmp_path, "images/a.png") == (tmp_path / "images/a.png").resolve()
    for bad in ("../x", "/etc/passwd", "images/../../x"):
        with pytest.raises(fileio.UnsafePath, match="outside"):
            fileio.inside(tmp_path, bad)
    (tmp_path / "link").symlink_to("/")
    with pytest.raises(fileio.UnsafePath, match="outside"):
        fileio.inside(tmp_path, "link/etc")


def test_prepare_keeps_hostile_patient_ids_inside_out(tmp_path: Path) -> None:
    from her2exp.apps.prepare import prepare
    from her2exp.config import commands as schemas

    manifest = hostile_manifest(tmp_path / "src")
    out = tmp_path / "deep" / "out"
    before = tree(tmp_path)
    full = schemas.check_prepare(compose("prepare", prepare_args(manifest, out)))
    record = prepare(full, out)
    assert record["n_patches"] == 12
    new = {p for p in tree(tmp_path) if p not in before}
    assert all(p.startswith("deep") for p in new), sorted(new)  # no ESCAPED.png above out
    assert_prepared_inside(out, 12)


# --- 4. the user's files are not overwritten ------------------------------------------------------


def test_manifest_refuses_to_replace_an_existing_manifest(tmp_path: Path) -> None:
    d = synthetic.generate(n_patients=6, patches_per_patient=2, image_size=SIZE, seed=0)
    root = tmp_path / "patches"
    for k, (image, label) in enumerate(zip(d.images, d.frame["label"], strict=True)):
        (root / ("her2_neg", "her2_pos")[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / ("her2_neg", "her2_pos")[label] / f"P{k}_0.png")
    mine = root / "manifest.csv"
    mine.write_text("path,label,patient_id\nedited by hand,1,real patient\n")
    proc = command("manifest", [f"input={root}", f"image_size={SIZE}"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"her2exp: {mine} exists")
    assert "overwrite=true" in proc.stderr and "edited by hand" in mine.read_text()
    # export_synthetic=DIR over a folder holding a manifest: refused alike, nothing touched.
    args = [f"export_synthetic={root}", "n_patients=6", "patches_per_patient=2", "image_size=32"]
    assert exit_code(manifest_cli.main, "manifest", args) == 2
    assert (
        "edited by hand" in mine.read_text()
        and not (root / "her2_neg" / "P0000-S0_000.png").exists()
    )
    # A bad file, skipped and listed; once it is gone a rerun leaves no stale list behind.
    (root / "her2_pos" / "bad.png").write_bytes(b"\x89PNG\r\n")
    base = [f"input={root}", f"image_size={SIZE}", "on_bad_file=skip", "overwrite=true"]
    assert exit_code(manifest_cli.main, "manifest", base) == 0
    listed = root / "manifest.skipped.csv"
    assert "bad.png" in listed.read_text() and "edited by hand" not in mine.read_text()
    (root / "her2_pos" / "bad.png").unlink()
    assert exit_code(manifest_cli.main, "manifest", base) == 0
    assert not listed.exists()


def test_prepare_refuses_a_non_empty_out_and_swaps_in_only_a_complete_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import her2exp.apps.prepare

    big = hostile_manifest(tmp_path / "big", [f"P{i}" for i in range(6)])
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert exit_code(prepare_cli.main, "prepare", prepare_args(big, out)) == 2
    assert exit_code(prepare_cli.main, "prepare", prepare_args(big, out, "overwrite=true")) == 2
    assert (out / "notes.txt").read_text() == "mine"  # not an earlier prepare output: kept
    (out / "notes.txt").unlink()
    assert exit_code(prepare_cli.main, "prepare", prepare_args(big, out)) == 0  # empty: fine
    assert_prepared_inside(out, 12)
    assert exit_code(prepare_cli.main, "prepare", prepare_args(big, out)) == 2  # now it is not
    # A smaller set replaces it whole (no stale images) ...
    small = tmp_path / "small.csv"
    pd.read_csv(big).groupby("label").head(2).assign(path=lambda f: "big/" + f["path"]).to_csv(
        small, index=False
    )
    assert exit_code(prepare_cli.main, "prepare", prepare_args(small, out, "overwrite=true")) == 0
    assert_prepared_inside(out, 4)
    # ... and a failure half-way (a full disk at the reference) leaves the old set as it was.
    before = tree(out)

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(her2exp.apps.prepare.checkpoint, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        exit_code(prepare_cli.main, "prepare", prepare_args(big, out, "overwrite=true"))
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "prepared", "small.csv"]


# --- 10. shared run directories -----------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the umask from /proc")
def test_files_respect_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
            os.umask(umask)
            folder = tmp_path / oct(umask)
            written = [
                fileio.atomic_write(folder / "a.txt", "x"),
                checkpoint.save({"w": np.zeros(2)}, folder / "last.pt"),
                checkpoint.checksum_path(folder / "last.pt"),
                reports.write_best_json(folder / "best.json", {"auc": 0.5}),
            ]
            for path in written:
                assert stat.S_IMODE(path.stat().st_mode) == mode, (oct(umask), path.name)
            with fileio.staged_dir(folder / "staged") as tmp:
                (tmp / "f").write_text("x")
            assert stat.S_IMODE((folder / "staged").stat().st_mode) == 0o777 & ~umask
    finally:
        os.umask(old)


# --- 11. her2exp-sync trusts only the run directory's own files ---------------------------------


def test_sync_refuses_uploads_from_outside_the_run_dir(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("sync"))
    run_dir = tmp_path / "run"
    (run_dir / "reports").mkdir(parents=True)
    (run_dir / "reports" / "summary.md").write_text("ok")
    secret = tmp_path / "secret.txt"
    secret.write_text("not the run's")
    (run_dir / "link.txt").symlink_to(secret)
    fileio.atomic_write_text(
        run_dir / "mlflow_run.json",
        json.dumps({"run_id": run.info.run_id, "tracking_uri": uri, "experiment_id": "1"}),
    )
    metric = {"op": "metrics", "run_id": run.info.run_id, "metrics": [["probe", 1.0, 0, 1]]}
    good = {"op": "artifact", "run_id": run.info.run_id, "path": str(run_dir / "reports")}
    hostile = [
        {**good, "path": str(secret)},
        {**good, "path": str(run_dir / "link.txt")},  # a link inside, pointing out
        {**good, "path": str(run_dir / "reports" / ".." / ".." / "secret.txt")},
        {"op": "model", "run_id": run.info.run_id, "path": str(tmp_path)},
    ]
    buffer = run_dir / "mlflow_buffer.jsonl"
    for bad in hostile:
        text = "".join(json.dumps(r) + "\n" for r in (metric, good, bad))
        buffer.write_text(text)
        with pytest.raises(ValueError, match="call 3.*outside"):  # fileio.UnsafePath
            offline.sync(run_dir)
        assert buffer.read_text() == text  # nothing sent, nothing dropped
    proc = command("sync", [f"input={run_dir}"], tmp_path)  # the last one, as the user sees it
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("her2exp: refused")
    assert f"{tmp_path}, outside {run_dir}" in proc.stderr and buffer.read_text() == text
    assert client.get_metric_history(run.info.run_id, "probe") == []
    assert client.list_artifacts(run.info.run_id) == []
    # The run directory's own files still go.
    buffer.write_text("".join(json.dumps(r) + "\n" for r in (metric, good)))
    assert offline.sync(run_dir) == (2, [])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "probe")] == [1.0]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["summary.md"]
    assert not buffer.exists()


# --- every command writes only inside its output ------------------------------------------------


def test_commands_write_only_inside_their_output(smoke_run: SmokeRun, tmp_path: Path) -> None:
    home, cwd, tmp = tmp_path / "home", tmp_path / "cwd", tmp_path / "tmp"
    for folder in (home, cwd, tmp):
        folder.mkdir()
    hostile = hostile_manifest(tmp_path / "hostile")
    env = {"HOME": str(home), "TMPDIR": str(tmp), "XDG_CACHE_HOME": "", "MPLCONFIGDIR": ""}
    env = {k: v for k, v in env.items() if v}
    ckpt = smoke_run.run_dir / "checkpoints" / "best.pt"
    steps = [
        ("manifest", [f"export_synthetic={tmp_path / 'export'}", "n_patients=12",
                      "patches_per_patient=1", f"image_size={SIZE}"], "export"),
        ("manifest", [f"root={tmp_path / 'export'}", f"out={tmp_path / 'lists' / 'm.csv'}",
                      'patient_regex="^([^-]+)-"', f"image_size={SIZE}"], "lists"),
        ("prepare", prepare_args(hostile, tmp_path / "prep" / "set"), "prep"),  # ESCAPED: 2 up
        ("predict", [f"checkpoint={ckpt}", f"input={tmp_path / 'export'}",
                     f"out={tmp_path / 'pred' / 'p.csv'}"], "pred"),
    ]  # fmt: skip
    for module, args, output in steps:
        before = tree(tmp_path)
        started = time.time()
        proc = command(module, args, cwd, **env)
        assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"
        after = tree(tmp_path)
        changed = {p for p, t in after.items() if p not in before or t != before[p]}
        stray = {p for p in changed if p != output and not p.startswith(f"{output}/")}
        # `import timm` makes torch's (empty) inductor cache folder in TMPDIR: not her2exp's.
        cache = {p for p in stray if p == "tmp" or p.startswith("tmp/torchinductor_")}
        assert all((tmp_path / p).is_dir() and p.count("/") <= 1 for p in cache), sorted(cache)
        stray -= cache
        assert not stray, f"{module} wrote outside {output}/: {sorted(stray)}"
        assert any(p.startswith(f"{output}/") for p in changed), module
        assert smoke_run.run_dir.stat().st_mtime < started  # the checkpoint's run untouched
    assert_prepared_inside(tmp_path / "prep" / "set", 12)
    assert len(pd.read_csv(tmp_path / "pred" / "p.csv")) == 12
