"""Training augmentation: per sample on the CPU (torchvision v2, image folders) or per batch on the device (packs).

Both apply the same kinds of change: a random resized crop of at least ``crop_scale`` of the area, a horizontal
flip with probability ``hflip``, and a rotation within ``rotate`` degrees.
"""

from collections.abc import Sequence

import kornia.augmentation as K
import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms import v2

__all__ = ["BatchAugment", "build_transforms"]


def build_transforms(
    img_size: Sequence[int], *, train: bool, crop_scale: float = 0.8, hflip: float = 0.0, rotate: float = 0.0
) -> v2.Transform:
    """Resize to ``img_size`` (H, W); in training, a light random crop, flip and rotation.

    The transforms run on uint8 or float (1, H, W) tensors, so 8-bit data stays 1 byte per pixel.
    """
    size = tuple(int(s) for s in img_size)
    if not train:
        return v2.Resize(size, antialias=True)
    steps: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rotate > 0:
        steps.append(v2.RandomRotation(rotate))
    return v2.Compose(steps)




class BatchAugment(nn.Module):
    """``build_transforms(train=True)``'s random crop, flip and rotation, on a whole batch on its device.

    kornia.augmentation does the work: ``RandomResizedCrop(size, scale=(crop_scale, 1))`` with torchvision's
    default aspect ratios (3/4, 4/3), ``RandomHorizontalFlip(hflip)``, and ``RandomRotation(rotate)`` on every
    image, as torchvision's ``RandomRotation`` does (bilinear, where torchvision's default is nearest). Each image
    gets its own parameters.

    The parameters are drawn from a generator seeded by (seed, epoch, step), under ``torch.random.fork_rng``: the
    global RNG (which dropout draws from) is left as it was, and a resumed run augments as an uninterrupted one.
    Call ``set_epoch`` at the start of every epoch.

    Args:
        size: (H, W) of the output.
        crop_scale: the smallest crop area, as a fraction of the image.
        hflip: flip probability.
        rotate: rotation range in degrees.
        seed: seed of the parameters (add the rank under DDP, so that ranks differ).

    Shape:
        - Input: (B, 1, H', W'), uint8 in [0, 255] or float in [0, 1].
        - Output: (B, 1, H, W), float32 in [0, 1].
    """

    def __init__(self, size: Sequence[int], *, crop_scale: float = 0.8, hflip: float = 0.0, rotate: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__()
        steps: list[nn.Module] = [K.RandomResizedCrop(tuple(int(s) for s in size), scale=(crop_scale, 1.0))]
        if hflip > 0:
            steps.append(K.RandomHorizontalFlip(p=hflip))
        if rotate > 0:
            steps.append(K.RandomRotation(rotate, p=1.0))
        self.augment = K.ImageSequential(*steps)
        self.seed, self.epoch, self.step = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        elif x.dtype != torch.float32:
            x = x.float()
        seed = int(np.random.SeedSequence([self.seed, self.epoch, self.step]).generate_state(1)[0])
        self.step += 1
        # kornia draws its parameters from the global CPU generator: fork it, seed the fork, and restore it after.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return self.augment(x)
