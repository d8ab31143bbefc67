"""A folder of synthetic X-ray-like PNGs in two class folders, 8- or 16-bit, written once and reused.

The images are ``benchmarks/pack.py``'s ``xray_like`` (a soft body, two darker lungs, rib-like stripes, noise;
class ``opacity`` adds a bright round spot in one lung). Each image draws from its own seed ``(seed, index)``,
so the folder is the same whatever ``--workers``. A ``.complete`` marker, written last, records the settings:
a folder with the marker is reused, and one made with other settings is refused rather than mixed.

    python benchmarks/synthetic.py --output /tmp/xray16 --n-images 2048 --size 512 --bits 16
"""

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

import numpy as np
from _common import HelpFormatter
from pack import xray_like
from PIL import Image

CLASSES = ("clear", "opacity")
MARKER = ".complete"


def describe(n: int, size: int, bits: int, seed: int) -> str:
    """The marker's text: what the folder holds."""
    return f"{n} images {size}x{size} {bits}-bit seed {seed}\n"


def _write_one(root: Path, i: int, size: int, bits: int, seed: int) -> None:
    label = i % 2
    img = xray_like(np.random.default_rng([seed, i]), size, label)
    if bits == 8:
        img = (img >> 8).astype(np.uint8)  # the top byte: the same picture, 256 levels
    Image.fromarray(img).save(root / CLASSES[label] / f"{i:05d}.png")


def generate(root: str | os.PathLike, n: int, size: int, bits: int = 16, seed: int = 0,
             workers: int | None = None) -> Path:
    """Write ``n`` PNGs of ``size`` x ``size`` into ``root/clear`` and ``root/opacity`` once; return ``root``.

    Args:
        root: the folder (created).
        n: images in all, alternating between the two classes.
        size: side of the square images.
        bits: 8 (mode ``L``) or 16 (mode ``I;16``).
        seed: the set's seed; image ``i`` draws from ``(seed, i)``.
        workers: processes that draw and write (default: the CPU count).

    Raises:
        ValueError: bad arguments, or ``root`` holds a complete set made with other settings.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16; got {bits}")
    if n < 2 or size < 8:
        raise ValueError(f"need at least 2 images of at least 8x8; got {n} of {size}x{size}")
    root = Path(root)
    marker, wanted = root / MARKER, describe(n, size, bits, seed)
    if marker.is_file():
        if marker.read_text() != wanted:
            raise ValueError(f"{root} holds another synthetic set ({marker.read_text().strip()}); "
                             f"wanted {wanted.strip()}: use another folder")
        return root
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    workers = max(1, min(workers or os.cpu_count() or 1, n))
    if workers == 1:
        for i in range(n):
            _write_one(root, i, size, bits, seed)
    else:  # fork: the workers need numpy and PIL only, already imported here
        ctx = get_context("fork") if "fork" in get_all_start_methods() else None
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            list(pool.map(partial(_write_one, root, size=size, bits=bits, seed=seed), range(n), chunksize=16))
    marker.write_text(wanted)
    return root


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--output", required=True, help="the folder to write (reused when it holds the same set)")
    p.add_argument("--n-images", type=int, default=512, help="images in all, half of each class")
    p.add_argument("--size", type=int, default=512, help="side of the square images")
    p.add_argument("--bits", type=int, default=16, choices=(8, 16), help="bit depth of the PNGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="processes (default: the CPU count)")
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    start = time.perf_counter()
    try:
        root = generate(args.output, args.n_images, args.size, bits=args.bits, seed=args.seed, workers=args.workers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{root}: {(root / MARKER).read_text().strip()} ({time.perf_counter() - start:.1f}s)")
