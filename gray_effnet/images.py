"""One image file as one gray channel, and the check of many files before training.

Batches leave the loader as uint8 wherever the files are 8-bit, 1 byte per pixel; the model normalises.
DICOM files are read by ``gray_effnet.dicom``.
"""

import os
import re
import stat
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from .dicom import DICOM_EXTENSIONS, MultiFrameWarning, probe_dicom, read_dicom
from .errors import DataError
from .intensity import Intensity, parse_intensity, to_unit_array
from .limits import check_pixels, pixel_limit

__all__ = ["GRAY_MODES", "IMG_EXTENSIONS", "ScanResult", "UnreadableImageWarning", "drop_unreadable",
           "file_kind", "is_dicom_file", "is_image_file", "open_image", "read_gray", "scan_images"]

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
        if not np.isfinite(a).all():  # NaN would reach the loss; inf would make every other pixel 0 after minmax
            raise DataError(f"float image with {np.count_nonzero(~np.isfinite(a))} NaN or infinite pixel value(s)")
        wide_float = intensity.kind == "full" and a.max(initial=0) > 1  # floats beyond [0, 1]: stretch them
        a = to_unit_array(a, 1.0, Intensity("minmax") if wide_float else intensity)
    else:
        if mode != "L":
            img = img.convert("L")  # RGB, RGBA, P, LA, CMYK, 1: ITU-R 601-2 luma, alpha dropped
        a = np.array(img, dtype=np.uint8)  # a writable copy
        if intensity.kind == "minmax" or intensity.dicom_only:
            a = to_unit_array(a, 255.0, intensity)
    return torch.from_numpy(np.ascontiguousarray(a))[None]


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, from its ``st_mode``: ``FIFO``, ``socket``, ``folder``, ..."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"), (stat.S_ISREG, "regular file")):
        if test(mode):
            return name
    return "unknown kind"


def _regular(path: str | os.PathLike) -> None:
    """Raise ``DataError`` unless ``path`` is a regular file: a FIFO or a device is never opened (it would block)."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise DataError(f"not a regular file ({file_kind(mode)})")


def _has_dicom_magic(path: str | os.PathLike) -> bool:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        # O_NONBLOCK: a file swapped for a FIFO since the stat above does not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A ``.dcm`` (``.dicom``, ``.dic``) name, or the ``DICM`` magic at byte 128 under any name."""
    suffix = _suffix(path)
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
    return _suffix(name) in IMG_EXTENSIONS or is_dicom_file(path)


def _suffix(path: str | os.PathLike) -> str:
    """``Path(path).suffix.lower()`` without building a Path (read once per image per epoch)."""
    return os.path.splitext(os.fspath(path))[1].lower()


