"""A checkpoint's metadata, defined once: ``CHECKPOINT_FIELDS``, one row per field, with its type and bounds.

Every reader and writer of the metadata goes through the table:

* ``describe(model)``: what is written, each field's ``write`` from the model (``GrayEfficientNet.describe``,
  ``gray_effnet.checkpoint.save_weights``), and the fields the model does not know (``epoch``, the validation
  scores) as extras.
* ``validate_metadata``: what is read back. The metadata is untrusted input: each field is checked, in the
  table's order, before any model is built, and the ``GrayEfficientNet`` keyword arguments come from the
  rows that have a ``kwarg``.

A new field is one row (and, if it needs a rule of its own, a small named check function); the fuzz test of
``tests/test_checkpoint.py`` takes its fields from this table, so a field without bad values to try fails it.

This module imports nothing of ``gray_effnet.model``, which imports it.
"""

import math
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import timm
from torch import Tensor

from .adapters import get_adapter_class, list_adapters
from .errors import InputError, WeightsError
from .intensity import parse_intensity
from .limits import MAX_NESTING, input_size_limit, nesting_depth, unprintable
from .tasks import TASKS

__all__ = [
    "CHECKPOINT_FIELDS",
    "EXTRA_FIELDS",
    "FORMAT_VERSION",
    "MAX_CLASSES",
    "MAX_IMG_SIDE",
    "MAX_NAME_CHARS",
    "MAX_OPTION_NUMBERS",
    "META_KEY",
    "SAFE_TIMM_KWARGS",
    "MetaField",
    "describe",
    "field_error",
    "is_int",
    "is_number",
    "validate_metadata",
]

META_KEY = "gray_effnet"
# 2 (issue 20): task, thresholds and val_auc, which a reader of version 1 refuses as unknown fields; a version 1
# file is a single-label checkpoint and reads as one.
FORMAT_VERSION = 2
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

_SHOW = reprlib.Repr()  # a bounded repr: a few levels and items, so a hostile value cannot flood or recurse
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 3, 6, 6, 60, 60


def field_error(source: Any, field: str, expected: str, got: Any) -> WeightsError:
    """The one error of a wrong field: ``SOURCE: checkpoint field 'F' must be EXPECTED; got VALUE`` (bounded)."""
    shown = _SHOW.repr(got)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return WeightsError(f"{source}: checkpoint field {field!r} must be {expected}; got {shown}")


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


# The fields above a field, checked, with the defaults of those a file lacks: what its checks may read.
Checked = Mapping[str, Any]
# A rule beyond the type and bounds: (value, checked, the file's tensors, the file for messages) -> None, or raises.
Rule = Callable[[Any, Checked, Mapping[str, Tensor], Any], None]


@dataclass(frozen=True)
class MetaField:
    """One field of a checkpoint's metadata: how it is written, checked and turned back into a model.

    Attributes:
        name: the key in the metadata.
        expected: what the field must be, as the error says it (``must be EXPECTED; got ...``) when ``valid``
            is false; a function of the checked fields above it where it depends on them.
        valid: the type and bounds: (value, checked) -> whether the value is one.
        rule: a check of its own after ``valid`` (against other fields, the tensors, ...), raising its own
            ``WeightsError``; None for none.
        required: a file must have it; otherwise a file without it (an older one) reads as ``default``.
        default: the value of an optional field a file lacks.
        write: the value written, from the model; None for the extras that the caller of ``describe`` gives
            (the epoch and its validation scores, which a model does not know).
        kwarg: the ``GrayEfficientNet`` keyword argument it becomes; ``**name`` spreads a dict into keyword
            arguments; None for a field that rebuilds nothing.
        read: the keyword argument's value from the checked value.
    """

    name: str
    expected: str | Callable[[Checked], str]
    valid: Callable[[Any, Checked], bool]
    rule: Rule | None = None
    required: bool = False
    default: Any = None
    write: Callable[[Any], Any] | None = None
    kwarg: str | None = None
    read: Callable[[Any], Any] = lambda value: value

    def check(self, value: Any, checked: Checked, state_dict: Mapping[str, Tensor], source: Any) -> None:
        if not self.valid(value, checked):
            expected = self.expected(checked) if callable(self.expected) else self.expected
            raise field_error(source, self.name, expected, value)
        if self.rule is not None:
            self.rule(value, checked, state_dict, source)


