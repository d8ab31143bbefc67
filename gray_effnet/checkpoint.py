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
timm options and the shapes of the tensors in the file, before any model is built.
"""

import csv
import dataclasses
import json
import math
import os
import random
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from torch import Tensor

from .adapters import get_adapter_class, list_adapters
from .errors import GrayEffnetError, InputError, WeightsError
from .files import atomic_write
from .intensity import parse_intensity
from .limits import MAX_NESTING, input_size_limit, nesting_depth, unprintable
from .model import GrayEfficientNet
from .tasks import TASKS
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

META_KEY = "gray_effnet"
# 2 (issue 20): task, thresholds and val_auc, which a reader of version 1 refuses as unknown fields; a version 1
# file is a single-label checkpoint and reads as one.
FORMAT_VERSION = 2
STATE_NAME = "last.state.pt"
MAX_CLASSES = 100_000
MAX_NAME_CHARS = 256
MAX_IMG_SIDE = 16_384
MAX_OPTION_NUMBERS = 64  # an adapter's options: a few windows and a range
# timm options a checkpoint may carry to timm.create_model: plain numbers this project itself writes, and
# nothing that makes timm open a file (checkpoint_path), fetch weights (pretrained*) or take a config.
SAFE_TIMM_KWARGS: dict[str, tuple[float, float]] = {
    "drop_rate": (0.0, 1.0),
    "drop_path_rate": (0.0, 1.0),
}


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


# -- metadata: written, then validated on every read ---------------------------------------------------
_SHOW = reprlib.Repr()  # a bounded repr: a few levels and items, so a hostile value cannot flood or recurse
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 3, 6, 6, 60, 60


def _fail(source: Any, field: str, expected: str, got: Any) -> WeightsError:
    shown = _SHOW.repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return WeightsError(f"{source}: checkpoint field {field!r} must be {expected}; got {shown}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _plain_numbers(value: Any, budget: list[int] | None = None) -> bool:
    """A finite number, or (nested) lists of them, with at most ``MAX_OPTION_NUMBERS`` numbers in all."""
    budget = [MAX_OPTION_NUMBERS] if budget is None else budget
    if isinstance(value, list):
        return all(_plain_numbers(v, budget) for v in value)
    budget[0] -= 1
    return budget[0] >= 0 and _is_number(value)


def _check_optional_number(meta, key, lo, hi, source) -> None:
    v = meta.get(key)
    if v is not None and not (_is_number(v) and lo <= v <= hi) and not (isinstance(v, float) and math.isnan(v)):
        raise _fail(source, key, f"null or a number in [{lo}, {hi}]", v)


def validate_metadata(meta: Any, state_dict: Mapping[str, Tensor], source: Any) -> dict[str, Any]:
    """Check a checkpoint's metadata field by field, and against the tensors it comes with.

    Nothing of the file reaches timm before this passes: the model name must be one of timm's, the adapter a
    registered one, ``timm_kwargs`` a subset of ``SAFE_TIMM_KWARGS``, ``num_classes`` the classifier's rows
    in the file, the stem's input channels the adapter's. Numbers are checked for type and range, names for
    type, length and count.

    Args:
        meta: the parsed metadata (anything: it comes from the file).
        state_dict: the file's tensors, under timm's names.
        source: the file, for messages.

    Returns:
        The keyword arguments of ``GrayEfficientNet`` that rebuild the model.

    Raises:
        WeightsError: naming the first field that is wrong, and what was expected.
    """
    if meta is None:
        raise WeightsError(
            f"{source} is not a gray_effnet checkpoint (no '{META_KEY}' metadata); load a plain timm state dict "
            "with GrayEfficientNet(model_name, weights=PATH, num_classes=...)"
        )
    if not isinstance(meta, dict):
        raise _fail(source, META_KEY, "a JSON object", meta)
    if nesting_depth(meta) > MAX_NESTING:  # before anything walks it: deeper values would end in a RecursionError
        raise WeightsError(f"{source}: checkpoint metadata nested more than {MAX_NESTING} levels deep; this project "
                           "writes 3")
    known = {"format_version", "model_name", "adapter", "num_classes", "class_names", "img_size", "mean", "std",
             "timm_kwargs", "intensity", "adapter_kwargs", "task", "thresholds", "epoch", "val_acc", "val_loss",
             "val_auc"}
    unknown = sorted(str(k) for k in meta if k not in known)
    if unknown:
        raise WeightsError(f"{source}: unknown checkpoint field(s) {unknown[:5]}; expected only {sorted(known)}")
    missing = [k for k in ("format_version", "model_name", "adapter", "num_classes", "mean", "std") if k not in meta]
    if missing:
        raise WeightsError(f"{source}: checkpoint field {missing[0]!r} is missing")

    version = meta["format_version"]
    if not _is_int(version) or version < 1:
        raise _fail(source, "format_version", f"an integer from 1 to {FORMAT_VERSION}", version)
    if version > FORMAT_VERSION:
        raise WeightsError(f"{source}: checkpoint field 'format_version' is {version}: the file was written by a "
                           f"newer gray_effnet (this one reads up to {FORMAT_VERSION}); upgrade gray_effnet")

    name = meta["model_name"]
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not timm.is_model(name):
        raise _fail(source, "model_name", "the name of a timm model", name)
    adapter = meta["adapter"]
    if not isinstance(adapter, str) or adapter not in list_adapters():
        raise _fail(source, "adapter", f"one of {', '.join(list_adapters())}", adapter)

    n = meta["num_classes"]
    if not _is_int(n) or not 1 <= n <= MAX_CLASSES:
        raise _fail(source, "num_classes", f"an integer from 1 to {MAX_CLASSES}", n)
    classifier = timm.models.get_pretrained_cfg_value(name, "classifier")
    head = state_dict.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    if head is None or head.ndim != 2 or head.shape[0] != n:
        rows = "no classifier" if head is None else f"a classifier of shape {tuple(head.shape)}"
        raise WeightsError(f"{source}: checkpoint field 'num_classes' says {n} but the file holds {rows}")
    first_conv = timm.models.get_pretrained_cfg_value(name, "first_conv")
    stem = state_dict.get(f"{first_conv}.weight") if isinstance(first_conv, str) else None
    in_chans = get_adapter_class(adapter).in_chans
    if stem is None or stem.ndim != 4 or stem.shape[1] != in_chans:
        got = "no stem weight" if stem is None else f"a stem weight of shape {tuple(stem.shape)}"
        raise WeightsError(f"{source}: checkpoint field 'adapter' is {adapter!r}, whose stem takes {in_chans} "
                           f"input channel(s), but the file holds {got}")

    names = meta.get("class_names")
    if names is not None:
        if (not isinstance(names, list) or len(names) != n
                or not all(isinstance(c, str) and 0 < len(c) <= MAX_NAME_CHARS for c in names)):
            raise _fail(source, "class_names", f"null or a list of {n} non-empty strings (num_classes)", names)
        shady = [c for c in names if unprintable(c)]
        if shady:  # they are printed in tables and written to CSVs
            raise _fail(source, "class_names", "names without control characters", shady[0])
        if len(set(names)) != len(names):
            raise _fail(source, "class_names", "a list of distinct names", names)
    size = meta.get("img_size")
    if size is not None and (not isinstance(size, list) or len(size) != 2
                             or not all(_is_int(s) and 1 <= s <= MAX_IMG_SIDE for s in size)):
        raise _fail(source, "img_size", f"null or [H, W] with integers from 1 to {MAX_IMG_SIDE}", size)
    if size is not None and size[0] * size[1] > input_size_limit():
        raise _fail(source, "img_size", f"[H, W] with H x W at most the pixel limit {input_size_limit()} "
                    "(--max-pixels)", size)
    for key in ("mean", "std"):
        v = meta[key]
        if not isinstance(v, list) or len(v) != 3 or not all(_is_number(x) and abs(x) <= 1e3 for x in v):
            raise _fail(source, key, "a list of 3 finite numbers (one per RGB channel)", v)
    if not all(s > 0 for s in meta["std"]):
        raise _fail(source, "std", "3 positive numbers", meta["std"])

    kwargs = meta.get("timm_kwargs", {})
    if not isinstance(kwargs, dict):
        raise _fail(source, "timm_kwargs", "a JSON object", kwargs)
    for key, value in kwargs.items():
        if key not in SAFE_TIMM_KWARGS:
            raise WeightsError(
                f"{source}: checkpoint field 'timm_kwargs' holds {key!r}, which gray_effnet does not pass to timm "
                f"from a file (allowed: {', '.join(SAFE_TIMM_KWARGS)}); options such as checkpoint_path or "
                "pretrained_cfg would make timm open other files"
            )
        lo, hi = SAFE_TIMM_KWARGS[key]
        if not (_is_number(value) and lo <= value < hi):
            raise _fail(source, f"timm_kwargs.{key}", f"a number in [{lo}, {hi})", value)

    intensity = meta.get("intensity", "full")
    try:
        if not isinstance(intensity, str) or len(intensity) > 64:
            raise InputError("not a short string")
        parse_intensity(intensity)
    except InputError as e:
        raise _fail(source, "intensity", f"an intensity mapping such as 'full' or 'range:-1024:3071' ({e})",
                    intensity) from None
    options = meta.get("adapter_kwargs") or {}
    allowed = get_adapter_class(adapter).option_names
    if not isinstance(options, dict) or not all(k in allowed for k in options):
        raise _fail(source, "adapter_kwargs", f"null or an object with the options of {adapter!r} "
                    f"({', '.join(allowed) or 'none'})", options)
    for key, value in options.items():
        if not _plain_numbers(value):
            raise _fail(source, f"adapter_kwargs.{key}",
                        f"finite numbers or lists of them (at most {MAX_OPTION_NUMBERS})", value)

    task = meta.get("task", "single")  # files written before issue 20 are single-label
    if task not in TASKS:
        raise _fail(source, "task", f"one of {', '.join(TASKS)}", task)
    if task == "multi" and names is not None and any("|" in c for c in names):
        raise _fail(source, "class_names", "finding names without '|' (it joins them in predictions.csv)", names)
    thresholds = meta.get("thresholds")
    if thresholds is not None and (task != "multi" or not isinstance(thresholds, list) or len(thresholds) != n
                                   or not all(_is_number(t) and 0 <= t <= 1 for t in thresholds)):
        raise _fail(source, "thresholds", f"null, or for task 'multi' a list of {n} numbers in [0, 1] (num_classes)",
                    thresholds)

    epoch = meta.get("epoch")
    if epoch is not None and not (_is_int(epoch) and epoch >= 0):
        raise _fail(source, "epoch", "null or an integer >= 0", epoch)
    _check_optional_number(meta, "val_acc", 0.0, 1.0, source)
    _check_optional_number(meta, "val_loss", 0.0, 1e6, source)
    _check_optional_number(meta, "val_auc", 0.0, 1.0, source)
    return {"model_name": name, "adapter": adapter, "num_classes": n, "class_names": names, "img_size": size,
            "mean": meta["mean"], "std": meta["std"], "intensity": intensity, "adapter_kwargs": options or None,
            "task": task, "thresholds": thresholds, **kwargs}


def describe(model: GrayEfficientNet, **extra: Any) -> dict[str, Any]:
    """The metadata written with ``model``'s weights; ``extra`` adds epoch, val_acc, val_loss, val_auc."""
    return {"format_version": FORMAT_VERSION, **model.describe(), **extra}


