"""One convention for every command (her2exp/cli/common.py): Hydra `key=value` overrides over a
schema, and a user's mistake - a Hydra override error included - as exactly one `her2exp: ...`
line on stderr with exit status 2. Internal bugs keep their traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN
from her2exp.cli import common

# (console script, a bad command line): unknown key, wrong type, malformed, unknown option,
# an old-style flag, a sweep whose first job does not compose. Each installed script once, as a
# process: what only a process shows (its exit status, all it writes on stderr, its cwd).
BAD = [
    ("her2exp-eval", ["foo=1"]),
    ("her2exp-predict", ["batch_size=abc"]),
    ("her2exp-compare", ["sweep=[1"]),
    ("her2exp-manifest", ["--export-synthetic", "out"]),
    ("her2exp-prepare", ["data=nope"]),
    ("her2exp-server", ["port=abc"]),
    ("her2exp-sync", ["input=/nonexistent/run"]),
    ("her2exp-rerun", ["-m", "run_id=x", "out=[a,b"]),
    ("her2exp-tile", ["input=/nonexistent/slides.csv", "out={out}/tiles"]),
    ("her2exp-train", ["trainer.epochs=abc"]),
]
# The further mistakes of a script already started above: the same main() in this process (the
# path from sys.argv to the one line is the same; an interpreter start each cost seconds).
BAD_IN_PROCESS = [
    ("train", ["trainer.no_such_key=1"]),
    ("train", ["-m", "trainer.epochs=1,abc"]),
    # issue 15: values out of range, an unwritable run directory ({out}: outside the cwd)
    ("train", ["trainer.min_lr_ratio=-1", "hydra.run.dir={out}/a"]),
    ("train", ["loss.label_smoothing=1.5", "hydra.run.dir={out}/b"]),
    ("train", ["hydra.run.dir=/proc/her2exp/run"]),
    ("eval", ["run_id=x", "evaluation.n_boot=-1", "hydra.run.dir={out}/c"]),
    # issue 20: her2exp-promote's own mistakes, before any registry is opened or created
    ("promote", ["name=her2", "version=abc"]),
    ("promote", ["name=her2", "version=1", "tracking.uri=sqlite:///{out}/no_such.db"]),
]


def test_console_scripts_report_a_bad_override_in_one_line(tmp_path: Path) -> None:
    """The installed scripts, started together (each pays the interpreter start once)."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    out = tmp_path.parent / f"{tmp_path.name}-runs"
    procs = [
        (
            name,
            subprocess.Popen(
                [str(BIN / name), *(a.format(out=out) for a in args)],
                cwd=tmp_path,
                env=env,
                **pipes,
            ),
        )
        for name, args in BAD
    ]
    for name, proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (name, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("her2exp: "), (name, err)
        assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err, (name, err)
    assert not any(tmp_path.iterdir()), "a failed command left files behind"


@pytest.mark.parametrize(("module", "argv"), BAD_IN_PROCESS)
def test_more_bad_command_lines_are_one_line_with_exit_2(
    module: str, argv: list[str], tmp_path: Path, monkeypatch, capsys
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    code, err = run_main(
        module, [a.format(out=tmp_path / "runs") for a in argv], monkeypatch, capsys
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("her2exp: "), err
    assert "Traceback" not in err and "HYDRA_FULL_ERROR" not in err, err
    assert not any(cwd.iterdir()), "a failed command left files behind"


def run_main(module: str, argv: list[str], monkeypatch, capsys) -> tuple[int | None, str]:
    """A command's main() in this process, as its console script calls it."""
    import importlib

    monkeypatch.setattr(sys, "argv", [f"her2exp-{module}", *argv])
    main = importlib.import_module(f"her2exp.cli.{module}").main
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("module", "argv", "expected"),
    [
        (
            "compare",
            ["foo=1"],
            "her2exp: foo is not a key of her2exp-compare (its keys: sweep, out,",
        ),
        ("compare", ["sweep"], "her2exp: 'sweep' is not key=value (missing EQUAL"),
        (
            "predict",
            ["batch_size=abc"],
            "her2exp: batch_size='abc' is not allowed (an integer >= 1)",
        ),
        (
            "prepare",
            ["data=nope"],
            "her2exp: data=nope is not an option of data (options: folder, manifest, slides,",
        ),
        ("predict", ["-m", "batch_size=abc,1"], "batch_size='abc' is not allowed (an integer"),
        ("server", ["--port", "5000"], "her2exp: --port is not an option (write port=5000:"),
        ("predict", ["input=/nonexistent"], "her2exp: input=/nonexistent"),
        ("server", ["port=0"], "her2exp: port=0 is not allowed (a TCP port"),
        # issue 32: a misspelt key, an old-style flag, an unknown option: the closest valid ones
        (
            "train",
            ["trainer.epoch=3"],
            "her2exp: trainer.epoch is not a key of her2exp-train (did you mean trainer.epochs?)",
        ),
        ("train", ["+trainer.epoch=3"], "trainer.epoch is not a key of her2exp-train (did you"),
        ("train", ["--epochs", "3"], "her2exp: --epochs is not an option (write trainer.epochs=3:"),
        (
            "train",
            ["model=resnet"],
            "her2exp: model=resnet is not an option of model (did you mean resnet18",
        ),
        (
            "sync",
            ["model=resnet18"],
            "her2exp: model is not a key of her2exp-sync (its keys: input, tracking.uri)",
        ),
        (
            "promote",
            ["name=her2", "version=0"],
            "her2exp: version=0 is not allowed (a version number >= 1)",
        ),
        # Asked of timm by training (builders.build_runtime) before any work, not by the light
        # config check: the same one line and exit 2 as when config.commands.check_train did.
        (
            "train",
            ["experiment=smoke", "tracking=off", "model.name=resnet181"],
            "her2exp: model.name='resnet181' is not a timm model",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_2(
    module: str, argv: list[str], expected: str, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # a multirun would create its sweep directory here
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, err = run_main(module, argv, monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert "HYDRA_FULL_ERROR" not in os.environ  # restored for the rest of the process


def test_only_rank_0_reports_under_torchrun(monkeypatch, capsys) -> None:
    monkeypatch.setenv("RANK", "1")
    code, err = run_main("compare", ["foo=1"], monkeypatch, capsys)
    assert code == 2 and err == ""


def test_internal_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys) -> None:
    """An exception from inside the command - even an OmegaConf one, which composition errors
    also are - is a bug: it propagates (Python prints the traceback, exit 1)."""
    from omegaconf.errors import ConfigKeyError

    import her2exp.apps.compare

    monkeypatch.chdir(tmp_path)
    for exc in (RuntimeError("bug"), ConfigKeyError("missing key in the code")):

        def broken(*_args, exc=exc):
            raise exc

        monkeypatch.setattr(her2exp.apps.compare, "compare", broken)
        monkeypatch.setattr(sys, "argv", ["her2exp-compare"])
        with pytest.raises(type(exc)):
            common_main()


def common_main() -> None:
    from her2exp.cli.compare import main

    main()


def test_hydra_full_error_shows_the_whole_traceback(monkeypatch) -> None:
    from hydra.errors import ConfigCompositionException

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["her2exp-compare", "leaderboard=maybe"])
    with pytest.raises(ConfigCompositionException):
        common_main()
    assert os.environ["HYDRA_FULL_ERROR"] == "1"


def test_a_leading_bare_argument_is_the_commands_main_key() -> None:
    """`her2exp-sync DIR` (older syntax) becomes run_dir='DIR', quoted for Hydra's grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for odd in ("/tmp/a dir/it's,1", "C:\\runs\\a", "x\\'y", "ends\\"):
        arg, rest = common.positional_to_override([odd, "tracking.uri=x"], "run_dir")
        assert rest == "tracking.uri=x"
        assert parser.parse_override(arg).value() == odd, arg
    assert common.positional_to_override(["run_dir=a"], "run_dir") == ["run_dir=a"]
    assert common.positional_to_override(["a"], None) == ["a"]


def test_compose_gives_the_commands_config() -> None:
    cfg = common.compose("server", ["port=5001"])
    assert cfg.port == 5001 and cfg.out == ".mlflow-server" and cfg.backend_store_uri is None
    cfg = common.compose("manifest", ["input=/data", "score_map={0:0,1+:0,3+:1}"])
    from her2exp.config.commands import manifest_data_config

    assert dict(manifest_data_config(cfg).score_map) == {"0": 0, "1+": 0, "3+": 1}
