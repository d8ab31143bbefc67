"""Label tables: a CSV that names each image and its labels, checked row by row and split by patient.

Medical data sets ship their labels as a table rather than as class folders. Three shapes are read:

* one label per row (``--label-column Diagnosis``): single-label, a class per distinct value;
* several findings in one cell (``--label-column "Finding Labels" --label-sep '|'``, NIH ChestX-ray14):
  multi-label, a finding per distinct name, ``No Finding`` meaning none of them;
* one column per finding (``--label-columns Atelectasis Edema ...``, CheXpert): multi-label, each cell 1, 0,
  -1 (uncertain: ``--uncertain ignore|ones|zeros``) or blank (unknown: always ignored).

A multi-label target is a float32 vector of 1.0, 0.0 or NaN, NaN meaning "leave this entry out of the loss and
the metrics": nothing unknown is silently read as 0. Paths are relative to ROOT (``--data``) and may not leave
it. Every row is checked (its cells, path, file, label, group and split); a bad row is skipped with its row
number and reason (``BadRowWarning``), or refused with ``--strict-data``. Row numbers are the table's line
numbers: the header is row 1, as a spreadsheet shows it.

The split is given (``--split-column``: train, val or test) or made, by group (``--group-column "Patient ID"``)
so that no patient is in both train and val, stratified over the groups' findings and a function of
(table, seed, val_split) alone.
"""

import csv
import io
import os
import random
import stat
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import torch

from .errors import DataError
from .files import atomic_write, default_cache_dir
from .folders import demo_digits
from .images import ScanResult, drop_unreadable, is_image_file
from .table_options import UNCERTAIN_POLICIES, TableOptions, has_control

__all__ = ["MAX_TABLE_BYTES", "NO_FINDING", "UNCERTAIN_POLICIES", "BadRowWarning", "TableData", "TableOptions",
           "TableRow", "load_table", "prepare_digits_table", "read_csv", "split_groups"]

MAX_TABLE_BYTES = 256 * 2**20  # CheXpert's train.csv is about 30 MB, NIH's Data_Entry_2017.csv 8 MB
MAX_COLUMNS = 10_000
NO_FINDING = "No Finding"
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_LISTED = 50  # bad rows named in a warning or error; the count covers them all


class BadRowWarning(UserWarning):
    """Rows of a label table were skipped; the message counts them by reason and names their row numbers."""


@dataclass
class TableRow:
    """One good row: where it is in the table, its image, its label, its group and its split."""

    row: int  # line number in the table; the header is row 1
    path: str  # as written in the table, relative to the data folder
    file: str  # the data folder joined with ``path``
    label: "int | np.ndarray"  # class index (single), or (K,) float32 of 1, 0, NaN (multi)
    group: str  # the group column's value; the path itself when there is no group column
    split: str = ""  # train, val or test

    @property
    def target(self) -> "int | torch.Tensor":
        """The dataset's label: the class index, or a (K,) float32 tensor."""
        return self.label if isinstance(self.label, int) else torch.from_numpy(self.label)


@dataclass
class TableData:
    """A checked, split label table. It has ``FolderData``'s fields (classes, train, val, scan, ignored, presplit).

    Attributes:
        root: the data folder the paths are relative to.
        table: the CSV file.
        options: how it was read.
        task: ``single`` or ``multi``.
        classes: class names (single) or finding names (multi), in label order.
        rows: every good row, each with its split; rows whose image is unreadable are left out.
        bad_rows: (row number, reason) of every skipped row.
        scan: what checking the image files found.
        split_text: how the split was made, for the data line.
        stat: (size, mtime_ns) of the table when it was read.
    """

    root: Path
    table: Path
    options: TableOptions
    task: str
    classes: list[str]
    rows: list[TableRow]
    bad_rows: list[tuple[int, str]]
    scan: ScanResult
    split_text: str
    stat: tuple[int, int]
    ignored: list[str] = field(default_factory=list)  # a table names its files: none is walked past

    @property
    def presplit(self) -> bool:
        return self.options.split_column is not None

    def split_rows(self, split: str) -> list[TableRow]:
        return [r for r in self.rows if r.split == split]

    def samples(self, split: str) -> list[tuple[str, "int | torch.Tensor"]]:
        """(file, target) of the rows of ``split``."""
        return [(r.file, r.target) for r in self.split_rows(split)]

    @property
    def train(self) -> list[tuple[str, "int | torch.Tensor"]]:
        return self.samples("train")

    @property
    def val(self) -> list[tuple[str, "int | torch.Tensor"]]:
        return self.samples("val")


