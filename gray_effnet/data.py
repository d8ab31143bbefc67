"""Gray image folders: reading (8 and 16 bit), scanning for bad files, splitting, transforms, loaders.

The layout is torchvision's ``ImageFolder`` (Keras ``flow_from_directory``): one subfolder per class. If
``DIR/train`` and ``DIR/val`` exist they are used as they are; otherwise a seeded, stratified split is made.
Batches leave the loader as uint8 wherever the files are 8-bit, 1 byte per pixel; the model normalises.
"""

import math
import os
import random
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from .errors import DataError

__all__ = [
    "IMG_EXTENSIONS",
    "Batch",
    "FolderSplit",
    "GrayImageFolder",
    "UnreadableImageWarning",
    "build_transforms",
    "collate",
    "find_images",
    "load_folder",
    "make_loader",
    "prepare_digits",
    "read_gray",
    "scan_images",
    "set_loader_epoch",
    "split_samples",
]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".pnm", ".ppm", ".pbm")
GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
INTENSITY_HELP = (
    "how deeper-than-8-bit pixels map to [0, 1]: 'full' divides by the file's range (65535 for 16-bit), "
    "'minmax' stretches each image to its own min..max, a number N divides by 2**N - 1 (e.g. 12 for 12-bit "
    "data stored in 16-bit files)"
)


class UnreadableImageWarning(UserWarning):
    """An image that could not be read was skipped."""


# -- reading ----------------------------------------------------------------------------------------
def _check_intensity(intensity: str) -> None:
    if intensity in ("full", "minmax"):
        return
    if not intensity.isdigit() or not 1 <= int(intensity) <= 32:
        raise DataError(f"intensity must be 'full', 'minmax' or a bit depth 1..32; got {intensity!r}")


def _to_unit(a: np.ndarray, full_scale: float, intensity: str) -> np.ndarray:
    a = a.astype(np.float32)
    if intensity == "minmax":
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    scale = float(2 ** int(intensity) - 1) if intensity != "full" else full_scale
    return np.clip(a / scale, 0.0, 1.0)


def _decode(img: Image.Image, intensity: str) -> Tensor:
    """A loaded PIL image -> (1, H, W): uint8 for 8-bit content, float32 in [0, 1] for deeper."""
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)  # phone and scanner JPEGs store rotation as an EXIF tag
    mode = img.mode
    if mode.startswith("I;16"):
        # Never convert('L'): Pillow clamps 16-bit values at 255 there (python-pillow/Pillow#3011).
        a = _to_unit(np.array(img, dtype=np.uint16), 65535.0, intensity)
    elif mode == "I":
        a = np.array(img, dtype=np.int64)
        a = _to_unit(a, 65535.0 if a.max(initial=0) <= 65535 else float(2**32 - 1), intensity)
    elif mode == "F":
        a = np.array(img, dtype=np.float32)
        a = _to_unit(a, 1.0, intensity if intensity != "full" or a.max(initial=0) <= 1 else "minmax")
    else:
        if mode != "L":
            img = img.convert("L")  # RGB, RGBA, P, LA, CMYK, 1: ITU-R 601-2 luma, alpha dropped
        a = np.array(img, dtype=np.uint8)  # a writable copy
        if intensity == "minmax":
            a = _to_unit(a, 255.0, intensity)
    return torch.from_numpy(np.ascontiguousarray(a))[None]


def read_gray(path: str | os.PathLike, intensity: str = "full") -> Tensor:
    """Read an image file as one gray channel.

    Args:
        path: any format Pillow reads; a multi-frame file gives its first frame.
        intensity: see ``INTENSITY_HELP``; ``full`` keeps 8-bit files as uint8.

    Returns:
        (1, H, W): uint8 for 8-bit files (colour ones converted to luminance), float32 in [0, 1] for
        16-bit and float files, which keep their full precision.
    """
    _check_intensity(intensity)
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        return _decode(img, intensity)


# -- finding and checking files ---------------------------------------------------------------------
@dataclass
class FolderSplit:
    """Samples of one split: (path, label) pairs over ``classes``."""

    classes: list[str]
    samples: list[tuple[str, int]]
    ignored: list[str] = field(default_factory=list)  # hidden files and non-image extensions


