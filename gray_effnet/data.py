"""Gray image folders: reading (8 and 16 bit, DICOM), scanning for bad files, splitting, transforms, loaders.

The layout is torchvision's ``ImageFolder`` (Keras ``flow_from_directory``): one subfolder per class. If
``DIR/train`` and ``DIR/val`` exist they are used as they are; otherwise a seeded, stratified split is made.
Batches leave the loader as uint8 wherever the files are 8-bit, 1 byte per pixel; the model normalises.

DICOM files (``.dcm``, or any name with the ``DICM`` magic at byte 128, as scanners and PACS exports write
them) are read with pydicom (``pip install 'gray_effnet[dicom]'``): stored values go to physical units through
the file's modality LUT, ``MONOCHROME1`` is inverted so that bright is high, and ``gray_effnet.intensity``
maps them to [0, 1].
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
from .intensity import INTENSITY_HELP, Intensity, parse_intensity

try:  # the optional [dicom] extra; without it a DICOM file is a bad file whose reason names the extra
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
except ImportError:  # pragma: no cover - exercised only where pydicom is absent
    pydicom = None

__all__ = [
    "DICOM_EXTENSIONS",
    "IMG_EXTENSIONS",
    "INTENSITY_HELP",
    "Batch",
    "FolderSplit",
    "SampleSeeds",
    "GrayImageFolder",
    "UnreadableImageWarning",
    "build_transforms",
    "collate",
    "drop_unreadable",
    "find_images",
    "is_dicom_file",
    "is_image_file",
    "MultiFrameWarning",
    "load_folder",
    "make_loader",
    "prepare_digits",
    "read_dicom",
    "read_gray",
    "scan_images",
    "set_loader_epoch",
    "split_samples",
]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".pnm", ".ppm", ".pbm")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
# PIL modes, and "DICOM <PhotometricInterpretation>" for DICOM files.
GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N", "DICOM MONOCHROME1", "DICOM MONOCHROME2"}
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}  # and every DICOM file: they are read as float32
DICOM_CODECS_HINT = "pip install 'gray_effnet[dicom-codecs]'"


class UnreadableImageWarning(UserWarning):
    """An image that could not be read was skipped."""


class MultiFrameWarning(UserWarning):
    """A multi-frame DICOM file (a volume, a cine loop) gave its first frame only."""


# -- reading ----------------------------------------------------------------------------------------
def _minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def _to_unit(a: np.ndarray, full_scale: float, intensity: Intensity) -> np.ndarray:
    if intensity.dicom_only:
        raise DataError(f"intensity {intensity} needs DICOM files (physical units or a window); this is not one")
    if intensity.kind == "minmax":
        return _minmax(a)
    scale = float(2**intensity.bits - 1) if intensity.kind == "bits" else full_scale
    return np.clip(a.astype(np.float32) / scale, 0.0, 1.0)


def _decode(img: Image.Image, intensity: Intensity) -> Tensor:
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
        a = _to_unit(a, 1.0, intensity if intensity.kind != "full" or a.max(initial=0) <= 1 else Intensity("minmax"))
    else:
        if mode != "L":
            img = img.convert("L")  # RGB, RGBA, P, LA, CMYK, 1: ITU-R 601-2 luma, alpha dropped
        a = np.array(img, dtype=np.uint8)  # a writable copy
        if intensity.kind == "minmax" or intensity.dicom_only:
            a = _to_unit(a, 255.0, intensity)
    return torch.from_numpy(np.ascontiguousarray(a))[None]


def _has_dicom_magic(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A ``.dcm`` (``.dicom``, ``.dic``) name, or the ``DICM`` magic at byte 128 under any name."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    return suffix not in IMG_EXTENSIONS and _has_dicom_magic(path)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether the folder scan takes ``path`` as an image: not hidden, and an image extension or DICOM.

    Files with other names are opened for the 4-byte DICOM magic, since scanners and PACS exports write
    DICOM files with no extension (``IM0001``) or with a UID as the name (``1.2.840.113619.2.55.3.1``).
    """
    name = os.path.basename(path)
    if name.startswith("."):
        return False
    return Path(name).suffix.lower() in IMG_EXTENSIONS or is_dicom_file(path)


def _need_pydicom() -> None:
    if pydicom is None:
        raise DataError("reading DICOM needs pydicom: pip install 'gray_effnet[dicom]'")


def _dcmread(path: str | os.PathLike, **kwargs):
    # force: .dcm files written without the 128-byte preamble and magic (old ACR-NEMA style) still parse.
    return pydicom.dcmread(path, force=Path(path).suffix.lower() in DICOM_EXTENSIONS, **kwargs)


