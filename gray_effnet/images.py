"""One image file as one gray channel, and the check of many files before training.

Batches leave the loader as uint8 wherever the files are 8-bit, 1 byte per pixel; the model normalises.
DICOM files are read by ``gray_effnet.dicom``.
"""

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .dicom import DICOM_EXTENSIONS, MultiFrameWarning, probe_dicom, read_dicom
from .errors import DataError
from .intensity import Intensity, parse_intensity, to_unit_array

__all__ = ["GRAY_MODES", "IMG_EXTENSIONS", "ScanResult", "UnreadableImageWarning", "drop_unreadable",
           "is_dicom_file", "is_image_file", "read_gray", "scan_images"]

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".pnm", ".ppm", ".pbm")
# PIL modes, and "DICOM <PhotometricInterpretation>" for DICOM files.
GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16B", "I;16L", "I;16N", "DICOM MONOCHROME1", "DICOM MONOCHROME2"}
_WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}  # and every DICOM file: they are read as float32


class UnreadableImageWarning(UserWarning):
    """An image that could not be read was skipped."""



def _decode(img: Image.Image, intensity: Intensity) -> Tensor:
    """A loaded PIL image -> (1, H, W): uint8 for 8-bit content, float32 in [0, 1] for deeper."""
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)  # phone and scanner JPEGs store rotation as an EXIF tag
    mode = img.mode
    if mode.startswith("I;16"):
        # Never convert('L'): Pillow clamps 16-bit values at 255 there (python-pillow/Pillow#3011).
        a = to_unit_array(np.array(img, dtype=np.uint16), 65535.0, intensity)
    elif mode == "I":
        a = np.array(img, dtype=np.int64)
        a = to_unit_array(a, 65535.0 if a.max(initial=0) <= 65535 else float(2**32 - 1), intensity)
    elif mode == "F":
        a = np.array(img, dtype=np.float32)
        wide_float = intensity.kind == "full" and a.max(initial=0) > 1  # floats beyond [0, 1]: stretch them
        a = to_unit_array(a, 1.0, Intensity("minmax") if wide_float else intensity)
    else:
        if mode != "L":
            img = img.convert("L")  # RGB, RGBA, P, LA, CMYK, 1: ITU-R 601-2 luma, alpha dropped
        a = np.array(img, dtype=np.uint8)  # a writable copy
        if intensity.kind == "minmax" or intensity.dicom_only:
            a = to_unit_array(a, 255.0, intensity)
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


def _probe(path: str, verify: bool) -> tuple[str | None, str, int]:
    """(mode, "", frames) of a readable file, (None, reason, 0) of a bad one."""
    try:
        if is_dicom_file(path):
            mode, frames = probe_dicom(path, verify)
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
