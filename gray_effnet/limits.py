"""Bounds on untrusted input: how many pixels a file may decode to, how deep metadata may nest, which names print.

The pixel limit is Pillow's own (``PIL.Image.MAX_IMAGE_PIXELS``, its decompression-bomb limit), so that there is one
number for every decoder: Pillow checks it when it opens a file, and ``gray_effnet`` checks it from the header of
every file before decoding, DICOM included. ``--max-pixels N`` (``set_max_pixels``) changes it for the process.

This module imports only ``errors`` and Pillow, so that checkpoint code can check metadata with it.
"""

import unicodedata
import warnings
from typing import Any

from PIL import Image

from .errors import DataError, InputError

__all__ = ["DEFAULT_MAX_PIXELS", "MAX_NESTING", "MAX_PIXELS_HELP", "check_pixels", "input_size_limit",
           "nesting_depth", "pixel_limit", "set_max_pixels", "unprintable"]

# Pillow's default (about a quarter of a gigapixel's worth of RGB bytes), taken before anyone changes it.
DEFAULT_MAX_PIXELS = int(Image.MAX_IMAGE_PIXELS or 1024 * 1024 * 1024 // 4 // 3)
MAX_NESTING = 32  # lists and objects inside one another in a checkpoint's metadata; this project writes 3
MAX_PIXELS_HELP = (
    "the most pixels one image may decode to (rows x columns x frames x samples for DICOM), checked from the "
    f"file's header before decoding; a larger file is skipped and named. Default: Pillow's limit, {DEFAULT_MAX_PIXELS}"
)


def pixel_limit(max_pixels: int | None = None) -> int:
    """``max_pixels`` if given, else the process's limit: Pillow's ``Image.MAX_IMAGE_PIXELS`` (or its default)."""
    if max_pixels is not None:
        return int(max_pixels)
    return int(Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)


def input_size_limit() -> int:
    """The most pixels (H x W) of the model's input size: a checkpoint's ``img_size``, ``--img-size``.

    The pixel limit, but never below Pillow's default: a lower ``--max-pixels`` is about the files read, and must
    not refuse a checkpoint that a default run wrote and loads."""
    return max(pixel_limit(), DEFAULT_MAX_PIXELS)


def set_max_pixels(max_pixels: int | None) -> int:
    """Make ``max_pixels`` (None: Pillow's default) the process's limit, for Pillow and for gray_effnet alike.

    Pillow warns (``DecompressionBombWarning``) between one and two times its limit and refuses above; this turns
    the warning into an error too, so that a file over the limit is refused by whichever check sees it first.

    Raises:
        InputError: a limit below 1.
    """
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
        raise InputError(f"--max-pixels must be a positive integer; got {max_pixels!r}")
    Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    return Image.MAX_IMAGE_PIXELS


def check_pixels(pixels: int, max_pixels: int | None = None, what: str = "") -> None:
    """Raise ``DataError`` when ``pixels`` (from a header) exceed the limit; ``what`` says how they were counted."""
    limit = pixel_limit(max_pixels)
    if pixels > limit:
        raise DataError(f"{pixels}{f' ({what})' if what else ''} pixels exceeds the limit of {limit} (--max-pixels)")


def nesting_depth(value: Any, stop: int = MAX_NESTING + 1) -> int:
    """How deep lists, tuples and dicts nest in ``value`` (a number or string is 0), counted up to ``stop``.

    Iterative, so that any depth is measured without a ``RecursionError``, and it stops at ``stop`` levels.
    """
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, (list, tuple)):
            continue
        deepest = max(deepest, depth + 1)
        if deepest >= stop:
            return deepest
        stack.extend((v, depth + 1) for v in item)
    return deepest


def unprintable(text: str) -> list[str]:
    """The characters of ``text`` that a terminal or a spreadsheet would act on rather than show.

    Control (Cc: ESC, newline, NUL), format (Cf: bidi overrides, zero-width) and surrogate (Cs: the bytes of a
    file name that are not UTF-8) characters.
    """
    return [c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Cs")]
