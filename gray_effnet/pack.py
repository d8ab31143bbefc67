"""Packed datasets: an image folder decoded and resized once into a memory-mapped array, read a batch at a time.

``python -m gray_effnet pack --data DIR --img-size H W --output P`` reads every image once (``read_gray``), resizes
it as the validation transform does, and writes the folder ``P``:

* ``images.npy``: (N, 1, H, W), uint8 for 8-bit data, uint16 (``round(x * 65535)``) or float16 for deeper data;
  opened as a memory map, so only the rows a batch needs are read.
* ``labels.npy``: (N,) int64 class indices, or for multi-label data (N, K) float32 findings: 1, 0, or NaN (not
  known: left out of the loss and the metrics).
* ``pack.json``: the signature (``"format": "gray_effnet.pack"``, the format version, the files it wrote), the
  task (``single`` or ``multi``), the classes (or findings), size, dtype, intensity mapping, the split (row indices
  of train and val), the source folder with each file's size and mtime, the skipped files and why, the command and
  time it was made. A pack of a label table (``--labels``) records the table too: its path, size and mtime (a
  changed table makes the pack stale), how it was read, its bad rows, and each row's group.

``train.py --data P``, ``--evaluate`` and ``predict`` read a pack instead of the files. Training augmentation
then runs on whole batches on the training device (``gray_effnet.augment.BatchAugment``). A pack is built in a
temporary sibling folder and renamed into place only when complete, so an interrupted pack is never read.

A pack is untrusted input when read: ``pack.json`` is read up to ``MAX_META_BYTES`` and checked field by field
(``validate_pack_meta``), and the ``.npy`` headers are checked against it and against the file sizes before
anything is mapped. A pack is replaced only when its ``pack.json`` carries the signature and the folder holds
nothing but the files it lists, and only those files are removed.
"""

import contextlib
import glob
import json
import math
import os
import reprlib
import shlex
import stat
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from .augment import build_transforms
from .data import Batch, remap_target
from .errors import DataError, GrayEffnetError, InputError
from .files import LOCK_NAME, output_lock, pid_alive
from .folders import FolderData, find_images, load_folder
from .images import ScanResult, UnreadableImageWarning, read_gray
from .intensity import Intensity, parse_intensity
from .table_options import TableOptions
from .tables import TableData, load_table

__all__ = ["DTYPES", "Pack", "PackedDataset", "has_pack_json", "is_pack", "open_pack", "validate_pack_meta",
           "write_pack"]

PACK_FORMAT = "gray_effnet.pack"
FORMAT_VERSION = 2  # 2: the signature ("format", "written"); packs of version 1 have none and are packed again
META = "pack.json"
WRITTEN = ("images.npy", "labels.npy", META)  # every file a pack holds; the only ones replacing it removes
DTYPES = ("auto", "uint8", "uint16", "float16")
STORED_DTYPES = DTYPES[1:]
MAX_META_BYTES = 1 << 30  # pack.json of a few million images; json.loads needs several times this in memory
MAX_CLASSES = 100_000  # the bounds of a checkpoint's class list (checkpoint.py), which a pack's classes become
MAX_NAME_CHARS = 256
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_TEXT_CHARS = 100_000  # the command line, a decoder's message
MAX_INT = 2**63  # what numpy and the file system store: seeds, sizes, mtimes in ns
_FINITE_CHUNK_BYTES = 64 << 20  # float16 rows checked per step
_PARTIAL = ".partial-"  # P.partial-<pid>: a pack being written; P.old-<pid>: the pack it replaces
_OLD = ".old-"


def max_pixels() -> int:
    """The largest H * W a pack may hold: PIL's decompression-bomb limit, as for a decoded image."""
    return int(Image.MAX_IMAGE_PIXELS or 89_478_485)  # None (the limit switched off): PIL's default


# -- the pack on disk -------------------------------------------------------------------------------
@dataclass
class Pack:
    """An opened pack. It has ``FolderData``'s fields (classes, train, val, scan, ignored, presplit), so that
    what reports a folder reports a pack too; the samples name the source files, relative to ``source``.

    Attributes:
        root: the pack folder.
        source: the folder it was packed from.
        img_size: (H, W) of every stored image.
        dtype: the stored dtype: ``uint8``, ``uint16`` or ``float16``.
        intensity: the mapping the images were read with (see ``gray_effnet.intensity``).
        rows: (source path, target) of each row of ``images.npy``; a row whose file failed to decode is in no split.
            A target is a class index, or (multi-label) a (K,) float32 tensor.
        train_rows: the rows of the training split.
        val_rows: the rows of the validation split.
        note: what the staleness check found (or why it could not check).
        meta: ``pack.json`` as read (and validated).
        task: ``single`` or ``multi``.
        labels: ``labels.npy``, checked against ``pack.json``: (N,) int64, or (N, K) float32 for multi-label.
        images_offset: the byte offset of the data in ``images.npy``.
    """

    root: Path
    source: Path
    classes: list[str]
    img_size: tuple[int, int]
    dtype: str
    intensity: str
    presplit: bool
    rows: list[tuple[str, int | Tensor]]
    train_rows: list[int]
    val_rows: list[int]
    scan: ScanResult
    ignored: list[str] = field(default_factory=list)
    note: str = ""
    meta: dict = field(default_factory=dict)
    task: str = "single"
    labels: np.ndarray | None = field(default=None, repr=False)  # checked against pack.json
    images_offset: int = 0  # where the data of images.npy starts, after its checked header

    @property
    def train(self) -> list[tuple[str, int | Tensor]]:
        return [self.rows[i] for i in self.train_rows]

    @property
    def val(self) -> list[tuple[str, int | Tensor]]:
        return [self.rows[i] for i in self.val_rows]

    @property
    def wide(self) -> bool:
        """Whether items are float32 in [0, 1] (every dtype but uint8)."""
        return self.dtype != "uint8"

    @property
    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.iterdir() if f.is_file())

    def refresh_command(self) -> str:
        """The ``pack`` command that rebuilds this pack from its source."""
        return _command(self.source, self.root, self.img_size, self.meta)


