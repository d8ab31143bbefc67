"""Datasets and loaders: gray images as (1, H, W) tensors, collated batches, per-sample seeds, DDP sampling."""

import math
import warnings
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .cache import ImageCache
from .images import UnreadableImageWarning, read_gray
from .intensity import Intensity, parse_intensity
from .limits import pixel_limit, set_max_pixels

__all__ = ["Batch", "GrayImageFolder", "SampleSeeds", "collate", "make_loader", "remap_target", "set_loader_epoch"]


class GrayImageFolder(Dataset):
    """(path, target) samples read as (1, H, W) gray tensors; an unreadable file gives ``None``.

    Args:
        samples: (path, target) pairs: a class index, or a (K,) float32 tensor of findings (1, 0, NaN).
        transform: applied to each (1, H, W) tensor.
        wide: return float32 in [0, 1] for every image (set when any file is deeper than 8 bit, so that a
            batch has one dtype); otherwise 8-bit files stay uint8.
        intensity: see ``gray_effnet.intensity``.
        max_pixels: the most pixels a file may decode to (default: the process's limit when the dataset is made).
        pixels: each sample's pixel count from its header (the scan's), which lets ``attach_caches`` give the
            dataset an ``ImageCache`` (``cache``): an image is then decoded once, and read from memory after.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform=None, *, wide: bool = False,
                 intensity: str | Intensity = "full", max_pixels: int | None = None,
                 pixels: Sequence[int] | None = None) -> None:
        self.intensity = parse_intensity(intensity)
        self.samples = list(samples)
        self.transform = transform
        self.wide = wide or self.intensity.kind != "full"
        self.max_pixels = pixel_limit(max_pixels)
        self.pixels = None if pixels is None else [int(n) for n in pixels]
        if self.pixels is not None and len(self.pixels) != len(self.samples):
            raise ValueError(f"{len(self.pixels)} pixel counts for {len(self.samples)} samples")
        self.cache: ImageCache | None = None

    def cache_bytes(self) -> list[int] | None:
        """The bytes each sample's image takes before its transform (uint8, or float32 if ``wide``), if known."""
        if self.pixels is None:
            return None
        return [n * (4 if self.wide else 1) for n in self.pixels]

    def __setstate__(self, state: dict) -> None:
        # Unpickled in a loader worker that was spawned, not forked: it has Pillow's default limit, not the
        # one --max-pixels gave the parent, so the dataset sets it there.
        self.__dict__.update(state)
        set_max_pixels(self.max_pixels)

    def __len__(self) -> int:
        return len(self.samples)

    # Training loaders hand this dataset (index, seed) keys (``SampleSeeds``): each image's augmentation then
    # depends on (seed, epoch, index) alone, whichever worker, persistent or not, reads it.
    takes_sample_seeds = True

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, int | Tensor, str] | None:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        img = None if self.cache is None else self.cache.get(index)
        if img is None:
            try:
                # The scan reported multi-frame files once.
                img = read_gray(path, self.intensity, warn_frames=False, max_pixels=self.max_pixels)
            except Exception as e:  # noqa: BLE001 - any decoder error must skip the file, not end the run
                warnings.warn(f"skipping unreadable image {path} ({type(e).__name__}: {e})", UnreadableImageWarning,
                              stacklevel=2)
                return None
            if self.wide and img.dtype == torch.uint8:
                img = img.float().div_(255)
            if self.cache is not None:
                self.cache.put(index, img)
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                # The CPU generator alone, restored after: the worker's (or the main process') stream stays as it
                # was. torch.manual_seed and fork_rng would cost ~60x more (they visit every device type).
                generator = torch.default_generator
                state = generator.get_state()
                generator.manual_seed(seed)
                try:
                    img = self.transform(img)
                finally:
                    generator.set_state(state)
        return img, label, path


class Batch(NamedTuple):
    """A collated batch; ``skipped`` counts the files that could not be read.

    Shape:
        images: (B, 1, H, W).
        targets: (B,) int64 class indices, or (B, K) float32 findings (1, 0, NaN = not known: leave out).
    """

    images: Tensor
    targets: Tensor
    paths: list[str]
    skipped: int


