"""Data sources: what ``train.py``, ``--evaluate``, ``predict`` and ``pack`` ask of the data, whatever its kind.

A data source is a folder of class subfolders (``FolderSource``), a pack decoded once by
``python -m gray_effnet pack`` (``PackSource``), or a flat folder of unlabelled images to predict
(``FolderSource.unlabelled``). ``open_source`` picks the kind; the scripts only ask the source:

* its ``classes`` and its splits (``train``, ``val``, ``all``);
* its ``task`` (``gray_effnet.tasks``): ``single`` (a class per image: folders, packs) or ``multi`` (a yes, no or
  unknown per finding, ``classes`` then naming the findings), and for ``multi`` the ``pos_fraction()`` of each
  finding among the known training labels;
* ``settings(img_size, intensity)``: the image size and intensity mapping to use (a pack fixes both and
  refuses others; a folder takes what it is given);
* ``dataset(split, ...)``: a dataset of ``(image, label, path)`` items, labels counted in the source's classes or,
  with ``class_names``, in a checkpoint's; a multi-label label is a float32 (K,) tensor of 1, 0 or NaN (unknown);
* ``batch_augment(...)``: the augmentation that runs on whole batches on the device (packs), or ``None`` when the
  dataset augments each sample itself (folders);
* ``loader_workers(requested)``: the loader processes it wants;
* ``check_model(model)``: that a checkpoint's classes and intensity mapping fit this data;
* ``describe(wide)``: the text of the ``data:`` line.

A new kind of data (label tables, say) is a new class here, not a new branch in each script.
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.data import Dataset

from .augment import BatchAugment, build_transforms
from .data import GrayImageFolder
from .errors import DataError, InputError
from .folders import FolderData, find_images, load_folder, prepare_digits
from .images import ScanResult, drop_unreadable, is_image_file
from .intensity import Intensity, parse_intensity
from .pack import Pack, PackedDataset, is_pack, open_pack

__all__ = ["Augmentation", "DataSource", "FolderSource", "PackSource", "open_source"]

SPLITS = ("train", "val", "all")


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation settings, shared by the per-sample (folders) and per-batch (packs) routes."""

    crop_scale: float = 0.8
    hflip: float = 0.0
    rotate: float = 0.0


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


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
        classes: class names, in label order (empty for unlabelled data).
        presplit: the split was given (``train/`` and ``val/`` folders, a pack of such a folder) rather than made.
        scan: what checking the files found (bad files, colour files, bit depth).
        ignored: files that are not images.
        task: ``single`` or ``multi`` (``gray_effnet.tasks``).
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

    def samples(self, split: str) -> list[tuple[str, int]]:
        """(path, label) of every image of ``split`` (``train``, ``val`` or ``all``)."""
        raise NotImplementedError

    def pos_fraction(self) -> np.ndarray:
        """Multi-label data: each finding's fraction of positives among its known training labels, (K,)."""
        raise InputError(f"{self.root} has one class per image; a fraction of positives per finding is for "
                         "multi-label data")

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

    def loader_workers(self, requested: int) -> int:
        return requested

    def check_model(self, model) -> None:
        """Refuse a checkpoint whose classes (or findings) this data's labels cannot be counted in."""
        if self.labelled and model.task != self.task:
            kind = {"single": "one class per image", "multi": "findings (multi-label)"}
            raise DataError(f"{self.root} is labelled with {kind[self.task]}, the checkpoint predicts "
                            f"{kind[model.task]}")
        if self.labelled and model.class_names:
            _label_map(self.classes, model.class_names, str(self.root))

    def describe(self, wide: bool) -> str:
        raise NotImplementedError

    def _counts(self, wide: bool) -> str:
        return (f"{self.scan.converted} converted from colour, {len(self.scan.bad)} unreadable skipped, "
                f"{len(self.ignored)} non-image files ignored; {'float32' if wide else 'uint8'} batches")

    def _split_text(self) -> str:
        if not self.labelled:
            return f"{len(self.samples('all'))} unlabelled images"
        kind = "given split" if self.presplit else f"seeded stratified split, {self.val_split:.0%} val"
        return (f"{_plural(len(self.classes), 'class', 'classes')}, {len(self.samples('train'))} train / "
                f"{len(self.samples('val'))} val images ({kind})")


