"""This project's files: weights with the metadata to rebuild a model, and the training state for resume.

After each epoch the output folder gets, in this order:

1. ``last.safetensors`` (and ``best.safetensors`` when the validation metric of ``--select-by`` improved): the
   weights under timm's names, with the metadata that ``load_model`` needs.
2. ``last.state.pt``: the resume point. Weights, optimizer, scaler, epoch, RNG states and the metric
   history, read back with ``torch.load(weights_only=True)``. It holds the weights too, so that one atomic
   rename moves the resume point; it is the only file ``--resume`` trusts.
3. ``metrics.csv``: rewritten from that history, so that every epoch appears exactly once.

Each file is written to a temporary name and renamed, so a ``kill -9`` leaves the previous version.

A checkpoint is untrusted input. No pickled code runs (safetensors, or ``torch.load(weights_only=True)``),
and its metadata is checked field by field (``validate_metadata``) against types, ranges, an allowlist of
timm options and the shapes of the tensors in the file, before any model is built. The fields, what is written
and how each is checked, are one table: ``gray_effnet.metadata.CHECKPOINT_FIELDS``.
"""

import csv
import dataclasses
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from .errors import GrayEffnetError, WeightsError
from .files import atomic_write
from .metadata import (
    EXTRA_FIELDS,
    FORMAT_VERSION,
    META_KEY,
    describe,
    field_error,
    is_int,
    is_number,
    validate_metadata,
)
from .model import GrayEfficientNet
from .weights import read_weights_file, safe_torch_load

__all__ = [
    "FORMAT_VERSION",
    "META_KEY",
    "STATE_NAME",
    "SELECT_BY",
    "EpochRow",
    "best_epoch",
    "load_model",
    "load_state",
    "read_checkpoint",
    "resolve_resume",
    "rng_state",
    "save_checkpoint",
    "save_weights",
    "set_rng_state",
    "validate_metadata",
    "write_metrics",
]

STATE_NAME = "last.state.pt"