# -- the rules of the fields that need one, in the table's order -------------------------------------------
def _readable_version(version: int, checked: Checked, state_dict: Mapping[str, Tensor], source: Any) -> None:
    if version > FORMAT_VERSION:
        raise WeightsError(f"{source}: checkpoint field 'format_version' is {version}: the file was written by a "
                           f"newer gray_effnet (this one reads up to {FORMAT_VERSION}); upgrade gray_effnet")


def _tensors_fit(n: int, checked: Checked, state_dict: Mapping[str, Tensor], source: Any) -> None:
    """The classifier's rows are ``num_classes`` and the stem's input channels the adapter's, from the file."""
    name, adapter = checked["model_name"], checked["adapter"]
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


def _printable_distinct(names: list[str] | None, checked: Checked, state_dict: Mapping[str, Tensor],
                        source: Any) -> None:
    if names is None:
        return
    shady = [c for c in names if unprintable(c)]
    if shady:  # they are printed in tables and written to CSVs
        raise field_error(source, "class_names", "names without control characters", shady[0])
    if len(set(names)) != len(names):
        raise field_error(source, "class_names", "a list of distinct names", names)


def _within_pixel_limit(size: list[int] | None, checked: Checked, state_dict: Mapping[str, Tensor],
                        source: Any) -> None:
    if size is not None and size[0] * size[1] > input_size_limit():
        raise field_error(source, "img_size", f"[H, W] with H x W at most the pixel limit {input_size_limit()} "
                          "(--max-pixels)", size)


def _positive(std: list[float], checked: Checked, state_dict: Mapping[str, Tensor], source: Any) -> None:
    if not all(s > 0 for s in std):
        raise field_error(source, "std", "3 positive numbers", std)


def _safe_timm_kwargs(kwargs: dict, checked: Checked, state_dict: Mapping[str, Tensor], source: Any) -> None:
    for key, value in kwargs.items():
        if key not in SAFE_TIMM_KWARGS:
            raise WeightsError(
                f"{source}: checkpoint field 'timm_kwargs' holds {key!r}, which gray_effnet does not pass to timm "
                f"from a file (allowed: {', '.join(SAFE_TIMM_KWARGS)}); options such as checkpoint_path or "
                "pretrained_cfg would make timm open other files"
            )
        lo, hi = SAFE_TIMM_KWARGS[key]
        if not (is_number(value) and lo <= value < hi):
            raise field_error(source, f"timm_kwargs.{key}", f"a number in [{lo}, {hi})", value)


_INTENSITY = "an intensity mapping such as 'full' or 'range:-1024:3071'"


def _parses(intensity: str, checked: Checked, state_dict: Mapping[str, Tensor], source: Any) -> None:
    try:
        parse_intensity(intensity)
    except InputError as e:
        raise field_error(source, "intensity", f"{_INTENSITY} ({e})", intensity) from None


def _plain_numbers(value: Any, budget: list[int] | None = None) -> bool:
    """A finite number, or (nested) lists of them, with at most ``MAX_OPTION_NUMBERS`` numbers in all."""
    budget = [MAX_OPTION_NUMBERS] if budget is None else budget
    if isinstance(value, list):
        return all(_plain_numbers(v, budget) for v in value)
    budget[0] -= 1
    return budget[0] >= 0 and is_number(value)


def _adapter_options(options: dict | None, checked: Checked) -> bool:
    options = options or {}
    return isinstance(options, dict) and all(k in get_adapter_class(checked["adapter"]).option_names for k in options)


def _option_numbers(options: dict | None, checked: Checked, state_dict: Mapping[str, Tensor], source: Any) -> None:
    for key, value in (options or {}).items():
        if not _plain_numbers(value):
            raise field_error(source, f"adapter_kwargs.{key}",
                              f"finite numbers or lists of them (at most {MAX_OPTION_NUMBERS})", value)


