"""The documentation site builds in strict mode, and the README stays short (issue 33).

The site is built in-process with the flags `make docs` passes (read from the Makefile), so a
warning, a broken cross-reference or a page missing from the navigation fails `make test`.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from sphinx.cmd.build import build_main

# Sphinx 9 deprecations raised inside myst-parser's own code: nothing this project can change.
pytestmark = pytest.mark.filterwarnings("ignore::PendingDeprecationWarning:myst_parser")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def sphinx_flags() -> list[str]:
    """The options of the Makefile's `docs` recipe (`$(PY) -m sphinx FLAGS docs docs/_build/html`)."""
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if "-m sphinx" in x)
    args = shlex.split(line.split("-m sphinx", 1)[1])
    assert args[-2:] == ["docs", "docs/_build/html"], line
    return args[:-2]


def build(src: Path, out: Path) -> tuple[int, str]:
    """Build `src` into `out/html`; the exit status and the warnings."""
    warnings = out / "warnings.txt"
    status = build_main([*sphinx_flags(), "-w", str(warnings), str(src), str(out / "html")])
    return status, warnings.read_text() if warnings.exists() else ""


def test_site_builds_strict(tmp_path: Path) -> None:
    assert {"-W", "-n", "--keep-going"} <= set(sphinx_flags())
    status, warnings = build(DOCS, tmp_path)
    assert status == 0, f"the documentation site does not build in strict mode:\n{warnings}"
    assert (tmp_path / "html" / "index.html").is_file()


def test_page_outside_the_navigation_fails_the_build(tmp_path: Path) -> None:
    """The site's conf.py and flags make an orphan page an error: a minimal site with the real
    conf.py builds, and fails once a page no toctree lists is added."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DOCS / "conf.py", src / "conf.py")
    (src / "index.md").write_text("# Home\n\n```{toctree}\nlisted\n```\n")
    (src / "listed.md").write_text("# Listed\n")
    assert build(src, tmp_path / "ok") == (0, "")
    (src / "orphan.md").write_text("# Orphan\n")
    status, warnings = build(src, tmp_path / "orphan")
    assert status != 0
    assert "orphan" in warnings and "toctree" in warnings, warnings


def test_readme_short() -> None:
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", setup, re.S)
    assert block, "the set-up section has no bash block"
    assert "make train" in block.group(1) and "make test" in block.group(1)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    missing = [t for t in targets if "://" not in t and not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"


def test_getting_started_names_every_make_target() -> None:
    """The page's list of `make help` targets (it once said 12 where there were 18)."""
    makefile = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^([a-zA-Z_-]+):.*?## ", makefile, re.M)
    page = (DOCS / "getting-started.md").read_text()
    listed = re.search(r"`make help` lists every target.*?\((.*?)\)", page, re.S)
    assert listed, "getting-started.md: the list of make targets is gone"
    names = re.findall(r"`([a-z-]+)`", listed.group(1))
    assert sorted(names) == sorted(t for t in targets if t != "help")