@dataclasses.dataclass
class EpochRow:
    """One row of ``metrics.csv``: the fields, in column order, are the one definition of its columns."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float  # cross-entropy without label smoothing, as --evaluate reports it
    val_acc: float  # a fraction
    img_per_s: float  # training images per second
    seconds: float  # training time of the epoch
    data_wait_s: float  # of which the training loop waited for the loader's next batch
    val_seconds: float  # evaluation time after the epoch
    process_peak_mem_mb: float  # since the process started: max RSS on CPU, max allocated on CUDA
    train_skipped: int
    val_skipped: int
    val_auc: float  # ROC AUC: macro over findings, of class 1 for 2 classes, macro one-vs-rest for more; NaN if none
    val_ap: float  # average precision, the same way


METRIC_COLUMNS = [f.name for f in dataclasses.fields(EpochRow)]
# Columns added after metrics.csv and state files were first written: older rows read them as NaN.
ADDED_COLUMNS = ("data_wait_s", "val_seconds", "val_auc", "val_ap")
# --select-by: the metrics.csv column that picks best.safetensors, and whether higher is better.
SELECT_BY: dict[str, tuple[str, bool]] = {"auc": ("val_auc", True), "acc": ("val_acc", True),
                                          "loss": ("val_loss", False)}


def best_epoch(history: list[dict[str, Any]], select_by: str) -> int:
    """The index in ``history`` of the best row by ``select_by``: the first of equals, NaN worse than any number."""
    column, higher = SELECT_BY[select_by]

    def key(i: int) -> tuple[bool, float, int]:
        v = history[i][column]
        return (not math.isnan(v), v if higher else -v, -i)

    return max(range(len(history)), key=key)


# -- weights files ------------------------------------------------------------------------------------
def save_weights(model: GrayEfficientNet, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``model``'s weights as a timm-native ``.safetensors`` file that ``load_model`` can rebuild.

    The metadata is checked with the same ``validate_metadata`` that reads it back, so a file this
    function writes always loads.

    Args:
        model: a ``GrayEfficientNet`` (unwrapped from DDP / ``torch.compile``).
        path: the file to write, atomically.
        **extra: what a model does not know (``gray_effnet.metadata.EXTRA_FIELDS``): ``epoch``, ``val_acc``,
            ``val_loss``, ``val_auc``.
    """
    meta = describe(model, **extra)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.timm_state_dict().items()}
    validate_metadata(meta, tensors, f"the metadata of {type(model).__name__} {model.model_name!r}")
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta)})
    return Path(path)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors (timm names) and the validated metadata of a checkpoint of this project."""
    state_dict, meta = read_weights_file(path, meta_key=META_KEY)
    validate_metadata(meta, state_dict, path)
    return state_dict, meta


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> GrayEfficientNet:
    """Rebuild the ``GrayEfficientNet`` that a checkpoint of this project describes.

    Model name, adapter, num_classes, class names, image size and statistics come from the file, checked
    by ``validate_metadata`` before anything is built. Accepts ``best.safetensors`` / ``last.safetensors``
    and the training-state file ``last.state.pt``.

    Example:
        >>> model = load_model("runs/tf_efficientnet_lite0-broadcast/best.safetensors").eval()
    """
    state_dict, meta = read_weights_file(path, meta_key=META_KEY)
    kwargs = validate_metadata(meta, state_dict, path)
    try:
        model = GrayEfficientNet(**kwargs, head_init_std=None)
    except GrayEffnetError as e:
        raise WeightsError(f"{path}: the model its metadata describes cannot be built: {e}") from None
    model.load_timm_state_dict(state_dict, source=str(path))
    return model.to(map_location)


# -- training state -----------------------------------------------------------------------------------
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
    """Rewrite ``metrics.csv`` from the full history, atomically; a row with other columns is an error."""
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            for row in history:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def save_checkpoint(
    output: Path,
    model: GrayEfficientNet,
    *,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    history: list[dict[str, Any]],
    select_by: str,
    is_best: bool,
    args: dict[str, Any],
) -> None:
    """Write the epoch's files (see the module docstring for the order and why).

    Args:
        model: the unwrapped ``GrayEfficientNet`` (not DDP, not compiled), with the epoch's thresholds if multi-label.
        history: one ``EpochRow`` (as a dict) per finished epoch; the last one is the epoch just finished.
        select_by: a key of ``SELECT_BY``, recorded for resume: the metric that picks ``best.safetensors``.
        is_best: the epoch just finished is the best so far (``best_epoch``): write ``best.safetensors`` too.
    """
    row = history[-1]
    extra = {name: row[name] for name in EXTRA_FIELDS}  # epoch, val_acc, ...: metrics.csv columns of the same names
    save_weights(model, output / "last.safetensors", **extra)
    if is_best:
        save_weights(model, output / "best.safetensors", **extra)
    state = {
        META_KEY: describe(model, **extra),
        "model": model.timm_state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": row["epoch"],
        "rng": rng_state(),
        "history": history,
        "select_by": select_by,
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


def _validate_state(state: Any, path: Path) -> None:
    """Check the fields of a training-state file that resume uses, beyond its model metadata."""
    for key, kind in (("optimizer", dict), ("scaler", dict), ("rng", dict), ("history", list), ("model", dict)):
        if not isinstance(state.get(key), kind):
            raise field_error(path, key, f"a {kind.__name__}", type(state.get(key)).__name__)
    epoch = state.get("epoch")
    if not is_int(epoch) or epoch < 0:
        raise field_error(path, "epoch", "an integer >= 0", epoch)
    history = state["history"]
    if len(history) != epoch + 1:
        raise field_error(path, "history", f"{epoch + 1} rows (one per finished epoch)", f"{len(history)} rows")
    for row in history:
        if not isinstance(row, dict) or sorted(row) != sorted(METRIC_COLUMNS):
            raise field_error(path, "history", f"rows with the columns {METRIC_COLUMNS}", row)
        if not all(is_number(v) or (isinstance(v, float) and math.isnan(v)) for v in row.values()):
            raise field_error(path, "history", "rows of numbers", row)
    if state.get("select_by") not in SELECT_BY:
        raise field_error(path, "select_by", f"one of {', '.join(SELECT_BY)}", state.get("select_by"))
    rng = state["rng"]
    numpy_state = rng.get("numpy")
    if (not isinstance(rng.get("torch"), Tensor) or rng["torch"].dtype != torch.uint8
            or not isinstance(rng.get("python"), tuple) or not isinstance(numpy_state, tuple)
            or len(numpy_state) != 5 or not isinstance(numpy_state[1], Tensor)):
        raise field_error(path, "rng", "the RNG states this project writes", "another structure")
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise field_error(path, "optimizer", "an optimizer state dict (state, param_groups)", sorted(optimizer)[:4])


def load_state(path: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """Read a training-state file (no pickled code runs), check every field, and that it fits this run.

    Args:
        expect: the settings the run that resumes must find: ``model_name``, ``adapter``, ``num_classes``,
            ``intensity`` (the mapping its images are read with), ``task`` and ``select_by``.

    Raises:
        WeightsError: the file is not a state file, a field is wrong, or it was made with other settings.
    """
    state = safe_torch_load(path)
    if not isinstance(state, dict) or META_KEY not in state or "optimizer" not in state:
        raise WeightsError(f"{path} is not a gray_effnet training state file")
    model = state.get("model")
    validate_metadata(state[META_KEY], model if isinstance(model, dict) else {}, path)
    if "select_by" not in state and "best_val_acc" in state:  # written before --select-by and val_auc (issue 20)
        state["select_by"] = "acc"
    for row in state["history"] if isinstance(state.get("history"), list) else []:
        if isinstance(row, dict):  # columns that rows written before them lack: unknown, not refused
            for column in ADDED_COLUMNS:
                row.setdefault(column, math.nan)
    _validate_state(state, path)
    recorded = {"task": "single", **state[META_KEY], "select_by": state["select_by"]}
    diffs = [f"{k}: the checkpoint has {recorded.get(k)!r}, this run has {v!r}"
             for k, v in expect.items() if recorded.get(k) != v]
    if diffs:
        raise WeightsError(
            f"cannot resume from {path}: it was made with other settings ({'; '.join(diffs)}). "
            "Resume with the same settings, or start a new run in another --output folder"
        )
    return state
