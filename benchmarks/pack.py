"""Training from a pack against training from the files: 16-bit X-ray-like PNGs, decoded every epoch or once.

* ``files``: ``GrayImageFolder`` + ``build_transforms(train=True)`` + ``make_loader(--workers)``: each epoch
  decodes every 16-bit PNG, resizes and augments it on the CPU, one image at a time.
* ``pack``: ``python -m gray_effnet pack`` once (timed), then ``PackedDataset`` + ``make_loader(workers=0)``
  and ``BatchAugment`` on the training device, a batch at a time.

One run measures, interleaved over ``--rounds`` (candidates rotated each round): a training epoch of each
(``train_one_epoch``, ``tf_efficientnet_lite0`` with the ``broadcast`` stem, random init) and each loader
alone (iterate + augment, batches moved to the device, no model). Reported: files/pack epoch time (goal
>= 3x) and the packed loader's images/s over the model's training images/s (goal >= 10x: the loader must not
be what a pack-fed run waits for).

The generated set (cached, reused while its ``.complete`` marker is there): smooth anatomy-like shapes (a
bright elliptical "body", two darker "lungs", noise), 16-bit; class 1 adds a bright round opacity in one lung.

Example:
    python benchmarks/pack.py                                         # 300 images 1024x1024 -> 64x64
    python benchmarks/pack.py --n-images 24 --source-size 256 --rounds 1 --csv /tmp/pack.csv   # a smoke test
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import (
    Candidate,
    HelpFormatter,
    Spread,
    default_output,
    environment,
    interleave,
    report,
    resolve_device,
    synchronize,
)
from PIL import Image
from tqdm import tqdm

from gray_effnet import GrayEfficientNet
from gray_effnet.augment import BatchAugment, build_transforms
from gray_effnet.data import GrayImageFolder, make_loader
from gray_effnet.engine import train_one_epoch
from gray_effnet.folders import default_cache_dir, load_folder
from gray_effnet.pack import PackedDataset, write_pack

EPOCH_GOAL = 3.0  # files epoch seconds over pack epoch seconds
LOADER_GOAL = 10.0  # packed loader images/s over the model's training images/s
TABLE_COLUMNS = ["candidate", "images_per_sec", "seconds", "ratio", "goal", "met"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--n-images", type=int, default=300, help="images to generate")
    p.add_argument("--source-size", type=int, default=1024, help="side of the generated square 16-bit PNGs")
    p.add_argument("--img-size", nargs=2, type=int, default=[64, 64], metavar=("H", "W"), help="training size")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the files pipeline")
    p.add_argument("--pack-workers", type=int, default=None, help="decoding threads of the pack (default: all)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each times every candidate once")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--crop-scale", type=float, default=0.8)
    p.add_argument("--hflip", type=float, default=0.5)
    p.add_argument("--rotate", type=float, default=0.0)
    p.add_argument("--cache", default=None, help="where the generated set and its pack go (default: the cache dir)")
    p.add_argument("--csv", default=None, help="default: benchmarks/results/pack-<device>.csv")
    p.add_argument("--md", default=None, help="default: the CSV path with .md")
    return p


# -- the data ---------------------------------------------------------------------------------------
def xray_like(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """One 16-bit image: a soft body ellipse, two darker lungs, ribs-like stripes, noise; class 1 an opacity."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    cx, cy = 0.5 + rng.normal(0, 0.03), 0.5 + rng.normal(0, 0.03)
    body = np.exp(-(((xx - cx) / 0.38) ** 2 + ((yy - cy) / 0.45) ** 2) ** 2)
    img = 0.15 + 0.6 * body
    for side in (-1, 1):
        lx, ly = cx + side * (0.15 + rng.normal(0, 0.01)), cy - 0.05 + rng.normal(0, 0.02)
        img -= 0.35 * np.exp(-(((xx - lx) / 0.1) ** 2 + ((yy - ly) / 0.22) ** 2) ** 2)
    img += 0.03 * np.sin(yy * 60 + rng.uniform(0, 6)) * body
    if label == 1:
        ox, oy = cx + rng.choice([-1, 1]) * 0.15, cy + rng.uniform(-0.15, 0.1)
        img += 0.25 * np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / 0.004))
    img += rng.normal(0, 0.01, img.shape)
    return np.clip(img * 65535, 0, 65535).astype(np.uint16)


def generate(root: Path, n: int, size: int, seed: int = 0) -> Path:
    """Write ``n`` 16-bit PNGs in two class folders once; reused while ``.complete`` is there."""
    marker = root / ".complete"
    if marker.is_file():
        return root
    rng = np.random.default_rng(seed)
    for i in tqdm(range(n), desc=f"writing {n} 16-bit PNGs to {root}", leave=False, dynamic_ncols=True):
        label = i % 2
        folder = root / ("opacity" if label else "clear")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(xray_like(rng, size, label)).save(folder / f"{i:05d}.png")
    marker.write_text(f"{n} images {size}x{size} 16-bit\n")
    return root


# -- the candidates ---------------------------------------------------------------------------------
class Epochs:
    """Training epochs of one model from one loader; each call is the next epoch."""

    def __init__(self, model, loader, device, augment, channels_last: bool):
        self.model, self.loader, self.device, self.augment = model, loader, device, augment
        self.channels_last = channels_last
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.criterion = torch.nn.CrossEntropyLoss()
        self.epoch = 0
        self.img_per_s: list[float] = []

    def __call__(self) -> None:
        self.loader.sampler.set_epoch(self.epoch)
        if self.augment is not None:
            self.augment.set_epoch(self.epoch)
        stats = train_one_epoch(self.model, self.loader, optimizer=self.optimizer, scheduler=None,
                                criterion=self.criterion, device=self.device, epoch=self.epoch, progress=False,
                                channels_last=self.channels_last, augment=self.augment)
        self.img_per_s.append(stats["img_per_s"])
        self.epoch += 1