# -- reading --------------------------------------------------------------------------------------------------
def read_csv(table: str | os.PathLike, max_bytes: int = MAX_TABLE_BYTES) -> tuple[list[str], list[tuple[int, list]]]:
    """The header and the records of a CSV file, each record with its row number; ``DataError`` for a bad file.

    The whole file is refused when it is larger than ``max_bytes``, is not UTF-8 (a BOM is fine), holds a NUL
    byte, is malformed as CSV (an unclosed quote, a cell over the csv module's size limit), or has a header with
    no column or more than ``MAX_COLUMNS``. Records are returned as read; their number of cells is checked by
    the caller, row by row.
    """
    table = Path(table)
    if not table.is_file():
        raise DataError(f"label table {table} does not exist or is not a file")
    with open(table, "rb") as f:
        data = f.read(max_bytes + 1)  # bounded whatever the file claims or grows to
    if len(data) > max_bytes:
        raise DataError(f"label table {table} is larger than {max_bytes // 2**20} MiB; refusing to read it")
    if b"\0" in data:
        row = data[:data.index(b"\0")].count(b"\n") + 1
        raise DataError(f"label table {table} holds a NUL byte (row {row}): not a CSV text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        row = data[:e.start].count(b"\n") + 1
        raise DataError(f"label table {table} is not UTF-8 text (row {row}, byte {e.start}); save it as UTF-8 "
                        "CSV") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    records, last = [], 0
    try:
        header = next(reader, None)
        last = reader.line_num
        for record in reader:
            records.append((last + 1, record))
            last = reader.line_num
    except csv.Error as e:
        raise DataError(f"label table {table} is not valid CSV at row {last + 1}: {e}") from None
    if not header or not any(h.strip() for h in header):
        raise DataError(f"label table {table} has no header row (the first row names the columns)")
    if len(header) > MAX_COLUMNS:
        raise DataError(f"label table {table} has {len(header)} columns; at most {MAX_COLUMNS} are read")
    return [h.strip() for h in header], records


def _column(header: list[str], name: str, flag: str, table: Path) -> int:
    hits = [i for i, h in enumerate(header) if h == name.strip()]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise DataError(f"label table {table} has {len(hits)} columns named {name!r} ({flag}); names must be unique")
    shown = ", ".join(repr(h) for h in header[:30]) + (", ..." if len(header) > 30 else "")
    hint = ""
    if len(header) == 1 and any(c in header[0] for c in "\t;"):
        hint = " (only comma-separated tables are read; this one looks separated by tabs or semicolons)"
    raise DataError(f"label table {table} has no column {name!r} ({flag}); its columns are: {shown}{hint}")


def _is_absolute(path: str) -> bool:
    windows = PureWindowsPath(path)
    return PurePosixPath(path).is_absolute() or bool(windows.drive) or windows.is_absolute() or path[:1] in "\\/"


def _check_path(path: str, root: Path, real_root: str) -> tuple[str, str] | str:
    """(file, real path) of a usable image path, or the reason it is not."""
    if not path:
        return "empty path"
    if has_control(path):
        return f"control character in the path: {path!r}"
    if _is_absolute(path):
        return f"absolute path: {path!r} (paths are relative to the data folder)"
    file = os.path.join(root, path)
    real = os.path.realpath(file)
    if os.path.commonpath([real, real_root]) != real_root:
        return f"outside the data folder: {path!r} (through '..' or a symbolic link)"
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return f"missing file: {path!r}"
    except OSError as e:
        return f"cannot stat: {path!r} ({type(e).__name__}: {e})"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file: {path!r}"
    if not is_image_file(file):
        return f"not an image file: {path!r} (by its extension, or DICOM's magic)"
    return file, real


def _parse_value(cell: str) -> float | None:
    """1, 0 or -1 (also written 1.0, 0.0, -1.0) as a float; ``None`` for anything else; NaN for blank."""
    if not cell:
        return float("nan")
    try:
        v = float(cell)
    except ValueError:
        return None
    return v if v in (1.0, 0.0, -1.0) else None


def _class_order(values: set[str]) -> list[str]:
    """Integers in numeric order (so '10' follows '9'), anything else in string order."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def _bad_listing(bad: Sequence[tuple[int, str]]) -> str:
    kinds = Counter(reason.partition(": ")[0] for _, reason in bad)  # reasons read "kind: detail"
    counts = "; ".join(f"{k}: {n}" for k, n in kinds.most_common())
    listing = "\n".join(f"  row {row}: {reason}" for row, reason in bad[:_LISTED])
    more = f"\n  ... and {len(bad) - _LISTED} more" if len(bad) > _LISTED else ""
    return f"{counts}\n{listing}{more}"


def load_table(root: str | os.PathLike, options: TableOptions, *, val_split: float = 0.2, seed: int = 0,
               strict: bool = False, verify: bool | None = None) -> TableData:
    """Read, check and split a label table, raising ``DataError`` before any training.

    Args:
        root: the data folder the table's paths are relative to.
        options: how to read it.
        val_split: the validation fraction of the groups, when the split is not given.
        seed: seed of the split.
        strict: refuse any bad row or unreadable image, listing them, instead of skipping them.
        verify: decode every image up front (default: only when ``strict``).
    """
    root, table = Path(root), Path(options.labels)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    if not options.split_column and not 0.0 < val_split < 1.0:
        raise DataError(f"val_split must be between 0 and 1; got {val_split}")
    st = table.stat() if table.is_file() else None
    header, records = read_csv(table)
    ipath = _column(header, options.path_column, "--path-column", table)
    ilabels = ([_column(header, options.label_column, "--label-column", table)] if options.label_column is not None
               else [_column(header, c, "--label-columns", table) for c in options.label_columns])
    igroup = _column(header, options.group_column, "--group-column", table) if options.group_column else None
    isplit = _column(header, options.split_column, "--split-column", table) if options.split_column else None
    sep, task = options.sep, options.task
    real_root = os.path.realpath(root)
    bad: list[tuple[int, str]] = []
    good: list[tuple[TableRow, object]] = []  # (row, raw label: class name, set of findings, or vector)
    first_row: dict[str, int] = {}  # real path -> row where it was first named

    for row, cells in records:
        if len(cells) != len(header):
            reason = "blank row" if not any(c.strip() for c in cells) else \
                f"wrong number of cells: {len(cells)}, the header has {len(header)}"
            bad.append((row, reason))
            continue
        checked = _check_path(cells[ipath].strip(), root, real_root)
        if isinstance(checked, str):
            bad.append((row, checked))
            continue
        file, real = checked
        path = cells[ipath].strip()
        if real in first_row:
            bad.append((row, f"duplicate path: {path!r}, the same file as row {first_row[real]}"))
            continue
        # -- the label
        if options.label_column is not None:
            cell = cells[ilabels[0]].strip()
            if not cell:
                bad.append((row, "empty label"))
                continue
            if has_control(cell):
                raise DataError(f"label table {table}, row {row}: a label with a control character ({cell!r}); "
                                "class and finding names must be printable")
            if sep is None:
                raw: object = cell
            else:
                names = [n.strip() for n in cell.split(sep)]
                if any(not n for n in names):
                    bad.append((row, f"empty finding name: {cell!r} (separator {sep!r})"))
                    continue
                none = [n for n in names if n.casefold() == NO_FINDING.casefold()]
                if none and len(names) > 1:
                    bad.append((row, f"unknown value: {cell!r}, {NO_FINDING!r} together with findings"))
                    continue
                raw = set() if none else set(names)
        else:
            values = [_parse_value(cells[i].strip()) for i in ilabels]
            unknown = [(options.label_columns[k], cells[i].strip()) for k, (i, v) in enumerate(zip(ilabels, values))
                       if v is None]
            if unknown:
                column, cell = unknown[0]
                bad.append((row, f"unknown value: {cell!r} in column {column!r} (1, 0, -1 or blank)"))
                continue
            vector = np.array(values, dtype=np.float32)
            if np.isnan(vector).all():
                bad.append((row, "empty label: every label column is blank"))
                continue
            uncertain = vector == -1
            vector[uncertain] = {"ignore": np.nan, "ones": 1.0, "zeros": 0.0}[options.uncertain]
            if np.isnan(vector).all():
                bad.append((row, "no usable label: every finding is blank or uncertain (-1), ignored under "
                                 "--uncertain ignore"))
                continue
            raw = vector
        # -- the group and the split
        group = path
        if igroup is not None:
            group = cells[igroup].strip()
            if not group or has_control(group):
                what = "empty group" if not group else f"control character in the group: {group!r}"
                bad.append((row, f"{what} (column {options.group_column!r})"))
                continue
        split = ""
        if isplit is not None:
            given = cells[isplit].strip()
            split = SPLIT_NAMES.get(given.casefold(), "")
            if not split:
                bad.append((row, f"unknown split: {given!r} in column {options.split_column!r} (train, val or test)"))
                continue
        first_row[real] = row
        good.append((TableRow(row=row, path=path, file=file, label=-1, group=group, split=split), raw))

    if bad and strict:
        raise DataError(f"--strict-data: {len(bad)} bad row(s) in the label table {table}: {_bad_listing(bad)}")
    if bad:
        warnings.warn(f"label table {table}: skipping {len(bad)} bad row(s): {_bad_listing(bad)}", BadRowWarning,
                      stacklevel=2)
    if not good:
        raise DataError(f"label table {table} has no usable rows")

    # -- classes or findings, and each row's label in them
    if task == "single":
        classes = _class_order({raw for _, raw in good})
        if len(classes) < 2:
            raise DataError(f"label table {table}: a single class ({classes[0]}) in {options.label_column!r}; a "
                            "classifier needs at least 2")
        index = {c: i for i, c in enumerate(classes)}
        for r, raw in good:
            r.label = index[raw]
    elif sep is not None:
        classes = sorted(set().union(*(raw for _, raw in good)))
        if not classes:
            raise DataError(f"label table {table}: no finding in {options.label_column!r}, only {NO_FINDING!r}")
        index = {c: i for i, c in enumerate(classes)}
        for r, raw in good:
            r.label = np.zeros(len(classes), dtype=np.float32)
            r.label[[index[n] for n in raw]] = 1.0
    else:
        classes = [c.strip() for c in options.label_columns]
        for r, raw in good:
            r.label = raw
    rows = [r for r, _ in good]

    # -- the split
    by_group: dict[str, set[str]] = {}
    for r in rows:
        by_group.setdefault(r.group, set()).add(r.split)
    if isplit is not None:
        if igroup is not None:
            crossing = sorted(g for g, s in by_group.items() if len(s) > 1)
            if crossing:
                shown = "; ".join(f"{g!r}: rows " + ", ".join(f"{r.row} ({r.split})" for r in rows if r.group == g)
                                  for g in crossing[:10])
                raise DataError(f"label table {table}: {len(crossing)} group(s) of {options.group_column!r} in more "
                                f"than one split of {options.split_column!r}, which would leak between them: {shown}"
                                + (" ..." if len(crossing) > 10 else ""))
        split_text = f"split given by {options.split_column!r}"
    else:
        signatures: dict[str, np.ndarray] = {}
        for r in rows:
            positive = np.zeros(len(classes), dtype=bool)
            if task == "single":
                positive[r.label] = True
            else:
                positive = r.label == 1.0
            signatures[r.group] = signatures.get(r.group, positive) | positive
        if len(signatures) < 2:
            raise DataError(f"label table {table}: a single group ({next(iter(signatures))!r}) cannot be split into "
                            "train and val")
        val_groups = split_groups(signatures, val_split, seed)
        for r in rows:
            r.split = "val" if r.group in val_groups else "train"
        by = f"by {options.group_column!r}, {val_split:.0%} of the groups" if igroup is not None else \
            f"by image, {val_split:.0%} of the images"
        split_text = f"seeded stratified split {by} to val"

    # -- the images: a header check of each (every pixel with strict), as for a folder
    kept, scan = drop_unreadable([(r.file, r.split) for r in rows], verify=strict if verify is None else verify,
                                 strict=strict)
    readable = {file for file, _ in kept}
    rows = [r for r in rows if r.file in readable]
    for split in ("train", "val"):
        if not any(r.split == split for r in rows):
            raise DataError(f"label table {table}: no usable {'training' if split == 'train' else 'validation'} "
                            f"images" + (f" (no row of {options.split_column!r} says {split})" if isplit else ""))
    return TableData(root=root, table=table, options=options, task=task, classes=classes, rows=rows, bad_rows=bad,
                     scan=scan, split_text=split_text, stat=(st.st_size, st.st_mtime_ns) if st else (0, 0))


def split_groups(signatures: dict[str, np.ndarray], val_split: float, seed: int) -> set[str]:
    """The groups for validation: ``round(G * val_split)`` of the G groups (at least 1, at most G - 1).

    Stratified where the groups allow: the groups are ordered by their findings, rarest finding first (groups with
    the rarest finding form one block, then the next rarest within it and after it, ...), ties in a seeded
    shuffled order, and validation takes evenly spaced groups along that order from a seeded offset. A finding
    held by n groups then gets ``n * val_split`` of them in validation to within one, however rare it is.

    Args:
        signatures: per group, a (K,) bool vector: which findings (or classes) any of its images has.
        val_split: the validation fraction of the groups.
        seed: the seed; the result depends only on the signatures, ``val_split`` and ``seed``.
    """
    if not 0.0 < val_split < 1.0:
        raise DataError(f"val_split must be between 0 and 1; got {val_split}")
    names = sorted(signatures)
    n = len(names)
    if n < 2:
        raise DataError(f"{n} group(s): cannot split into train and val")
    rng = random.Random(f"{seed}-groups")
    rng.shuffle(names)
    sig = np.stack([np.asarray(signatures[g], dtype=bool) for g in names])  # (G, K)
    rarest_first = np.argsort(sig.sum(0), kind="stable")
    keys = [tuple(int(not b) for b in sig[i, rarest_first]) for i in range(n)]  # positives sort first
    order = sorted(range(n), key=keys.__getitem__)  # stable: ties keep the seeded order
    n_val = min(max(round(n * val_split), 1), n - 1)
    offset = rng.random()
    picks = {int((j + offset) * n / n_val) for j in range(n_val)}  # n / n_val > 1: distinct, below n
    return {names[order[p]] for p in picks}


def write_split(path: str | os.PathLike, rows: Sequence[tuple[str, str, str]]) -> Path:
    """``split.csv``: one row per image (path as in the table, group, split), written atomically."""
    path = Path(path)
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "group", "split"])
            writer.writerows(rows)
    return path


# -- the offline demo -------------------------------------------------------------------------------------------
DIGITS_FINDINGS = ("even", "gt4", "loop")


def _digit_findings(digit: int) -> dict[str, int]:
    # A handwritten 4 is closed at the top in some hands and open in others: its loop is uncertain (-1).
    loop = 1 if digit in (0, 6, 8, 9) else -1 if digit == 4 else 0
    return {"even": int(digit % 2 == 0), "gt4": int(digit > 4), "loop": loop}


def prepare_digits_table(cache_dir: str | os.PathLike | None = None, per_class: int | None = None) -> Path:
    """Write scikit-learn's digits once as PNGs with a label table; return the folder (``labels.csv`` inside).

    ``labels.csv`` has the columns:

    * ``path``: ``images/NNNN.png``;
    * ``patient``: a synthetic group id, one per 5 consecutive images, so that several images share a "patient";
    * ``digit``: the digit (a single-label column);
    * ``even``, ``gt4`` (greater than 4), ``loop`` (0, 6, 8, 9; a 4 is -1, uncertain): CheXpert-style columns;
    * ``findings``: the certain findings joined with '|', or ``No Finding`` (1 and 3): NIH-style;
    * ``split``: test for every 10th patient, val for the next one, train for the rest.

    Args:
        cache_dir: where to write (default: ``$GRAY_EFFNET_CACHE`` or ``~/.cache/gray_effnet``).
        per_class: keep only the first N images of each digit (for quick tests).
    """
    from PIL import Image

    name = "digits-table" if per_class is None else f"digits-table-{per_class}"
    root = Path(cache_dir or default_cache_dir()) / name
    marker = root / ".complete"
    if marker.is_file():
        return root
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, pixels, digit in demo_digits(per_class):
        n = len(lines)
        path = f"images/{i:04d}.png"
        Image.fromarray(pixels).save(root / path)
        found = _digit_findings(digit)
        findings = "|".join(f for f in DIGITS_FINDINGS if found[f] == 1) or NO_FINDING
        patient = n // 5
        split = "test" if patient % 10 == 0 else "val" if patient % 10 == 1 else "train"
        lines.append([path, f"P{patient:04d}", digit, *(found[f] for f in DIGITS_FINDINGS), findings, split])
    with atomic_write(root / "labels.csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "patient", "digit", *DIGITS_FINDINGS, "findings", "split"])
            writer.writerows(lines)
    marker.write_text(f"{len(lines)} images\n")
    return root
