"""Data sources: what ``train.py``, ``--evaluate``, ``predict`` and ``pack`` ask of the data, whatever its kind.

A data source is a folder of class subfolders (``FolderSource``), a label table naming the images of a folder
(``TableSource``, ``--labels FILE.csv``), a pack decoded once by ``python -m gray_effnet pack`` (``PackSource``),
or a flat folder of unlabelled images to predict (``FolderSource.unlabelled``). ``open_source`` picks the kind;
the scripts only ask the source:

* its ``task`` (``single``: a class index per image; ``multi``: a (K,) float32 vector of 1, 0 or NaN, NaN meaning
  "leave out of the loss and the metrics"), its ``classes`` (the class or finding names) and its splits
  (``train``, ``val``, ``all``; a table also has ``test``, and its ``all`` includes it);
* ``pos_fraction()``: each finding's (or class') share of positives among the labelled training entries;
* ``write_split(path)``: ``split.csv`` (path, group, split), where the source knows its groups (tables);
* ``settings(img_size, intensity)``: the image size and intensity mapping to use (a pack fixes the mapping and
  takes its own size or a smaller one; a folder takes what it is given);
* ``dataset(split, ...)``: a dataset of ``(image, target, path)`` items, targets counted in the source's classes
  or, with ``class_names``, in a checkpoint's (a multi-label finding the data lacks is NaN there);
* ``batch_augment(...)``: the augmentation that runs on whole batches on the device (packs), or ``None`` when the
  dataset augments each sample itself (folders);
* ``loader_workers(requested)``: the loader processes it wants;
* ``check_model(model)``: that a checkpoint's classes and intensity mapping fit this data;
* ``describe(wide)``: the text of the ``data:`` line.

A new kind of data is a new class here, not a new branch in each script.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .augment import BatchAugment, build_transforms
from .cli import plural
from .data import GrayImageFolder, remap_target
from .errors import DataError, InputError
from .folders import (
    FolderData,
    class_folders,
    describe_skipped,
    find_images,
    load_folder,
    prepare_digits,
    walk_images,
    warn_skipped,
)
from .images import ScanResult, drop_unreadable
from .intensity import Intensity, parse_intensity
from .pack import Pack, PackedDataset, has_pack_json, open_pack
from .tables import TableData, TableOptions, load_table, write_split

__all__ = ["Augmentation", "DataSource", "FolderSource", "PackSource", "TableSource", "open_source"]

SPLITS = ("train", "val", "all")
TABLE_SPLITS = ("train", "val", "test", "all")


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation settings, shared by the per-sample (folders) and per-batch (packs) routes."""

    crop_scale: float = 0.8
    hflip: float = 0.0
    rotate: float = 0.0


def _label_map(source_classes: Sequence[str], class_names: Sequence[str] | None, what: str) -> list[int] | None:
    """New index, in ``class_names``, of each of ``source_classes``; ``DataError`` naming the unknown ones."""
    if class_names is None or list(class_names) == list(source_classes):
        return None
    unknown = sorted(set(source_classes) - set(class_names))
    if unknown:
        raise DataError(f"classes of {what} that are not classes of the checkpoint: {unknown}; its classes are "
                        f"{list(class_names)}")
    return [list(class_names).index(c) for c in source_classes]


