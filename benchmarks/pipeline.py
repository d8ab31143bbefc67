"""Input pipelines for gray images: the common torchvision route against gray_effnet's, on one folder.

* ``torchvision``: what a typical user writes for a 3-channel ImageNet model. ``datasets.ImageFolder``
  (whose loader opens every file as RGB), ``Grayscale(3)``, ``Resize``, ``ToTensor``, ``Normalize``:
  float32, 3 channels, normalised on the CPU.
* ``gray_effnet``: ``GrayImageFolder`` + ``build_transforms(train=False)`` + ``make_loader(train=False)``:
  uint8, 1 channel; the model converts to float and normalises on the device.

Both go through a ``DataLoader`` with the same batch size and workers, and both end with the batch on the
device: pinned memory and ``non_blocking`` copies for both on CUDA (the PyTorch ImageNet example does so
too), and for ``gray_effnet`` also ``GrayEfficientNet.prepare_input`` (uint8 -> float in [0, 1]), so that
both stop at a float tensor the network can take. The stem's normalisation is timed by ``adapters.py``.

An epoch over the folder is one timed step, workers' start-up included (``make_loader`` does not keep
workers between epochs); ``steady_images_per_sec`` leaves out the first batch. The two pipelines alternate
over ``--repeats`` rounds; ``speed_ratio`` is the median over rounds of images/s relative to torchvision.
``getitem_ms`` and ``collate_ms`` time one image's ``__getitem__`` and one batch's collate in this
process with one thread, as a DataLoader worker runs them.

Example:
    python benchmarks/pipeline.py --num-images 512 --batch-size 32 --repeats 3
    python benchmarks/pipeline.py --data /path/to/imagefolder --workers 8 --device cuda
"""

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable
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
    warm_up,
)
from PIL import Image
from timm.models import get_pretrained_cfg
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import datasets
from torchvision import transforms as T
from tqdm import tqdm

from gray_effnet import GrayEfficientNet
from gray_effnet.augment import build_transforms
from gray_effnet.data import GrayImageFolder, collate, make_loader
from gray_effnet.folders import default_cache_dir, find_images
from gray_effnet.images import scan_images

SPEED_TARGET = 2.0  # gray_effnet images/s over torchvision's
BYTES_TARGET = 10.0  # torchvision bytes per image over gray_effnet's
TABLE_COLUMNS = ["pipeline", "images_per_sec", "speed_ratio", "speed_iqr", "steady_images_per_sec",
                 "steady_speed_ratio", "batch_dtype", "bytes_per_image", "bytes_ratio", "getitem_ms", "collate_ms"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--data", default=None, help="an ImageFolder tree; default: generated gray PNGs (cached)")
    parser.add_argument("--num-images", type=int, default=2048, help="images to generate when --data is not given")
    parser.add_argument("--src-size", nargs=2, type=int, default=[256, 256], metavar=("H", "W"),
                        help="size of the generated images")
    parser.add_argument("--classes", type=int, default=4, help="class folders to generate")
    parser.add_argument("--img-size", nargs=2, type=int, default=[224, 224], metavar=("H", "W"),
                        help="size the pipelines resize to")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model whose mean/std to use")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each runs an epoch of every pipeline")
    parser.add_argument("--warmup", type=int, default=1, help="untimed epochs per pipeline")
    parser.add_argument("--profile-items", type=int, default=64, help="images for getitem_ms and the profile")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of each dataset's __getitem__ "
                        "(printed anyway when the speed target is missed)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of the main process")
    parser.add_argument("--csv", default=None, help="default: benchmarks/results/pipeline-<device>.csv")
    parser.add_argument("--md", default=None, help="default: the CSV path with .md")
    return parser


# -- the data ---------------------------------------------------------------------------------------
def generate_images(root: Path, n: int, size: tuple[int, int], classes: int, seed: int = 0) -> Path:
    """Write ``n`` 8-bit gray PNGs in ImageFolder layout once; reused while ``.complete`` is there.

    Smooth random shading plus mild noise: photo-like, so the PNGs compress about as real scans do
    (pure noise would not compress and would make decoding unrealistically slow).
    """
    marker = root / ".complete"
    if marker.is_file():
        return root
    rng = np.random.default_rng(seed)
    h, w = size
    for i in tqdm(range(n), desc=f"writing {n} PNGs to {root}", leave=False, dynamic_ncols=True):
        coarse = Image.fromarray(rng.normal(size=(9, 9)).astype(np.float32), mode="F")
        a = np.asarray(coarse.resize((w, h), Image.Resampling.BICUBIC))
        a = (a - a.min()) / max(float(np.ptp(a)), 1e-6) * 200 + 28 + rng.normal(0, 4, (h, w))
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), mode="L").save(folder / f"{i:06d}.png")
    marker.write_text(f"{n} images {h}x{w}\n")
    return root


