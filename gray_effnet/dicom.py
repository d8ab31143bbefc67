"""DICOM files: stored values to physical units (the modality LUT), then to [0, 1] by the intensity mapping.

DICOM files (``.dcm``, or any name with the ``DICM`` magic at byte 128, as scanners and PACS exports write
them) are read with pydicom (``pip install 'gray_effnet[dicom]'``): stored values go to physical units through
the file's modality LUT, ``MONOCHROME1`` is inverted so that bright is high, and ``gray_effnet.intensity``
maps them to [0, 1].
"""

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import DataError
from .intensity import Intensity, minmax, parse_intensity, to_unit_array

try:  # the optional [dicom] extra; without it a DICOM file is a bad file whose reason names the extra
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
except ImportError:  # pragma: no cover - exercised only where pydicom is absent
    pydicom = None

__all__ = ["DICOM_CODECS_HINT", "DICOM_EXTENSIONS", "MultiFrameWarning", "probe_dicom", "read_dicom"]

DICOM_EXTENSIONS = (".dcm", ".dicom", ".dic")
DICOM_CODECS_HINT = "pip install 'gray_effnet[dicom-codecs]'"


class MultiFrameWarning(UserWarning):
    """A multi-frame DICOM file (a volume, a cine loop) gave its first frame only."""


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
        unit = to_unit_array(gray, float(2**bits - 1), intensity)
        return torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32))[None]
    if intensity.kind == "bits":
        unit = to_unit_array(stored, 0.0, intensity)  # a bit depth is about the stored values, before any LUT
    else:
        values = apply_modality_lut(stored, ds)  # physical units: HU for CT
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



def probe_dicom(path: str, verify: bool) -> tuple[str, int]:
    """(mode, frames) of a DICOM file from its header (pixel data deferred); ``verify`` decodes it too."""
    _need_pydicom()
    if verify:
        read_dicom(path, "minmax", warn_frames=False)
    ds = _dcmread(path, defer_size="64 KB")  # reads the header, leaves the pixel data on disk
    frames = _dicom_image_check(ds)
    return f"DICOM {str(ds.get('PhotometricInterpretation', 'MONOCHROME2')).strip()}", frames
