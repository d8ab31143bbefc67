"""Training checkpoints: what ``--resume`` needs, written so that a crash never leaves half a file.

After each epoch the output folder gets, in this order:

1. ``last.safetensors`` (and ``best.safetensors`` when validation accuracy improved): the weights with
   the metadata that ``gray_effnet.load_model`` needs.
2. ``last.state.pt``: the resume point. Weights, optimizer, scheduler, scaler, epoch, RNG states and the
   metric history, read back with ``torch.load(weights_only=True)``. It holds the weights too, so that one
   atomic rename moves the resume point; it is the only file ``--resume`` trusts.
3. ``metrics.csv``: rewritten from that history, so that every epoch appears exactly once.

Each file is written to a temporary name and renamed, so a ``kill -9`` leaves the previous version.
"""

import csv
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import WeightsError
from .weights import META_KEY, atomic_write, safe_torch_load, save_weights

__all__ = ["METRIC_COLUMNS", "STATE_NAME", "load_state", "resolve_resume", "rng_state", "save_checkpoint",
           "set_rng_state", "write_metrics", "cleanup_temporaries"]

STATE_NAME = "last.state.pt"
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "img_per_s", "seconds",
                  "peak_mem_mb", "train_skipped", "val_skipped"]


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain Python values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy arrays are not on torch's weights_only allow-list: store the key as a tensor
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.csv`` from the full history, atomically."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def save_checkpoint(
    output: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    epoch: int,
    history: list[dict[str, Any]],
    best_val_acc: float,
    is_best: bool,
    args: dict[str, Any],
) -> None:
    """Write the epoch's files (see the module docstring for the order and why).

    Args:
        model: the unwrapped ``GrayEfficientNet`` (not DDP, not compiled).
        epoch: the epoch just finished, 0-based.
        history: one metrics row per finished epoch.
    """
    row = history[-1]
    extra = {"epoch": epoch, "val_acc": row.get("val_acc"), "val_loss": row.get("val_loss")}
    save_weights(model, output / "last.safetensors", **extra)
    if is_best:
        save_weights(model, output / "best.safetensors", **extra)
    state = {
        META_KEY: {**model.describe(), **extra},
        "model": model.timm_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "history": history,
        "best_val_acc": best_val_acc,
        "args": args,
    }
    with atomic_write(output / STATE_NAME) as tmp:
        torch.save(state, tmp)
    write_metrics(output / "metrics.csv", history)


def resolve_resume(resume: str, output: Path) -> Path | None:
    """The state file that ``--resume`` means.

    ``auto`` (``--resume`` with no path) is ``OUTPUT/last.state.pt`` when it exists and None (start fresh)
    otherwise; a folder means its ``last.state.pt``; a ``.safetensors`` path means the state file beside it.
    """
    if resume == "auto":
        path = output / STATE_NAME
        return path if path.is_file() else None
    path = Path(resume)
    if path.is_dir():
        path = path / STATE_NAME
    elif path.suffix == ".safetensors":
        path = path.with_name(STATE_NAME)
    if not path.is_file():
        raise WeightsError(f"--resume {resume}: no checkpoint at {path}")
    return path


def load_state(path: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Read a state file (no pickled code runs) and check it belongs to the same model.

    Args:
        expect: ``model_name``, ``adapter`` and ``num_classes`` of the run that resumes.
    """
    state = safe_torch_load(path)
    meta = state.get(META_KEY, {}) if isinstance(state, dict) else {}
    if not meta or "optimizer" not in state:
        raise WeightsError(f"{path} is not a gray_effnet training state file")
    diffs = [f"{k}: checkpoint has {meta.get(k)!r}, this run has {v!r}" for k, v in expect.items() if meta.get(k) != v]
    if diffs:
        raise WeightsError(
            f"cannot resume from {path}, it was made for another model ({'; '.join(diffs)}). "
            "Resume with the same settings, or start a new run in another --output folder"
        )
    return state


def cleanup_temporaries(output: Path) -> list[str]:
    """Remove temporary files that a killed run left behind; returns their names."""
    removed = []
    for p in output.glob(".*.tmp"):
        removed.append(p.name)
        os.unlink(p)
    return removed
