"""Two gloo processes on the CPU: each rank trains on its own share of the images, and evaluation counts each once.

The processes are forked (as DataLoader workers are, and like them they run torch at 1 thread; spawning them
would cost a fresh import of torch each, about 10 s on 2 shared cores) and meet through a file store in the
test's temporary folder: no network port, no torchrun. Each writes what it saw to a file that the test reads.
"""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from gray_effnet.augment import build_transforms
from gray_effnet.data import GrayImageFolder, make_loader, set_loader_epoch
from gray_effnet.engine import evaluate

WORLD = 2
SEED = 3


def write_samples(root: Path, n: int, start: int = 0) -> list[tuple[str, int]]:
    """``n`` 8x8 PNGs in two classes, each a different constant gray, as (path, label) pairs."""
    samples = []
    for i in range(start, start + n):
        label = i % 2
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        path = root / str(label) / f"{i:02d}.png"
        Image.fromarray(np.full((8, 8), 12 * i, np.uint8)).save(path)
        samples.append((str(path), label))
    return samples


class MeanClassifier(nn.Module):
    """Logits from the mean brightness: an untrained stand-in whose predictions depend on the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.float().mean(dim=(1, 2, 3)) / (255 if x.dtype == torch.uint8 else 1)
        return torch.stack([1 - m, m], dim=1)


def _rank(rank: int, store: str, train: list, val: list, out: str) -> None:
    torch.set_num_threads(1)  # a forked child must not use the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        train_ds = GrayImageFolder(train, build_transforms((8, 8), train=True, crop_scale=1.0))
        # A batch as large as a rank's share: no batch is dropped, so the ranks' shares can be compared whole.
        loader = make_loader(train_ds, 8, train=True, workers=0, seed=SEED, world_size=WORLD, rank=dist.get_rank())
        epochs = []
        for epoch in range(2):
            set_loader_epoch(loader, epoch, SEED)
            epochs.append([p for batch in loader for p in batch.paths])
        val_ds = GrayImageFolder(val, build_transforms((8, 8), train=False))
        val_loader = make_loader(val_ds, 2, train=False, workers=0, world_size=WORLD, rank=dist.get_rank())
        result = evaluate(MeanClassifier(), val_loader, device=torch.device("cpu"), num_classes=2,
                          keep_predictions=True, progress=False)
        with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump({"epochs": epochs, "predictions": result.predictions, "confusion": result.confusion}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
class TestTwoRanks:
    def test_train_shares_and_validation_gather(self, tmp_path):
        train = write_samples(tmp_path / "train", 10)
        val = write_samples(tmp_path / "val", 7, start=10)  # odd: the ranks evaluate 4 and 3 images
        mp.start_processes(_rank, args=(str(tmp_path / "store"), train, val, str(tmp_path)), nprocs=WORLD,
                           start_method="fork")
        seen = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]
        everything = sorted(p for p, _ in train)
        for epoch in range(2):
            shares = [set(s["epochs"][epoch]) for s in seen]
            assert [len(s["epochs"][epoch]) for s in seen] == [5, 5]
            assert not shares[0] & shares[1], f"epoch {epoch}: the ranks train on the same images"
            assert sorted(shares[0] | shares[1]) == everything
        assert set(seen[0]["epochs"][0]) != set(seen[0]["epochs"][1])  # the shares are reshuffled each epoch

        # Every rank gets every validation prediction, each image once, with its own target and prediction.
        want = []
        for path, label in val:
            m = float(np.asarray(Image.open(path)).mean()) / 255
            want.append((path, label, int(m > 0.5)))
        for s in seen:
            assert [p[:3] for p in s["predictions"]] == sorted(want)
            assert int(s["confusion"].sum()) == len(val)