class DataSource:
    """The interface every kind of data implements (see the module docstring).

    Attributes:
        root: where the data is.
        task: ``single`` (a class index per image) or ``multi`` (a (K,) float32 vector of 1, 0, NaN per image).
        classes: class names (single) or finding names (multi), in label order (empty for unlabelled data).
        presplit: the split was given (``train/`` and ``val/`` folders, a split column, a pack of either) rather
            than made.
        scan: what checking the files found (bad files, colour files, bit depth).
        ignored: files that are not images.
    """

    root: Path
    classes: list[str]
    presplit: bool
    scan: ScanResult
    ignored: list[str]
    task: str = "single"

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def samples(self, split: str) -> list[tuple[str, "int | torch.Tensor"]]:
        """(path, target) of every image of ``split`` (``train``, ``val`` or ``all``)."""
        raise NotImplementedError

    def pos_fraction(self) -> np.ndarray:
        """(K,) share of positives among the labelled (non-NaN) entries of the training split, per finding.

        For single-label data, each class' share of the training images (one-vs-rest). NaN for a finding that no
        training image has a label for.
        """
        targets = [y for _, y in self.samples("train")]
        if self.task == "multi":
            t = torch.stack(targets).double().numpy() if targets else np.empty((0, len(self.classes)))  # (N, K)
            known = (~np.isnan(t)).sum(0)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(known > 0, np.nansum(t, 0) / known, np.nan)
        counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=len(self.classes)).astype(np.float64)
        return counts / counts.sum() if counts.sum() else np.full(len(self.classes), np.nan)

    def write_split(self, path: str | os.PathLike) -> Path | None:
        """Write ``split.csv`` (path, group, split) where the source has groups; return it, or ``None``."""
        return None

    def settings(self, img_size: Sequence[int] | None, intensity: "str | Intensity | None",
                 default_size: Sequence[int] = (64, 64)) -> tuple[tuple[int, int], str]:
        """The (H, W) and the canonical intensity mapping to read this source with."""
        raise NotImplementedError

    def dataset(self, split: str, img_size: Sequence[int], intensity: str, *, augment: Augmentation | None = None,
                class_names: Sequence[str] | None = None) -> Dataset:
        """The images of ``split``; ``augment`` for training; labels re-indexed into ``class_names`` if given."""
        raise NotImplementedError

    def batch_augment(self, img_size: Sequence[int], augment: Augmentation, seed: int) -> nn.Module | None:
        """The augmentation applied to whole batches on the device, or ``None`` if the dataset augments."""
        return None

    def loader_workers(self, requested: int | str) -> tuple[int | str, str | None]:
        """The loader workers for ``--workers requested`` (``auto``: ``speed.choose_workers`` decides), and why, if
        the source decides it itself."""
        return requested, None

    def check_model(self, model) -> None:
        """Refuse a checkpoint of another task, or whose classes (or findings) the labels cannot be counted in."""
        if self.labelled and model.task != self.task:
            kind = {"single": "one class per image", "multi": "findings (multi-label)"}
            raise DataError(f"{self.root} is labelled with {kind[self.task]}, the checkpoint predicts "
                            f"{kind[model.task]}")
        if self.labelled and model.class_names:
            _label_map(self.classes, model.class_names, str(self.root))

    def describe(self, wide: bool) -> str:
        raise NotImplementedError

    skipped: list[tuple[str, str]] = []  # (path, reason): what the folder scan left out (FIFOs, symlink loops, ...)

    def _counts(self, wide: bool) -> str:
        return (f"{self.scan.converted} converted from colour, {len(self.scan.bad)} unreadable skipped, "
                + (f"{describe_skipped(self.skipped)} by the folder scan, " if self.skipped else "")
                + f"{len(self.ignored)} non-image files ignored; {'float32' if wide else 'uint8'} batches")

    def _split_text(self) -> str:
        if not self.labelled:
            return f"{len(self.samples('all'))} unlabelled images"
        kind = "given split" if self.presplit else f"seeded stratified split, {self.val_split:.0%} val"
        return (f"{plural(len(self.classes), 'class', 'classes')}, {len(self.samples('train'))} train / "
                f"{len(self.samples('val'))} val images ({kind})")


def _file_settings(img_size, intensity, default_size) -> tuple[tuple[int, int], str]:
    """Image files are read at any size and with any mapping: the one given, or the default."""
    size = tuple(int(s) for s in (img_size or default_size))
    return size, str(parse_intensity(intensity or "full"))


def _file_dataset(source: DataSource, split: str, img_size, intensity, *, augment: Augmentation | None,
                  class_names: Sequence[str] | None) -> GrayImageFolder:
    """The image files of ``split`` of ``source``, read and augmented one at a time."""
    samples = source.samples(split)
    label_map = _label_map(source.classes, class_names, str(source.root)) if source.labelled else None
    if label_map is not None:
        samples = [(p, remap_target(y, label_map, len(class_names))) for p, y in samples]
    transform = (build_transforms(img_size, train=True, crop_scale=augment.crop_scale, hflip=augment.hflip,
                                  rotate=augment.rotate)
                 if augment is not None else build_transforms(img_size, train=False))
    pixels = [source.scan.pixels.get(p, 0) for p, _ in samples] if source.scan.pixels else None
    return GrayImageFolder(samples, transform, wide=source.scan.wide, intensity=intensity, pixels=pixels)


