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
from gray_effnet.data import Batch, GrayImageFolder, make_loader, set_loader_epoch
from gray_effnet.engine import evaluate
from gray_effnet.metrics import finding_metrics

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


def multi_label_rows() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """9 images' ids, logits and labels of 2 findings (NaN: unknown), for a multi-label evaluation split over ranks."""
    g = torch.Generator().manual_seed(SEED)
    logits = torch.randn(9, 2, generator=g)
    labels = (torch.rand(9, 2, generator=g) < 0.5).float()
    labels[torch.rand(9, 2, generator=g) < 0.2] = float("nan")
    labels[0], labels[1] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # both classes in each finding
    return torch.arange(9, dtype=torch.uint8), logits, labels


class Lookup(nn.Module):
    """Image ``i`` (its first pixel holds ``i``) gets row ``i`` of a fixed logit table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


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
        # Multi-label: rank 0 has images 0, 2, 4, 6, 8 and rank 1 the others, in batches of 2 (paths out of order).
        ids, logits, labels = multi_label_rows()
        mine = ids[rank::WORLD]
        batches = [Batch(mine[i:i + 2].view(-1, 1, 1, 1).expand(-1, 1, 2, 2), labels[mine[i:i + 2].long()],
                         [f"{8 - int(j):02d}" for j in mine[i:i + 2]], 0) for i in range(0, len(mine), 2)]
        multi = evaluate(Lookup(logits), batches, device=torch.device("cpu"), num_classes=2, task="multi",
                         progress=False)
        with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump({"epochs": epochs, "predictions": result.predictions, "confusion": result.confusion,
                         "multi": multi}, f)
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

        # Multi-label: every rank computes the ranking metrics over every image's probabilities, gathered and
        # sorted by path, and gets the numbers of one process that saw all nine.
        _, logits, labels = multi_label_rows()
        whole = finding_metrics(labels.numpy(), logits.sigmoid().numpy())
        order = list(range(8, -1, -1))  # path f"{8 - i:02d}" sorts image 8 first
        for s in seen:
            multi = s["multi"]
            assert multi.paths == [f"{i:02d}" for i in range(9)]
            torch.testing.assert_close(multi.scores, logits.sigmoid()[order])
            torch.testing.assert_close(multi.targets, labels[order], equal_nan=True)
            assert multi.findings.auc.tolist() == pytest.approx(whole.auc.tolist())
            assert multi.thresholds == pytest.approx(whole.threshold.tolist())
            assert multi.auc == pytest.approx(whole.macro_auc)
            assert int(multi.confusion.sum()) == int((~labels.isnan()).sum())
