"""Image folders as a data source's files: the class-folder scan, the seeded split, and the offline demo.

The layout is torchvision's ``ImageFolder`` (Keras ``flow_from_directory``): one subfolder per class. If
``DIR/train`` and ``DIR/val`` exist they are used as they are; otherwise a seeded, stratified split is made.
"""

import errno
import os
import random
import stat
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .files import default_cache_dir  # noqa: F401 - part of this module's API: where the demo digits go
from .images import ScanResult, drop_unreadable, file_kind, is_image_file
from .limits import unprintable

__all__ = ["SKIP_KINDS", "FolderData", "FolderSplit", "Listing", "SkippedFileWarning", "class_folders",
           "default_cache_dir", "demo_digits", "describe_skipped", "find_images", "load_folder", "prepare_digits",
           "split_samples", "walk_images", "warn_skipped"]


SKIP_KINDS = ("not a regular file", "symlink loop", "permission denied", "already seen", "broken symlink",
              "cannot be listed")


class SkippedFileWarning(UserWarning):
    """The folder scan left out a path that is not a file to read: a FIFO, a symlink loop, an unreadable folder."""


@dataclass
class FolderSplit:
    """Samples of one split: (path, label) pairs over ``classes``."""

    classes: list[str]
    samples: list[tuple[str, int]]
    ignored: list[str] = field(default_factory=list)  # hidden files and non-image extensions
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): see ``walk_images``


@dataclass
class Listing:
    """What ``walk_images`` found under a folder."""

    files: list[str] = field(default_factory=list)  # image files, each real file once
    ignored: list[str] = field(default_factory=list)  # hidden files and files that are not images
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), reason starting with a SKIP_KIND


def _key(st: os.stat_result, path: str) -> tuple:
    """What makes a file or folder the same one under two names. Some file systems report inode 0 for every file."""
    return (st.st_dev, st.st_ino) if st.st_ino else ("path", os.path.realpath(path))


class _Walk:
    """The state of one scan: the folders and files already seen, by (device, inode), with the path first seen."""

    def __init__(self) -> None:
        self.folders: dict[tuple, str] = {}
        self.files: dict[tuple, str] = {}

    def enter(self, path: str, st: os.stat_result, listing: Listing) -> bool:
        """Whether to list the folder ``path``: no when it was listed already (then it is skipped and named)."""
        key = _key(st, path)
        first = self.folders.get(key)
        if first is None:
            self.folders[key] = path
            return True
        here = os.path.realpath(os.path.dirname(path))
        target = os.path.realpath(first)
        if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
            listing.skipped.append((path, f"symlink loop: leads back to {first}"))
        else:
            listing.skipped.append((path, f"already seen as {first}"))
        return False

    def scan(self, top: str, listing: Listing, recursive: bool = True) -> None:
        """Add the files under the folder ``top`` to ``listing``: depth first, each folder's files in name order
        before its subfolders (``os.walk``'s order), symlinked folders followed once."""
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except PermissionError:
                listing.skipped.append((folder, "permission denied: the folder cannot be listed"))
                continue
            except OSError as e:
                listing.skipped.append((folder, f"cannot be listed ({e.strerror or e})"))
                continue
            subfolders = []
            for entry in entries:
                if entry.name.startswith("."):  # .DS_Store, .ipynb_checkpoints, .git: hidden files are ignored
                    if not _is_dir(entry):
                        listing.ignored.append(entry.path)
                    continue
                st = self._stat(entry, listing)
                if st is None:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if recursive and self.enter(entry.path, st, listing):
                        subfolders.append(entry.path)
                elif not stat.S_ISREG(st.st_mode):  # never opened: reading a FIFO would wait forever
                    listing.skipped.append((entry.path, f"not a regular file ({file_kind(st.st_mode)})"))
                else:
                    key = _key(st, entry.path)
                    first = self.files.setdefault(key, entry.path)
                    if first != entry.path:
                        listing.skipped.append((entry.path, f"already seen as {first}"))
                    elif is_image_file(entry.path):
                        listing.files.append(entry.path)
                    else:
                        listing.ignored.append(entry.path)
            stack.extend(reversed(subfolders))

    @staticmethod
    def _stat(entry: os.DirEntry, listing: Listing) -> os.stat_result | None:
        """The entry's stat, its link followed; None (and the entry named in ``skipped``) when there is none."""
        try:
            return entry.stat()
        except PermissionError:
            listing.skipped.append((entry.path, "permission denied"))
        except FileNotFoundError:
            listing.skipped.append((entry.path, "broken symlink" if entry.is_symlink() else "cannot be listed "
                                    "(it vanished during the scan)"))
        except OSError as e:
            if e.errno == errno.ELOOP:
                listing.skipped.append((entry.path, "symlink loop: the link never reaches a file"))
            else:
                listing.skipped.append((entry.path, f"cannot be listed ({e.strerror or e})"))
        return None