class FolderSource(DataSource):
    """Image files: class subfolders (split by ``load_folder``), or a flat folder of unlabelled images."""

    def __init__(self, root: Path, folder: FolderData, *, val_split: float):
        self.root, self.val_split = Path(root), val_split
        self.classes, self.presplit, self.scan, self.ignored, self.skipped = (
            folder.classes, folder.presplit, folder.scan, folder.ignored, folder.skipped)
        self._splits = {"train": folder.train, "val": folder.val}

    @classmethod
    def unlabelled(cls, root: Path, strict: bool = False) -> "FolderSource":
        """Every image file directly in ``root``, with no labels (``predict`` on a flat folder), by the same scan."""
        listing = walk_images(root, recursive=False)
        warn_skipped(listing.skipped)
        if not listing.files:
            skipped = f" ({describe_skipped(listing.skipped)})" if listing.skipped else ""
            raise DataError(f"no images in {root}{skipped}")
        kept, scan = drop_unreadable([(p, -1) for p in listing.files], strict=strict)
        if not kept:
            raise DataError(f"none of the {len(listing.files)} image file(s) in {root} can be read (first: "
                            f"{scan.bad[0][0]}: {scan.bad[0][1]})")
        return cls(root, FolderData([], [], kept, scan, listing.ignored, False, listing.skipped), val_split=0.0)

    def samples(self, split: str) -> list[tuple[str, int]]:
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return self._splits["train"] + self._splits["val"] if split == "all" else self._splits[split]

    def settings(self, img_size, intensity, default_size=(64, 64)):
        return _file_settings(img_size, intensity, default_size)

    def dataset(self, split, img_size, intensity, *, augment=None, class_names=None):
        return _file_dataset(self, split, img_size, intensity, augment=augment, class_names=class_names)

    def describe(self, wide: bool) -> str:
        return f"data: {self.root}: {self._split_text()}; {self._counts(wide)}"


class TableSource(DataSource):
    """A label table (``--labels FILE.csv``): image files under a folder with their labels, groups and splits.

    The table is read and checked by ``tables.load_table``; the images are read as a folder's are. Besides
    ``train`` and ``val`` it has a ``test`` split (rows a split column marks test: in neither training nor
    validation), and its ``all`` is every image of the three.
    """

    def __init__(self, table: TableData, *, val_split: float):
        self.table = table
        self.root, self.task, self.classes, self.presplit = table.root, table.task, table.classes, table.presplit
        self.scan, self.ignored, self.val_split = table.scan, table.ignored, val_split

    def samples(self, split: str) -> list[tuple[str, "int | torch.Tensor"]]:
        if split not in TABLE_SPLITS:
            raise InputError(f"split must be one of {', '.join(TABLE_SPLITS)}; got {split!r}")
        if split == "all":
            return [s for part in ("train", "val", "test") for s in self.table.samples(part)]
        return self.table.samples(split)

    def settings(self, img_size, intensity, default_size=(64, 64)):
        return _file_settings(img_size, intensity, default_size)

    def dataset(self, split, img_size, intensity, *, augment=None, class_names=None):
        return _file_dataset(self, split, img_size, intensity, augment=augment, class_names=class_names)

    def write_split(self, path: str | os.PathLike) -> Path:
        return write_split(path, [(r.path, r.group, r.split) for r in self.table.rows])

    def describe(self, wide: bool) -> str:
        t, options = self.table, self.table.options
        if self.task == "multi":
            names = ", ".join(self.classes[:8]) + (", ..." if len(self.classes) > 8 else "")
            what = f"multi-label, {plural(len(self.classes), 'finding')} ({names})"
            if options.label_columns:
                what += f", -1 read as {dict(ignore='ignored', ones='1', zeros='0')[options.uncertain]}"
        else:
            what = plural(len(self.classes), "class", "classes")
        rows = {s: t.split_rows(s) for s in ("train", "val", "test")}
        text = (f"data: {self.root}: table {t.table.name}, {what}; {len(rows['train'])} train / {len(rows['val'])} "
                "val images")
        if options.group_column:
            groups = {s: len({r.group for r in rows[s]}) for s in rows}
            text += f" of {groups['train']} / {groups['val']} groups of {options.group_column!r}"
        if rows["test"]:
            text += f", {len(rows['test'])} test images left out"
            if options.group_column:
                text += f" ({plural(groups['test'], 'group')})"
        return (f"{text}; {t.split_text}; {len(t.bad_rows)} bad rows skipped, {t.scan.converted} converted from "
                f"colour, {len(t.scan.bad)} unreadable skipped; {'float32' if wide else 'uint8'} batches")


