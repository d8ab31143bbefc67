"""DICOM files: stored values to physical units (the modality LUT), then to [0, 1] by the intensity mapping.

DICOM files (``.dcm``, or any name with the ``DICM`` magic at byte 128, as scanners and PACS exports write
them) are read with pydicom (``pip install 'gray_effnet[dicom]'``): stored values go to physical units through
the file's modality LUT, ``MONOCHROME1`` is inverted so that bright is high, and ``gray_effnet.intensity``
maps them to [0, 1].
"""

import math
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import DataError
from .intensity import Intensity, minmax, parse_intensity, to_unit_array
from .limits import check_pixels, pixel_limit

try:  # the optional [dicom] extra; without it a DICOM file is a bad file whose reason names the extra
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filereader import read_dataset, read_preamble
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
except ImportError:  # pragma: no cover - exercised only where pydicom is absent
    pydicom = None

__all__ = ["DICOM_CODECS_HINT", "DICOM_EXTENSIONS", "MultiFrameWarning", "probe_dicom", "read_dicom"]

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
DICOM_CODECS_HINT = "pip install 'gray_effnet[dicom-codecs]'"
_PIXEL_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # Float, Double Float and (plain) Pixel Data
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole data set is one zlib stream
_HEADER_BYTES = 4 * 2**20  # the most a deflated file's header (all before its pixel data) may inflate to


class MultiFrameWarning(UserWarning):
    """A multi-frame DICOM file (a volume, a cine loop) gave its first frame only."""


def _need_pydicom() -> None:
    if pydicom is None:
        raise DataError("reading DICOM needs pydicom: pip install 'gray_effnet[dicom]'")


def _dcmread(path: str | os.PathLike, **kwargs):
    # force: .dcm files written without the 128-byte preamble and magic (old ACR-NEMA style) still parse.
    return pydicom.dcmread(path, force=Path(path).suffix.lower() in DICOM_EXTENSIONS, **kwargs)


def _dicom_image_check(ds, has_pixels: bool | None = None) -> int:
    """Raise ``DataError`` for a DICOM file that holds no decodable image; return its number of frames.

    ``has_pixels``: whether pixel data follows a header read without it (default: whether ``ds`` holds it)."""
    if not ("PixelData" in ds if has_pixels is None else has_pixels):
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


def _header_pixels(ds, max_pixels: int | None) -> None:
    """Check Rows x Columns x NumberOfFrames x SamplesPerPixel (what pydicom holds in memory) against the limit."""
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
    except (TypeError, ValueError) as e:
        raise DataError(f"DICOM header with an unreadable image size ({e})") from None
    if min(rows, cols, frames, samples) < 1:
        raise DataError(f"DICOM header with {rows} rows, {cols} columns, {frames} frames, {samples} samples per "
                        "pixel: not an image")
    what = f"{rows}x{cols}" + (f"x{frames} frames" if frames > 1 else "") + (f"x{samples} samples" if samples > 1
                                                                             else "")
    check_pixels(rows * cols * frames * samples, max_pixels, what)


def _check_modality_lut(ds) -> None:
    """A RescaleSlope of 0 maps every pixel to one value; NaN or inf ones make every pixel NaN."""
    for key in ("RescaleSlope", "RescaleIntercept"):
        if key in ds:
            try:
                value = float(ds[key].value)
            except (TypeError, ValueError) as e:
                raise DataError(f"DICOM {key} {ds[key].value!r} is not a number ({e})") from None
            if not math.isfinite(value):
                raise DataError(f"DICOM {key} is {value}: the modality LUT would make every pixel non-finite")
            if key == "RescaleSlope" and value == 0:
                raise DataError("DICOM RescaleSlope is 0: the modality LUT would map every pixel to one value")


