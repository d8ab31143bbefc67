"""Where a run ran: the device's human name and the code's commit, recorded with every result."""

import os
import platform
import subprocess
from pathlib import Path

import timm
import torch

__all__ = ["NA", "device_name", "git_commit", "versions"]

NA = "n/a"


def device_name(device: torch.device) -> str:
    """A human name for ``device``: the GPU model, or the CPU model (``lscpu``'s) and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def git_commit(path: str | os.PathLike) -> str:
    """The short commit of the git checkout holding ``path``, with ``+dirty`` for uncommitted changes to
    tracked files; ``n/a`` outside a checkout."""
    folder = Path(path).resolve()
    folder = folder if folder.is_dir() else folder.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=folder, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return NA
    return f"{sha}+dirty" if dirty else sha


def versions() -> dict[str, str]:
    """The versions of what a run's results depend on, beside this package's own: torch, timm and Python."""
    return {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version()}
