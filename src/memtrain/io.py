"""Small file helpers shared by every long job: atomic writes and append-only JSONL.

Long jobs (asset fetches, data builds, training, evaluation) must never leave a half-written file that a
later run mistakes for a finished one, so everything that marks progress goes through these helpers.

Temp files and dirs get the permissions the process umask gives a normal file/dir (``mkstemp``/``mkdtemp``
would leave them 0600/0700, unreadable to the other users of a shared cluster). Temp dirs carry their
writer's host and pid in their name (``.tmp-NAME-pPID@HOST.XXXX``), so a later writer of the same target can
delete those a dead process left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from memtrain.errors import UserError
from memtrain.log import logger

# A leaked temp dir whose writer cannot be checked (another host, an old name) is removed after this long.
STALE_TMP_AGE_S = 24 * 3600
_TMP_OWNER = re.compile(r"-p(?P<pid>\d+)@(?P<host>[A-Za-z0-9_-]*)\.[^.]*$")


def process_umask() -> int:
    """The current umask, read without changing it where possible (os.umask alone must set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename/creation in directory ``path`` durable (no-op where directories cannot be opened)."""
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


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (before renaming it into place)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname().split(".")[0])[:40]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_tmp(final: Path, max_age_s: float = STALE_TMP_AGE_S) -> list[Path]:
    """Remove ``.tmp-NAME-*`` dirs next to ``final`` left by dead writers: on this host when their pid is
    gone, otherwise (another host, or no owner in the name) only when untouched for ``max_age_s``."""
    final = Path(final)
    removed: list[Path] = []
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    now = time.time()
    for p in entries:
        if not p.name.startswith(f".tmp-{final.name}-") or p.is_symlink() or not p.is_dir():
            continue
        owner = _TMP_OWNER.search(p.name[len(f".tmp-{final.name}") :])
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        same_host = owner is not None and owner["host"] == _host()
        stale = not _pid_alive(int(owner["pid"])) if owner is not None and same_host else age > max_age_s
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            logger.info("removed %s, a temp dir left by an interrupted writer", p)
    return removed

def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~process_umask())  # mkstemp makes it 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(final: Path, durable: bool = False) -> Iterator[Path]:
    """Yield a temp directory next to ``final``; on success it replaces ``final`` in one rename.

    An interrupted writer leaves only a ``.tmp-*`` directory behind, never a half-filled ``final``; the
    next writer of ``final`` removes those of dead writers (:func:`clean_stale_tmp`). ``durable``: fsync
    every file before the rename and the parent after it, so a power loss cannot leave a renamed but empty
    directory (checkpoints, datasets).
    """
    tmp = temp_dir_for(final)
    try:
        yield tmp
        replace_dir(tmp, final, durable)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def temp_dir_for(final: Path) -> Path:
    """A new temp directory next to ``final`` named after its writer (pid, host), so the next writer of
    ``final`` can tell a dead writer's leftovers (:func:`clean_stale_tmp`, run here first)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-p{os.getpid()}@{_host()}.", dir=final.parent))
    os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes it 0700
    return tmp


def replace_dir(tmp: Path, final: Path, durable: bool = False) -> None:
    """Rename the finished ``tmp`` to ``final`` in one step (replacing an old ``final``); ``durable``: fsync
    every file first and the parent after."""
    if durable:
        fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    if durable:
        fsync_dir(final.parent)


# what a full disk looks like from libraries that do not raise OSError(ENOSPC): safetensors' Rust writer, and
# torch.save's C++ stream on the next attempt
_DISK_FULL_TEXT = ("no space left on device", "iostream error", "disk quota exceeded")
_LOW_SPACE_BYTES = 64 * 2**20


def disk_full_error(exc: BaseException, path: Path, what: str) -> OSError | None:
    """An ``OSError(ENOSPC)`` that names ``path`` and its free space when ``exc``, raised while writing
    ``what`` there, is a full disk (by errno, by a library's message, or by the free space left); else None.
    So a full disk is one line that says so, not a library's traceback."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    full = full or any(t in str(exc).lower() for t in _DISK_FULL_TEXT)
    try:
        free = shutil.disk_usage(next(p for p in (Path(path), *Path(path).parents) if p.exists())).free
    except (OSError, StopIteration):
        free = None
    if not full and not (free is not None and free < _LOW_SPACE_BYTES):
        return None
    left = f", {free / 2**20:.0f} MiB free" if free is not None else ""
    return OSError(errno.ENOSPC, f"no space left on device writing {what}{left}; free space and rerun "
                   "(a run resumes from its last checkpoint)", str(path))


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def append_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows, one JSON object per line, flushed so a crash loses at most the line being written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        fh.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read JSONL, ignoring a truncated last line (what a killed writer leaves) but nothing else."""
    return read_jsonl_tail(path)[0]


def read_jsonl_tail(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of a JSONL file and the text of a damaged last line (None when it parses): a killed writer
    leaves one, and a caller that rewrites the file keeps that text somewhere instead of losing it."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                return rows, line
            raise UserError(f"{path}:{i + 1}: not valid JSON ({exc.msg})") from exc
    return rows, None


class NotWritableError(UserError):
    """An output directory the process cannot write: one line naming it and the OS's reason."""


def check_writable(directory: str | Path, what: str = "output") -> Path:
    """Create ``directory`` (and its parents) and a temp file in it, so that a read-only, full or forbidden
    output fails in one line at the start of a job instead of after hours of work (or, as root, where
    permission bits are ignored, only the real write can tell)."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".memtrain-write-check-") as fh:
            fh.write(b"x")
            fh.flush()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(directory) else ""
        raise NotWritableError(f"{what} {directory}: cannot write there: {reason}{where}") from exc
    return directory


# --------------------------------------------------------------------------------------------------------
# Run-directory locks: one writer per --out
# --------------------------------------------------------------------------------------------------------

LOCK_FILE = ".lock"
_held_locks: dict[str, tuple[int, int]] = {}  # realpath of the directory -> (fd, depth)


class DirLockedError(UserError):
    """Another process is writing the same run directory."""


def acquire_dir_lock(directory: Path) -> Path:
    """Lock ``directory`` (created if needed) for this process with ``flock`` on ``DIR/.lock``.

    Two trainers or evaluations writing one ``--out`` would interleave rows and delete each other's temp
    checkpoints, so the second one is refused with a line naming the directory and the holder (pid, host).
    The kernel drops the lock when the holder exits in any way, SIGKILL included, so a crash never leaves a
    stale lock; the file itself is left in place (unlinking it would let two processes lock different files).
    Re-entrant within a process; pair with :func:`release_dir_lock`. A filesystem without ``flock`` gets a
    warning and no lock.
    """
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(directory)
    if key in _held_locks:
        fd, depth = _held_locks[key]
        _held_locks[key] = (fd, depth + 1)
        return directory / LOCK_FILE
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "holder unknown"
        os.close(fd)
        raise DirLockedError(f"{directory} is in use by another memtrain process ({holder}); wait for it to "
                             "finish or choose another --out") from None
    except OSError as exc:  # e.g. ENOLCK on an NFS mount without lock support
        os.close(fd)
        logger.warning("%s: cannot lock (%s); make sure no other process writes this directory", path,
                       exc.strerror or exc)
        return path
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
              "\n".encode(), 0)
    _held_locks[key] = (fd, 1)
    return path


def release_dir_lock(directory: Path) -> None:
    """Undo one :func:`acquire_dir_lock` of this process (the lock is dropped when the last one is undone)."""
    import fcntl

    key = os.path.realpath(directory)
    if key not in _held_locks:
        return
    fd, depth = _held_locks.pop(key)
    if depth > 1:
        _held_locks[key] = (fd, depth - 1)
        return
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