def has_pack_json(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a folder holding ``pack.json``: meant as a pack, so read with ``open_pack``, which says
    what is wrong with it if anything is. (A partial pack never has it: it is written last.)"""
    return path is not None and (Path(path) / META).is_file()


def is_pack(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` holds a pack this project wrote: ``pack.json`` carries its signature (``"format":
    "gray_effnet.pack"``, a format version, and ``"written"``: the files of a pack). Not whether it is valid (that
    is ``open_pack``'s to say); whether replacing it may remove those files. Never raises."""
    if path is None:
        return False
    try:
        meta = json.loads(_read_regular(Path(path) / META, MAX_META_BYTES))
    except (OSError, ValueError, RecursionError, GrayEffnetError):
        return False
    return (isinstance(meta, dict) and meta.get("format") == PACK_FORMAT and _is_int(meta.get("format_version"))
            and meta.get("written") == list(WRITTEN))


def _read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (not a FIFO or device, which could block or not end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path} is not a regular file")
        if st.st_size > limit:
            raise DataError(f"{path} is {st.st_size} bytes; a pack's is at most {limit}")
        return f.read(st.st_size)  # not f.read(limit): that allocates `limit` bytes before reading


def _command(source: Path, output: Path, img_size: Sequence[int], meta: dict) -> str:
    args = ["python", "-m", "gray_effnet", "pack", "--data", str(source), "--img-size", *map(str, img_size),
            "--output", str(output)]
    if not meta.get("presplit"):
        args += ["--val-split", str(meta["val_split"]), "--seed", str(meta["seed"])]
    if meta.get("intensity", "full") != "full":
        args += ["--intensity", meta["intensity"]]
    if meta.get("dtype_requested", "auto") != "auto":
        args += ["--dtype", meta["dtype_requested"]]
    if meta.get("table"):
        args += TableOptions.from_json(meta["table"]["options"]).flags()
    return shlex.join(args)


def _stat(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _listing(source: Path, presplit: bool) -> list[str]:
    """The image files the folder scan finds now (``find_images``'s rules), as paths."""
    trees = [source / "train", source / "val"] if presplit else [source]
    return [p for tree in trees for p, _ in find_images(tree, min_classes=1).samples]


def _changes(root: Path, source: Path, recorded: dict, now: dict, refresh: str) -> None:
    """``DataError`` counting and naming the files added, removed or modified since packing."""
    added = sorted(set(now) - set(recorded))
    removed = sorted(set(recorded) - set(now))
    modified = sorted(p for p in now if p in recorded and now[p] != list(recorded[p]))
    if added or removed or modified:
        parts = [f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
                 for what, names in (("added", added), ("removed", removed), ("modified", modified)) if names]
        raise DataError(f"pack {root} is stale: since it was made, files of {source} were {'; '.join(parts)}; "
                        f"{refresh}")


def _table_staleness(root: Path, meta: dict, refresh: str) -> str:
    """A pack of a label table: the table unchanged, and each file it named as it was (the table lists the files,
    so files added to the folder do not matter)."""
    source, table = Path(meta["source"]), Path(meta["table"]["path"])
    if not table.is_file():
        return f"label table {table} is gone: could not check whether the pack is stale"
    st = table.stat()
    if [st.st_size, st.st_mtime_ns] != [meta["table"]["size"], meta["table"]["mtime_ns"]]:
        raise DataError(f"pack {root} is stale: its label table {table} changed since it was made; {refresh}")
    now = {}
    for p in meta["files"]:
        with contextlib.suppress(OSError):  # gone: counted as removed
            now[p] = _stat(os.path.join(source, p))
    _changes(root, source, meta["files"], now, refresh)
    return f"label table {table.name} and its files unchanged since packing"


def _staleness(root: Path, meta: dict) -> str:
    """A note when the source cannot be checked; ``DataError`` naming the changes when the pack is stale."""
    source = Path(meta["source"])
    refresh = f"refresh it with: {_command(source, root, meta['img_size'], meta)}"
    if not source.is_dir():
        return f"source folder {source} is gone: could not check whether the pack is stale"
    if meta["table"] is not None:
        return _table_staleness(root, meta, refresh)
    presplit = (source / "train").is_dir() and (source / "val").is_dir()
    if presplit != meta["presplit"]:
        raise DataError(f"pack {root} is stale: {source} {'now has' if presplit else 'no longer has'} train/ and "
                        f"val/ folders; {refresh}")
    try:
        now = {os.path.relpath(p, source): _stat(p) for p in _listing(source, presplit)}
    except (DataError, OSError) as e:
        raise DataError(f"pack {root} is stale: its source {source} cannot be listed as it was ({e}); {refresh}") \
            from None
    _changes(root, source, meta["files"], now, refresh)
    return f"source {source} unchanged since packing"


# -- pack.json: written, then validated on every read ---------------------------------------------------
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlong = 60, 60, 4, 4, 40


def _fail(source: Any, field: str, expected: str, got: Any) -> DataError:
    return DataError(f"{source}: pack field {field!r} must be {expected}; got {_short.repr(got)}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_text(v: Any, limit: int, empty: bool = False) -> bool:
    return isinstance(v, str) and (empty or len(v) > 0) and len(v) <= limit and "\x00" not in v


def _is_relpath(v: Any) -> bool:
    """A path below the source folder, as ``write_pack`` records it: relative, without ``..``."""
    return (_is_text(v, MAX_PATH_CHARS) and not os.path.isabs(v) and v != ".."
            and not v.startswith("../") and "/../" not in v and not v.endswith("/.."))


def _check_int_list(meta: dict, key: str, n: int, source: Any) -> list[int]:
    rows = meta[key]
    if not isinstance(rows, list) or not rows:
        raise _fail(source, key, f"a non-empty list of row indices (there are {n} rows)", rows)
    bad = next((r for r in rows if not (_is_int(r) and 0 <= r < n)), None)
    if bad is not None:
        raise _fail(source, key, f"row indices in [0, {n})", bad)
    if len(set(rows)) != len(rows):
        raise _fail(source, key, "distinct row indices", rows)
    return rows


_FIELDS = ("format", "format_version", "written", "task", "classes", "img_size", "dtype", "dtype_requested",
           "intensity", "val_split", "seed", "presplit", "source", "rows", "train", "val", "files", "skipped",
           "ignored", "modes", "wide_source", "table", "command", "created", "seconds")
TASKS = ("single", "multi")
_TABLE_FIELDS = ("path", "size", "mtime_ns", "options", "bad_rows", "test_rows", "split", "groups")


def _is_column(v: Any) -> bool:
    return _is_text(v, MAX_PATH_CHARS)


def _is_column_or_none(v: Any) -> bool:
    return v is None or _is_column(v)


def _is_columns(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= MAX_CLASSES and all(_is_column(c) for c in v)


_TEXT = f"a string of 1 to {MAX_PATH_CHARS} characters"
_TEXT_OR_NULL = f"null or {_TEXT}"
# The fields of TableOptions.to_json(), each with its type: checked before TableOptions checks the values.
_TABLE_OPTIONS = {
    "labels": (_is_column, _TEXT), "path_column": (_is_column, _TEXT),
    "label_column": (_is_column_or_none, _TEXT_OR_NULL),
    "label_columns": (_is_columns, f"a list of at most {MAX_CLASSES} strings of 1 to {MAX_PATH_CHARS} characters"),
    "label_sep": (_is_column_or_none, _TEXT_OR_NULL), "uncertain": (_is_column, _TEXT),
    "group_column": (_is_column_or_none, _TEXT_OR_NULL), "split_column": (_is_column_or_none, _TEXT_OR_NULL),
    "multi_label": (lambda v: isinstance(v, bool), "true or false"),
}


def _check_table(meta: dict, source: Any) -> None:
    """``table``: null for a pack of class folders; for a pack of a label table, its record, every part typed."""
    table, task, n = meta["table"], meta["task"], len(meta["rows"])
    if table is None:
        if task == "multi":
            raise _fail(source, "table", "the label table's record: a multi-label pack is made from a label table",
                        table)
        return

    def bad(part: str, expected: str, got: Any) -> DataError:
        return _fail(source, "table", f"null or a label table's record, whose {part!r} is {expected}", got)

    if not isinstance(table, dict) or set(table) != set(_TABLE_FIELDS):
        raise _fail(source, "table", f"null or an object of {list(_TABLE_FIELDS)}", table)
    path = table["path"]
    if not (_is_text(path, MAX_PATH_CHARS) and os.path.isabs(path)):
        raise bad("path", f"an absolute path of at most {MAX_PATH_CHARS} characters", path)
    if not (_is_int(table["size"]) and 0 <= table["size"] < MAX_INT):
        raise bad("size", "a size in bytes", table["size"])
    if not (_is_int(table["mtime_ns"]) and -MAX_INT <= table["mtime_ns"] < MAX_INT):
        raise bad("mtime_ns", "a modification time in ns", table["mtime_ns"])
    options = table["options"]
    if not isinstance(options, dict) or set(options) != set(_TABLE_OPTIONS):
        raise bad("options", f"an object of {list(_TABLE_OPTIONS)}", options)
    wrong = next((k for k, (ok, _) in _TABLE_OPTIONS.items() if not ok(options[k])), None)
    if wrong is not None:
        raise bad("options", f"table options whose {wrong!r} is {_TABLE_OPTIONS[wrong][1]}", options[wrong])
    try:
        parsed = TableOptions.from_json(options)
    except (InputError, DataError) as e:
        raise bad("options", f"table options that can be used ({e})", options) from None
    if parsed.labels != path:
        raise bad("options", f"table options whose 'labels' is its 'path', {path!r}", parsed.labels)
    if parsed.task != task:
        raise bad("options", f"table options of a {task}-label table (the pack's 'task')", options)
    rows = table["bad_rows"]
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == 2 and _is_int(r[0]) and 1 <= r[0] < MAX_INT
            and _is_text(r[1], MAX_TEXT_CHARS) for r in rows):
        raise bad("bad_rows", "a list of [row number, reason]", rows)
    if not (_is_int(table["test_rows"]) and 0 <= table["test_rows"] < MAX_INT):
        raise bad("test_rows", "a count of rows, 0 or more", table["test_rows"])
    if not _is_text(table["split"], MAX_TEXT_CHARS):
        raise bad("split", f"a string of 1 to {MAX_TEXT_CHARS} characters", table["split"])
    groups = table["groups"]
    if not (isinstance(groups, list) and len(groups) == n and all(_is_text(g, MAX_TEXT_CHARS) for g in groups)):
        raise bad("groups", f"a list of {n} group names, one per entry of 'rows'", groups)


def validate_pack_meta(meta: Any, source: Any) -> dict[str, Any]:
    """Check a pack's ``pack.json`` field by field, before any array is opened.

    Every field is required and typed; numbers are range-checked (``img_size`` within PIL's decompression-bomb
    limit), lists and strings bounded. The split is checked as a split: ``train`` and ``val`` are non-empty,
    distinct, disjoint row indices in range, and every row's label is a class index (single-label) or null
    (multi-label: the findings are in ``labels.npy`` only). ``source`` must be an absolute path: the staleness
    check lists that folder. ``table`` is null (class folders) or the record of a label table, each part typed,
    its options ``TableOptions``' and of the pack's task, and one group per row; a multi-label pack has one.

    Args:
        meta: the parsed ``pack.json`` (anything: it comes from the file).
        source: the file, for messages.

    Returns:
        ``meta``, checked.

    Raises:
        DataError: naming the first field that is wrong, and what was expected.
    """
    if not isinstance(meta, dict):
        raise _fail(source, META, "a JSON object", meta)
    if meta.get("format") != PACK_FORMAT:
        old = " (a pack written before format 2 has none: pack it again)" if meta.get("format_version") == 1 else ""
        raise DataError(f"{source} is not a gray_effnet pack's: its 'format' is {_short.repr(meta.get('format'))}, "
                        f"not {PACK_FORMAT!r}{old}")
    unknown = sorted(str(k) for k in meta if k not in _FIELDS)
    if unknown:
        raise DataError(f"{source}: unknown pack field(s) {unknown[:5]}; expected only {list(_FIELDS)}")
    missing = [k for k in _FIELDS if k not in meta]
    if missing:
        # 'task' and 'table' came with label tables, after the first packs of format 2: those have neither.
        old = ("; packs written before gray_effnet read label tables have none: pack it again"
               if missing[0] in ("task", "table") else "")
        raise DataError(f"{source}: pack field {missing[0]!r} is missing{old}")

    version = meta["format_version"]
    if not _is_int(version) or version < 1:
        raise _fail(source, "format_version", f"an integer from 1 to {FORMAT_VERSION}", version)
    if version != FORMAT_VERSION:
        remedy = "upgrade gray_effnet" if version > FORMAT_VERSION else "pack it again"
        raise DataError(f"{source}: pack field 'format_version' is {version}; this gray_effnet reads format "
                        f"{FORMAT_VERSION}: {remedy}")
    if meta["written"] != list(WRITTEN):
        raise _fail(source, "written", f"the files of a pack, {list(WRITTEN)}", meta["written"])
    if meta["task"] not in TASKS:
        raise _fail(source, "task", f"one of {', '.join(TASKS)}", meta["task"])

    classes = meta["classes"]
    if (not isinstance(classes, list) or not 1 <= len(classes) <= MAX_CLASSES
            or not all(_is_text(c, MAX_NAME_CHARS) for c in classes)):
        raise _fail(source, "classes", f"a list of 1 to {MAX_CLASSES} names of 1 to {MAX_NAME_CHARS} characters",
                    classes)
    if len(set(classes)) != len(classes):
        raise _fail(source, "classes", "a list of distinct names", classes)
    size = meta["img_size"]
    if (not isinstance(size, list) or len(size) != 2 or not all(_is_int(s) and s >= 1 for s in size)
            or size[0] * size[1] > max_pixels()):
        raise _fail(source, "img_size", f"[H, W], positive integers with H * W at most {max_pixels()}", size)
    if meta["dtype"] not in STORED_DTYPES:
        raise _fail(source, "dtype", f"one of {', '.join(STORED_DTYPES)}", meta["dtype"])
    if meta["dtype_requested"] not in DTYPES:
        raise _fail(source, "dtype_requested", f"one of {', '.join(DTYPES)}", meta["dtype_requested"])
    intensity = meta["intensity"]
    try:
        ok = _is_text(intensity, MAX_NAME_CHARS) and str(parse_intensity(intensity)) == intensity
    except InputError:
        ok = False
    if not ok:
        raise _fail(source, "intensity", "an intensity mapping in its canonical form (see gray_effnet.intensity)",
                    intensity)
    if not (_is_number(meta["val_split"]) and 0 < meta["val_split"] < 1):
        raise _fail(source, "val_split", "a number between 0 and 1", meta["val_split"])
    if not (_is_int(meta["seed"]) and -MAX_INT <= meta["seed"] < MAX_INT):
        raise _fail(source, "seed", "a 64-bit integer", meta["seed"])
    for key in ("presplit", "wide_source"):
        if not isinstance(meta[key], bool):
            raise _fail(source, key, "true or false", meta[key])
    src = meta["source"]
    if not (_is_text(src, MAX_PATH_CHARS) and os.path.isabs(src)):
        raise _fail(source, "source", f"an absolute path of at most {MAX_PATH_CHARS} characters", src)

    rows = meta["rows"]
    if not isinstance(rows, list) or len(rows) < 2:
        raise _fail(source, "rows", "a list of [path, label] (at least one training and one validation image)", rows)
    n, n_classes, multi = len(rows), len(classes), meta["task"] == "multi"
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2 and _is_relpath(row[0])
                and (row[1] is None if multi else _is_int(row[1]) and 0 <= row[1] < n_classes)):
            want = ("[relative path, null] (with 'task' multi, the findings are in labels.npy)" if multi else
                    f"[relative path, label] with labels in [0, {n_classes}) (one per entry of 'classes')")
            raise _fail(source, "rows", f"{want}; row {i} is not", row)
    train = _check_int_list(meta, "train", n, source)
    val = _check_int_list(meta, "val", n, source)
    both = set(train) & set(val)
    if both:
        raise _fail(source, "val", f"rows disjoint from 'train'; {len(both)} are in both, e.g.", sorted(both)[:4])

    files = meta["files"]
    if not isinstance(files, dict) or not all(
            _is_relpath(k) and isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)
            and 0 <= v[0] < MAX_INT and -MAX_INT <= v[1] < MAX_INT for k, v in files.items()):
        raise _fail(source, "files", "an object of relative path: [size, mtime in ns]", files)
    skipped = meta["skipped"]
    if not isinstance(skipped, list) or not all(
            isinstance(s, list) and len(s) == 2 and _is_relpath(s[0]) and _is_text(s[1], MAX_TEXT_CHARS, empty=True)
            for s in skipped):
        raise _fail(source, "skipped", "a list of [relative path, reason]", skipped)
    if not isinstance(meta["ignored"], list) or not all(_is_relpath(p) for p in meta["ignored"]):
        raise _fail(source, "ignored", "a list of relative paths", meta["ignored"])
    modes = meta["modes"]
    if not isinstance(modes, dict) or not all(_is_text(k, MAX_NAME_CHARS) and _is_int(v) and 0 <= v < MAX_INT
                                              for k, v in modes.items()):
        raise _fail(source, "modes", "an object of image mode: count", modes)
    _check_table(meta, source)
    for key, limit in (("command", MAX_TEXT_CHARS), ("created", MAX_NAME_CHARS)):
        if not _is_text(meta[key], limit, empty=True):
            raise _fail(source, key, f"a string of at most {limit} characters", meta[key])
    if not (_is_number(meta["seconds"]) and meta["seconds"] >= 0):
        raise _fail(source, "seconds", "a number of seconds, 0 or more", meta["seconds"])
    return meta


def _read_meta(root: Path) -> dict[str, Any]:
    path = root / META
    try:
        text = _read_regular(path, MAX_META_BYTES)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror})") from None
    try:
        meta = json.loads(text)
    except RecursionError:
        raise DataError(f"{path} is not a pack's: its JSON is nested too deeply") from None
    except ValueError as e:
        raise DataError(f"{path} is not a pack's: it is not JSON ({str(e)[:200]})") from None
    return validate_pack_meta(meta, path)


