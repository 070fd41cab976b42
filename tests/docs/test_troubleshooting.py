"""docs/troubleshooting.md quotes only messages her2exp still prints.

Why: the page is looked up by the words a user sees, so a message reworded in the code leaves
the page pointing at nothing. Every ```text block of the page is one message (a line each);
its `<...>` parts are variable, and every fixed part between them must be text of a string
literal of her2exp/ (f-string parts included; a message built from several literals may cross
from the end of one into the start of the next). Read from the source with `ast`, in-process.
"""

from __future__ import annotations

import ast
import re
from functools import cache

import pytest

from conftest import REPO

PAGE = REPO / "docs" / "troubleshooting.md"
PACKAGE = REPO / "her2exp"
#: The prefix her2exp prints before every user error and warning (cli/common.py `fail`).
PREFIX = "her2exp: "
#: Fixed parts shorter than this (`: `, ` -> `) are punctuation between variable parts.
MIN_CHECKED = 4
#: Stripped from both ends of a fixed part: the brackets and separators around a variable part
#: are often written by the code that fills it in, not by the message's own literal.
EDGE_PUNCTUATION = " ()[]:;,.'\""
#: Where a part crosses literals: the least it takes from the first and the last literal, and
#: the shortest whole literal it may cross (no chain of one-word constants makes up a message).
MIN_EDGE = 4
MIN_MIDDLE = 6
BLOCK = re.compile(r"^```text\n(.*?)^```", re.DOTALL | re.MULTILINE)
VARIABLE = re.compile(r"<[^<>]*>")


def quoted_messages(markdown: str) -> list[str]:
    """Each line of each ```text block, without the `her2exp: ` prefix."""
    lines = []
    for block in BLOCK.findall(markdown):
        for line in block.splitlines():
            line = line.strip()
            if line:
                lines.append(line.removeprefix(PREFIX))
    return lines


def fixed_parts(message: str) -> list[str]:
    """The words of a message outside its `<...>` parts, long enough to check."""
    parts = (p.strip(EDGE_PUNCTUATION) for p in VARIABLE.split(message))
    return [p for p in parts if len(p) >= MIN_CHECKED]


def _literal_text(node: ast.JoinedStr) -> list[str]:
    """An f-string's literal runs, split where a value is interpolated."""
    runs, current = [], ""
    for value in node.values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            current += value.value
        else:
            runs.append(current)
            current = ""
    return [*runs, current]


@cache
def source_pieces() -> frozenset[str]:
    """Every literal run of text in her2exp/*.py (adjacent literals already joined by the parser)."""
    pieces: set[str] = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.JoinedStr):
                pieces.update(_literal_text(node))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                pieces.add(node.value)
    return frozenset(p for p in pieces if p)


@cache
def _tail_matches(rest: str, pieces: frozenset[str]) -> bool:
    """`rest` is the start of a literal, or one whole literal followed by such a tail."""
    if len(rest) >= MIN_EDGE and any(p.startswith(rest) for p in pieces):
        return True
    return any(
        len(p) >= MIN_MIDDLE and rest.startswith(p) and _tail_matches(rest[len(p) :], pieces)
        for p in pieces
    )


def in_source(part: str, pieces: frozenset[str] | None = None) -> bool:
    """Whether `part` is text her2exp prints: inside one literal, or the end of one literal
    followed by (whole literals and) the start of another."""
    pieces = source_pieces() if pieces is None else pieces
    if any(part in p for p in pieces):
        return True
    for cut in range(MIN_EDGE, len(part) - MIN_EDGE + 1):
        head = part[:cut]
        if any(p.endswith(head) for p in pieces) and _tail_matches(part[cut:], pieces):
            return True
    return False


def test_the_page_quotes_20_to_30_entries_with_checkable_words() -> None:
    """Each entry has a message with a fixed part long enough to mean something."""
    text = PAGE.read_text()
    messages = quoted_messages(text)
    assert 20 <= len(BLOCK.findall(text)) <= 30
    assert all(any(len(p) >= 12 for p in fixed_parts(m)) for m in messages), messages


def test_every_quoted_message_is_in_the_code() -> None:
    missing = [
        (message, part)
        for message in quoted_messages(PAGE.read_text())
        for part in fixed_parts(message)
        if not in_source(part)
    ]
    assert not missing, "quoted on the page but not in her2exp/:\n" + "\n".join(map(str, missing))


@pytest.mark.parametrize(
    ("part", "found"),
    [
        ("is not a key of her2exp-", True),  # inside one f-string
        ("was trained on other data (fingerprint", True),
        # the end of `f"data: {exc}"` then the start of splits.py's message
        ("data: split", True),
        ("is not a key of her2exp-train, says the page", False),
        ("trainer.resume_force=false to continue anyway", False),
    ],
)
def test_the_check_tells_code_text_from_other_text(part: str, found: bool) -> None:
    """The check itself can fail: reworded text is not found."""
    assert in_source(part) is found


def test_messages_are_split_on_their_variable_parts() -> None:
    message = "her2exp: <key>=<value> is not allowed (<what is allowed>)"
    assert quoted_messages(f"```text\n{message}\n```\n") == [message.removeprefix(PREFIX)]
    assert fixed_parts(message.removeprefix(PREFIX)) == ["is not allowed"]
