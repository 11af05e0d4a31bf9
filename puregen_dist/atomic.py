"""Atomic writes on the local filesystem: a reader or a crash never sees a half-written target.

A file is written under a temporary name in the target's directory (same filesystem, so the rename is atomic),
flushed and fsynced, then moved onto the target with ``os.replace``; the directory is fsynced so the rename
survives a power loss. A directory (a checkpoint) is filled under a temporary sibling name, then renamed into
place; an existing one is moved aside first and removed only once the new one is in place (renamed back if
the swap fails). On any exception the temporary file or directory is removed and the target is untouched.

A write that runs out of space (ENOSPC, EDQUOT) or hits a file-size limit (EFBIG) raises :class:`DiskFullError`
(an ``OSError`` naming the target and the cause), after the same clean-up.

Temporary names start with a dot (``.<name>.<random>.tmp``, ``.<name>.tmp-<random>``,
``.<name>.old-<random>``), so listings that skip hidden files (Parquet readers, Ray Data) never see them.

This module imports nothing from ``puregen_dist``: algorithm packages and the pipeline both use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

SPACE_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EFBIG: "file too large (a file-size limit such as `ulimit -f`, or the filesystem's maximum)"}
"""errno values of a write that failed for lack of space, and what each means."""


class DiskFullError(OSError):
    """Writing ``filename`` failed for lack of space or a file-size limit (``errno`` ENOSPC, EDQUOT or EFBIG).
    The target kept its previous content (or stays absent) and the temporary file or directory was removed."""


def _disk_full(exc: BaseException, target: Path) -> DiskFullError | None:
    """``exc`` as a :class:`DiskFullError` naming ``target`` when it is a write failing for lack of space."""
    if isinstance(exc, DiskFullError) or not isinstance(exc, OSError) or exc.errno not in SPACE_ERRNOS:
        return None
    return DiskFullError(exc.errno, f"writing {target} failed: {SPACE_ERRNOS[exc.errno]}; it was left as it "
                                    "was and the temporary copy removed: free space and run again", str(target))


FILE_MODE = 0o644
"""Permissions of a file written by :func:`atomic_file` (``mkstemp`` alone would give 0600)."""
DIR_MODE = 0o755
"""Permissions of a directory written by :func:`atomic_dir` (``mkdtemp`` alone would give 0700); the files in it
get :data:`FILE_MODE`."""


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: Literal["wb", "w"] = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit, fsync it and move it onto ``path``.

    Args:
        path: the file to write; its parent directories are created.
        mode: ``"wb"`` (bytes) or ``"w"`` (text: UTF-8, no newline translation, as the csv module wants).

    Yields:
        The open temporary file. If the ``with`` body raises, the temporary file is removed and ``path``
        keeps its old content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8", "newline": ""} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = _disk_full(exc, path)
        if full is not None:
            raise full from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_file`); returns ``path``."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Fill a fresh temporary sibling of ``directory``; on a clean exit, fsync it and rename it into place.

    An existing ``directory`` is renamed aside, the new one renamed in, then the old one removed; if the
    second rename fails the old one is renamed back. Only a crash between the two renames leaves ``directory``
    missing, with its previous content in ``.<name>.old-<random>`` next to it.

    Args:
        directory: the directory to (re)place; its parent directories are created.

    Yields:
        The empty temporary directory to write into. If the ``with`` body raises, it is removed and
        ``directory`` is untouched.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish_modes(tmp)
        _swap_in(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(exc, directory)
        if full is not None:
            raise full from exc
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(directory.parent)


def _swap_in(new: Path, directory: Path) -> None:
    """Rename ``new`` to ``directory``, keeping an existing ``directory`` until the rename succeeded."""
    if not directory.exists():
        new.rename(directory)
        return
    old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:12]}")
    directory.rename(old)
    try:
        new.rename(directory)
    except BaseException:
        old.rename(directory)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _publish_modes(root: Path) -> None:
    """Give ``root``, its directories and files the modes of a published artifact (:data:`DIR_MODE`,
    :data:`FILE_MODE`): writers such as ``safetensors.save_file`` and ``mkstemp`` create 0600 files, which other
    users of a shared store or a packaged reference could not read."""
    for current, dirs, files in os.walk(root):
        for name in files:
            os.chmod(os.path.join(current, name), FILE_MODE)
        for name in dirs:
            os.chmod(os.path.join(current, name), DIR_MODE)
    os.chmod(root, DIR_MODE)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory (deepest first), so the content is durable
    before the rename that publishes it."""
    for current, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fd = os.open(os.path.join(current, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(current))


def _fsync_dir(directory: Path) -> None:
    """fsync a directory (makes renames in it durable); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["DIR_MODE", "FILE_MODE", "SPACE_ERRNOS", "DiskFullError", "atomic_dir", "atomic_file", "atomic_write_text"]
