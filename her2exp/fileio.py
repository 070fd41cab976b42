"""One way to write a file: temp file in the same folder, fsync, `os.replace`, fsync the folder.

A reader (or a process restarted after a kill) sees the old file or the new one, never half of
one. Checkpoints, reports, figures, manifests and the tracking buffer all write through here
(docs/architecture.md, "Files").
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def name_the_file(exc: BaseException, path: str | Path) -> None:
    """A full disk surfaces as a bare `[Errno 28]` from write(): re-raise it naming the file."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        raise OSError(exc.errno, f"{exc.strerror} while writing {path}", str(path)) from exc


def fsync_dir(path: str | Path) -> None:
    """Make a rename durable (a power cut after os.replace must not bring back the old name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(
    path: str | Path,
    content: str | bytes | Callable[[IO[bytes]], None],
    *,
    before_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Write `content` (text, bytes, or a function writing to a binary file) to `path` atomically.

    `before_replace(tmp)` runs once the temporary file is complete and synced, before it replaces
    `path` (checkpoints update their checksum sidecar there). Any error removes the temporary file
    and is re-raised naming `path`; the previous file is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace(Path(tmp))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        name_the_file(exc, path)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Text files (reports, manifests, sidecars): see :func:`atomic_write`."""
    return atomic_write(path, text)
