"""Files this project writes: atomically, under a lock, and cleaned up only where it can prove it wrote them.

* ``atomic_write``: a temporary file beside the target, renamed onto it when complete. Its name carries the
  writer's pid and this project's suffix (``.NAME.<pid>-<random>.gray_effnet.tmp``), so a later run can tell its
  own leftovers from a user's files and from a live process's temporaries.
* ``output_lock``: one run per output folder. A second run on the same folder is refused, naming the holder.
* ``cleanup_temporaries``: removes the temporaries of processes that are gone; call it holding the lock.
* ``check_output_folder`` / ``check_output_file``: refuse an output path that cannot be written, before any work.
"""

import contextlib
import errno
import fcntl
import json
import os
import socket
import stat
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from .errors import InputError

__all__ = ["LOCK_NAME", "atomic_write", "check_output_file", "check_output_folder", "cleanup_temporaries",
           "default_cache_dir", "output_lock", "pid_alive"]

LOCK_NAME = ".gray_effnet.lock"
TMP_SUFFIX = ".gray_effnet.tmp"
_MAX_LOCK_BYTES = 4096  # a lock file says who holds it in a few dozen bytes; read no more of a foreign one


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A crash (or ``kill -9``) at any moment leaves either the old file or the new one, never half of one.
    A stray temporary file may remain: ``.NAME.<pid>-<random>.gray_effnet.tmp``, which ``cleanup_temporaries``
    removes once that pid is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions of a new file
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # make a rename durable where the OS allows it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _writer_pid(name: str) -> int | None:
    """The pid in an ``atomic_write`` temporary's name; None for any other name."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    tag = name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]  # "<pid>-<random>"; mkstemp's random part has no "." or "-"
    pid, sep, rest = tag.partition("-")
    return int(pid) if sep and rest and pid.isdigit() and len(pid) < 10 else None


def cleanup_temporaries(output: str | os.PathLike) -> list[str]:
    """Remove ``atomic_write`` temporaries in ``output`` whose writing process is gone; return their names.

    Only regular files with this project's temporary name are touched, and only when the pid in the name is not
    a live process: a user's ``notes.tmp`` and a running ``predict``'s temporary stay. Call it holding
    ``output_lock(output)``, so that no run of this folder is writing.
    """
    removed = []
    for p in sorted(Path(output).glob(f".*{TMP_SUFFIX}")):
        pid = _writer_pid(p.name)
        if pid is None or (pid != os.getpid() and pid_alive(pid)):
            continue
        if not stat.S_ISREG(p.lstat().st_mode):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
            removed.append(p.name)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


# -- output paths: checked before any work -----------------------------------------------------------------
def _blocking_ancestor(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` that is not a folder (so nothing can be created below it)."""
    for parent in path.parents:
        if parent.exists() or parent.is_symlink():
            return None if parent.is_dir() else parent
    return None


def check_output_folder(path: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse an output folder that exists as something else (a file), or lies below a file.

    Raises:
        InputError: naming the path and what is in the way.
    """
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():
        raise InputError(f"{flag} {path} exists and is not a folder; name a new or existing folder")
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise InputError(f"{flag} {path}: {blocker} is a file, so no folder can be made there")


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> None:
    """Refuse an output file that exists as a folder (or anything but a regular file), or lies below a file.

    An existing regular file is fine: it is the file the user named, and it is replaced atomically.

    Raises:
        InputError: naming the path and what is in the way.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a folder; name the file to write (in it, or elsewhere)")
    if path.exists() and not path.is_file():
        raise InputError(f"{flag} {path} exists and is not a regular file; name a file")
    blocker = _blocking_ancestor(path)
    if blocker is not None:
        raise InputError(f"{flag} {path}: {blocker} is a file, so nothing can be written below it")


# -- one run per output folder -----------------------------------------------------------------------------
def _shown(value: object, limit: int = 80) -> str:
    """A field of a lock file (untrusted text) as one short, printable line."""
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _holder(fd: int) -> str:
    """Who holds the lock, from the lock file's contents (which the holder wrote, but anyone could have)."""
    try:
        info = json.loads(os.pread(fd, _MAX_LOCK_BYTES, 0).decode("utf-8", "replace"))
    except (OSError, ValueError, RecursionError):
        info = None
    if not isinstance(info, dict):
        return "another process (its lock file does not say which)"
    return (f"{_shown(info.get('what', 'another run'))} (pid {_shown(info.get('pid', '?'))} on "
            f"{_shown(info.get('host', '?'))}, since {_shown(info.get('since', '?'))})")


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    st = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


def _acquire(folder: Path, what: str) -> int | None:
    """Open and lock ``folder/LOCK_NAME``; its fd, or None where the file system cannot lock (with a warning)."""
    path = folder / LOCK_NAME
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as e:  # a symbolic link (ELOOP), a folder, no permission: not a lock this project made
            raise InputError(f"cannot lock {folder}: {path} cannot be opened as a lock file ({e.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InputError(f"cannot lock {folder}: {path} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)  # e.g. a network file system without flock: run, but say that nothing is guarded
                warnings.warn(f"cannot lock {folder} ({e.strerror}): a second run on it would not be refused",
                              RuntimeWarning, stacklevel=4)
                return None
            holder = _holder(fd)
            os.close(fd)
            raise InputError(f"{folder} is in use by {holder}; wait for it to end, or choose another output") \
                from None
        if _same_file(fd, path):  # not a lock file that its last holder removed between our open and our lock
            os.ftruncate(fd, 0)
            info = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            os.pwrite(fd, json.dumps(info).encode(), 0)
            return fd
        os.close(fd)
    raise InputError(f"cannot lock {folder}: its lock file keeps changing")


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, what: str) -> Iterator[Path]:
    """Hold the exclusive lock of an output folder for one run: ``folder/.gray_effnet.lock``.

    The lock file holds the holder's pid, host, start time and ``what``; a second ``output_lock`` of the same
    folder, from any process (this one included), is refused with an ``InputError`` naming them. The lock is
    ``flock``-ed, so it ends with the process however it ends, and a stale lock file never blocks anyone. The
    lock file is removed on release. The folder is made if needed, and removed again on release if it was made
    here and nothing was written into it (a refused run leaves no empty folder behind).

    Args:
        folder: the output folder.
        what: what runs there (``train.py``, ``pack``, ``export``), for the refusal message.

    Raises:
        InputError: the folder is in use (the message names the holder), exists as a file, or cannot be made.

    Example:
        >>> with output_lock("runs/xray", "train.py"):
        ...     cleanup_temporaries("runs/xray")  # no live run of this folder is writing
    """
    folder = Path(folder)
    check_output_folder(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot make the output folder {folder}: {e.strerror}") from None
    try:
        fd = _acquire(folder, what)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    try:
        yield folder / LOCK_NAME
    finally:
        if fd is not None:
            if _same_file(fd, folder / LOCK_NAME):  # a pack's swap may have moved our lock file away
                os.unlink(folder / LOCK_NAME)
            os.close(fd)  # releases the flock; unlinked first, so a later opener locks a fresh file
        if created:
            with contextlib.suppress(OSError):  # only if empty: what the run wrote stays
                folder.rmdir()


def default_cache_dir() -> Path:
    """The cache folder: ``$GRAY_EFFNET_CACHE``, or ``gray_effnet`` under ``$XDG_CACHE_HOME`` (``~/.cache``)."""
    base = os.environ.get("GRAY_EFFNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gray_effnet"
    )
    return Path(base)