def _finding_names(task: str, checked: Checked, state_dict: Mapping[str, Tensor], source: Any) -> None:
    """A multi-label model's class names (its findings) without '|': a rule of the task, checked after it."""
    names = checked["class_names"]
    if task == "multi" and names is not None and any("|" in c for c in names):
        raise field_error(source, "class_names", "finding names without '|' (it joins them in predictions.csv)",
                          names)


def _names(names: Any, checked: Checked) -> bool:
    return names is None or (isinstance(names, list) and len(names) == checked["num_classes"] and all(
        isinstance(c, str) and 0 < len(c) <= MAX_NAME_CHARS for c in names))


def _img_size(size: Any, checked: Checked) -> bool:
    return size is None or (isinstance(size, list) and len(size) == 2
                            and all(is_int(s) and 1 <= s <= MAX_IMG_SIDE for s in size))


def _rgb(v: Any, checked: Checked) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(is_number(x) and abs(x) <= 1e3 for x in v)


def _thresholds(thresholds: Any, checked: Checked) -> bool:
    return thresholds is None or (checked["task"] == "multi" and isinstance(thresholds, list)
                                  and len(thresholds) == checked["num_classes"]
                                  and all(is_number(t) and 0 <= t <= 1 for t in thresholds))


def _score(lo: float, hi: float) -> tuple[str, Callable[[Any, Checked], bool]]:
    """(expected, valid) of a validation score: null, NaN (not measured) or a number in [lo, hi]."""
    return (f"null or a number in [{lo}, {hi}]",
            lambda v, checked: v is None or is_number(v) and lo <= v <= hi or isinstance(v, float) and math.isnan(v))


_RGB = "a list of 3 finite numbers (one per RGB channel)"

CHECKPOINT_FIELDS: tuple[MetaField, ...] = (
    MetaField("format_version", f"an integer from 1 to {FORMAT_VERSION}", lambda v, c: is_int(v) and v >= 1,
              _readable_version, required=True, write=lambda m: FORMAT_VERSION),
    MetaField("model_name", "the name of a timm model",
              lambda v, c: isinstance(v, str) and len(v) <= MAX_NAME_CHARS and timm.is_model(v),
              required=True, write=lambda m: m.model_name, kwarg="model_name"),
    MetaField("adapter", lambda c: f"one of {', '.join(list_adapters())}",
              lambda v, c: isinstance(v, str) and v in list_adapters(),
              required=True, write=lambda m: m.adapter, kwarg="adapter"),
    MetaField("num_classes", f"an integer from 1 to {MAX_CLASSES}", lambda v, c: is_int(v) and 1 <= v <= MAX_CLASSES,
              _tensors_fit, required=True, write=lambda m: m.num_classes, kwarg="num_classes"),
    MetaField("class_names", lambda c: f"null or a list of {c['num_classes']} non-empty strings (num_classes)",
              _names, _printable_distinct, write=lambda m: m.class_names, kwarg="class_names"),
    MetaField("img_size", f"null or [H, W] with integers from 1 to {MAX_IMG_SIDE}", _img_size, _within_pixel_limit,
              write=lambda m: list(m.img_size) if m.img_size else None, kwarg="img_size"),
    MetaField("mean", _RGB, _rgb, required=True, write=lambda m: list(m.mean), kwarg="mean"),
    MetaField("std", _RGB, _rgb, _positive, required=True, write=lambda m: list(m.std), kwarg="std"),
    MetaField("timm_kwargs", "a JSON object", lambda v, c: isinstance(v, dict), _safe_timm_kwargs, default={},
              write=lambda m: m.timm_kwargs, kwarg="**timm_kwargs"),
    MetaField("intensity", f"{_INTENSITY} (not a short string)", lambda v, c: isinstance(v, str) and len(v) <= 64,
              _parses, default="full", write=lambda m: m.intensity, kwarg="intensity"),
    MetaField("adapter_kwargs", lambda c: f"null or an object with the options of {c['adapter']!r} "
              f"({', '.join(get_adapter_class(c['adapter']).option_names) or 'none'})",
              _adapter_options, _option_numbers, write=lambda m: m.stem.options(), kwarg="adapter_kwargs",
              read=lambda options: options or None),
    # Files written before issue 20 (format_version 1) have no task: they are single-label.
    MetaField("task", f"one of {', '.join(TASKS)}", lambda v, c: v in TASKS, _finding_names, default="single",
              write=lambda m: m.task, kwarg="task"),
    MetaField("thresholds", lambda c: f"null, or for task 'multi' a list of {c['num_classes']} numbers in [0, 1] "
              "(num_classes)", _thresholds, write=lambda m: m.thresholds, kwarg="thresholds"),
    # The extras: the epoch and its validation scores (the metrics.csv columns of the same names).
    MetaField("epoch", "null or an integer >= 0", lambda v, c: v is None or is_int(v) and v >= 0),
    MetaField("val_acc", *_score(0.0, 1.0)),
    MetaField("val_loss", *_score(0.0, 1e6)),
    MetaField("val_auc", *_score(0.0, 1.0)),
)
EXTRA_FIELDS = tuple(f.name for f in CHECKPOINT_FIELDS if f.write is None)


