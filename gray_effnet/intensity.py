"""How pixel values map to the model's [0, 1] input: the ``--intensity`` spec, parsed once, saved in checkpoints.

The canonical string forms (what ``str()`` gives and what a checkpoint stores under ``"intensity"``):

* ``"full"``: divide by the file's own full scale (255 for 8-bit, 65535 for 16-bit PNG and TIFF; for DICOM,
  the range its stored bits can hold, taken through the modality LUT).
* ``"minmax"``: stretch each image to its own min..max.
* ``"12"`` (any bit depth 1..32): divide the stored values by ``2**N - 1``.
* ``"window"``: DICOM only: the file's own WindowCenter/WindowWidth or VOI LUT, as a viewer first shows it.
* ``"range:-1024:3071"``: DICOM only: a fixed physical range (Hounsfield units for CT) to [0, 1], clipped.
  The one that intensity windows (the ``window`` and ``wso`` adapters) are defined on.

On the command line ``range`` takes its bounds as two more words, ``--intensity range -1024 3071``, or in the
canonical form ``--intensity range:-1024:3071``; ``parse_intensity_args`` accepts both.

This module imports only ``errors`` and numpy, so that checkpoint code can validate metadata with it.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import DataError, InputError

__all__ = ["INTENSITY_HELP", "KINDS", "WINDOWS_HELP", "Intensity", "minmax", "parse_intensity", "parse_intensity_args",
           "parse_windows", "to_unit_array"]

KINDS = ("full", "minmax", "bits", "window", "range")
INTENSITY_HELP = (
    "how pixel values map to [0, 1]: 'full' divides by the file's full scale (65535 for 16-bit; for DICOM the "
    "range its stored bits hold, in physical units), 'minmax' stretches each image to its own min..max, a number "
    "N divides by 2**N - 1 (e.g. 12 for 12-bit data in 16-bit files); DICOM only: 'window' applies the file's "
    "WindowCenter/Width (VOI LUT), 'range LO HI' maps physical values LO..HI (HU for CT, e.g. range -1024 3071) "
    "to 0..1, clipped, and is what --windows needs. Default: 'full', or the checkpoint's with --evaluate/predict"
)

WINDOWS_HELP = (
    "intensity windows CENTER:WIDTH in physical units, one per stem channel, for --adapter window or wso, e.g. "
    "CT brain, subdural, bone: 40:80 80:200 600:2800. Needs --intensity range LO HI. A negative center reads as an "
    "option to argparse, so give the windows in one word then: --windows=-600:1500,40:80,600:2800"
)


@dataclass(frozen=True)
class Intensity:
    """A parsed intensity mapping; build it with ``parse_intensity``.

    Attributes:
        kind: one of ``KINDS``.
        bits: the bit depth when ``kind == "bits"``.
        low: the physical value mapped to 0 when ``kind == "range"``.
        high: the physical value mapped to 1 when ``kind == "range"``.
    """

    kind: str
    bits: int | None = None
    low: float | None = None
    high: float | None = None

    def __str__(self) -> str:
        if self.kind == "bits":
            return str(self.bits)
        if self.kind == "range":
            return f"range:{_num(self.low)}:{_num(self.high)}"
        return self.kind

    @property
    def dicom_only(self) -> bool:
        """``window`` and ``range`` need the physical units (or the window) that only DICOM files carry."""
        return self.kind in ("window", "range")

    def to_unit(self, physical: np.ndarray | float) -> np.ndarray:
        """Map physical values to [0, 1] (clipped); only for ``range``."""
        if self.kind != "range":
            raise InputError(f"only a 'range' intensity maps physical values to [0, 1]; this one is {self}")
        return np.clip((np.asarray(physical, dtype=np.float64) - self.low) / (self.high - self.low), 0.0, 1.0)


def _num(v: float) -> str:
    """-1024.0 -> '-1024', 0.5 -> '0.5': the shortest form that reads back to the same float."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def _float(text: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise InputError(f"intensity {spec!r}: {text!r} is not a finite number; expected e.g. 'range:-1024:3071'")
    return v


def parse_intensity(spec: "str | Intensity") -> Intensity:
    """Parse an intensity spec in its canonical string form (see the module docstring).

    Raises:
        InputError: anything else, with the accepted forms named.

    Example:
        >>> str(parse_intensity("range:-1024:3071.5"))
        'range:-1024:3071.5'
        >>> parse_intensity("12").bits
        12
    """
    if isinstance(spec, Intensity):
        return spec
    if not isinstance(spec, str):
        raise InputError(f"intensity must be a string such as 'full' or 'range:-1024:3071'; got {type(spec).__name__}")
    s = spec.strip()
    if s in ("full", "minmax", "window"):
        return Intensity(s)
    if s.isdigit():
        bits = int(s)
        if not 1 <= bits <= 32:
            raise InputError(f"intensity bit depth must be 1..32; got {spec!r}")
        return Intensity("bits", bits=bits)
    if s.startswith("range"):
        parts = s.split(":")
        if len(parts) != 3 or parts[0] != "range":
            raise InputError(f"intensity {spec!r}: a range is written 'range:LO:HI', e.g. 'range:-1024:3071'")
        low, high = _float(parts[1], spec), _float(parts[2], spec)
        if not low < high:
            raise InputError(f"intensity {spec!r}: the range's low end must be below its high end")
        return Intensity("range", low=low, high=high)
    raise InputError(
        f"unknown intensity {spec!r}; expected 'full', 'minmax', a bit depth 1..32, 'window' or 'range:LO:HI'"
    )


def parse_intensity_args(words: Sequence[str] | str | None) -> Intensity | None:
    """The ``--intensity`` option's words (``nargs="+"``): ``["range", "-1024", "3071"]`` or ``["12"]``.

    None (the option not given) stays None, so that a caller can fall back to a checkpoint's mapping.
    """
    if words is None:
        return None
    if isinstance(words, str):
        words = [words]
    words = list(words)
    if words and words[0] == "range" and len(words) == 3:
        return parse_intensity(f"range:{words[1]}:{words[2]}")
    if len(words) != 1:
        raise InputError(f"--intensity {' '.join(words)}: expected one word, or 'range LO HI' (e.g. range -1024 3071)")
    return parse_intensity(words[0])


def parse_windows(words: Sequence[str]) -> list[list[float]]:
    """``["40:80", "80:200", "600:2800"]`` -> ``[[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]]``.

    Each window is ``CENTER:WIDTH`` with a positive width; a word may hold several, separated by commas
    (``-600:1500,40:80``: the one-word form that a negative center needs on the command line). How many windows
    an adapter needs is its own check.
    """
    out = []
    for word in (w for text in words for w in str(text).split(",")):
        parts = str(word).split(":")
        if len(parts) != 2:
            raise InputError(f"window {word!r}: expected CENTER:WIDTH, e.g. 40:80 (brain) or 600:2800 (bone)")
        center, width = _float(parts[0], word), _float(parts[1], word)
        if width <= 0:
            raise InputError(f"window {word!r}: the width must be positive")
        out.append([center, width])
    return out


def minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def to_unit_array(a: np.ndarray, full_scale: float, intensity: Intensity) -> np.ndarray:
    if intensity.dicom_only:
        raise DataError(f"intensity {intensity} needs DICOM files (physical units or a window); this is not one")
    if intensity.kind == "minmax":
        return minmax(a)
    scale = float(2**intensity.bits - 1) if intensity.kind == "bits" else full_scale
    return np.clip(a.astype(np.float32) / scale, 0.0, 1.0)