def find_images(root: str | os.PathLike, min_classes: int = 2) -> FolderSplit:
    """List an ImageFolder tree: one subfolder per class, images at any depth below it.

    Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) and files without an image
    extension are ignored and listed in ``ignored``. Errors are raised before any training starts.

    Args:
        root: the folder.
        min_classes: fewer class folders is an error (a classifier trains on 2 or more).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        loose = [p.name for p in root.iterdir() if p.suffix.lower() in IMG_EXTENSIONS][:3]
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
                if fname.startswith(".") or Path(fname).suffix.lower() not in IMG_EXTENSIONS:
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


@dataclass
class ScanResult:
    """What a pass over the files found."""

    bad: list[tuple[str, str]]  # (path, reason)
    modes: Counter  # PIL mode -> count, of the readable files
    wide: bool  # some file is deeper than 8 bit

    @property
    def converted(self) -> int:
        """Files converted from colour (or palette) to luminance."""
        return sum(n for m, n in self.modes.items() if m not in GRAY_MODES)


def _probe(path: str, verify: bool) -> tuple[str | None, str]:
    try:
        with Image.open(path) as img:
            if verify:
                img.seek(0)
                img.load()
            return img.mode, ""
    except Exception as e:  # noqa: BLE001 - malformed files raise all kinds (KeyError, struct.error, ...)
        return None, f"{type(e).__name__}: {e}"


def scan_images(paths: Sequence[str], verify: bool = False, threads: int = 8) -> ScanResult:
    """Open every file's header (and decode it fully if ``verify``) to find bad files before training.

    A header check catches empty, non-image and most corrupt files at little cost; truncated pixel data
    only shows when decoding, which ``verify`` (``--strict-data``) does for every file up front.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda p: _probe(p, verify), paths))
    bad = [(p, why) for p, (mode, why) in zip(paths, results) if mode is None]
    modes = Counter(mode for mode, _ in results if mode is not None)
    return ScanResult(bad, modes, any(m in _WIDE_MODES for m in modes))


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
    scan = scan_images([p for p, _ in train + val], verify=strict if verify is None else verify)
    if scan.bad and strict:
        listing = "\n".join(f"  {p}: {why}" for p, why in scan.bad)
        raise DataError(f"--strict-data: {len(scan.bad)} unreadable file(s):\n{listing}")
    for path, why in scan.bad:
        warnings.warn(f"skipping unreadable image {path} ({why})", UnreadableImageWarning, stacklevel=2)
    bad = {p for p, _ in scan.bad}
    train = [s for s in train if s[0] not in bad]
    val = [s for s in val if s[0] not in bad]
    if not train or not val:
        raise DataError(f"{root}: no readable images left for {'training' if not train else 'validation'}")
    return FolderData(classes, train, val, scan, ignored, presplit)


# -- datasets and loaders ---------------------------------------------------------------------------
def build_transforms(
    img_size: Sequence[int], *, train: bool, crop_scale: float = 0.8, hflip: float = 0.0, rotate: float = 0.0
) -> v2.Transform:
    """Resize to ``img_size`` (H, W); in training, a light random crop, flip and rotation.

    The transforms run on uint8 or float (1, H, W) tensors, so 8-bit data stays 1 byte per pixel.
    """
    size = tuple(int(s) for s in img_size)
    if not train:
        return v2.Resize(size, antialias=True)
    steps: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rotate > 0:
        steps.append(v2.RandomRotation(rotate))
    return v2.Compose(steps)


class GrayImageFolder(Dataset):
    """(path, label) samples read as (1, H, W) gray tensors; an unreadable file gives ``None``.

    Args:
        samples: (path, label) pairs.
        transform: applied to each (1, H, W) tensor.
        wide: return float32 in [0, 1] for every image (set when any file is deeper than 8 bit, so that a
            batch has one dtype); otherwise 8-bit files stay uint8.
        intensity: see ``read_gray``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform=None, *, wide: bool = False,
                 intensity: str = "full") -> None:
        _check_intensity(intensity)
        self.samples = list(samples)
        self.transform = transform
        self.wide = wide or intensity != "full"
        self.intensity = intensity

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str] | None:
        path, label = self.samples[index]
        try:
            img = read_gray(path, self.intensity)
        except Exception as e:  # noqa: BLE001 - any decoder error must skip the file, not end the run
            warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})", UnreadableImageWarning,
                          stacklevel=2)
            return None
        if self.wide and img.dtype == torch.uint8:
            img = img.float().div_(255)
        if self.transform is not None:
            img = self.transform(img)
        return img, label, path


class Batch(NamedTuple):
    """A collated batch; ``skipped`` names the files that could not be read."""

    images: Tensor
    targets: Tensor
    paths: list[str]
    skipped: int


def collate(items: list[tuple[Tensor, int, str] | None]) -> Batch:
    """Stack the readable samples; unreadable ones (``None``) are dropped and counted."""
    good = [it for it in items if it is not None]
    if not good:
        return Batch(torch.empty(0, 1, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long), [], len(items))
    images = torch.stack([it[0] for it in good])
    targets = torch.tensor([it[1] for it in good], dtype=torch.long)
    return Batch(images, targets, [it[2] for it in good], len(items) - len(good))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 2,
    pin_memory: bool = False,
    seed: int = 0,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A loader whose order depends only on (seed, epoch): call ``set_loader_epoch`` each training epoch.

    Training uses a ``DistributedSampler`` for one process too, so single-process and ``torchrun`` runs
    share one code path. Evaluation gives each rank every ``world_size``-th sample, with no padding, so
    every image counts once; evaluate the unwrapped model, since DDP expects equal batch counts.
    """
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = range(rank, len(dataset), world_size)
    per_rank = math.ceil(len(dataset) / world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=train and per_rank > batch_size,  # a batch of 1 breaks BatchNorm in training
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,  # fresh workers each epoch, seeded from (seed, epoch): resumable
    )


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int = 0) -> None:
    """Make the shuffle and the workers' augmentation seeds a function of (seed, epoch)."""
    loader.sampler.set_epoch(epoch)
    loader.generator = torch.Generator().manual_seed(seed * 100003 + epoch)


# -- the offline demo data --------------------------------------------------------------------------
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
