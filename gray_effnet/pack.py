"""Packed datasets: an image folder decoded and resized once into a memory-mapped array, read a batch at a time.

``python -m gray_effnet pack --data DIR --img-size H W --output P`` reads every image once (``read_gray``), resizes
it as the validation transform does, and writes the folder ``P``:

* ``images.npy``: (N, 1, H, W), uint8 for 8-bit data, uint16 (``round(x * 65535)``) or float16 for deeper data;
  opened with ``np.load(mmap_mode="r")``, so only the rows a batch needs are read.
* ``labels.npy``: (N,) int64 class indices, or for multi-label data (N, K) float32 findings: 1, 0, or NaN (not
  known: left out of the loss and the metrics).
* ``pack.json``: the task (``single`` or ``multi``), the classes (or findings), size, dtype, intensity mapping, the
  split (row indices of train and val), the source folder with each file's size and mtime, the skipped files and
  why, the command and time it was made. A pack of a label table (``--labels``) records the table too: its path,
  size and mtime (a changed table makes the pack stale), how it was read, its bad rows, and each row's group.

``train.py --data P``, ``--evaluate`` and ``predict`` read a pack instead of the files. Training augmentation
then runs on whole batches on the training device (``BatchAugment``, kornia.augmentation). A pack is built in a
temporary sibling folder and renamed into place only when complete, so an interrupted pack is never read.
"""

import json
import os
import shlex
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from .augment import build_transforms
from .data import Batch, remap_target
from .errors import DataError, InputError
from .files import pid_alive
from .folders import find_images, load_folder
from .images import ScanResult, UnreadableImageWarning, read_gray
from .intensity import Intensity, parse_intensity
from .tables import TableOptions, load_table

__all__ = ["DTYPES", "Pack", "PackedDataset", "is_pack", "open_pack", "write_pack"]

FORMAT_VERSION = 1
META = "pack.json"
DTYPES = ("auto", "uint8", "uint16", "float16")
_PARTIAL = ".partial-"  # P.partial-<pid>: a pack being written; P.old-<pid>: the pack it replaces
_OLD = ".old-"


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
        meta: ``pack.json`` as read.
        task: ``single`` or ``multi``.
    """

    root: Path
    source: Path
    classes: list[str]
    img_size: tuple[int, int]
    dtype: str
    intensity: str
    presplit: bool
    rows: list[tuple[str, int]]
    train_rows: list[int]
    val_rows: list[int]
    scan: ScanResult
    ignored: list[str] = field(default_factory=list)
    note: str = ""
    meta: dict = field(default_factory=dict)
    task: str = "single"

    @property
    def train(self) -> list[tuple[str, int]]:
        return [self.rows[i] for i in self.train_rows]

    @property
    def val(self) -> list[tuple[str, int]]:
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


def is_pack(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a complete pack (a folder with ``pack.json``; a partial one never has it)."""
    return path is not None and (Path(path) / META).is_file()


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
    """A pack of a label table: the table unchanged, and each file it named as it was (the table lists the files)."""
    source, table = Path(meta["source"]), Path(meta["table"]["path"])
    if not table.is_file():
        return f"label table {table} is gone: could not check whether the pack is stale"
    st = table.stat()
    if [st.st_size, st.st_mtime_ns] != [meta["table"]["size"], meta["table"]["mtime_ns"]]:
        raise DataError(f"pack {root} is stale: its label table {table} changed since it was made; {refresh}")
    now = {}
    for p in meta["files"]:
        try:
            now[p] = _stat(os.path.join(source, p))
        except OSError:
            pass  # removed
    _changes(root, source, meta["files"], now, refresh)
    return f"label table {table.name} and its files unchanged since packing"


def _staleness(root: Path, meta: dict) -> str:
    """A note when the source cannot be checked; ``DataError`` naming the changes when the pack is stale."""
    source = Path(meta["source"])
    refresh = f"refresh it with: {_command(source, root, meta['img_size'], meta)}"
    if not source.is_dir():
        return f"source folder {source} is gone: could not check whether the pack is stale"
    if meta.get("table"):
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


