"""Write-then-rename helpers, so that an interrupted run never leaves half-written output.

Temporary files and folders are created beside their final path under names that start
with :data:`TEMP_PREFIX` followed by the host name and the process id
(``.gsn-tmp.<host>.<pid>.<random>.<name>``). A run killed before it renames them leaves
them behind; the next run that writes into the same folder removes those of this host
whose process is gone (:func:`clean_stale_temps`). Files and folders are created with
the permissions the user's umask gives (``tempfile`` alone would make them private).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".gsn-tmp."
_cleaned: set[Path] = set()


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname())[:40] or "h"


def current_umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove temporary files/folders in ``folder`` left by dead processes of this host.

    Runs once per folder and process. Returns what was removed.
    """
    folder = Path(folder)
    key = folder.resolve() if folder.exists() else folder.absolute()
    if key in _cleaned or not folder.is_dir():
        return []
    _cleaned.add(key)
    removed = []
    host = _host()
    try:
        entries = [e for e in folder.iterdir() if e.name.startswith(TEMP_PREFIX)]
    except OSError:
        return []
    for entry in entries:
        parts = entry.name[len(TEMP_PREFIX):].split(".", 2)
        if len(parts) < 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
        except OSError as exc:
            logger.warning("cannot remove stale temporary %s (%s)", entry, exc)
    if removed:
        logger.info("removed %d temporary file(s) left by interrupted runs in %s",
                    len(removed), folder)
    return removed


def _name_output(exc: BaseException, path: Path) -> None:
    """Give an OSError without a file name (a full disk inside a library's writer) the
    output's path, so that the one-line error names it."""
    if isinstance(exc, OSError) and exc.filename is None:
        exc.filename = str(path)


def _temp_name(name: str) -> str:
    return f"{TEMP_PREFIX}{_host()}.{os.getpid()}.{secrets.token_hex(4)}.{name}"


def temp_file(final: str | Path) -> Path:
    """Create an empty temporary file beside ``final`` (same suffix, umask permissions)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    mode = 0o666 & ~current_umask()
    while True:
        tmp = final.parent / _temp_name(final.name)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def temp_dir(final: str | Path, suffix: str = ".partial") -> Path:
    """Create an empty temporary folder beside ``final`` (umask permissions)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    while True:
        tmp = final.parent / (_temp_name(final.name) + suffix)
        try:
            tmp.mkdir(mode=0o777)  # mkdir applies the umask itself
        except FileExistsError:
            continue
        return tmp


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file name beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the final suffix so that writers that infer the format from
    the extension (OpenCV, tifffile) still work. On error the temporary file is removed.
    """
    path = Path(path)
    tmp_path = temp_file(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        _name_output(exc, path)
        raise


@contextlib.contextmanager
def staged_directory(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; move it to ``final`` on success.

    If ``final`` exists it is replaced only when ``overwrite`` is true (the old folder is
    removed after the new one is in place); otherwise ``FileExistsError`` is raised
    before anything is written. On error the staging folder is deleted, so ``final`` is
    either complete or untouched.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists (use --overwrite to replace it)")
    stage = temp_dir(final)
    try:
        yield stage
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        _name_output(exc, final)
        raise
    if final.exists():
        trash = temp_dir(final, ".old")
        os.replace(final, trash / final.name)
        os.replace(stage, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(stage, final)