# -- the arrays: headers checked before anything is mapped ------------------------------------------------
def _npy_offset(path: Path, shape: tuple[int, ...], dtype: np.dtype, says: str = "") -> int:
    """The data offset of ``path``, once its header is ``shape`` and ``dtype`` (C order) and its size fits them;
    ``says`` is what ``pack.json`` says it is, for the message (default: the dtype and shape).

    Only the header is read (``np.lib.format``'s own parser, which evaluates literals only), so a header that
    claims 2**40 rows costs nothing: it is refused before any array exists.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{path} is not a regular file")
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version}")
        except (ValueError, OSError, SyntaxError, TypeError) as e:
            raise DataError(f"{path} is not an array file of a pack ({str(e)[:200]})") from None
        offset = f.tell()
    if got_dtype != dtype or fortran or tuple(got_shape) != shape:
        says = says or f"{path.parent / META} says {dtype} {shape}"
        raise DataError(f"{path} holds {_short.repr(str(got_dtype))} {_short.repr(tuple(got_shape))}"
                        f"{' in Fortran order' if fortran else ''}; {says}")
    expected = offset + math.prod(shape) * dtype.itemsize
    if st.st_size != expected:
        raise DataError(f"{path} is {st.st_size} bytes; its header and {META} make it {expected}")
    return offset


def _check_labels(root: Path, meta: dict[str, Any]) -> np.ndarray:
    """``labels.npy``, header checked before it is read, then its values: (N,) int64 class indices equal to the
    labels of the rows (single-label), or (N, K) float32 of 1, 0 or NaN (multi-label)."""
    path, n, k, task = root / "labels.npy", len(meta["rows"]), len(meta["classes"]), meta["task"]
    if task == "multi":
        shape, dtype, want = (n, k), np.dtype(np.float32), f"float32 ({n}, {k}) of 1, 0 or NaN"
    else:
        shape, dtype, want = (n,), np.dtype(np.int64), f"int64 ({n},) class indices below {k}"
    says = f"{META} ({task}-label) says {want}"
    offset = _npy_offset(path, shape, dtype, says)
    labels = np.array(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))
    if task == "multi":
        bad = ~((labels == 0) | (labels == 1) | np.isnan(labels))
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise DataError(f"{path} holds {labels[row, col]} in row {row} ({meta['rows'][row][0]}), finding "
                            f"{meta['classes'][col]!r}; {says}")
        return labels
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= k:
        raise DataError(f"{path} holds labels from {low} to {high}; {says} (the pack has {k} classes: labels in "
                        f"[0, {k}))")
    if not np.array_equal(labels, np.fromiter((label for _, label in meta["rows"]), np.int64, n)):
        raise DataError(f"{path} differs from the labels of the rows of {root / META}")
    return labels


def _check_arrays(root: Path, meta: dict[str, Any]) -> tuple[np.ndarray, int]:
    """``labels.npy`` (``_check_labels``) and the data offset of ``images.npy`` (checked: header, size, and for
    float16 every value finite)."""
    n = len(meta["rows"])
    h, w = meta["img_size"]
    dtype = np.dtype(meta["dtype"])
    offset = _npy_offset(root / "images.npy", (n, 1, h, w), dtype)
    labels = _check_labels(root, meta)
    if dtype == np.float16:  # NaN would pass through training as NaN losses; refuse the pack instead
        images = np.memmap(root / "images.npy", dtype=dtype, mode="r", offset=offset, shape=(n, 1, h, w))
        step = max(1, _FINITE_CHUNK_BYTES // (h * w * dtype.itemsize))
        for start in range(0, n, step):
            block = images[start:start + step]
            finite = np.isfinite(block).reshape(len(block), -1).all(axis=1)
            if not finite.all():
                row = start + int(np.argmin(finite))
                raise DataError(f"{root / 'images.npy'}: row {row} ({meta['rows'][row][0]}) holds NaN or infinite "
                                "values; pack it again")
        del images
    return labels, offset


def open_pack(path: str | os.PathLike, check_stale: bool = True) -> Pack:
    """Open a pack written by ``write_pack``.

    Nothing of it is trusted: ``pack.json`` is checked field by field (``validate_pack_meta``), the ``.npy``
    headers against it and the file sizes before any array is mapped, the labels against the rows and the
    classes (or, multi-label, for 1, 0 or NaN), and a float16 pack for NaN and infinity.

    Args:
        path: the pack folder.
        check_stale: compare the source folder's image files (paths, sizes, mtimes) with those recorded; for a
            pack of a label table, the table's size and mtime, and the files it named.

    Raises:
        DataError: not a pack, a format this version does not read, a field or an array that does not match, or
            (``check_stale``) a source folder whose files were added, removed or modified since packing; the
            message counts and names them and gives the command that refreshes the pack. A source folder that
            is gone is not an error: ``Pack.note`` says that staleness could not be checked.
    """
    root = Path(path)
    if not has_pack_json(root):
        raise DataError(f"{root} is not a pack (no {META}); make one with: python -m gray_effnet pack --data DIR "
                        f"--img-size H W --output {root}")
    meta = _read_meta(root)
    labels, offset = _check_arrays(root, meta)
    h, w = meta["img_size"]
    note = _staleness(root, meta) if check_stale else "staleness not checked"
    source = Path(meta["source"])
    bad = [(str(source / p), why) for p, why in meta["skipped"]]
    scan = ScanResult(bad=bad, modes=Counter(meta["modes"]), wide=meta["wide_source"])
    if meta["task"] == "multi":
        rows = [(str(source / p), torch.from_numpy(labels[i].copy())) for i, (p, _) in enumerate(meta["rows"])]
    else:
        rows = [(str(source / p), int(label)) for p, label in meta["rows"]]
    return Pack(root=root, source=source, classes=meta["classes"], img_size=(h, w), dtype=meta["dtype"],
                intensity=meta["intensity"], presplit=meta["presplit"], rows=rows, train_rows=meta["train"],
                val_rows=meta["val"], scan=scan, ignored=[str(source / p) for p in meta["ignored"]], note=note,
                meta=meta, task=meta["task"], labels=labels, images_offset=offset)


# -- writing ----------------------------------------------------------------------------------------
def _remove_ours(folder: Path, names: Sequence[str]) -> list[str]:
    """Remove the files ``names`` from ``folder``, then the folder if that empties it; return what is left.

    Nothing but those names is removed: a file someone else put there keeps the folder, and is returned."""
    for name in names:
        p = folder / name
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(p.lstat().st_mode):  # a file, or a link (removing it leaves its target)
                p.unlink()
    try:
        folder.rmdir()
    except FileNotFoundError:
        return []
    except OSError:
        with contextlib.suppress(OSError):
            return sorted(os.listdir(folder))
    return []


def clean_leftovers(output: str | os.PathLike) -> list[str]:
    """Remove ``P.partial-<pid>`` and ``P.old-<pid>`` folders of packing processes that are gone; return them.

    Only the files a pack holds are removed from them, then the folder if that empties it; a leftover holding
    anything else stays, with a warning. Call it holding ``output_lock(P)``.
    """
    output = Path(output)
    removed = []
    for tag in (_PARTIAL, _OLD):
        for p in sorted(output.parent.glob(f"{glob.escape(output.name)}{tag}*")):
            pid = p.name[len(output.name) + len(tag):]
            if not pid.isdigit() or p.is_symlink() or not p.is_dir():
                continue
            if pid != str(os.getpid()) and pid_alive(int(pid)):
                continue
            left = _remove_ours(p, (*WRITTEN, LOCK_NAME))
            if left:
                warnings.warn(f"kept {p}: it holds files that packing did not write ({', '.join(left[:5])})",
                              RuntimeWarning, stacklevel=2)
            else:
                removed.append(p.name)
    return removed


def _check_output(source: Path, output: Path) -> None:
    """Refuse an ``output`` that is not ours to replace, and a source that replacing it would delete."""
    if output.is_symlink():
        raise DataError(f"{output} is a symbolic link; name the pack folder itself")
    src = source.resolve()
    if output.exists():
        out = output.resolve()
        if src == out or src.is_relative_to(out):
            raise DataError(f"the source folder {source} is inside {output}, which packing would replace; "
                            "move it out, or choose another --output")
    if output.resolve().is_relative_to(src):
        raise DataError(f"the pack {output} must not be inside its source folder {source}")
    if not output.exists():
        return
    if not output.is_dir():
        raise DataError(f"{output} exists and is not a folder; refusing to replace it")
    try:
        names = set(os.listdir(output)) - {LOCK_NAME}
        if not names:
            return
        if not is_pack(output):
            why = f"its {META} has no gray_effnet signature" if META in names else f"no {META}"
            raise DataError(f"{output} exists and is not a pack ({why}); refusing to replace it")
        foreign = sorted(n for n in names if n not in WRITTEN or not stat.S_ISREG((output / n).lstat().st_mode))
    except OSError as e:
        raise DataError(f"{output} cannot be listed ({e.strerror}); refusing to replace it") from None
    if foreign:
        raise DataError(f"{output} holds files that are not part of its pack ({', '.join(foreign[:5])}"
                        f"{', ...' if len(foreign) > 5 else ''}); refusing to replace it: move them out, or choose "
                        "another --output")


def _store(img: Tensor, dtype: str) -> np.ndarray:
    """(1, H, W) uint8, or float in [0, 1] -> the stored dtype."""
    a = img.numpy()
    if dtype == "uint8":
        return a
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255
    if dtype == "uint16":
        return np.rint(np.clip(a, 0.0, 1.0) * 65535).astype(np.uint16)
    return a.astype(np.float16)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pack(
    data: str | os.PathLike,
    output: str | os.PathLike,
    img_size: Sequence[int],
    *,
    val_split: float = 0.2,
    seed: int = 0,
    intensity: str | Intensity = "full",
    dtype: str = "auto",
    strict: bool = False,
    workers: int | None = None,
    progress: bool = True,
    command: str = "",
    table: TableOptions | None = None,
) -> Pack:
    """Decode and resize every image of ``data`` once into the pack folder ``output``; return it opened.

    The files, split and bad-file checks are ``load_folder``'s (``load_table``'s with ``table``), and each image
    goes through ``read_gray`` and
    the validation transform (``build_transforms(img_size, train=False)``), so a pack's validation images are
    what ``GrayImageFolder`` gives for them: equal for 8-bit data, within uint16 rounding for deeper data.
    Files that fail to decode are skipped and named (``UnreadableImageWarning``, and ``pack.json``).

    ``output`` is checked before any work, and locked (``output_lock``) for the whole run. It may be absent, an
    empty folder, or a pack this project wrote (``is_pack``) that holds nothing but its files; anything else is
    refused, as is a source folder inside it. Everything is written to ``output.partial-<pid>``, checked as
    ``open_pack`` would check it, and renamed to ``output`` when complete; an older pack there is moved aside
    only then, and its files (``WRITTEN``) removed. Leftovers of an interrupted run are removed the next time.

    Args:
        data: an ImageFolder tree, or one with ``train/`` and ``val/``; with ``table``, the folder its paths are
            relative to.
        output: the pack folder to write.
        img_size: (H, W) to resize to.
        val_split: the validation fraction when ``data`` is not split already.
        seed: seed of the split.
        intensity: see ``gray_effnet.intensity``.
        dtype: ``auto`` (uint8 for 8-bit data read with ``full``, else uint16), ``uint8``, ``uint16`` or ``float16``.
        strict: refuse when any file is unreadable, listing them all.
        workers: decoding threads (default: the CPU count).
        progress: show a progress bar.
        command: the command line, recorded in ``pack.json``.
        table: read the images and labels from this label table (``tables.load_table``) instead of class folders;
            its test rows are not packed.

    Raises:
        DataError: an output that is not ours to replace, a source inside it (or it inside the source), a
            folder that cannot be packed.
        InputError: a size, dtype, split or seed that cannot be used; ``output`` in use by another run.
    """
    start = time.perf_counter()
    source, output = Path(data), Path(output)
    intensity = parse_intensity(intensity)
    h, w = (int(s) for s in img_size)
    if h < 1 or w < 1 or h * w > max_pixels():
        raise InputError(f"--img-size must be positive, with H * W at most {max_pixels()}; got {h} {w}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if not (_is_number(val_split) and 0 < val_split < 1):
        raise InputError(f"--val-split must be between 0 and 1; got {val_split}")
    if not (_is_int(seed) and -MAX_INT <= seed < MAX_INT):
        raise InputError(f"--seed must be a 64-bit integer; got {seed}")
    if table is not None:  # the table's path is kept absolute: the pack checks it for staleness from anywhere
        table = TableOptions(**{**table.to_json(), "labels": str(Path(table.labels).resolve())})
    _check_output(source, output)  # before any work, and again below once no other run can change it
    with output_lock(output, "pack"):
        _check_output(source, output)
        clean_leftovers(output)
        folder = (load_table(source, table, val_split=val_split, seed=seed, strict=strict) if table is not None
                  else load_folder(source, val_split=val_split, seed=seed, strict=strict))
        wide = folder.scan.wide or intensity.kind != "full"
        stored = ("uint16" if wide else "uint8") if dtype == "auto" else dtype
        if stored == "uint8" and wide:
            raise InputError(f"{source} has images deeper than 8 bit (or intensity {intensity} makes them float); "
                             "uint8 would drop their precision: use --dtype uint16 or float16")
        rows = folder.train + folder.val
        # Stat before decoding, so that a file changed while packing makes the pack stale, not silently mixed.
        files = {os.path.relpath(p, source): _stat(p) for p in sorted([p for p, _ in rows] + [p for p, _ in
                                                                                               folder.scan.bad])}
        partial = output.parent / f"{output.name}{_PARTIAL}{os.getpid()}"
        try:
            partial.mkdir(parents=True)
        except FileExistsError:
            raise DataError(f"{partial} is in the way: it holds files that packing did not write; move it") from None
        try:
            meta = _write_partial(partial, source, folder, rows, (h, w), stored=stored, intensity=intensity,
                                  strict=strict, workers=workers, progress=progress)
            meta.update(dtype_requested=dtype, val_split=val_split, seed=seed, files=files,
                        table=_table_record(folder, rows) if isinstance(folder, TableData) else None,
                        command=command[:MAX_TEXT_CHARS], created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        seconds=round(time.perf_counter() - start, 3))
            validate_pack_meta(meta, partial / META)  # what we write is what open_pack accepts
            (partial / META).write_text(json.dumps(meta, indent=1))
            _check_arrays(partial, meta)
            for name in WRITTEN:
                _fsync(partial / name)
            _swap_in(partial, output)
        except BaseException:
            _remove_ours(partial, WRITTEN)
            raise
    return open_pack(output, check_stale=False)


def _table_record(data: TableData, rows: list[tuple[str, int | Tensor]]) -> dict[str, Any]:
    """``pack.json``'s ``table``: what was read (path, size, mtime, options), what it found, each row's group."""
    groups = {r.file: r.group for r in data.rows}
    return {"path": data.options.labels, "size": data.stat[0], "mtime_ns": data.stat[1],
            "options": data.options.to_json(), "bad_rows": [[row, why[:MAX_TEXT_CHARS]] for row, why in data.bad_rows],
            "test_rows": len(data.split_rows("test")), "split": data.split_text[:MAX_TEXT_CHARS],
            "groups": [groups[p] for p, _ in rows]}


def _write_partial(partial: Path, source: Path, folder: FolderData | TableData, rows: list[tuple[str, int | Tensor]],
                   size: tuple[int, int], *, stored: str, intensity: Intensity, strict: bool, workers: int | None,
                   progress: bool) -> dict[str, Any]:
    """Decode ``rows`` into ``partial/images.npy``, write ``labels.npy``; return ``pack.json``'s fields so far."""
    h, w = size
    images = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=stored, shape=(len(rows), 1, h, w))
    resize = build_transforms((h, w), train=False)

    def one(i: int) -> str:
        try:
            img = read_gray(rows[i][0], intensity, warn_frames=False)  # the scan reported multi-frame files
        except Exception as e:  # noqa: BLE001 - any decoder error skips the file, as in training
            return f"{type(e).__name__}: {e}"
        if stored != "uint8" and img.dtype == torch.uint8:
            img = img.float().div_(255)  # as GrayImageFolder does for a folder with any deep file
        images[i] = _store(resize(img), stored)
        return ""

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        errors = list(tqdm(pool.map(one, range(len(rows))), total=len(rows), desc=f"packing {source}",
                           disable=not progress, leave=False, dynamic_ncols=True))
    images.flush()
    failed = [(rows[i][0], why) for i, why in enumerate(errors) if why]
    if failed and strict:
        listing = "\n".join(f"  {p}: {why}" for p, why in failed)
        raise DataError(f"--strict-data: {len(failed)} file(s) failed to decode:\n{listing}")
    for path, why in failed:
        warnings.warn(f"skipping unreadable image {path} ({why})", UnreadableImageWarning, stacklevel=3)
    n_train = len(folder.train)
    train_rows = [i for i in range(n_train) if not errors[i]]
    val_rows = [i for i in range(n_train, len(rows)) if not errors[i]]
    if not train_rows or not val_rows:
        raise DataError(f"{source}: no readable images left for {'training' if not train_rows else 'validation'}")
    if folder.task == "multi":  # (N, K) float32, NaN where the finding is not known; in labels.npy only
        np.save(partial / "labels.npy", np.stack([np.asarray(y, dtype=np.float32) for _, y in rows]))
        row_labels = [None] * len(rows)
    else:
        row_labels = [int(y) for _, y in rows]
        np.save(partial / "labels.npy", np.array(row_labels, dtype=np.int64))
    return {
        "format": PACK_FORMAT,
        "format_version": FORMAT_VERSION,
        "written": list(WRITTEN),
        "task": folder.task,
        "classes": folder.classes,
        "img_size": [h, w],
        "dtype": stored,
        "intensity": str(intensity),
        "presplit": folder.presplit,
        "source": str(source.resolve()),
        "rows": [[os.path.relpath(p, source), label] for (p, _), label in zip(rows, row_labels)],
        "train": train_rows,
        "val": val_rows,
        "skipped": [[os.path.relpath(p, source), why[:MAX_TEXT_CHARS]] for p, why in folder.scan.bad + failed],
        "ignored": [os.path.relpath(p, source) for p in folder.ignored],
        "modes": dict(folder.scan.modes),
        "wide_source": folder.scan.wide,
    }


