"""A second real gray data set for compare.py: patches of scikit-image's bundled textures, one class per image.

Unlike the digits (8x8 drawings, upscaled), these are natural gray images at their own resolution: three
textures (``brick``, ``grass``, ``gravel``), a tissue section (``immunohistochemistry``), a star field
(``hubble_deep_field``) and a retina fundus (``retina``), the colour ones as luma (ITU-R 601-2). From each, a
512x512 crop (the centre for the larger images; inside the fundus disc for ``retina``) is the class's source.

Brightness and contrast alone would tell most of these apart (a dark star field, a flat fundus), so by default
(``photometric="random"``) each patch's mean and standard deviation are set to values drawn at random for it
(mean 64 to 192, standard deviation 16 to 48, then rounded and clipped to 0..255): the classes differ by their
texture, not their exposure. ``photometric="none"`` keeps the source's values.

Training and validation patches come from DISJOINT column ranges of each source: training patches lie wholly in
the left ``train_fraction`` of the columns, validation patches wholly right of that plus a ``gap`` at least one
patch wide, so no source pixel is in both splits and no validation patch abuts a training one. Within its range,
each patch's top-left corner is drawn from ``numpy.random.default_rng([seed, class index, split])``; patches of
one split may overlap each other. The folder is written as ``train/CLASS/*.png`` and ``val/CLASS/*.png`` (so
``load_folder`` uses the given split), with ``textures.json`` recording the seed, the parameters, each source's
crop and every patch's box, and a ``.complete`` marker written last.

    python benchmarks/textures.py --output /tmp/textures                      # the defaults compare.py uses
    python benchmarks/textures.py --output /tmp/tex --patch 32 --n-train 100 --seed 1
    python benchmarks/compare.py --data textures ...                           # written once into the cache
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gray_effnet.cli import HelpFormatter
from gray_effnet.files import default_cache_dir

MARKER = ".complete"
RECORD = "textures.json"
SOURCE_SIZE = 512
PHOTOMETRIC = ("random", "none")
MEAN_RANGE, STD_RANGE = (64.0, 192.0), (16.0, 48.0)
IMAGES = ("brick", "grass", "gravel", "immunohistochemistry", "hubble_deep_field", "retina")


@dataclass(frozen=True)
class Params:
    """What defines a texture set: the same parameters give the same files, bit for bit."""

    images: tuple[str, ...] = IMAGES
    patch: int = 48  # side of a square patch, in source pixels
    n_train: int = 200  # patches per class
    n_val: int = 50
    train_fraction: float = 0.6  # training patches lie in the left 60% of the columns
    gap: int | None = None  # columns between the two ranges; default: one patch
    photometric: str = "random"  # or "none"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "images", tuple(self.images))
        if self.gap is None:
            object.__setattr__(self, "gap", self.patch)

    def ranges(self, width: int = SOURCE_SIZE) -> tuple[tuple[int, int], tuple[int, int]]:
        """The half-open column ranges ``[start, stop)`` that training and validation patches lie wholly in."""
        train_stop = int(self.train_fraction * width)
        return (0, train_stop), (train_stop + self.gap, width)

    def check(self) -> None:
        """Raise ValueError for parameters that cannot give two disjoint, non-empty splits."""
        unknown = [n for n in self.images if n not in SOURCES]
        if unknown or len(set(self.images)) < 2:
            raise ValueError(f"images: need 2 or more distinct names of {sorted(SOURCES)}; got {list(self.images)}")
        if not 8 <= self.patch <= SOURCE_SIZE // 4:
            raise ValueError(f"patch must be 8 to {SOURCE_SIZE // 4} pixels; got {self.patch}")
        if self.n_train < 1 or self.n_val < 1:
            raise ValueError(f"n_train and n_val must be at least 1; got {self.n_train}, {self.n_val}")
        if self.photometric not in PHOTOMETRIC:
            raise ValueError(f"photometric must be one of {PHOTOMETRIC}; got {self.photometric!r}")
        if self.gap < self.patch:
            raise ValueError(f"gap must be at least one patch ({self.patch}) wide; got {self.gap}")
        for name, (start, stop) in zip(("train", "val"), self.ranges()):
            if stop - start < self.patch:
                raise ValueError(f"the {name} columns [{start}, {stop}) are narrower than a patch ({self.patch}): "
                                 "change train_fraction, gap or patch")

    def key(self) -> str:
        """A short name for the cache folder: a hash of the parameters."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]


