"""Files this project writes: atomically, and cleaned up only where it can prove it wrote them."""

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_write", "cleanup_temporaries", "default_cache_dir", "pid_alive"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``.

    A crash (or ``kill -9``) at any moment leaves either the old file or the new one, never half of one.
    A stray temporary file may remain; its name starts with ``.`` and ends with ``.tmp``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
        with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def cleanup_temporaries(output: Path) -> list[str]:
    """Remove temporary files that a killed run left behind; returns their names."""
    removed = []
    for p in output.glob(".*.tmp"):
        removed.append(p.name)
        os.unlink(p)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def default_cache_dir() -> Path:
    """This project's cache folder: ``$GRAY_EFFNET_CACHE``, or ``gray_effnet`` under ``$XDG_CACHE_HOME`` (``~/.cache``)."""
    base = os.environ.get("GRAY_EFFNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gray_effnet"
    )
    return Path(base)