def _dicom_image_check(ds) -> int:
    """Raise ``DataError`` for a DICOM file that holds no decodable image; return its number of frames."""
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID")
        what = f"{sop.name}, modality {ds.get('Modality', '?')}" if sop else "no SOP class"
        raise DataError(f"DICOM file with no pixel data ({what}): not an image")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        raise DataError("DICOM file with no transfer syntax in its file meta: cannot tell how its pixels are encoded")
    if tsyntax.is_compressed:
        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise DataError(f"pydicom cannot decode the {tsyntax.name} transfer syntax") from None
        if not decoder.is_available:
            raise DataError(_missing_codec(tsyntax, decoder))
    return int(ds.get("NumberOfFrames") or 1)


def _missing_codec(tsyntax, decoder) -> str:
    needs = "; ".join(decoder.missing_dependencies) or "a pixel data handler"
    return f"no installed pixel data handler decodes {tsyntax.name} ({needs}): {DICOM_CODECS_HINT}"


def _representable(ds) -> tuple[float, float]:
    """The stored values that ``BitsStored`` and ``PixelRepresentation`` allow, e.g. 0..4095 or -2048..2047."""
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> (H, W): ITU-R 601-2 luma, the weights of Pillow's ``convert('L')`` used for other formats."""
    if rgb.dtype == np.uint8:
        return np.asarray(Image.fromarray(rgb).convert("L"))
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def read_dicom(path: str | os.PathLike, intensity: str | Intensity = "full", warn_frames: bool = True) -> Tensor:
    """Read the first frame of a DICOM image as one gray channel, float32 in [0, 1].

    Stored values go to physical units (Hounsfield units for CT) through the file's modality LUT
    (RescaleSlope/Intercept or a Modality LUT Sequence, by pydicom), then to [0, 1] as ``intensity`` says:
    ``full`` maps the range that ``BitsStored`` can hold, ``minmax`` the image's own, ``N`` divides the stored
    values by ``2**N - 1``, ``window`` applies the file's WindowCenter/Width (or VOI LUT), ``range:LO:HI`` maps
    LO..HI to 0..1. ``MONOCHROME1`` images are inverted after that, so that bright is high. Colour images
    (RGB, YBR, palette) are converted to luminance; they have no physical units, so ``window`` and ``range``
    refuse them.

    Args:
        path: a DICOM file, with or without the ``.dcm`` extension.
        intensity: see ``gray_effnet.intensity``.
        warn_frames: warn (``MultiFrameWarning``) that a multi-frame file gave its first frame.

    Raises:
        DataError: no pydicom, no pixel data (an RT plan, a structured report), no decoder for a compressed
            transfer syntax (the message names the missing packages and the extra), truncated pixel data, or
            ``window`` on a file without a window.
    """
    _need_pydicom()
    intensity = parse_intensity(intensity)
    ds = _dcmread(path)
    frames = _dicom_image_check(ds)
    try:
        stored = pixel_array(ds, index=0 if frames > 1 else None)
    except RuntimeError as e:  # an available plugin that cannot do this variant, e.g. Pillow with 12-bit JPEG
        tsyntax = ds.file_meta.TransferSyntaxUID
        raise DataError(f"{_missing_codec(tsyntax, get_decoder(tsyntax))} ({str(e).strip().splitlines()[-1]})") \
            from None
    if frames > 1 and warn_frames:
        warnings.warn(f"{path} has {frames} frames; using the first", MultiFrameWarning, stacklevel=2)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if not photometric.startswith("MONOCHROME"):
        if intensity.dicom_only:
            raise DataError(f"intensity {intensity} needs physical units; this DICOM image is {photometric} colour")
        rgb = apply_color_lut(stored, ds) if photometric == "PALETTE COLOR" else stored
        gray = _luma(rgb)  # pydicom gives YBR as RGB already
        bits = 8 * rgb.dtype.itemsize if photometric == "PALETTE COLOR" else int(ds.get("BitsStored") or 8)
        unit = _to_unit(gray, float(2**bits - 1), intensity)
        return torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None]
    if intensity.kind == "bits":
        unit = _to_unit(stored, 0.0, intensity)  # a bit depth is about the stored values, before any LUT
    else:
        values = apply_modality_lut(stored, ds)  # physical units: HU for CT
        if intensity.kind == "minmax":
            unit = _minmax(values)
        elif intensity.kind == "range":
            unit = intensity.to_unit(values)
        elif intensity.kind == "full":
            lo, hi = apply_modality_lut(np.array(_representable(ds), dtype=np.float64), ds)
            lo, hi = min(lo, hi), max(lo, hi)
            unit = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else _minmax(values)
        else:  # window
            if "WindowCenter" not in ds and "VOILUTSequence" not in ds:
                raise DataError("intensity 'window': this DICOM file has no WindowCenter/WindowWidth or VOI LUT; "
                                "use --intensity range LO HI or minmax")
            shown = apply_voi_lut(values, ds)
            # pydicom scales a window to the output range of the stored bits; its ends are where the window
            # sends values far below and far above it.
            lo, hi = np.sort(apply_voi_lut(np.array([-1e12, 1e12]), ds).astype(np.float64))
            unit = np.clip((shown - lo) / (hi - lo), 0.0, 1.0) if hi > lo else _minmax(shown)
    if photometric == "MONOCHROME1":  # white is low: invert, so that every image reaches the model bright-is-high
        unit = 1.0 - unit
    return torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None]


