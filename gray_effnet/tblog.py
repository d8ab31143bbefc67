"""TensorBoard logging for train.py ``--tensorboard``: the epoch's metrics, and class-activation maps of a few
validation images, so that one can watch where the model looks change from epoch to epoch.

Needs the optional extra: ``pip install "gray_effnet[tensorboard]"``; view with ``tensorboard --logdir RUN``.
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .cam import grad_cam, overlay
from .errors import InputError
from .model import GrayEfficientNet

__all__ = ["TENSORBOARD_HINT", "EpochLog", "require_tensorboard"]

TENSORBOARD_HINT = 'pip install "gray_effnet[tensorboard]"'
SCALARS = {"train/loss": "train_loss", "train/acc": "train_acc", "val/loss": "val_loss", "val/acc": "val_acc",
           "lr": "lr", "speed/img_per_s": "img_per_s"}
MULTI_SCALARS = {"val/auc": "val_auc", "val/ap": "val_ap"}  # macro over the findings: multi-label's own metrics


def require_tensorboard() -> None:
    """Raise ``InputError`` naming the extra when the ``tensorboard`` package is not installed.

    ``torch.utils.tensorboard`` imports it on first use; asking first lets train.py refuse before any work.
    """
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise InputError(f"--tensorboard needs the tensorboard package: {TENSORBOARD_HINT}") from None


def _label_key(target: int | torch.Tensor) -> int | tuple[float, ...]:
    """A sortable key of a label: the class index, or a multi-label (K,) vector as a tuple (-1 where unknown)."""
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        return tuple(target.nan_to_num(-1.0).tolist())
    return int(target)


def _pick(dataset: Dataset, count: int) -> list[tuple[torch.Tensor, int | tuple[float, ...]]]:
    """Up to ``count`` readable images of ``dataset``, taking the classes (or, multi-label, the combinations of
    findings) in turn, its first image of each first."""
    by_class: dict = {}
    for i in range(min(len(dataset), 20 * count)):  # a bounded look: a large set need not be read through
        item = dataset[i]
        if item is not None:
            key = _label_key(item[1])
            by_class.setdefault(key, []).append((item[0], key))
    picked, rank = [], 0
    while len(picked) < count and any(rank < len(v) for v in by_class.values()):
        picked += [v[rank] for _, v in sorted(by_class.items()) if rank < len(v)][: count - len(picked)]
        rank += 1
    return picked


class EpochLog:
    """A ``SummaryWriter`` that train.py calls once per epoch.

    Args:
        log_dir: the event files' folder.
        val_dataset: the validation set; ``images`` of its images (classes in turn) get a map each epoch.
        images: how many (0: scalars only).
        task: ``multi`` also logs the validation macro ROC AUC and average precision; the maps are then those of
            each image's most probable finding.
    """

    def __init__(self, log_dir: str | os.PathLike, val_dataset: Dataset | None = None, images: int = 8,
                 task: str = "single") -> None:
        require_tensorboard()
        # Here, not at the top: torch.utils.tensorboard fails to import without the optional package.
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.log_dir = log_dir
        self.scalars = {**SCALARS, **(MULTI_SCALARS if task == "multi" else {})}
        picked = _pick(val_dataset, images) if val_dataset is not None and images > 0 else []
        self.images = torch.stack([img.float().div(255) if img.dtype == torch.uint8 else img.float()
                                   for img, _ in picked]) if picked else None  # (N, 1, H, W) in [0, 1]

    def epoch(self, epoch: int, row: Mapping[str, Any], model: GrayEfficientNet | None = None) -> None:
        """Log one ``metrics.csv`` row, and the maps of the predicted classes on the picked images.

        Args:
            model: the unwrapped model (not DDP, not compiled); its train/eval mode is restored.
        """
        for tag, key in self.scalars.items():
            self.writer.add_scalar(tag, float(row[key]), epoch)
        if model is not None and self.images is not None:
            device = next(model.parameters()).device
            cam = grad_cam(model, self.images.to(device))
            tiles = [overlay(img[0].numpy(), m.numpy()) for img, m in zip(self.images, cam.maps.cpu())]
            self.writer.add_images("val/cam", torch.from_numpy(np.stack(tiles)), epoch,
                                   dataformats="NHWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