def open_pack(path: str | os.PathLike, check_stale: bool = True) -> Pack:
    """Open a pack written by ``write_pack``.

    Args:
        path: the pack folder.
        check_stale: compare the source folder's image files (paths, sizes, mtimes) with those recorded.

    Raises:
        DataError: not a pack, a format this version does not read, arrays that do not match ``pack.json``, or
            (``check_stale``) a source folder whose files were added, removed or modified since packing; the
            message counts and names them and gives the command that refreshes the pack. A source folder that
            is gone is not an error: ``Pack.note`` says that staleness could not be checked.
    """
    root = Path(path)
    if not is_pack(root):
        raise DataError(f"{root} is not a pack (no {META}); make one with: python -m gray_effnet pack --data DIR "
                        f"--img-size H W --output {root}")
    meta = json.loads((root / META).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{root}: pack format {meta.get('format_version')!r}; this version reads {FORMAT_VERSION}")
    h, w = meta["img_size"]
    try:
        images = np.load(root / "images.npy", mmap_mode="r")
        labels = np.load(root / "labels.npy")
    except (OSError, ValueError) as e:
        raise DataError(f"{root}: cannot read the pack's arrays ({e})") from None
    n, task, k = len(meta["rows"]), meta.get("task", "single"), len(meta["classes"])
    if images.shape != (n, 1, h, w) or str(images.dtype) != meta["dtype"]:
        raise DataError(f"{root}: images.npy is {images.dtype} {images.shape}; {META} says {meta['dtype']} "
                        f"({n}, 1, {h}, {w})")
    if task == "single":
        ok = labels.shape == (n,) and labels.dtype == np.int64 and bool(((labels >= 0) & (labels < k)).all())
        want = f"int64 ({n},) class indices below {k}"
    elif task == "multi":
        ok = (labels.shape == (n, k) and labels.dtype == np.float32
              and bool(((labels == 0) | (labels == 1) | np.isnan(labels)).all()))
        want = f"float32 ({n}, {k}) of 1, 0 or NaN"
    else:
        raise DataError(f"{root}: {META} says task {task!r}; a pack is single- or multi-label")
    if not ok:
        raise DataError(f"{root}: labels.npy is {labels.dtype} {labels.shape}, or holds values out of range; "
                        f"{META} ({task}-label) says {want}")
    note = _staleness(root, meta) if check_stale else "staleness not checked"
    source = Path(meta["source"])
    bad = [(str(source / p), why) for p, why in meta["skipped"]]
    scan = ScanResult(bad=bad, modes=Counter(meta["modes"]), wide=meta["wide_source"])
    if task == "multi":
        rows = [(str(source / p), torch.from_numpy(labels[i].copy())) for i, (p, _) in enumerate(meta["rows"])]
    else:
        rows = [(str(source / p), int(label)) for p, label in meta["rows"]]
    return Pack(root=root, source=source, classes=meta["classes"], img_size=(h, w), dtype=meta["dtype"],
                intensity=meta["intensity"], presplit=meta["presplit"], rows=rows, train_rows=meta["train"],
                val_rows=meta["val"], scan=scan, ignored=[str(source / p) for p in meta["ignored"]], note=note,
                meta=meta, task=task)


# -- writing ----------------------------------------------------------------------------------------
def clean_leftovers(output: str | os.PathLike) -> list[str]:
    """Remove ``P.partial-<pid>`` and ``P.old-<pid>`` folders of packing processes that are gone; return them."""
    output = Path(output)
    removed = []
    for tag in (_PARTIAL, _OLD):
        for p in output.parent.glob(f"{output.name}{tag}*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and (pid == str(os.getpid()) or not pid_alive(int(pid))):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


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

    The files, split and bad-file checks are ``load_folder``'s, and each image goes through ``read_gray`` and
    the validation transform (``build_transforms(img_size, train=False)``), so a pack's validation images are
    what ``GrayImageFolder`` gives for them: equal for 8-bit data, within uint16 rounding for deeper data.
    Files that fail to decode are skipped and named (``UnreadableImageWarning``, and ``pack.json``).

    Everything is written to ``output.partial-<pid>`` and renamed to ``output`` when complete; an older pack at
    ``output`` is replaced only then. Leftovers of an interrupted run are removed the next time.

    Args:
        data: an ImageFolder tree, or one with ``train/`` and ``val/``; with ``table``, the folder its paths are
            relative to.
        output: the pack folder to write (an existing pack there is replaced; any other folder is refused).
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
    """
    start = time.perf_counter()
    source, output = Path(data), Path(output)
    intensity = parse_intensity(intensity)
    h, w = (int(s) for s in img_size)
    if h < 1 or w < 1:
        raise InputError(f"--img-size must be positive; got {h} {w}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    if output.exists() and not is_pack(output) and (not output.is_dir() or any(output.iterdir())):
        raise DataError(f"{output} exists and is not a pack; refusing to replace it")
    if source.resolve() == output.resolve() or output.resolve().is_relative_to(source.resolve()):
        raise DataError(f"the pack {output} must not be inside its source folder {source}")
    clean_leftovers(output)
    if table is not None:  # the table's path is kept absolute: the pack checks it for staleness from anywhere
        table = TableOptions(**{**table.to_json(), "labels": str(Path(table.labels).resolve())})
        folder = load_table(source, table, val_split=val_split, seed=seed, strict=strict)
    else:
        folder = load_folder(source, val_split=val_split, seed=seed, strict=strict)
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
    partial.mkdir(parents=True)
    try:
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
            warnings.warn(f"skipping unreadable image {path} ({why})", UnreadableImageWarning, stacklevel=2)
        n_train = len(folder.train)
        train_rows = [i for i in range(n_train) if not errors[i]]
        val_rows = [i for i in range(n_train, len(rows)) if not errors[i]]
        if not train_rows or not val_rows:
            raise DataError(f"{source}: no readable images left for {'training' if not train_rows else 'validation'}")
        if folder.task == "multi":  # (N, K) float32, NaN where the finding is not known
            labels = np.stack([np.asarray(y, dtype=np.float32) for _, y in rows])
            row_labels = [None] * len(rows)  # in labels.npy only
        else:
            labels = np.array([y for _, y in rows], dtype=np.int64)
            row_labels = [int(y) for _, y in rows]
        np.save(partial / "labels.npy", labels)
        meta = {
            "format_version": FORMAT_VERSION,
            "task": folder.task,
            "classes": folder.classes,
            "img_size": [h, w],
            "dtype": stored,
            "dtype_requested": dtype,
            "intensity": str(intensity),
            "val_split": val_split,
            "seed": seed,
            "presplit": folder.presplit,
            "source": str(source.resolve()),
            "rows": [[os.path.relpath(p, source), label] for (p, _), label in zip(rows, row_labels)],
            "train": train_rows,
            "val": val_rows,
            "files": files,
            "skipped": [[os.path.relpath(p, source), why] for p, why in folder.scan.bad + failed],
            "ignored": [os.path.relpath(p, source) for p in folder.ignored],
            "modes": dict(folder.scan.modes),
            "wide_source": folder.scan.wide,
            "command": command,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.perf_counter() - start, 3),
        }
        if table is not None:
            groups = {r.file: r.group for r in folder.rows}
            meta["table"] = {"path": table.labels, "size": folder.stat[0], "mtime_ns": folder.stat[1],
                             "options": table.to_json(), "bad_rows": [list(b) for b in folder.bad_rows],
                             "test_rows": len(folder.split_rows("test")), "split": folder.split_text,
                             "groups": [groups[p] for p, _ in rows]}
        (partial / META).write_text(json.dumps(meta, indent=1))
        for name in ("images.npy", "labels.npy", META):
            _fsync(partial / name)
        _swap_in(partial, output)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return open_pack(output, check_stale=False)


def _swap_in(partial: Path, output: Path) -> None:
    """Rename the complete ``partial`` to ``output``; an older pack there is moved aside first, then removed."""
    old = output.parent / f"{output.name}{_OLD}{os.getpid()}"
    if output.exists():
        os.replace(output, old)
    os.replace(partial, output)
    shutil.rmtree(old, ignore_errors=True)


# -- reading ----------------------------------------------------------------------------------------
class PackedDataset(Dataset):
    """The images of one split of a pack, with ``GrayImageFolder``'s item contract.

    ``dataset[i]`` is ``(image, label, source path)``: (1, H, W) uint8 for a uint8 pack, float32 in [0, 1]
    otherwise. A ``DataLoader`` with automatic batching calls ``__getitems__`` instead, which reads the whole
    batch with one sorted fancy index into the memory map and returns a collated ``Batch`` (``data.collate``
    passes it through), so there is no per-image work in Python and a worker process buys little.

    Args:
        pack: an opened pack.
        split: ``train``, ``val`` or ``all`` (every readable image, train first).
        label_map: new label of each pack class (e.g. the class index in a checkpoint); default unchanged.
        num_classes: with ``label_map`` on multi-label data, the number of findings to count in (those the pack
            lacks are NaN).
    """

    def __init__(self, pack: Pack, split: str = "val", *, label_map: Sequence[int] | None = None,
                 num_classes: int | None = None) -> None:
        splits = {"train": pack.train_rows, "val": pack.val_rows, "all": pack.train_rows + pack.val_rows}
        if split not in splits:
            raise InputError(f"split must be one of {', '.join(splits)}; got {split!r}")
        self.rows = np.asarray(splits[split], dtype=np.int64)
        self.task = pack.task
        labels = torch.from_numpy(np.load(pack.root / "labels.npy")[self.rows])  # (N,) int64 or (N, K) float32
        if label_map is not None:
            labels = remap_target(labels, label_map, num_classes if num_classes is not None else len(label_map))
        self.labels = labels
        self.paths = [pack.rows[i][0] for i in self.rows]
        self.file = pack.root / "images.npy"
        self.dtype = pack.dtype
        self.wide = pack.wide
        self._images: np.ndarray | None = None  # opened in each process that reads, never pickled

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": None}  # a pickled memmap would copy the whole array to each worker

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, positions: Sequence[int]) -> Tensor:
        """(B, 1, H, W) of the given positions, in their order."""
        if self._images is None:
            self._images = np.load(self.file, mmap_mode="r")
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        order = np.argsort(rows, kind="stable")
        block = np.empty((len(rows), *self._images.shape[1:]), dtype=self._images.dtype)
        block[order] = self._images[rows[order]]  # ascending rows: one forward pass through the file
        if self.dtype == "uint8":
            return torch.from_numpy(block)
        scale = 1 / 65535 if self.dtype == "uint16" else 1.0
        return torch.from_numpy(block.astype(np.float32) * np.float32(scale))

    def __getitem__(self, index: int) -> tuple[Tensor, int | Tensor, str]:
        label = self.labels[index] if self.task == "multi" else int(self.labels[index])
        return self._read([index])[0], label, self.paths[index]

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        return Batch(self._read(indices), self.labels[list(indices)], [self.paths[i] for i in indices], 0)