# -- the two pipelines ------------------------------------------------------------------------------
def torchvision_pipeline(root: Path, img_size: tuple[int, int], mean, std, args, pin: bool) -> DataLoader:
    """The common route: RGB files through Grayscale(3), Resize, ToTensor and Normalize."""
    transform = T.Compose([
        T.Grayscale(num_output_channels=3),
        T.Resize(img_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers, pin_memory=pin)


def gray_effnet_pipeline(root: Path, img_size: tuple[int, int], args, pin: bool) -> DataLoader:
    """Ours: 1-channel uint8 tensors, resized as tensors, normalised later in the model."""
    samples = find_images(root).samples
    # As train.py does: when any file is deeper than 8 bit, every image is float so that batches stack.
    wide = scan_images([p for p, _ in samples]).wide
    dataset = GrayImageFolder(samples, transform=build_transforms(img_size, train=False), wide=wide)
    return make_loader(dataset, args.batch_size, train=False, workers=args.workers, pin_memory=pin)


class Epoch:
    """One pass over a loader that ends with each batch on the device; keeps what it saw."""

    def __init__(self, loader: DataLoader, to_device: Callable[[Tensor, Tensor], object], device: torch.device):
        self.loader, self.to_device, self.device = loader, to_device, device
        self.steady: list[float] = []  # images/s after the first batch, one per epoch
        self.bytes_per_image = 0
        self.batch_dtype = ""
        self.batch_shape: tuple[int, ...] = ()

    def __call__(self) -> None:
        first_at, first_n, n = 0.0, 0, 0
        for i, (images, targets, *_) in enumerate(self.loader):
            self.to_device(images, targets)
            n += len(images)
            if i == 0:
                # What crosses to the device per image: 4 bytes x 3 channels, or 1 byte x 1 channel.
                self.bytes_per_image = images.element_size() * images[0].numel()
                self.batch_dtype = str(images.dtype).removeprefix("torch.")
                self.batch_shape = tuple(images.shape[1:])
                synchronize(self.device)
                first_at, first_n = time.perf_counter(), n
        synchronize(self.device)
        if n > first_n:
            self.steady.append((n - first_n) / (time.perf_counter() - first_at))


def per_item_ms(dataset: Dataset, collate_fn: Callable, n: int, batch_size: int) -> tuple[float, float]:
    """Median ms of one ``__getitem__``, and ms of one collate of ``batch_size`` items, with one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run with one torch thread
    try:
        times, items = [], []
        for i in range(min(n, len(dataset))):
            t0 = time.perf_counter()
            items.append(dataset[i])
            times.append(time.perf_counter() - t0)
        batch = [items[i % len(items)] for i in range(batch_size)]
        t0 = time.perf_counter()
        for _ in range(5):
            collate_fn(batch)
        collate = (time.perf_counter() - t0) / 5
    finally:
        torch.set_num_threads(threads)
    return Spread.of(times).median * 1e3, collate * 1e3


def profile_getitem(name: str, dataset: Dataset, n: int, top: int = 18) -> str:
    """cProfile of ``n`` calls of ``dataset[i]`` with one thread, the ``top`` entries by own time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    prof = cProfile.Profile()
    try:
        prof.enable()
        for i in range(min(n, len(dataset))):
            dataset[i]
        prof.disable()
    finally:
        torch.set_num_threads(threads)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return f"--- {name}: {min(n, len(dataset))} x __getitem__, by own time ---\n{out.getvalue()}"


def main(args: argparse.Namespace) -> tuple[list[dict], str]:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    img_size = tuple(args.img_size)
    if args.data:
        root = Path(args.data)
    else:
        h, w = args.src_size
        root = generate_images(default_cache_dir() / f"bench-gray-png-{args.num_images}-{h}x{w}", args.num_images,
                               (h, w), args.classes)
    cfg = get_pretrained_cfg(args.model)
    mean, std = cfg.mean, cfg.std
    pin = device.type == "cuda"

    model = GrayEfficientNet(args.model, adapter="fold", num_classes=2).to(device)  # only for prepare_input

    def tv_to_device(images: Tensor, targets: Tensor) -> None:
        images.to(device, non_blocking=True)
        targets.to(device, non_blocking=True)

    def ge_to_device(images: Tensor, targets: Tensor) -> None:
        model.prepare_input(images.to(device, non_blocking=True))  # uint8 -> float in [0, 1], as forward does
        targets.to(device, non_blocking=True)

    tv_loader = torchvision_pipeline(root, img_size, mean, std, args, pin)
    ge_loader = gray_effnet_pipeline(root, img_size, args, pin)
    if len(tv_loader.dataset) != len(ge_loader.dataset):
        raise SystemExit(f"the pipelines see {len(tv_loader.dataset)} and {len(ge_loader.dataset)} images in {root}")
    n_images = len(ge_loader.dataset)
    epochs = {"torchvision": Epoch(tv_loader, tv_to_device, device), "gray_effnet": Epoch(ge_loader, ge_to_device,
                                                                                          device)}
    candidates = [Candidate(name, epoch, n_images) for name, epoch in epochs.items()]
    warm_up(candidates, args.warmup, device, desc="warm-up epochs")
    for epoch in epochs.values():
        epoch.steady.clear()
    interleave(candidates, args.repeats, 1, device, desc="rounds", memory=False)

    per_item = {
        "torchvision": per_item_ms(tv_loader.dataset, default_collate, args.profile_items, args.batch_size),
        "gray_effnet": per_item_ms(ge_loader.dataset, collate, args.profile_items, args.batch_size),
    }
    files = [p for p, _ in find_images(root).samples]
    file_kb = float(np.mean([Path(p).stat().st_size for p in files[:512]])) / 1024
    with Image.open(files[0]) as im:
        src = f"{im.height}x{im.width} {im.mode}"
    env = environment(device, "float32", model=args.model, batch_size=args.batch_size,
                      img_size=f"{img_size[0]}x{img_size[1]}", src_images=src, file_kb=round(file_kb, 1),
                      num_images=n_images, workers=args.workers, pin_memory=pin, data=str(root))
    base = candidates[0]
    rows = []
    for cand in candidates:
        ep = epochs[cand.name]
        ratios = Spread.of(cand.ratios_to(base))
        rows.append({
            "pipeline": cand.name,
            "images_per_sec": cand.samples_per_sec,
            "steady_images_per_sec": Spread.of(ep.steady).median,
            "epoch_s": cand.step_spread.median,
            "speed_ratio": ratios.median,
            "speed_q1": ratios.q1,
            "speed_q3": ratios.q3,
            "speed_min": ratios.min,
            "speed_max": ratios.max,
            "speed_iqr": f"{ratios.q1:.3f}-{ratios.q3:.3f}",
            "steady_speed_ratio": Spread.of([a / b for a, b in zip(ep.steady, epochs["torchvision"].steady)]).median,
            "bytes_per_image": ep.bytes_per_image,
            "bytes_ratio": epochs["torchvision"].bytes_per_image / ep.bytes_per_image,
            "batch_dtype": ep.batch_dtype,
            "batch_shape": "x".join(map(str, ep.batch_shape)),
            "getitem_ms": per_item[cand.name][0],
            "collate_ms": per_item[cand.name][1],
            "rounds": args.repeats,
            **env,
            "dtype": ep.batch_dtype,
        })

    ours = rows[-1]
    speed_ok, bytes_ok = ours["speed_ratio"] >= SPEED_TARGET, ours["bytes_ratio"] >= BYTES_TARGET
    verdict = (
        f"speed: gray_effnet at {ours['speed_ratio']:.2f}x torchvision's images/s (IQR {ours['speed_iqr']}); "
        f"target >= {SPEED_TARGET:g}x: {'met' if speed_ok else 'MISSED'} (without worker start-up: "
        f"{ours['steady_speed_ratio']:.2f}x)\n"
        f"bytes: {ours['bytes_ratio']:.1f}x fewer bytes per image to the device ({ours['bytes_per_image']} vs "
        f"{rows[0]['bytes_per_image']}); target >= {BYTES_TARGET:g}x: {'met' if bytes_ok else 'MISSED'}"
    )
    if args.profile or not speed_ok:
        verdict += "\n\n" + "\n".join(
            profile_getitem(name, loader.dataset, args.profile_items)
            for name, loader in (("torchvision", tv_loader), ("gray_effnet", ge_loader))
        )
    return rows, verdict


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    rows, verdict = main(args)
    csv_path = args.csv or default_output(f"pipeline-{rows[0]['device']}", ".csv")
    md_path = args.md or str(csv_path).removesuffix(".csv") + ".md"
    notes = [
        "speed_ratio: median over rounds of images/s relative to torchvision in the same round; speed_iqr: its "
        "quartiles. bytes_ratio: torchvision's bytes per image over this pipeline's. images_per_sec counts "
        "whole epochs, worker start-up included; steady_images_per_sec leaves out the first batch.",
    ]
    r = rows[0]
    header = (f"{r['num_images']} images ({r['src_images']}, {r['file_kb']} KB) -> {r['img_size']}  batch "
              f"{r['batch_size']}  workers {r['workers']}  {r['device_name']}  torch {r['torch']}")
    report(rows, TABLE_COLUMNS, csv_path, "Input pipelines: torchvision Grayscale(3) vs gray_effnet",
           notes + [verdict.split("\n\n")[0].replace("\n", "  \n")], md_path, header)
    print(f"\n{verdict}")
