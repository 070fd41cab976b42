"""What both file scanners produce: the rows of a source before its files are opened, and the
one exception that lists every problem found in them.

A scanner (folder or manifest) never stops at the first bad row: it records what is wrong with
each, so the user fixes the whole data set in one pass (or `data.on_bad_file=skip` drops the bad
rows and keeps their list for the run's artifacts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

MANIFEST_COLUMNS = ("path", "label", "patient_id", "slide_id", "site", "split")
#: The columns of a scan's rows after `file` and `display`.
META_COLUMNS = ["label", "her2_score", "patient_id", "slide_id", "site", "split"]
SKIPPED_COLUMNS = ("path", "problem")
UNKNOWN_SITE = "unknown"
#: Lines of problems an error message shows; the exception's `problems` table holds them all.
MAX_LISTED = 200


class DataValidationError(ValueError):
    """Every problem found in the user's data, one line per file: raised before training."""

    def __init__(self, where: str, problems: list[tuple[str, str]], advice: str = "") -> None:
        self.problems = pd.DataFrame(problems, columns=list(SKIPPED_COLUMNS))
        n = len(problems)
        if advice and not advice.startswith((" ", ",", ";", ":")):
            advice = f" ({advice})"  # never "4 problemson_bad_file=..."
        lines = [f"{where}: {n} problem{'s' if n != 1 else ''}{advice}"]
        lines += [f"  {path}: {problem}" for path, problem in problems[:MAX_LISTED]]
        if n > MAX_LISTED:
            lines.append(f"  ... and {n - MAX_LISTED} more")
        super().__init__("\n".join(lines))


@dataclass
class Scan:
    """Rows read from a folder or a manifest, before their files are opened."""

    where: str  # "data.root=..." / "data.path=...": how messages name the source
    rows: pd.DataFrame  # file, display, label, her2_score, patient_id, slide_id, site, split
    problems: dict[int, list[str]]  # row -> what is wrong with it
    folder_problems: list[tuple[str, str]] = field(default_factory=list)
    explicit_split: bool = False
    excluded_equivocal: int = 0
    own_patient: int = 0  # rows whose patient id is the file itself