def read_gray(path: str | os.PathLike, intensity: str | Intensity = "full", warn_frames: bool = True) -> Tensor:
    """Read an image file as one gray channel.

    Args:
        path: any format Pillow reads, or DICOM (see ``read_dicom``); a multi-frame file gives its first frame.
        intensity: see ``gray_effnet.intensity``; ``full`` keeps 8-bit files as uint8.
        warn_frames: for DICOM, warn that a multi-frame file gave its first frame.

    Returns:
        (1, H, W): uint8 for 8-bit files (colour ones converted to luminance), float32 in [0, 1] for
        16-bit, float and DICOM files, which keep their full precision.
    """
    intensity = parse_intensity(intensity)
    if is_dicom_file(path):
        return read_dicom(path, intensity, warn_frames=warn_frames)
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


@dataclass
class ScanResult:
    """What a pass over the files found."""

    bad: list[tuple[str, str]]  # (path, reason)
    modes: Counter  # PIL mode (or "DICOM <photometric>") -> count, of the readable files
    wide: bool  # some file is deeper than 8 bit (or DICOM)
    frames: dict[str, int] = field(default_factory=dict)  # multi-frame files -> their number of frames

    @property
    def converted(self) -> int:
        """Files converted from colour (or palette) to luminance."""
        return sum(n for m, n in self.modes.items() if m not in GRAY_MODES)


def _probe_dicom(path: str, verify: bool) -> tuple[str, int]:
    """(mode, frames) of a DICOM file from its header (pixel data deferred); ``verify`` decodes it too."""
    _need_pydicom()
    if verify:
        read_dicom(path, "minmax", warn_frames=False)
    ds = _dcmread(path, defer_size="64 KB")  # reads the header, leaves the pixel data on disk
    frames = _dicom_image_check(ds)
    return f"DICOM {str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).strip()}", frames


def _probe(path: str, verify: bool) -> tuple[str | None, str, int]:
    """(mode, "", frames) of a readable file, (None, reason, 0) of a bad one."""
    try:
        if is_dicom_file(path):
            mode, frames = _probe_dicom(path, verify)
            return mode, "", frames
        with Image.open(path) as img:
            if verify:
                img.seek(0)
                img.load()
            return img.mode, "", 1
    except Exception as e:  # noqa: BLE001 - malformed files raise all kinds (KeyError, struct.error, ...)
        return None, f"{type(e).__name__}: {e}", 0