def loader_only(loader, device, augment):
    """An epoch of the loader alone: each batch to the device (and augmented there), no model."""
    state = {"epoch": 0}

    def step() -> None:
        loader.sampler.set_epoch(state["epoch"])
        if augment is not None:
            augment.set_epoch(state["epoch"])
        for batch in loader:
            images = batch.images.to(device, non_blocking=True)
            if augment is not None:
                augment(images)
        state["epoch"] += 1

    return step


def main(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    size = tuple(args.img_size)
    cache = Path(args.cache) if args.cache else default_cache_dir()
    src = generate(cache / f"bench-xray16-{args.n_images}-{args.source_size}", args.n_images, args.source_size)
    start = time.perf_counter()
    pack = write_pack(src, cache / f"bench-xray16-{args.n_images}-{args.source_size}-pack-{size[0]}x{size[1]}", size,
                      workers=args.pack_workers, progress=True)
    pack_seconds = time.perf_counter() - start

    folder = load_folder(src)
    transform = build_transforms(size, train=True, crop_scale=args.crop_scale, hflip=args.hflip, rotate=args.rotate)
    pin = device.type == "cuda"
    files_loader = make_loader(GrayImageFolder(folder.train, transform, wide=folder.scan.wide), args.batch_size,
                               train=True, workers=args.workers, pin_memory=pin)
    pack_loader = make_loader(PackedDataset(pack, "train"), args.batch_size, train=True, workers=0, pin_memory=pin)
    augment = BatchAugment(size, crop_scale=args.crop_scale, hflip=args.hflip, rotate=args.rotate)

    def model():
        torch.manual_seed(0)
        m = GrayEfficientNet("tf_efficientnet_lite0", adapter="broadcast", num_classes=2).to(device)
        return m.to(memory_format=torch.channels_last) if args.channels_last else m

    epochs = {"files_epoch": Epochs(model(), files_loader, device, None, args.channels_last),
              "pack_epoch": Epochs(model(), pack_loader, device, augment, args.channels_last)}
    n = len(folder.train)
    candidates = [Candidate(name, ep, n) for name, ep in epochs.items()]
    candidates += [Candidate("files_loader", loader_only(files_loader, device, None), n),
                   Candidate("pack_loader", loader_only(pack_loader, device, augment), n)]
    for cand in candidates:  # warm-up: worker start, allocator, the augmentation's first call
        cand.step()
    synchronize(device)
    interleave(candidates, args.rounds, 1, device, desc="rounds", memory=False)

    by = {c.name: c for c in candidates}
    epoch_ratio = Spread.of([f / p for f, p in zip(by["files_epoch"].seconds, by["pack_epoch"].seconds)]).median
    model_ips = Spread.of(epochs["pack_epoch"].img_per_s[1:]).median  # train_one_epoch's own timing, warm-up out
    loader_ratio = by["pack_loader"].samples_per_sec / model_ips
    env = environment(device, "float32", model="tf_efficientnet_lite0", adapter="broadcast",
                      batch_size=args.batch_size, img_size=f"{size[0]}x{size[1]}", n_images=args.n_images,
                      train_images=n, source=f"{args.source_size}x{args.source_size} 16-bit PNG",
                      pack_dtype=pack.dtype, pack_mb=round(pack.nbytes / 2**20, 2), pack_seconds=round(pack_seconds, 2),
                      workers=args.workers, channels_last=args.channels_last, rounds=args.rounds)
    ratios = {"pack_epoch": (epoch_ratio, EPOCH_GOAL), "pack_loader": (loader_ratio, LOADER_GOAL)}
    rows = []
    for cand in candidates:
        ratio, goal = ratios.get(cand.name, (None, None))
        rows.append({"candidate": cand.name, "images_per_sec": cand.samples_per_sec,
                     "seconds": cand.step_spread.median, "ratio": ratio, "goal": goal,
                     "met": None if goal is None else ("yes" if ratio >= goal else "NO"), **env})
    rows.append({"candidate": "model_train", "images_per_sec": model_ips, "seconds": n / model_ips, "ratio": None,
                 "goal": None, "met": None, **env})
    return rows


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    rows = main(args)
    csv_path = args.csv or default_output(f"pack-{rows[0]['device']}", ".csv")
    md_path = args.md or str(csv_path).removesuffix(".csv") + ".md"
    notes = ["pack_epoch ratio: files epoch seconds / pack epoch seconds, median over rounds. pack_loader ratio: "
             "the packed loader's images/s (with BatchAugment) / the model's training images/s from the pack "
             "(model_train, train_one_epoch's own timing). Loaders alone move each batch to the device.",
             f"packing took {rows[0]['pack_seconds']}s once ({rows[0]['pack_mb']} MB, {rows[0]['pack_dtype']})."]
    r = rows[0]
    header = (f"{r['train_images']} train images ({r['source']}) -> {r['img_size']}  batch {r['batch_size']}  "
              f"workers {r['workers']}  {r['device_name']}  torch {r['torch']}")
    report(rows, TABLE_COLUMNS, csv_path, "Training from a pack vs from 16-bit PNG files", notes, md_path, header)
