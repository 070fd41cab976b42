"""Sphinx configuration of the her2exp documentation site (`make docs`).

Sphinx + MyST-Parser (Markdown pages) + Furo (theme): all three are actively maintained.
The build is strict (`make docs` and tests/docs pass -W -n): a warning, a broken link or a page
missing from the navigation fails it.
"""

project = "her2exp"
author = "her2exp contributors"
extensions = ["myst_parser"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]  # the build output is not a page
# `[text](page.md#a-heading)` links: MyST makes anchors for headings down to ###.
myst_heading_anchors = 3
# Definition lists (`term` / `: meaning`), for the glossary.
myst_enable_extensions = ["deflist"]
html_theme = "furo"
html_title = "her2exp"
