"""Decoded images kept in memory between epochs: each file is decoded once a run, not once an epoch.

Decoding is most of what reading an image file costs (``benchmarks/loop.py``'s ``decode_ms`` against its
``loader_ms``), and an epoch decodes every file again to crop it differently. ``ImageCache`` keeps each
image as it left the decoder, before any augmentation, so a cached run's batches are exactly an uncached run's
(tf.data's ``Dataset.cache()``; timm has no such cache). It holds the dataset's images up to a budget of bytes,
in the dataset's order, each that still fits; the rest are read from their files every epoch, as before. Each
training process has its own (under ``torchrun`` an image is decoded once in each process that reads it).

Room is laid out up front, from each image's pixel count (the scan read it from the header), in one arena: a
file that decodes to another size than its header said (it changed since the scan) is simply not kept. The arena
is allocated, not touched: memory is only used as images arrive. With loader workers it is allocated in shared
memory before they start (and then committed at once, as torch does), so what one worker decodes every worker
reads; a slot is written once, by whichever process reads that image first, and read only in later
epochs, after the batches that wrote it went through the loader's queues.

``--ram-cache`` (``parse_budget``, ``attach_caches``) sets the budget: ``auto`` is a quarter of the memory
available at the start, shared by the training processes of the machine; ``off`` or ``0`` turns it off.
"""

import math
import os
from argparse import ArgumentTypeError
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["ALIGN", "AUTO_SHARE", "RAM_CACHE_HELP", "ImageCache", "attach_caches", "available_memory",
           "parse_budget"]

ALIGN = 64  # bytes: every slot starts on a cache line, so a float32 view of it is always aligned
AUTO_SHARE = 0.25  # of the memory available at the start, for --ram-cache auto
_DTYPES = (None, torch.uint8, torch.float32)  # the code kept in ``filled``: 0 is an empty slot
GIB = 1024 ** 3
RAM_CACHE_HELP = ("keep decoded images in memory after their first read, up to GIB (shared by the processes of a "
                  "machine); auto (the default): a quarter of the available memory; off: decode every file every epoch")


class ImageCache:
    """Room for the decoded (1, H, W) images of a dataset's samples, within ``budget`` bytes.

    Args:
        nbytes: the bytes each sample decodes to, in the dataset's order (0: unknown or not read here, never kept).
        budget: the most bytes the arena may take; samples are given room in order, each that still fits.
        shared: allocate it in shared memory, for loader workers (torch commits shared memory when it allocates
            it, so that a full /dev/shm fails here rather than as a bus error in a worker).

    Example:
        >>> cache = ImageCache([4, 4, 4], budget=1 << 20)
        >>> cache.put(1, torch.ones(1, 2, 2, dtype=torch.uint8))
        True
        >>> cache.get(1).sum().item(), cache.get(0)
        (4, None)
    """

    def __init__(self, nbytes: Sequence[int], budget: int, *, shared: bool = False) -> None:
        self.nbytes, self.offsets, end = [], [], 0  # slot i is arena[offsets[i]:offsets[i] + nbytes[i]]
        for n in nbytes:
            n = max(int(n), 0)
            size = math.ceil(n / ALIGN) * ALIGN
            if end + size > budget:  # an empty slot, never filled: a smaller image later may still fit
                n = size = 0
            self.nbytes.append(n)
            self.offsets.append(end)
            end += size
        if shared:
            self.arena = _shared_bytes(end)
        else:
            self.arena = torch.empty(end, dtype=torch.uint8)  # pages are used only as images arrive
        self.shapes = torch.zeros(len(self.nbytes), 2, dtype=torch.int64)  # (H, W) of each kept image
        self.filled = torch.zeros(len(self.nbytes), dtype=torch.uint8)  # index into _DTYPES
        if shared:
            self.shapes.share_memory_()
            self.filled.share_memory_()

    @property
    def slots(self) -> int:
        """The samples that have room."""
        return sum(1 for n in self.nbytes if n)

    @property
    def reserved(self) -> int:
        """Bytes of the arena (allocated, used only as images arrive)."""
        return self.arena.numel()

    def kept(self) -> int:
        """The images kept so far."""
        return int(self.filled.count_nonzero())

    def get(self, index: int) -> Tensor | None:
        """A copy of the image kept for ``index`` (a transform may change its input in place), or ``None``."""
        if not 0 <= index < len(self.nbytes) or not (code := int(self.filled[index])):
            return None
        start = self.offsets[index]
        h, w = self.shapes[index].tolist()
        return self.arena[start:start + self.nbytes[index]].view(_DTYPES[code]).view(1, h, w).clone()

    def put(self, index: int, img: Tensor) -> bool:
        """Keep ``img`` ((1, H, W), uint8 or float32) for ``index`` if it has room of exactly its size."""
        if (not 0 <= index < len(self.nbytes) or not self.nbytes[index] or self.filled[index]
                or img.dtype not in _DTYPES or img.dim() != 3 or img.shape[0] != 1
                or img.numel() * img.element_size() != self.nbytes[index]):
            return False
        start = self.offsets[index]
        self.arena[start:start + self.nbytes[index]].view(img.dtype).copy_(img.reshape(-1))
        self.shapes[index] = torch.tensor(img.shape[1:])
        self.filled[index] = _DTYPES.index(img.dtype)  # last: a reader sees the flag only after the pixels
        return True