def describe(model: Any, **extra: Any) -> dict[str, Any]:
    """The metadata written with ``model``'s weights (a ``GrayEfficientNet``), in the table's order.

    Args:
        model: the model whose fields are written.
        **extra: the ``EXTRA_FIELDS`` it does not know (``epoch``, ``val_acc``, ``val_loss``, ``val_auc``); one
            left out is not written.

    Raises:
        TypeError: an extra that is not one of ``EXTRA_FIELDS``.
    """
    wrong = sorted(set(extra) - set(EXTRA_FIELDS))
    if wrong:
        raise TypeError(f"describe() takes only {', '.join(EXTRA_FIELDS)} as extras; got {wrong}")
    return {f.name: f.write(model) if f.write is not None else extra[f.name]
            for f in CHECKPOINT_FIELDS if f.write is not None or f.name in extra}


def validate_metadata(meta: Any, state_dict: Mapping[str, Tensor], source: Any) -> dict[str, Any]:
    """Check a checkpoint's metadata field by field, and against the tensors it comes with.

    Nothing of the file reaches timm before this passes: the model name must be one of timm's, the adapter a
    registered one, ``timm_kwargs`` a subset of ``SAFE_TIMM_KWARGS``, ``num_classes`` the classifier's rows
    in the file, the stem's input channels the adapter's. Numbers are checked for type and range, names for
    type, length and count: each field as its row of ``CHECKPOINT_FIELDS`` says, in the table's order.

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
        raise field_error(source, META_KEY, "a JSON object", meta)
    if nesting_depth(meta) > MAX_NESTING:  # before anything walks it: deeper values would end in a RecursionError
        raise WeightsError(f"{source}: checkpoint metadata nested more than {MAX_NESTING} levels deep; this project "
                           "writes 3")
    known = {f.name for f in CHECKPOINT_FIELDS}
    unknown = sorted(str(k) for k in meta if k not in known)
    if unknown:
        raise WeightsError(f"{source}: unknown checkpoint field(s) {unknown[:5]}; expected only {sorted(known)}")
    missing = [f.name for f in CHECKPOINT_FIELDS if f.required and f.name not in meta]
    if missing:
        raise WeightsError(f"{source}: checkpoint field {missing[0]!r} is missing")

    checked: dict[str, Any] = {}
    kwargs: dict[str, Any] = {}
    for field in CHECKPOINT_FIELDS:
        value = meta.get(field.name, field.default)
        field.check(value, checked, state_dict, source)
        checked[field.name] = value
        if field.kwarg is not None and field.kwarg.startswith("**"):
            kwargs.update(field.read(value))
        elif field.kwarg is not None:
            kwargs[field.kwarg] = field.read(value)
    return kwargs
