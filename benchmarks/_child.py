"""Child processes that end with the benchmark that started them (``train.py`` runs, packing).

Python's default SIGTERM ends this process on the spot, leaving its children running; Ctrl-C (KeyboardInterrupt) or
an error unwinds through ``child``, which stops the child on the way. The child stays in this process group, so that
a signal to the whole group (a terminal's Ctrl-C, ``timeout`` in gpu.sh) still reaches it directly; ``child`` covers
a signal to this process alone.

Standard library only: a benchmark's parent process, and the test of this one, start without importing torch.
"""

import signal
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["GRACE_S", "child", "sigterm_raises", "stop"]

# How long a terminated child gets to exit before it is killed: under gpu.sh's `timeout --kill-after=15`, well
# within the 15 s before the whole group is killed.
GRACE_S = 5.0


def _raise_exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # the shell's exit status for a process ended by the signal: 143


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``SystemExit(143)``, so that ``finally`` blocks and ``child`` run.

    Left as it is where this is not the main thread (only it may set handlers, and only it receives signals) or
    where SIGTERM already has a handler other than the default (the caller's own, or one set by an outer block).
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def stop(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """Terminate ``proc``, give it ``grace_s`` to exit, then kill it; return once it has been reaped."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        pass
    finally:  # also where a second Ctrl-C or SIGTERM cuts the grace short
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextmanager
def child(cmd: Sequence[str], *, grace_s: float = GRACE_S, **popen_kwargs) -> Iterator[subprocess.Popen]:
    """``subprocess.Popen(cmd, **popen_kwargs)`` that does not outlive an interruption of this process.

    While the block runs, SIGTERM raises ``SystemExit`` (``sigterm_raises``); on that, Ctrl-C or any other exception
    out of the block, the child is stopped (``stop``) and the exception goes on. On the way out, as with ``Popen``
    itself, its pipes are closed and it is waited for.

    Example:
        >>> with child([sys.executable, "train.py", ...], stdout=subprocess.PIPE, text=True) as proc:
        ...     for line in proc.stdout:
        ...         print(line, end="")
    """
    with sigterm_raises():
        proc = subprocess.Popen(cmd, **popen_kwargs)
        with proc:  # Popen's exit waits for the child: stopped first below, where the block was interrupted
            try:
                yield proc
            except BaseException:
                stop(proc, grace_s)
                raise
