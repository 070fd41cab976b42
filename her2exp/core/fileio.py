"""One way to write a file: temp file in the same folder, fsync, `os.replace`, fsync the folder.

A reader (or a process restarted after a kill) sees the old file or the new one, never half of
one. Checkpoints, reports, figures, manifests and the tracking buffer all write through here
(docs/architecture.md, "Files"). Also here: names built from the user's data (`safe_name`),
the check that a write stays in its folder (`inside`), and whole output folders built aside and
moved into place (`staged_dir`), so nothing of the user's is overwritten or half-replaced.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from her2exp.core.errors import UserError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 64  # characters kept of a name before its hash suffix (file systems allow 255 bytes)


class UnsafePath(ValueError):
    """A path built from data (a manifest, a run directory's queue) that leaves its folder."""


def _read_umask() -> int:
    """The process umask without changing it (Linux: /proc); elsewhere os.umask set and reset,
    which is why the fallback is read once, at import, before any thread writes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def _umask_now_unsafe() -> int:
    """os.umask can only be read by setting it: for a moment another thread's file gets 022."""
    old = os.umask(0o022)
    os.umask(old)
    return old


_UMASK_AT_IMPORT = _umask_now_unsafe()


def file_mode() -> int:
    """The mode `open()` would give a new file: 0o666 less the umask (mkstemp gives 0o600, which
    makes a team's shared run directory unreadable to colleagues)."""
    return 0o666 & ~_read_umask()


def safe_name(text: object) -> str:
    """`text` as one file name: [A-Za-z0-9._-] kept, other runs collapsed to `_`, no leading dot.

    When anything was changed (or nothing is left) a hash of the original is appended, so two
    distinct ids never share a file (`a/b` and `a_b` stay apart). Unchanged names read as given.
    """
    raw = str(text)
    cleaned = _UNSAFE.sub("_", raw).lstrip(".")
    if cleaned == raw and cleaned and len(cleaned) <= MAX_NAME:
        return cleaned
    digest = hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned[:MAX_NAME]}-{digest}" if cleaned else digest


def inside(root: str | Path, path: str | Path) -> Path:
    """`root / path` resolved (symlinks too); UnsafePath naming it when it leaves `root`."""
    base = Path(root).resolve()
    target = (Path(root) / path).resolve()
    if target != base and base not in target.parents:
        raise UnsafePath(f"{path} resolves to {target}, outside {root}")
    return target


def is_empty_dir(path: str | Path) -> bool:
    """True for a missing folder or one without entries (hidden ones count)."""
    path = Path(path)
    return not path.exists() or (path.is_dir() and next(path.iterdir(), None) is None)


def check_replaceable(out: str | Path, key: str, overwrite: bool, own_file: str) -> None:
    """FileExistsError, one line naming `key=out` and the option, unless `out` is missing or
    empty, or `overwrite` and `out` holds `own_file` (so it is an earlier output of the same
    command: overwrite=true never removes a folder of the user's own, e.g. out=~ by mistake)."""
    out = Path(out)
    if is_empty_dir(out):
        return
    if not out.is_dir():
        raise FileExistsError(f"{key}={out} exists and is not a folder: give a new or empty folder")
    if not overwrite:
        raise FileExistsError(
            f"{key}={out} is not empty: give a new or empty folder, or overwrite=true to replace it"
        )
    if not (out / own_file).is_file():
        raise FileExistsError(
            f"{key}={out} is not empty and holds no {own_file}, so it is not an earlier output "
            "of this command; overwrite=true replaces only those: give a new or empty folder"
        )


def writable_problem(path: str | Path, folder: bool = False) -> str | None:
    """Why a file (`folder`: a folder) could not be written at `path`, None when it can: no
    component of the path is a regular file, the target is not a folder when a file is wanted
    (nor a file when a folder is), and the nearest existing folder takes a new file (tried with
    an unnamed temporary file: os.access says yes to root everywhere, even in /proc). Writes
    nothing."""
    path = Path(os.path.abspath(path))
    if path.exists():
        if folder and not path.is_dir():
            return f"{path} exists and is not a folder"
        if not folder and path.is_dir():
            return f"{path} is a folder, not a file"
    near = path if folder and path.is_dir() else path.parent
    while not near.exists() and near != near.parent:
        near = near.parent  # the missing folders are created with the output
    if not near.is_dir():
        return f"{near} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=near):
            pass
    except OSError as exc:
        return f"cannot create a file in {near} ({exc.strerror})"
    return None


def check_writable(path: str | Path, option: str, folder: bool = False) -> None:
    """UserError, one line naming `option=path` (her2exp: ...), unless the command could write
    its output there (`writable_problem`): checked before any work, so a wrong out= costs
    nothing and leaves nothing."""
    problem = writable_problem(path, folder)
    if problem is not None:
        what = "folder" if folder else "file"
        raise UserError(f"{option}={path} cannot be written: {problem}; give a writable {what}")


def _swap_in(tmp: Path, out: Path) -> None:
    """`tmp` becomes `out`; a non-empty `out` is moved aside first and removed once `tmp` is in
    place (put back if that fails). An empty folder is replaced by the rename itself (POSIX)."""
    if is_empty_dir(out) and not out.is_symlink():
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, aside / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside / out.name, out)
        raise
    finally:
        fsync_dir(out.parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged_dir(out: str | Path) -> Iterator[Path]:
    """Build a whole output folder in a temporary sibling (`.NAME.tmp-XXXX`), moved to `out` at
    the end, so `out` is never half-written. An `out` already there is replaced only then (the
    caller decides whether it may be); an error removes the temporary folder and leaves `out`
    untouched."""
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_read_umask())  # mkdtemp makes it 0o700
        yield tmp
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
        os.fchmod(fd, file_mode())
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