# -- the sources ---------------------------------------------------------------------------------------------
def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma of an (H, W, 3+) uint8 image, as uint8 (PIL's ``convert("L")``)."""
    return (rgb[..., :3] @ np.array([0.299, 0.587, 0.114])).round().clip(0, 255).astype(np.uint8)


def _centre(img: np.ndarray, size: int = SOURCE_SIZE) -> tuple[np.ndarray, list[int]]:
    top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
    return img[top:top + size, left:left + size], [top, left, size, size]


def _skimage(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("the texture data set needs scikit-image (from a checkout: pip install -e '.[bench]')") \
            from None
    img = np.asarray(getattr(skimage.data, name)())
    return luma(img) if img.ndim == 3 else img


# name -> how the 512x512 uint8 source is made (all of these ship with scikit-image; none needs a download)
SOURCES = {name: f"skimage.data.{name}()" for name in ("brick", "grass", "gravel")}
SOURCES.update({"immunohistochemistry": "luma of skimage.data.immunohistochemistry()",
                "hubble_deep_field": "luma of skimage.data.hubble_deep_field(), centre 512x512",
                "retina": "luma of skimage.data.retina(), centre 512x512 (inside the fundus disc)"})


def load_source(name: str) -> tuple[np.ndarray, list[int]]:
    """The class's (512, 512) uint8 source and its crop box ``[top, left, height, width]`` in the original."""
    img = _skimage(name)
    if img.dtype != np.uint8 or img.ndim != 2 or min(img.shape) < SOURCE_SIZE:
        raise ValueError(f"skimage.data.{name}: expected a gray uint8 image of {SOURCE_SIZE}+ pixels a side; "
                         f"got {img.dtype} {img.shape}")
    return _centre(img)


# -- the patches ---------------------------------------------------------------------------------------------
@dataclass
class Patch:
    split: str
    cls: str
    file: str
    box: list[int]  # [top, left, height, width] in the class's 512x512 source
    mean_std: list[float] | None = None  # the mean and std it was set to (photometric="random")


def boxes(params: Params, class_index: int, split: str, n: int, height: int = SOURCE_SIZE) -> list[list[int]]:
    """``n`` patch boxes wholly inside the split's column range, from their own seeded generator."""
    (start, stop) = params.ranges()[0 if split == "train" else 1]
    rng = np.random.default_rng([params.seed, class_index, 0 if split == "train" else 1])
    tops = rng.integers(0, height - params.patch + 1, n)
    lefts = rng.integers(start, stop - params.patch + 1, n)
    return [[int(t), int(x), params.patch, params.patch] for t, x in zip(tops, lefts)]


def restyle(patch: np.ndarray, mean: float, std: float) -> np.ndarray:
    """``patch`` with its mean and standard deviation set to ``mean`` and ``std`` (a flat patch stays flat)."""
    x = patch.astype(np.float64)
    x = (x - x.mean()) / max(x.std(), 1.0) * std + mean
    return x.round().clip(0, 255).astype(np.uint8)


@dataclass
class Record:
    params: dict
    sources: dict[str, dict] = field(default_factory=dict)
    patches: list[dict] = field(default_factory=list)


def _dumps(record: Record) -> str:
    """JSON with one patch a line: readable, and a tenth of the size of an indented dump."""
    patches = ",\n".join(f"  {json.dumps(p)}" for p in record.patches)
    return (f'{{\n "params": {json.dumps(record.params)},\n "sources": {json.dumps(record.sources)},\n'
            f' "patches": [\n{patches}\n ]\n}}\n')


def generate(root: str | os.PathLike, params: Params = Params()) -> Path:
    """Write the texture set into ``root`` once (``train/``, ``val/``, ``textures.json``); return ``root``.

    A folder with the marker is reused when it holds the same parameters and refused otherwise. The files are
    written into a sibling temporary folder, which is renamed to ``root`` when complete.

    Raises:
        ValueError: bad parameters, or ``root`` holds another set or other files.
    """
    params.check()
    root = Path(root)
    wanted = json.dumps(asdict(params), sort_keys=True)
    if (root / MARKER).is_file():
        if (root / MARKER).read_text() != wanted:
            raise ValueError(f"{root} holds another texture set ({(root / MARKER).read_text()}); use another folder")
        return root
    if root.exists() and any(root.iterdir()):
        raise ValueError(f"{root} exists and is not a complete texture set: use another folder, or delete it")
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # ours: the name carries this process's id
    record = Record(asdict(params))
    for c, name in enumerate(params.images):
        src, crop = load_source(name)
        record.sources[name] = {"how": SOURCES[name], "crop": crop}
        for split, n in (("train", params.n_train), ("val", params.n_val)):
            folder = tmp / split / name
            folder.mkdir(parents=True)
            styles = np.random.default_rng([params.seed, c, 0 if split == "train" else 1, 1]).uniform(
                (MEAN_RANGE[0], STD_RANGE[0]), (MEAN_RANGE[1], STD_RANGE[1]), (n, 2))
            for i, (top, left, h, w) in enumerate(boxes(params, c, split, n)):
                file = f"{split}/{name}/{i:04d}.png"
                pixels, style = src[top:top + h, left:left + w], None
                if params.photometric == "random":
                    style = [round(float(v), 4) for v in styles[i]]
                    pixels = restyle(pixels, *style)
                Image.fromarray(np.ascontiguousarray(pixels)).save(tmp / file)
                record.patches.append(asdict(Patch(split, name, file, [top, left, h, w], style)))
    (tmp / RECORD).write_text(_dumps(record))
    (tmp / MARKER).write_text(wanted)
    root.parent.mkdir(parents=True, exist_ok=True)
    if root.exists():
        root.rmdir()  # empty: checked above
    os.replace(tmp, root)
    return root


def prepare_textures(params: Params = Params(), cache_dir: str | os.PathLike | None = None) -> Path:
    """The texture set in the cache (``textures-<hash of the parameters>``), written on first use."""
    return generate(Path(cache_dir or default_cache_dir()) / f"textures-{params.key()}", params)


def read_params(root: str | os.PathLike) -> dict | None:
    """The parameters a texture folder was made with (None for another kind of folder)."""
    path = Path(root) / RECORD
    return json.loads(path.read_text())["params"] if path.is_file() else None


def get_args_parser() -> argparse.ArgumentParser:
    d = Params()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--output", default=None, help="the folder to write (default: the cache, as compare.py uses)")
    p.add_argument("--images", nargs="+", default=list(d.images), choices=sorted(SOURCES), help="one class each")
    p.add_argument("--patch", type=int, default=d.patch, help="side of a patch, in source pixels")
    p.add_argument("--n-train", type=int, default=d.n_train, help="training patches per class")
    p.add_argument("--n-val", type=int, default=d.n_val, help="validation patches per class")
    p.add_argument("--train-fraction", type=float, default=d.train_fraction,
                   help="training patches lie in this left fraction of each source's columns")
    p.add_argument("--gap", type=int, default=None, help="columns between the ranges (default and minimum: a patch)")
    p.add_argument("--photometric", default=d.photometric, choices=PHOTOMETRIC,
                   help="random: each patch's mean and std set at random, so exposure tells no class; none: as is")
    p.add_argument("--seed", type=int, default=d.seed)
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    args = get_args_parser().parse_args(argv)
    params = Params(images=tuple(args.images), patch=args.patch, n_train=args.n_train, n_val=args.n_val,
                    train_fraction=args.train_fraction, gap=args.gap, photometric=args.photometric, seed=args.seed)
    try:
        root = generate(args.output, params) if args.output else prepare_textures(params)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{root}: {len(params.images)} classes, {params.n_train} train / {params.n_val} val patches of "
          f"{params.patch}x{params.patch} each; {RECORD} records the boxes")
    return root


if __name__ == "__main__":
    main()