def _swap_in(partial: Path, output: Path) -> None:
    """Rename the complete ``partial`` to ``output``; what was there is moved aside first, then its files removed.

    ``output`` exists (``output_lock`` made it if needed) and holds a pack of ours or nothing but the lock file:
    ``_check_output`` said so, holding the lock."""
    old = output.parent / f"{output.name}{_OLD}{os.getpid()}"
    try:
        os.replace(output, old)
    except OSError as e:
        raise DataError(f"cannot move {output} aside to {old} ({e.strerror}); nothing was replaced") from None
    try:
        os.replace(partial, output)
    except BaseException:
        os.replace(old, output)
        raise
    left = _remove_ours(old, (*WRITTEN, LOCK_NAME))
    if left:
        warnings.warn(f"kept {old}: files were added to the old pack while packing ({', '.join(left[:5])})",
                      RuntimeWarning, stacklevel=3)


# -- reading ----------------------------------------------------------------------------------------
class PackedDataset(Dataset):
    """The images of one split of a pack, with ``GrayImageFolder``'s item contract.

    ``dataset[i]`` is ``(image, label, source path)``: (1, H, W) uint8 for a uint8 pack, float32 in [0, 1]
    otherwise; the label is a class index, or (multi-label) a (K,) float32 tensor of 1, 0 or NaN. A
    ``DataLoader`` with automatic batching calls ``__getitems__`` instead, which reads the whole batch with one
    sorted fancy index into the memory map and returns a collated ``Batch`` (``data.collate`` passes it through),
    so there is no per-image work in Python and a worker process buys little.

    Args:
        pack: an opened pack.
        split: ``train``, ``val`` or ``all`` (every readable image, train first).
        label_map: new label of each pack class (e.g. the class index in a checkpoint); default unchanged.
        num_classes: with ``label_map`` on multi-label data, the number of findings to count in (those the pack
            lacks are NaN).
        resize: (H, W) to resize the images to (bilinear, antialiased, as ``build_transforms(train=False)``), for
            a pack larger than the size a model reads; default: as packed.
    """

    def __init__(self, pack: Pack, split: str = "val", *, label_map: Sequence[int] | None = None,
                 num_classes: int | None = None, resize: Sequence[int] | None = None) -> None:
        splits = {"train": pack.train_rows, "val": pack.val_rows, "all": pack.train_rows + pack.val_rows}
        if split not in splits:
            raise InputError(f"split must be one of {', '.join(splits)}; got {split!r}")
        self.rows = np.asarray(splits[split], dtype=np.int64)
        self.task = pack.task
        labels = torch.from_numpy(pack.labels[self.rows])  # (N,) int64 or (N, K) float32, checked by open_pack
        if label_map is not None:
            labels = remap_target(labels, label_map, num_classes if num_classes is not None else len(label_map))
        self.labels = labels
        self.paths = [pack.rows[i][0] for i in self.rows]
        self.file = pack.root / "images.npy"
        self.offset, self.shape = pack.images_offset, (len(pack.rows), 1, *pack.img_size)  # its checked header
        self.dtype = pack.dtype
        self.wide = pack.wide
        self.resize = None if resize is None else build_transforms(resize, train=False)
        self._images: np.ndarray | None = None  # opened in each process that reads, never pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}  # a pickled memmap would copy the whole array to each worker

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, positions: Sequence[int]) -> Tensor:
        """(B, 1, H, W) of the given positions, in their order."""
        if self._images is None:
            self._images = np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")
        block = np.empty((len(rows), *self._images.shape[1:]), dtype=self._images.dtype)
        block[order] = self._images[rows[order]]  # ascending rows: one forward pass through the file
        if self.dtype == "uint8":
            images = torch.from_numpy(block)
        else:
            scale = 1 / 65535 if self.dtype == "uint16" else 1.0
            images = torch.from_numpy(block.astype(np.float32) * np.float32(scale))
        return images if self.resize is None else self.resize(images)

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor, str]:
        label = self.labels[index] if self.task == "multi" else int(self.labels[index])
        return self._read([index])[0], label, self.paths[index]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        return Batch(self._read(indices), self.labels[list(indices)], [self.paths[i] for i in indices], 0)