_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def open_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """``Image.open``, refusing (``DataError``) a file whose header gives more pixels than the limit, before decoding.

    The size is checked here against ``max_pixels`` (default: the process's limit, ``limits.pixel_limit``); Pillow
    checks it too, against its own ``Image.MAX_IMAGE_PIXELS``, and its ``DecompressionBombWarning`` (an error once
    ``limits.set_max_pixels`` has run) and ``DecompressionBombError`` become the same ``DataError``.
    """
    _regular(path)
    try:
        img = Image.open(path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        found = _BOMB_PIXELS.search(str(e))
        if found:
            check_pixels(int(found.group(1)), max_pixels)
        # Under ``max_pixels`` but over Pillow's own limit, which Pillow enforces anyway.
        raise DataError(f"{e} (Pillow's Image.MAX_IMAGE_PIXELS, which --max-pixels sets)") from None
    try:
        w, h = img.size
        check_pixels(w * h, max_pixels, f"{w}x{h}")
    except BaseException:
        img.close()
        raise
    return img


def read_gray(path: str | os.PathLike, intensity: str | Intensity = "full", warn_frames: bool = True,
              max_pixels: int | None = None) -> Tensor:
    """Read an image file as one gray channel.

    Args:
        path: any format Pillow reads, or DICOM (see ``read_dicom``); a multi-frame file gives its first frame.
        intensity: see ``gray_effnet.intensity``; ``full`` keeps 8-bit files as uint8.
        warn_frames: for DICOM, warn that a multi-frame file gave its first frame.
        max_pixels: the most pixels the file may decode to, checked from its header before decoding (default:
            the process's limit, ``limits.pixel_limit``).

    Returns:
        (1, H, W): uint8 for 8-bit files (colour ones converted to luminance), float32 in [0, 1] for
        16-bit, float and DICOM files, which keep their full precision.

    Raises:
        DataError: not a regular file, more pixels than the limit, a float image with NaN or infinite values, and
            the DICOM reader's errors (``read_dicom``). Decoders raise their own errors for malformed files.
    """
    intensity = parse_intensity(intensity)
    if is_dicom_file(path):
        _regular(path)
        return read_dicom(path, intensity, warn_frames=warn_frames, max_pixels=max_pixels)
    with open_image(path, max_pixels) as img:
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
    pixels: dict[str, int] = field(default_factory=dict)  # readable files -> pixels of the (first) frame, by header

    @property
    def converted(self) -> int:
        """Files converted from colour (or palette) to luminance."""
        return sum(n for m, n in self.modes.items() if m not in GRAY_MODES)


def _probe(path: str, verify: bool, max_pixels: int | None = None) -> tuple[str | None, str, int, int]:
    """(mode, "", frames, pixels of a frame) of a readable file, (None, reason, 0, 0) of a bad one."""
    try:
        if is_dicom_file(path):
            _regular(path)
            mode, frames, pixels = probe_dicom(path, verify, max_pixels=max_pixels)
            return mode, "", frames, pixels
        with open_image(path, max_pixels) as img:
            if verify:
                img.seek(0)
                img.load()
                _decode(img, Intensity("full"))  # what training will do to it: a NaN in a float image shows here
            return img.mode, "", 1, img.width * img.height
    except Exception as e:  # noqa: BLE001 - malformed files raise all kinds (KeyError, struct.error, ...)
        return None, f"{type(e).__name__}: {e}", 0, 0


SCAN_CHUNK = 64  # files probed per thread task


def scan_images(paths: Sequence[str], verify: bool = False, threads: int = 8,
                max_pixels: int | None = None) -> ScanResult:
    """Open every file's header (and decode it fully if ``verify``) to find bad files before training.

    A header check catches empty, non-image and most corrupt files, and files with more pixels than the limit
    (``max_pixels``, default: the process's), at little cost; truncated pixel data and NaN in float images only
    show when decoding, which ``verify`` (``--strict-data``) does for every file up front.
    """
    max_pixels = pixel_limit(max_pixels)  # resolved once, here: the threads below see the same number
    # Threads for slow disks; chunks of files per task, since a task per file made submitting them cost more than
    # probing (0.25-0.5 s against 0.19 s for 5,000 cached PNGs).
    chunks = [paths[i:i + SCAN_CHUNK] for i in range(0, len(paths), SCAN_CHUNK)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = [r for chunk in pool.map(lambda c: [_probe(p, verify, max_pixels) for p in c], chunks) for r in chunk]
    bad = [(p, why) for p, (mode, why, _, _) in zip(paths, results) if mode is None]
    modes = Counter(mode for mode, _, _, _ in results if mode is not None)
    frames = {p: n for p, (_, _, n, _) in zip(paths, results) if n > 1}
    pixels = {p: n for p, (mode, _, _, n) in zip(paths, results) if mode is not None}
    wide = any(m in _WIDE_MODES or m.startswith("DICOM") for m in modes)
    return ScanResult(bad, modes, wide, frames, pixels)


def drop_unreadable(
    samples: Sequence[tuple[str, int]], verify: bool = False, strict: bool = False, max_pixels: int | None = None
) -> tuple[list[tuple[str, int]], ScanResult]:
    """Scan ``samples`` (``scan_images``), report the bad files, and return the readable ones.

    Every bad file is named in an ``UnreadableImageWarning`` with its reason, and the multi-frame files in one
    ``MultiFrameWarning`` (their first frame is used), so that training and prediction report alike.

    Args:
        samples: (path, label) pairs.
        verify: decode every file (slow, but it finds truncated pixel data before the first step).
        strict: raise ``DataError`` listing every bad file instead of skipping them.
        max_pixels: the most pixels a file may decode to (default: the process's limit).
    """
    scan = scan_images([p for p, _ in samples], verify=verify, max_pixels=max_pixels)
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