class FolderSource(DataSource):
    """Image files: class subfolders (split by ``load_folder``), or a flat folder of unlabelled images."""

    def __init__(self, root: Path, folder: FolderData | None, *, val_split: float, unlabelled: list[str] = ()):
        self.root, self.val_split = Path(root), val_split
        if folder is not None:
            self.classes, self.presplit, self.scan, self.ignored = (folder.classes, folder.presplit, folder.scan,
                                                                    folder.ignored)
            self._splits = {"train": folder.train, "val": folder.val}
        else:
            kept, self.scan = drop_unreadable([(p, -1) for p in unlabelled])
            self.classes, self.presplit, self.ignored = [], False, []
            self._splits = {"train": [], "val": kept}

    @classmethod
    def unlabelled(cls, root: Path) -> "FolderSource":
        """Every image file directly in ``root``, with no labels (``predict`` on a flat folder)."""
        files = [str(p) for p in sorted(Path(root).iterdir()) if p.is_file() and is_image_file(p)]
        if not files:
            raise DataError(f"no images in {root}")
        return cls(root, None, val_split=0.0, unlabelled=files)

    def samples(self, split: str) -> list[tuple[str, int]]:
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return self._splits["train"] + self._splits["val"] if split == "all" else self._splits[split]

    def settings(self, img_size, intensity, default_size=(64, 64)):
        size = tuple(int(s) for s in (img_size or default_size))
        return size, str(parse_intensity(intensity or "full"))

    def dataset(self, split, img_size, intensity, *, augment=None, class_names=None):
        samples = self.samples(split)
        label_map = _label_map(self.classes, class_names, str(self.root)) if self.labelled else None
        if label_map is not None:
            samples = [(p, label_map[y]) for p, y in samples]
        transform = (build_transforms(img_size, train=True, crop_scale=augment.crop_scale, hflip=augment.hflip,
                                      rotate=augment.rotate)
                     if augment is not None else build_transforms(img_size, train=False))
        return GrayImageFolder(samples, transform, wide=self.scan.wide, intensity=intensity)

    def describe(self, wide: bool) -> str:
        return f"data: {self.root}: {self._split_text()}; {self._counts(wide)}"


class PackSource(DataSource):
    """A pack: decoded and resized once; its size and intensity mapping are fixed, and it augments on the device."""

    def __init__(self, pack: Pack):
        self.pack = pack
        self.root, self.classes, self.presplit = pack.root, pack.classes, pack.presplit
        self.scan, self.ignored, self.val_split = pack.scan, pack.ignored, pack.meta["val_split"]

    def samples(self, split: str) -> list[tuple[str, int]]:
        if split not in SPLITS:
            raise InputError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
        return self.pack.train + self.pack.val if split == "all" else getattr(self.pack, split)

    def settings(self, img_size, intensity, default_size=(64, 64)):
        pack = self.pack
        if img_size and tuple(img_size) != pack.img_size:
            raise InputError(f"--img-size {img_size[0]} {img_size[1]}: the pack {pack.root} holds "
                             f"{pack.img_size[0]}x{pack.img_size[1]} images; leave out --img-size, or pack again at "
                             "that size (python -m gray_effnet pack --img-size H W)")
        named = None if intensity is None else str(parse_intensity(intensity))
        if named is not None and named != pack.intensity:
            raise InputError(f"the pack {pack.root} was read with intensity {pack.intensity!r}, this run needs "
                             f"{named!r} (--intensity, or a checkpoint's): pack again with --intensity {named}")
        return pack.img_size, pack.intensity

    def dataset(self, split, img_size, intensity, *, augment=None, class_names=None):
        self.settings(img_size, intensity)  # a pack is read as it was packed
        return PackedDataset(self.pack, split, label_map=_label_map(self.classes, class_names, f"the pack {self.root}"))

    def batch_augment(self, img_size, augment, seed):
        return BatchAugment(img_size, crop_scale=augment.crop_scale, hflip=augment.hflip, rotate=augment.rotate,
                            seed=seed)

    def loader_workers(self, requested: int) -> int:
        return 0  # one index into a memory map per batch: worker processes would only add their start-up

    def describe(self, wide: bool) -> str:
        pack = self.pack
        return (f"data: {self.root}: pack of {pack.source}, {pack.dtype}, {pack.note}; {self._split_text()}; "
                f"{self._counts(wide)}")


def open_source(data: str | os.PathLike | None, *, val_split: float = 0.2, seed: int = 0, strict: bool = False,
                labelled: bool = True) -> DataSource:
    """The data source at ``data``: a pack, a folder of class subfolders, or (``labelled=False``) also a flat folder.

    Args:
        data: the path; ``None`` is the offline demo (scikit-learn's digits, written once as PNG class folders).
        val_split: the validation fraction when the folder is not split already.
        seed: seed of the split.
        strict: decode every file first and refuse to start if any is bad.
        labelled: require labels; otherwise a folder with no class subfolders is a flat folder of images to predict,
            and a single class folder is enough.
    """
    if data is None:
        data = prepare_digits()
    root = Path(data)
    if is_pack(root):  # decoded once by `python -m gray_effnet pack`; open_pack refuses a stale one
        return PackSource(open_pack(root))
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    if labelled:
        return FolderSource(root, load_folder(root, val_split=val_split, seed=seed, strict=strict),
                            val_split=val_split)
    if not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return FolderSource.unlabelled(root)
    found = find_images(root, min_classes=1)
    kept, scan = drop_unreadable(found.samples, strict=strict)
    folder = FolderData(found.classes, [], kept, scan, found.ignored, presplit=False)
    return FolderSource(root, folder, val_split=0.0)