class PackSource(DataSource):
    """A pack: decoded and resized once; its size and intensity mapping are fixed, and it augments on the device."""

    def __init__(self, pack: Pack):
        self.pack = pack
        self.root, self.task, self.classes, self.presplit = pack.root, pack.task, pack.classes, pack.presplit
        self.scan, self.ignored, self.val_split = pack.scan, pack.ignored, pack.meta["val_split"]

    def samples(self, split: str) -> list[tuple[str, int]]:
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return self.pack.train + self.pack.val if split == "all" else getattr(self.pack, split)

    def settings(self, img_size, intensity, default_size=(64, 64)):
        """The pack's size, or a smaller ``img_size``: training then crops from the larger packed images (as from
        files), and evaluation resizes them. A larger size is refused: it would only enlarge the packed pixels."""
        pack = self.pack
        size = tuple(int(s) for s in img_size) if img_size else pack.img_size
        if size[0] > pack.img_size[0] or size[1] > pack.img_size[1]:
            raise InputError(f"--img-size {size[0]} {size[1]}: the pack {pack.root} holds "
                             f"{pack.img_size[0]}x{pack.img_size[1]} images; train at that size or smaller, or pack "
                             "again at a larger one (python -m gray_effnet pack --img-size H W)")
        named = None if intensity is None else str(parse_intensity(intensity))
        if named is not None and named != pack.intensity:
            raise InputError(f"the pack {pack.root} was read with intensity {pack.intensity!r}, this run needs "
                             f"{named!r} (--intensity, or a checkpoint's): pack again with --intensity {named}")
        return size, pack.intensity

    def dataset(self, split, img_size, intensity, *, augment=None, class_names=None):
        size, _ = self.settings(img_size, intensity)
        # Training batches stay at the packed size: batch_augment crops them to ``size``. Others are resized to it.
        resize = None if augment is not None or size == self.pack.img_size else size
        return PackedDataset(self.pack, split, label_map=_label_map(self.classes, class_names, f"the pack {self.root}"),
                             num_classes=None if class_names is None else len(class_names), resize=resize)

    def write_split(self, path: str | os.PathLike) -> Path | None:
        table = self.pack.meta.get("table")
        if not table:
            return None
        split = {i: "train" for i in self.pack.train_rows} | {i: "val" for i in self.pack.val_rows}
        return write_split(path, [(p, group, split[i]) for i, ((p, _), group) in
                                  enumerate(zip(self.pack.meta["rows"], table["groups"])) if i in split])

    def batch_augment(self, img_size, augment, seed):
        return BatchAugment(img_size, crop_scale=augment.crop_scale, hflip=augment.hflip, rotate=augment.rotate,
                            seed=seed)

    def loader_workers(self, requested):
        # Worker processes would only add their start-up.
        return 0, "a pack: one slice of its memory map per batch, nothing to decode"

    def describe(self, wide: bool) -> str:
        pack = self.pack
        table = pack.meta.get("table")
        of = f"{pack.source} (table {Path(table['path']).name}, {table['split']})" if table else str(pack.source)
        what = f"multi-label, {plural(len(self.classes), 'finding')}; " if self.task == "multi" else ""
        return (f"data: {self.root}: pack of {of}, {pack.dtype}, {pack.note}; {what}{self._split_text()}; "
                f"{self._counts(wide)}")


def open_source(data: str | os.PathLike | None, *, val_split: float = 0.2, seed: int = 0, strict: bool = False,
                labelled: bool = True, table: TableOptions | None = None) -> DataSource:
    """The data source at ``data``: a label table's folder, a pack, a folder of class subfolders, or
    (``labelled=False``) also a flat folder.

    Args:
        data: the path; ``None`` is the offline demo (scikit-learn's digits, written once as PNG class folders).
        val_split: the validation fraction when the folder (or table) is not split already.
        seed: seed of the split.
        strict: decode every file first and refuse to start if any file (or table row) is bad.
        labelled: require labels; otherwise a folder with no class subfolders is a flat folder of images to predict,
            and a single class folder is enough. A table always has labels.
        table: read the images and their labels from this label table (``--labels``), paths relative to ``data``.
    """
    if table is not None:
        if data is None:
            raise InputError("--labels needs --data DIR: the folder the table's paths are relative to")
        if has_pack_json(data):
            raise InputError(f"{data} is a pack, which holds its labels already; leave out --labels and the "
                             "table options")
        return TableSource(load_table(data, table, val_split=val_split, seed=seed, strict=strict),
                           val_split=val_split)
    if data is None:
        data = prepare_digits()
    root = Path(data)
    if has_pack_json(root):  # decoded once by `python -m gray_effnet pack`; open_pack refuses a stale or broken one
        return PackSource(open_pack(root))
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    if labelled:
        return FolderSource(root, load_folder(root, val_split=val_split, seed=seed, strict=strict),
                            val_split=val_split)
    if not class_folders(root):
        return FolderSource.unlabelled(root, strict=strict)
    found = find_images(root, min_classes=1)
    warn_skipped(found.skipped)
    kept, scan = drop_unreadable(found.samples, strict=strict)
    if not kept:
        raise DataError(f"none of the {len(found.samples)} image file(s) in {root} can be read (first: "
                        f"{scan.bad[0][0]}: {scan.bad[0][1]})")
    folder = FolderData(found.classes, [], kept, scan, found.ignored, presplit=False, skipped=found.skipped)
    return FolderSource(root, folder, val_split=0.0)