# -- weights files ------------------------------------------------------------------------------------
def save_weights(model: GrayEfficientNet, path: str | os.PathLike, **extra: Any) -> Path:
    """Write ``model``'s weights as a timm-native ``.safetensors`` file that ``load_model`` can rebuild.

    The metadata is checked with the same ``validate_metadata`` that reads it back, so a file this
    function writes always loads.

    Args:
        model: a ``GrayEfficientNet`` (unwrapped from DDP / ``torch.compile``).
        path: the file to write, atomically.
        **extra: ``epoch``, ``val_acc``, ``val_loss``, ``val_auc``.
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
    extra = {"epoch": row["epoch"], "val_acc": row["val_acc"], "val_loss": row["val_loss"], "val_auc": row["val_auc"]}
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
            raise _fail(path, key, f"a {kind.__name__}", type(state.get(key)).__name__)
    epoch = state.get("epoch")
    if not _is_int(epoch) or epoch < 0:
        raise _fail(path, "epoch", "an integer >= 0", epoch)
    history = state["history"]
    if len(history) != epoch + 1:
        raise _fail(path, "history", f"{epoch + 1} rows (one per finished epoch)", f"{len(history)} rows")
    for row in history:
        if not isinstance(row, dict) or sorted(row) != sorted(METRIC_COLUMNS):
            raise _fail(path, "history", f"rows with the columns {METRIC_COLUMNS}", row)
        if not all(_is_number(v) or (isinstance(v, float) and math.isnan(v)) for v in row.values()):
            raise _fail(path, "history", "rows of numbers", row)
    if state.get("select_by") not in SELECT_BY:
        raise _fail(path, "select_by", f"one of {', '.join(SELECT_BY)}", state.get("select_by"))
    rng = state["rng"]
    numpy_state = rng.get("numpy")
    if (not isinstance(rng.get("torch"), Tensor) or rng["torch"].dtype != torch.uint8
            or not isinstance(rng.get("python"), tuple) or not isinstance(numpy_state, tuple)
            or len(numpy_state) != 5 or not isinstance(numpy_state[1], Tensor)):
        raise _fail(path, "rng", "the RNG states this project writes", "another structure")
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        raise _fail(path, "optimizer", "an optimizer state dict (state, param_groups)", sorted(optimizer)[:4])


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
            if isinstance(row, dict):
                row.setdefault("val_auc", math.nan)
                row.setdefault("val_ap", math.nan)
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