def walk_images(top: str | os.PathLike, recursive: bool = True) -> Listing:
    """The image files under the folder ``top``; every other path is ignored or skipped, and named.

    Regular files only: FIFOs, sockets and devices are skipped without being opened. Each real file counts once
    (by device and inode): a second name for it, through a symlink or a hard link, is skipped as ``already seen``.
    A symlinked folder is followed the first time it is met; a link back to a folder above it is a ``symlink
    loop``. A folder that cannot be listed is skipped (``permission denied``). The walk lists each folder once,
    stats each entry once and always ends.

    Args:
        top: the folder.
        recursive: list subfolders too.
    """
    top = os.fspath(top)
    walk, listing = _Walk(), Listing()
    try:
        walk.enter(top, os.stat(top), listing)
    except OSError as e:
        raise DataError(f"cannot read the folder {top}: {e.strerror or e}") from None
    walk.scan(top, listing, recursive)
    return listing


def class_folders(root: str | os.PathLike) -> list[str]:
    """The names of ``root``'s subfolders that are not hidden, sorted: its classes, in an ImageFolder tree.

    Raises:
        DataError: ``root`` cannot be listed, or a name holds characters that a terminal or a spreadsheet would act
            on (``limits.unprintable``: ESC, newline, bidi overrides, bytes that are not UTF-8): class names are
            printed, written to CSVs and saved in checkpoints.
    """
    try:
        with os.scandir(root) as it:
            names = sorted(e.name for e in it if not e.name.startswith(".") and _is_dir(e))
    except OSError as e:
        raise DataError(f"cannot list the data folder {root}: {e.strerror or e}") from None
    for name in names:
        if unprintable(name):
            raise DataError(f"class folder {name!r} in {root}: its name holds control characters "
                            f"({', '.join(sorted({repr(c) for c in unprintable(name)}))}); rename the folder")
    return names


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def find_images(root: str | os.PathLike, min_classes: int = 2) -> FolderSplit:
    """List an ImageFolder tree: one subfolder per class, images at any depth below it (``walk_images``).

    Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) and files that are not images
    (``is_image_file``: an image extension, or DICOM) are ignored and listed in ``ignored``. What is not a file
    to read (a FIFO, a symlink loop, a second name of a file, a folder that cannot be listed) is in ``skipped``,
    with the reason. Errors are raised before any training starts.

    Args:
        root: the folder.
        min_classes: fewer class folders is an error (a classifier trains on 2 or more).

    Raises:
        DataError: no such folder, no class folders, a class folder with no images or a name with control
            characters, fewer than ``min_classes`` classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    classes = class_folders(root)
    if not classes:
        loose = walk_images(root, recursive=False).files[:3]
        hint = f" (found loose images such as {', '.join(os.path.basename(p) for p in loose)})" if loose else ""
        raise DataError(
            f"{root} has no class subfolders{hint}; expected one subfolder per class, e.g. {root}/cat/1.png"
        )
    walk, listing = _Walk(), Listing()
    walk.enter(str(root), os.stat(root), listing)  # so that a link back to the root is a loop
    samples, empty = [], []
    for label, name in enumerate(classes):
        before = len(listing.files)
        folder = str(root / name)
        try:
            if walk.enter(folder, os.stat(folder), listing):
                walk.scan(folder, listing)
        except OSError as e:
            listing.skipped.append((folder, f"cannot be listed ({e.strerror or e})"))
        samples += [(path, label) for path in listing.files[before:]]
        if len(listing.files) == before:
            empty.append(name)
    if empty:
        raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty)}"
                        + (f" ({describe_skipped(listing.skipped)})" if listing.skipped else ""))
    if len(classes) < min_classes:
        raise DataError(f"{root} has a single class ({classes[0]}); a classifier needs at least 2 class folders")
    return FolderSplit(classes, samples, listing.ignored, listing.skipped)


def describe_skipped(skipped: Sequence[tuple[str, str]]) -> str:
    """``3 skipped (2 not a regular file, 1 symlink loop)``: the count of each kind of reason."""
    counts = Counter(next((k for k in SKIP_KINDS if why.startswith(k)), why) for _, why in skipped)
    return f"{len(skipped)} skipped" + (f" ({', '.join(f'{n} {k}' for k, n in counts.most_common())})"
                                        if counts else "")


def warn_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    """Name each skipped path and its reason in a ``SkippedFileWarning``, as unreadable images are named."""
    for path, why in skipped:
        warnings.warn(f"skipping {path}: {why}", SkippedFileWarning, stacklevel=3)


def split_samples(
    samples: Sequence[tuple[str, int]], val_split: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """A seeded, stratified split: each class gives ``round(n * val_split)`` images to validation.

    Each class keeps at least one image on each side (when it has two). The result depends only on the
    sorted file list, ``val_split`` and ``seed``.
    """
    if not 0.0 < val_split < 1.0:
        raise DataError(f"val_split must be between 0 and 1; got {val_split}")
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in sorted(samples):
        by_class.setdefault(s[1], []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        random.Random(f"{seed}-{label}").shuffle(items)
        n_val = min(max(round(len(items) * val_split), 1), len(items) - 1) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return sorted(train), sorted(val)


@dataclass
class FolderData:
    """The train and validation samples of a data folder, after checks."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    scan: ScanResult
    ignored: list[str]
    presplit: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)  # by the folder scan: (path, reason)
    task: str = "single"  # class folders give one class per image