def _check_deflated(path: str | os.PathLike, max_pixels: int | None) -> tuple | None:
    """Bound what a deflated file inflates to, before pydicom inflates it whole in memory (it always does).

    The header is inflated up to ``_HEADER_BYTES`` and its image size checked against the pixel limit; then the rest
    is inflated and counted (not kept): a file that inflates to more than its header and pixels can hold is refused.

    Returns:
        For a deflated file, (its header as a Dataset, whether pixel data follows it); None at once for other
        transfer syntaxes: their data is on disk, and the header check bounds their decoders.
    """
    force = Path(path).suffix.lower() in DICOM_EXTENSIONS
    with open(path, "rb") as f:
        try:
            read_preamble(f, force)
            meta = pydicom.filereader._read_file_meta_info(f)  # public read_file_meta_info hides where the data starts
        except Exception:  # noqa: BLE001 - pydicom's full read then names what is wrong with the file
            return None
        if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
            return None
        inflater, pending = zlib.decompressobj(-zlib.MAX_WBITS), b""

        def inflate(limit: int) -> bytes:
            nonlocal pending
            out = []
            while limit > 0 and not inflater.eof:
                if not pending:
                    pending = f.read(2**16)
                    if not pending:
                        break
                chunk = inflater.decompress(pending, limit)
                pending = inflater.unconsumed_tail
                out.append(chunk)
                limit -= len(chunk)
            return b"".join(out)

        try:
            head = inflate(_HEADER_BYTES)
        except zlib.error as e:
            raise DataError(f"deflated DICOM data that does not inflate ({e})") from None
        at_pixels = []

        def stop(tag, vr, length) -> bool:
            if tag in _PIXEL_TAGS:
                at_pixels.append(tag)
            return bool(at_pixels)

        try:
            ds = read_dataset(DicomBytesIO(head), is_implicit_VR=False, is_little_endian=True, stop_when=stop)
        except Exception as e:  # noqa: BLE001 - a header cut at _HEADER_BYTES, or a malformed one
            raise DataError(f"deflated DICOM whose header cannot be read from its first {_HEADER_BYTES} inflated "
                            f"bytes ({type(e).__name__}: {e})") from None
        ds = pydicom.dataset.FileDataset(path, ds, file_meta=meta)
        if inflater.eof:
            return ds, bool(at_pixels)  # the whole data set was within _HEADER_BYTES
        if not at_pixels:
            raise DataError(f"deflated DICOM whose header inflates to more than {_HEADER_BYTES} bytes: not read")
        _header_pixels(ds, max_pixels)
        pixels = int(ds.get("Rows")) * int(ds.get("Columns")) * int(ds.get("NumberOfFrames") or 1) \
            * int(ds.get("SamplesPerPixel") or 1)
        bits = {0x7FE00008: 32, 0x7FE00009: 64}.get(at_pixels[0], int(ds.get("BitsAllocated") or 16))
        bound = 2 * _HEADER_BYTES + pixels * max(1, math.ceil(bits / 8))  # a header, pixels, trailing elements
        total = len(head)
        try:
            while not inflater.eof and total <= bound:
                chunk = inflate(min(2**20, bound + 1 - total))
                if not chunk:
                    break
                total += len(chunk)
        except zlib.error as e:
            raise DataError(f"deflated DICOM data that does not inflate ({e})") from None
        if total > bound:
            raise DataError(f"deflated DICOM data inflates to more than {bound} bytes, more than the "
                            f"{pixels} pixels its header declares can fill")
    return ds, True


def _read_header(path: str | os.PathLike, max_pixels: int | None, pixels: bool = True):
    """The file's header checked (pixel count, modality LUT, decoder), and its number of frames.

    With ``pixels`` the Dataset can give its pixels: deferred (read from disk when asked for), or for a deflated
    file, all inflated in memory by pydicom once ``_check_deflated`` has bounded it. Without, a deflated file gives
    the header that check read."""
    deflated = _check_deflated(path, max_pixels)
    has_pixels = None
    if deflated is not None and not pixels:
        ds, has_pixels = deflated
    else:
        ds = _dcmread(path, defer_size=None if deflated else "64 KB")
    frames = _dicom_image_check(ds, has_pixels)
    _header_pixels(ds, max_pixels)
    _check_modality_lut(ds)
    return ds, frames