def scan_images(paths: Sequence[str], verify: bool = False, threads: int = 8) -> ScanResult:
    """Open every file's header (and decode it fully if ``verify``) to find bad files before training.

    A header check catches empty, non-image and most corrupt files at little cost; truncated pixel data
    only shows when decoding, which ``verify`` (``--strict-data``) does for every file up front.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(pool.map(lambda p: _probe(p, verify), paths))
    bad = [(p, why) for p, (mode, why, _) in zip(paths, results) if mode is None]
    modes = Counter(mode for mode, _, _ in results if mode is not None)
    frames = {p: n for p, (_, _, n) in zip(paths, results) if n > 1}
    wide = any(m in _WIDE_MODES or m.startswith("DICOM") for m in modes)
    return ScanResult(bad, modes, wide, frames)


def drop_unreadable(
    samples: Sequence[tuple[str, int]], verify: bool = False, strict: bool = False
) -> tuple[list[tuple[str, int]], ScanResult]:
    """Scan ``samples`` (``scan_images``), report the bad files, and return the readable ones.

    Every bad file is named in an ``UnreadableImageWarning`` with its reason, and the multi-frame files in one
    ``MultiFrameWarning`` (their first frame is used), so that training and prediction report alike.

    Args:
        samples: (path, label) pairs.
        verify: decode every file (slow, but it finds truncated pixel data before the first step).
        strict: raise ``DataError`` listing every bad file instead of skipping them.
    """
    scan = scan_images([p for p, _ in samples], verify=verify)
    if scan.bad and strict:
        listing = "\n".join(f"  {p}: {why}" for p, why in scan.bad)
        raise DataError(f"--strict-data: {len(scan.bad)} unreadable file(s):\n{listing}")
    for path, why in scan.bad:
        warnings.warn(f"skipping unreadable image {path} ({why})", UnreadableImageWarning, stacklevel=2)
    if scan.frames:
        listing = ", ".join(f"{p} ({n} frames)" for p, n in list(scan.frames.items())[:5])
        more = f" and {len(scan.frames) - 5} more" if len(scan.frames) > 5 else ""
        warnings.warn(f"{len(scan.frames)} multi-frame file(s), of which only the first frame is used: {listing}{more}",
                      MultiFrameWarning, stacklevel=2)
    bad = {p for p, _ in scan.bad}
    return [s for s in samples if s[0] not in bad], scan


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
    kept, scan = drop_unreadable(train + val, verify=strict if verify is None else verify, strict=strict)
    good = {p for p, _ in kept}
    train = [s for s in train if s[0] in good]
    val = [s for s in val if s[0] in good]
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
        intensity: see ``gray_effnet.intensity``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform=None, *, wide: bool = False,
                 intensity: str | Intensity = "full") -> None:
        self.intensity = parse_intensity(intensity)
        self.samples = list(samples)
        self.transform = transform
        self.wide = wide or self.intensity.kind != "full"

    def __len__(self) -> int:
        return len(self.samples)

    # Training loaders hand this dataset (index, seed) keys (``SampleSeeds``): each image's augmentation then
    # depends on (seed, epoch, index) alone, whichever worker, persistent or not, reads it.
    takes_sample_seeds = True

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int, str] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        try:
            img = read_gray(path, self.intensity, warn_frames=False)  # the scan reported multi-frame files once
        except Exception as e:  # noqa: BLE001 - any decoder error must skip the file, not end the run
            warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})", UnreadableImageWarning,
                          stacklevel=2)
            return None
        if self.wide and img.dtype == torch.uint8:
            img = img.float().div_(255)
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                # The CPU generator alone, restored after: the worker's (or the main process') stream stays as it
                # was. torch.manual_seed and fork_rng would cost ~60x more (they visit every device type).
                generator = torch.default_generator
                state = generator.get_state()
                generator.manual_seed(seed)
                try:
                    img = self.transform(img)
                finally:
                    generator.set_state(state)
        return img, label, path


class Batch(NamedTuple):
    """A collated batch; ``skipped`` names the files that could not be read."""

    images: Tensor
    targets: Tensor
    paths: list[str]
    skipped: int


def collate(items: list[tuple[Tensor, int, str] | None] | Batch) -> Batch:
    """Stack the readable samples; unreadable ones (``None``) are dropped and counted.

    A dataset whose ``__getitems__`` reads a whole batch at once (a pack) gives a ``Batch``: it passes as it is.
    """
    if isinstance(items, Batch):
        return items
    good = [it for it in items if it is not None]
    if not good:
        return Batch(torch.empty(0, 1, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long), [], len(items))
    images = torch.stack([it[0] for it in good])
    targets = torch.tensor([it[1] for it in good], dtype=torch.long)
    return Batch(images, targets, [it[2] for it in good], len(items) - len(good))


class SampleSeeds(torch.utils.data.Sampler):
    """Wrap a training sampler: yield ``(index, seed)`` with ``seed`` a function of (seed, epoch, index).

    The augmentation seeds then travel with the indices, so loader workers can persist across epochs (no
    re-forking each epoch) and a resumed run still sees what an uninterrupted one saw in the same epoch.
    """

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        # Distinct, well-mixed 63-bit seeds from the three integers (SplitMix-style constants).
        base = (self.seed * 0x9E3779B97F4A7C15 + self.epoch * 0xBF58476D1CE4E5B9) & (2**63 - 1)
        for index in self.sampler:
            yield index, (base ^ (index * 0x94D049BB133111EB)) & (2**63 - 1)


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
    """A loader whose order and augmentation depend only on (seed, epoch): call ``set_loader_epoch`` each epoch.

    Training uses a ``DistributedSampler`` for one process too, so single-process and ``torchrun`` runs
    share one code path. Evaluation gives each rank every ``world_size``-th sample, with no padding, so
    every image counts once; evaluate the unwrapped model, since DDP expects equal batch counts.
    """
    seeded = train and getattr(dataset, "takes_sample_seeds", False)
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        if seeded:
            sampler = SampleSeeds(sampler, seed)
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
        # Workers live for the whole run (forking them each epoch costs a pause per epoch) wherever their own
        # random state does not matter: evaluation, and datasets seeded per sample. Other training datasets get
        # fresh workers each epoch, seeded from (seed, epoch) by set_loader_epoch.
        persistent_workers=workers > 0 and (seeded or not train),
    )


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int = 0) -> None:
    """Make the shuffle and the augmentation seeds (per sample, or else the workers') a function of (seed, epoch)."""
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