def load_folder(
    root: str | os.PathLike, val_split: float = 0.2, seed: int = 0, strict: bool = False, verify: bool | None = None,
    max_pixels: int | None = None,
) -> FolderData:
    """Find, check and split the images of ``root``, raising ``DataError`` before any training.

    What the folder scan skipped (``find_images``) is named in ``SkippedFileWarning``s, and unreadable images in
    ``UnreadableImageWarning``s (``drop_unreadable``).

    Args:
        root: an ImageFolder tree, or one with ``train/`` and ``val/`` ImageFolder trees.
        val_split: the validation fraction when ``root`` is not split already.
        seed: seed of the split.
        strict: refuse to start when any file is unreadable, listing them all.
        verify: decode every file up front (default: only when ``strict``).
        max_pixels: the most pixels a file may decode to (default: the process's limit, ``limits.pixel_limit``).
    """
    root = Path(root)
    presplit = (root / "train").is_dir() and (root / "val").is_dir()
    if presplit:
        tr, va = find_images(root / "train"), find_images(root / "val")
        if tr.classes != va.classes:
            only_tr = sorted(set(tr.classes) - set(va.classes))
            only_va = sorted(set(va.classes) - set(tr.classes))
            raise DataError(
                f"train and val class folders differ in {root}: only in train: {only_tr or 'none'}; "
                f"only in val: {only_va or 'none'}"
            )
        classes, train, val, ignored = tr.classes, tr.samples, va.samples, tr.ignored + va.ignored
        skipped = tr.skipped + va.skipped
    else:
        found = find_images(root)
        classes, ignored, skipped = found.classes, found.ignored, found.skipped
        train, val = split_samples(found.samples, val_split, seed)
    warn_skipped(skipped)
    kept, scan = drop_unreadable(train + val, verify=strict if verify is None else verify, strict=strict,
                                 max_pixels=max_pixels)
    good = {p for p, _ in kept}
    train = [s for s in train if s[0] in good]
    val = [s for s in val if s[0] in good]
    if not train or not val:
        raise DataError(f"{root}: no readable images left for {'training' if not train else 'validation'}")
    return FolderData(classes, train, val, scan, ignored, presplit, skipped)


def demo_digits(per_class: int | None = None) -> Iterator[tuple[int, np.ndarray, int]]:
    """scikit-learn's bundled 8x8 digits as (index, uint8 pixels scaled from 0..16 to 0..255, digit), the first
    ``per_class`` of each digit; the demo data of the class folders and of the label table."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the demo data set needs scikit-learn (from a checkout: pip install -e '.[demo]'; otherwise: "
            "pip install scikit-learn), or pass --data DIR"
        ) from None
    digits = load_digits()
    counts: Counter = Counter()
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and counts[target] >= per_class:
            continue
        counts[target] += 1
        yield i, np.round(image * (255.0 / 16.0)).astype(np.uint8), int(target)


def prepare_digits(cache_dir: str | os.PathLike | None = None, per_class: int | None = None) -> Path:
    """Write scikit-learn's bundled 8x8 digits once as 8-bit PNG class folders; return the folder.

    The pixel values 0..16 are scaled to 0..255. The folder is reused while its ``.complete`` marker is
    there, so an interrupted first write is redone rather than trusted.

    Args:
        cache_dir: where to write (default: ``$GRAY_EFFNET_CACHE`` or ``~/.cache/gray_effnet``).
        per_class: keep only the first N images of each class (for quick tests).
    """
    name = "digits" if per_class is None else f"digits-{per_class}"
    root = Path(cache_dir or default_cache_dir()) / name
    marker = root / ".complete"
    if marker.is_file():
        return root
    counts: Counter = Counter()
    for i, pixels, target in demo_digits(per_class):
        counts[target] += 1
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    marker.write_text(f"{sum(counts.values())} images\n")
    return root