def read_dicom(path: str | os.PathLike, intensity: str | Intensity = "full", warn_frames: bool = True,
               max_pixels: int | None = None) -> Tensor:
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
        max_pixels: the most pixels (rows x columns x frames x samples) the file may hold, checked from its header
            before any pixel is read (default: the process's limit, ``limits.pixel_limit``).

    Raises:
        DataError: no pydicom, no pixel data (an RT plan, a structured report), more pixels than the limit, a
            RescaleSlope of 0 or a non-finite slope or intercept, NaN or infinite values after the modality LUT,
            no decoder for a compressed transfer syntax (the message names the missing packages and the extra),
            truncated pixel data, or ``window`` on a file without a window.
    """
    _need_pydicom()
    intensity = parse_intensity(intensity)
    ds, frames = _read_header(path, max_pixels)
    try:
        stored = pixel_array(ds, index=0 if frames > 1 else None)
    except RuntimeError as e:  # an available plugin that cannot do this variant, e.g. Pillow with 12-bit JPEG
        tsyntax = ds.file_meta.TransferSyntaxUID
        raise DataError(f"{_missing_codec(tsyntax, get_decoder(tsyntax))} ({str(e).strip().splitlines()[-1]})") \
            from None
    _check_finite(stored, "stored pixel")
    if frames > 1 and warn_frames:
        warnings.warn(f"{path} has {frames} frames; using the first", MultiFrameWarning, stacklevel=2)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    if not photometric.startswith("MONOCHROME"):
        if intensity.dicom_only:
            raise DataError(f"intensity {intensity} needs physical units; this DICOM image is {photometric} colour")
        rgb = apply_color_lut(stored, ds) if photometric == "PALETTE COLOR" else stored
        gray = _luma(rgb)  # pydicom gives YBR as RGB already
        bits = 8 * rgb.dtype.itemsize if photometric == "PALETTE COLOR" else int(ds.get("BitsStored") or 8)
        unit = to_unit_array(gray, float(2**bits - 1), intensity)
        return torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None]
    if intensity.kind == "bits":
        unit = to_unit_array(stored, 0.0, intensity)  # a bit depth is about the stored values, before any LUT
    else:
        values = apply_modality_lut(stored, ds)  # physical units: HU for CT
        _check_finite(values, "pixel value after the modality LUT")
        if intensity.kind == "minmax":
            unit = minmax(values)
        elif intensity.kind == "range":
            unit = intensity.to_unit(values)
        elif intensity.kind == "full":
            lo, hi = apply_modality_lut(np.array(_representable(ds), dtype=np.float64), ds)
            lo, hi = min(lo, hi), max(lo, hi)
            unit = np.clip((values - lo) / (hi - lo), 0.0, 1.0) if hi > lo else minmax(values)
        else:  # window
            if "WindowCenter" not in ds and "VOILUTSequence" not in ds:
                raise DataError("intensity 'window': this DICOM file has no WindowCenter/WindowWidth or VOI LUT; "
                                "use --intensity range LO HI or minmax")
            shown = apply_voi_lut(values, ds)
            # pydicom scales a window to the output range of the stored bits; its ends are where the window
            # sends values far below and far above it.
            lo, hi = np.sort(apply_voi_lut(np.array([-1e12, 1e12]), ds).astype(np.float64))
            unit = np.clip((shown - lo) / (hi - lo), 0.0, 1.0) if hi > lo else minmax(shown)
    if photometric == "MONOCHROME1":  # white is low: invert, so that every image reaches the model bright-is-high
        unit = 1.0 - unit
    return torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None]



def _check_finite(a: np.ndarray, what: str) -> None:
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise DataError(f"DICOM image with {np.count_nonzero(~np.isfinite(a))} NaN or infinite {what}(s)")


def probe_dicom(path: str, verify: bool, max_pixels: int | None = None) -> tuple[str, int, int]:
    """(mode, frames, pixels of a frame) of a DICOM file from its header (pixel data deferred); ``verify`` decodes
    it too.

    The header checks are ``read_dicom``'s: pixel count against the limit, modality LUT, decoder."""
    _need_pydicom()
    max_pixels = pixel_limit(max_pixels)
    if verify:
        read_dicom(path, "minmax", warn_frames=False, max_pixels=max_pixels)
    ds, frames = _read_header(path, max_pixels, pixels=False)
    pixels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0)
    return f"DICOM {str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).strip()}", frames, pixels
