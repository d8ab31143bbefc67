"""Image folders as a data source's files: the class-folder scan, the seeded split, and the offline demo.

The layout is torchvision's ``ImageFolder`` (Keras ``flow_from_directory``): one subfolder per class. If
``DIR/train`` and ``DIR/val`` exist they are used as they are; otherwise a seeded, stratified split is made.
"""

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .images import ScanResult, drop_unreadable, is_image_file

__all__ = ["FolderData", "FolderSplit", "default_cache_dir", "find_images", "load_folder", "prepare_digits",
           "split_samples"]


@dataclass
class FolderSplit:
    """Samples of one split: (path, label) pairs over ``classes``."""

    classes: list[str]
    samples: list[tuple[str, int]]
    ignored: list[str] = field(default_factory=list)  # hidden files and non-image extensions


def find_images(root: str | os.PathLike, min_classes: int = 2) -> FolderSplit:
    """List an ImageFolder tree: one subfolder per class, images at any depth below it.

    Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) and files that are not images
    (``is_image_file``: an image extension, or DICOM) are ignored and listed in ``ignored``. Errors are raised
    before any training starts.

    Args:
        root: the folder.
        min_classes: fewer class folders is an error (a classifier trains on 2 or more).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.is_file() and is_image_file(p)][:3]
        hint = f" (found loose images such as {', '.join(loose)})" if loose else ""
        raise DataError(
            f"{root} has no class subfolders{hint}; expected one subfolder per class, e.g. {root}/cat/1.png"
        )
    samples, ignored, empty = [], [], []
    for label, name in enumerate(classes):
        found = 0
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                path = os.path.join(dirpath, fname)
                if not is_image_file(path):
                    ignored.append(path)
                    continue
                samples.append((path, label))
                found += 1
        if not found:
            empty.append(name)
    if empty:
        raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty)}")
    if len(classes) < min_classes:
        raise DataError(f"{root} has a single class ({classes[0]}); a classifier needs at least 2 class folders")
    return FolderSplit(classes, samples, ignored)


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
    task: str = "single"  # class folders give one class per image


def load_folder(
    root: str | os.PathLike, val_split: float = 0.2, seed: int = 0, strict: bool = False, verify: bool | None = None
) -> FolderData:
    """Find, check and split the images of ``root``, raising ``DataError`` before any training.

    Args:
        root: an ImageFolder tree, or one with ``train/`` and ``val/`` ImageFolder trees.
        val_split: the validation fraction when ``root`` is not split already.
        seed: seed of the split.
        strict: refuse to start when any file is unreadable, listing them all.
        verify: decode every file up front (default: only when ``strict``).
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
    else:
        found = find_images(root)
        classes, ignored = found.classes, found.ignored
        train, val = split_samples(found.samples, val_split, seed)
    kept, scan = drop_unreadable(train + val, verify=strict if verify is None else verify, strict=strict)
    good = {p for p, _ in kept}
    train = [s for s in train if s[0] in good]
    val = [s for s in val if s[0] in good]
    if not train or not val:
        raise DataError(f"{root}: no readable images left for {'training' if not train else 'validation'}")
    return FolderData(classes, train, val, scan, ignored, presplit)


def default_cache_dir() -> Path:
    base = os.environ.get("GRAY_EFFNET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gray_effnet"
    )
    return Path(base)


def prepare_digits(cache_dir: str | os.PathLike | None = None, per_class: int | None = None) -> Path:
    """Write scikit-learn's bundled 8x8 digits once as 8-bit PNG class folders; return the folder.

    The pixel values 0..16 are scaled to 0..255. The folder is reused while its ``.complete`` marker is
    there, so an interrupted first write is redone rather than trusted.

    Args:
        cache_dir: where to write (default: ``$GRAY_EFFNET_CACHE`` or ``~/.cache/gray_effnet``).
        per_class: keep only the first N images of each class (for quick tests).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError(
            "the demo data set needs scikit-learn (from a checkout: pip install -e '.[demo]'; otherwise: "
            "pip install scikit-learn), or pass --data DIR"
        ) from None
    name = "digits" if per_class is None else f"digits-{per_class}"
    root = Path(cache_dir or default_cache_dir()) / name
    marker = root / ".complete"
    if marker.is_file():
        return root
    digits = load_digits()
    counts: Counter = Counter()
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        if per_class is not None and counts[target] >= per_class:
            continue
        counts[target] += 1
        folder = root / str(target)
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(image * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    marker.write_text(f"{sum(counts.values())} images\n")
    return root