def collate(items: list[tuple[Tensor, int | Tensor, str] | None] | Batch) -> Batch:
    """Stack the readable samples; unreadable ones (``None``) are dropped and counted.

    Integer targets (class indices) become a (B,) int64 tensor; tensor targets (multi-label findings, (K,)) a
    (B, K) float32 one. A dataset whose ``__getitems__`` reads a whole batch at once (a pack) gives a ``Batch``: it
    passes as it is. A batch with no readable sample has empty targets (its size is 0 whatever the task).
    """
    if isinstance(items, Batch):
        return items
    good = [it for it in items if it is not None]
    if not good:
        return Batch(torch.empty(0, 1, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long), [], len(items))
    images = torch.stack([it[0] for it in good])
    if isinstance(good[0][1], Tensor):
        targets = torch.stack([it[1] for it in good]).float()  # (B, K); NaN entries stay NaN
    else:
        targets = torch.tensor([it[1] for it in good], dtype=torch.long)
    return Batch(images, targets, [it[2] for it in good], len(items) - len(good))


def remap_target(target: int | Tensor, label_map: Sequence[int], num_classes: int) -> int | Tensor:
    """A target counted in other classes (a checkpoint's).

    A class index ``y`` (an int, or an integer tensor of them) becomes ``label_map[y]``. A float (..., K) tensor of
    findings becomes (..., num_classes), finding ``k`` in column ``label_map[k]``, and NaN (not known) in the columns
    of the findings the data has no label for.
    """
    if isinstance(target, Tensor) and target.is_floating_point():
        out = target.new_full((*target.shape[:-1], num_classes), float("nan"))
        out[..., list(label_map)] = target
        return out
    if isinstance(target, Tensor):
        return torch.as_tensor(label_map, dtype=torch.long)[target]
    return label_map[target]


class SampleSeeds(torch.utils.data.Sampler):
    """Wrap a training sampler: yield ``(index, seed)`` with ``seed`` a function of (seed, epoch, index).

    The augmentation seeds then travel with the indices, so loader workers can persist across epochs (no
    re-forking each epoch) and a resumed run still sees what an uninterrupted one saw in the same epoch.
    """

    def __init__(self, sampler: DistributedSampler, seed: int) -> None:
        self.sampler, self.seed, self.epoch = sampler, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        # Distinct, well-mixed 63-bit seeds from the three integers (SplitMix-style constants).
        base = (self.seed * 0x9E3779B97F4A7C15 + self.epoch * 0xBF58476D1CE4E5B9) & (2**63 - 1)
        for index in self.sampler:
            yield index, (base ^ (index * 0x94D049BB133111EB)) & (2**63 - 1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    workers: int = 2,
    pin_memory: bool = False,
    seed: int = 0,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A loader whose order and augmentation depend only on (seed, epoch): call ``set_loader_epoch`` each epoch.

    Training uses a ``DistributedSampler`` for one process too, so single-process and ``torchrun`` runs
    share one code path. Evaluation gives each rank every ``world_size``-th sample, with no padding, so
    every image counts once; evaluate the unwrapped model, since DDP expects equal batch counts.
    """
    seeded = train and getattr(dataset, "takes_sample_seeds", False)
    if train:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        if seeded:
            sampler = SampleSeeds(sampler, seed)
    else:
        sampler = range(rank, len(dataset), world_size)
    per_rank = math.ceil(len(dataset) / world_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=train and per_rank > batch_size,  # a batch of 1 breaks BatchNorm in training
        generator=torch.Generator().manual_seed(seed),
        # Workers live for the whole run (forking them each epoch costs a pause per epoch) wherever their own
        # random state does not matter: evaluation, and datasets seeded per sample. Other training datasets get
        # fresh workers each epoch, seeded from (seed, epoch) by set_loader_epoch.
        persistent_workers=workers > 0 and (seeded or not train),
    )


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int = 0) -> None:
    """Make the shuffle and the augmentation seeds (per sample, or else the workers') a function of (seed, epoch)."""
    loader.sampler.set_epoch(epoch)
    loader.generator = torch.Generator().manual_seed(seed * 100003 + epoch)