def _shared_bytes(n: int) -> Tensor:
    """A uint8 tensor of ``n`` bytes in shared memory, allocated there by torch's own route (what
    ``share_memory_()`` calls; on a private tensor it would first copy, and so touch, every page)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))


# A container's memory limit and use: cgroup v2, then v1 (whose "no limit" is a huge number, not "max").
CGROUP_MEMORY = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # absent, or "max" (no limit)
        return None


def available_memory() -> int | None:
    """Bytes of memory available now, or ``None``: Linux's ``MemAvailable`` (elsewhere, free physical pages), and
    no more than what is left under this process's cgroup limit (a container's memory limit)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_path, usage_path in CGROUP_MEMORY:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None and limit < free + usage:
            return max(limit - usage, 0)
    return free


def parse_budget(text: str) -> float | None:
    """``--ram-cache``: ``auto`` (``None``), ``off`` (0), or GiB (a number, 0 or more)."""
    text = text.strip().lower()
    if text == "auto":
        return None
    if text == "off":
        return 0.0
    try:
        gib = float(text)
    except ValueError:
        gib = -1.0
    if not math.isfinite(gib) or gib < 0:
        raise ArgumentTypeError(f"must be auto, off or a number of GiB (0 or more); got {text!r}")
    return gib


def _shared_memory_room() -> int | None:
    """Free bytes of /dev/shm, where torch puts shared tensors on Linux (a container's is often 64 MB)."""
    try:
        st = os.statvfs("/dev/shm")
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def attach_caches(loaders: Sequence, gib: float | None, *, processes: int = 1, epochs: int = 2) -> str:
    """Give each loader's dataset that can keep its images (``cache_bytes()``) an ``ImageCache``, within one budget.

    Call it before the loaders' first epoch: their worker processes must start with the cache in place. Each
    dataset gets room only for the indices its loader reads in this process (a training loader's
    ``DistributedSampler`` reads them all over the epochs; an evaluation loader's ``range`` its rank's share).

    Args:
        loaders: the run's loaders, the training one first (it is read every epoch; validation too).
        gib: ``parse_budget``'s value: ``None`` for auto (``AUTO_SHARE`` of the available memory), else GiB.
        processes: training processes on this machine, which share the budget (and /dev/shm).
        epochs: the epochs the run has left: with one, every image is read once and nothing is kept.

    Returns:
        The line to log: what is kept, of how much, and why.
    """
    datasets = [loader.dataset for loader in loaders]
    if not any(hasattr(d, "cache_bytes") for d in datasets):
        return "ram cache: not needed (no image is decoded from a file)"
    wanted = [d.cache_bytes() if hasattr(d, "cache_bytes") else None for d in datasets]
    if not any(wanted):
        return "ram cache: none (no image sizes known)"
    if gib == 0:
        return "ram cache: off (asked for): every epoch decodes every file"
    if epochs < 2:
        return "ram cache: not needed (one epoch left: each image is read once)"
    if gib is None:
        free = available_memory()
        if free is None:
            return "ram cache: off (auto: the available memory is unknown here; --ram-cache GIB sets a budget)"
        budget, why = int(free * AUTO_SHARE / processes), f"auto: {AUTO_SHARE:.0%} of {free / GIB:.1f} GiB available"
    else:
        budget, why = int(gib * GIB / processes), f"--ram-cache {gib:g} GiB"
    if processes > 1:
        why += f", over {processes} processes"
    workers = max(loader.num_workers for loader in loaders)
    # Shared memory also carries the workers' batches to the training process: half of it is left for them.
    if workers > 0 and (room := _shared_memory_room()) is not None and room // 2 // processes < budget:
        budget = room // 2 // processes
        why += f"; half of /dev/shm's free {room / GIB:.2f} GiB" + (f", over {processes} processes" * (processes > 1))
    kept = []
    for loader, sizes in zip(loaders, wanted):
        if not sizes:
            continue
        if isinstance(loader.sampler, range):  # evaluation: this rank's share of the indices
            read = set(loader.sampler)
            sizes = [n if i in read else 0 for i, n in enumerate(sizes)]
        try:
            cache = ImageCache(sizes, budget, shared=loader.num_workers > 0)
        except RuntimeError as e:  # shared memory refused (a container's /dev/shm, a ulimit): read the files
            for d in datasets:
                if hasattr(d, "cache_bytes"):
                    d.cache = None
            return f"ram cache: off (shared memory for {workers} workers could not be had: {e})"
        loader.dataset.cache = cache
        budget -= cache.reserved
        kept.append((cache, sum(1 for n in sizes if n)))
    mib = sum(c.reserved for c, _ in kept) / 2**20
    parts = ", ".join(f"{c.slots} of {n}" for c, n in kept)
    return (f"ram cache: {parts} images kept after their first read, {mib:.{1 if mib < 10 else 0}f} MiB at most "
            f"({why})")
