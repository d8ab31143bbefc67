"""Training augmentation: per sample on the CPU (torchvision v2, image folders) or per batch on the device (packs).

Both apply the same kinds of change: a random resized crop of at least ``crop_scale`` of the area, a horizontal
flip with probability ``hflip``, and a rotation within ``rotate`` degrees.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import v2

__all__ = ["BatchAugment", "RandomResizedCrop", "build_transforms"]

TRIES = 10  # torchvision's attempts at a crop inside the image before the centre crop
RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default aspect ratios


def build_transforms(
    img_size: Sequence[int], *, train: bool, crop_scale: float = 0.8, hflip: float = 0.0, rotate: float = 0.0
) -> v2.Transform:
    """Resize to ``img_size`` (H, W); in training, a light random crop, flip and rotation.

    The transforms run on uint8 or float (1, H, W) tensors, so 8-bit data stays 1 byte per pixel.
    """
    size = tuple(int(s) for s in img_size)
    if not train:
        return v2.Resize(size, antialias=True)
    steps: list[v2.Transform] = [RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if rotate > 0:
        steps.append(v2.RandomRotation(rotate))
    return v2.Compose(steps)


class RandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` with the crop drawn in one call to the random generator, and a plain tensor cropped
    and resized without v2's dispatch: 0.023 ms an image against its 0.043 (28x28 to 32x32, 1 thread, AMD EPYC).

    The box is the one ``BatchAugment.crop_boxes`` draws from the same generator state (the files path and the pack
    path share one rule), with torchvision's distribution: up to 10 tries of an area in ``scale`` and a log-uniform
    aspect ratio in ``ratio``, else the centre crop. The random numbers differ from torchvision's own draw.
    """

    def make_params(self, flat_inputs: list) -> dict[str, int]:
        height, width = v2.query_size(flat_inputs)
        top, left, h, w = crop_box(height, width, self.scale, self.ratio)
        return dict(top=top, left=left, height=h, width=w)

    def forward(self, *inputs):
        if len(inputs) == 1 and type(inputs[0]) is Tensor:  # a plain tensor: not a tv_tensor, which v2 dispatches
            x = inputs[0]
            top, left, h, w = crop_box(x.shape[-2], x.shape[-1], self.scale, self.ratio)
            return v2.functional.resized_crop_image(x, top, left, h, w, list(self.size),
                                                    interpolation=self.interpolation, antialias=self.antialias)
        return super().forward(*inputs)


def crop_box(height: int, width: int, scale: Sequence[float], ratio: Sequence[float] = RATIO,
             generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """One random crop (top, left, height, width) of a ``height`` x ``width`` image: ``BatchAugment.crop_boxes``
    for one image, from one draw of ``generator`` (default: torch's global one)."""
    u = torch.rand(2 * TRIES + 2, generator=generator, dtype=torch.float64).tolist()
    area, lo, hi = height * width, math.log(ratio[0]), math.log(ratio[1])
    for t in range(TRIES):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * t])
        aspect = math.exp(lo + (hi - lo) * u[2 * t + 1])
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return math.floor(u[-2] * (height - h + 1)), math.floor(u[-1] * (width - w + 1)), h, w
    w, h = _centre_crop(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def _centre_crop(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int]:
    """The (width, height) torchvision falls back to when no try fits: the whole image, at the nearest allowed
    aspect ratio."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return width, round(width / ratio[0])
    if in_ratio > ratio[1]:
        return round(height * ratio[1]), height
    return width, height


class BatchAugment(nn.Module):
    """``build_transforms(train=True)``'s random crop, flip and rotation, on a whole batch on its device.

    Each image gets its own parameters, drawn as torchvision draws them (``RandomResizedCrop.make_params``: up to
    10 tries of an area in ``(crop_scale, 1)`` of the image and a log-uniform aspect ratio in (3/4, 4/3), else the
    centre crop; a flip with probability ``hflip``; an angle uniform in ``(-rotate, rotate)``). They are drawn on
    the CPU, from a ``torch.Generator`` seeded by (seed, epoch, step): a resumed run augments as an uninterrupted
    one, and no global random state is touched.

    They reach the device in one asynchronous copy, and the work is done there on the whole batch: the crop and
    its resize are two batched matrix products whose weights are torchvision's antialiased bilinear resize (the
    ``antialias=True`` of ``build_transforms``, so a crop equals the files path's crop of the same box, up to its
    uint8 rounding), the flip reverses the rows of one of them, and the rotation is one ``grid_sample``
    (bilinear, zeros outside; torchvision's default is nearest). Nothing waits for the device: on CUDA the next
    step is queued while this one runs.

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

    ratio = RATIO
    tries = TRIES

    def __init__(self, size: Sequence[int], *, crop_scale: float = 0.8, hflip: float = 0.0, rotate: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__()
        self.size = tuple(int(s) for s in size)
        self.scale = (float(crop_scale), 1.0)
        self.hflip, self.rotate = float(hflip), float(rotate)
        self.seed, self.epoch, self.step = seed, 0, 0

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, hflip={self.hflip}, rotate={self.rotate}, seed={self.seed}"

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.step = epoch, 0

    def crop_boxes(self, n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
        """(n, 4) crops (left, top, right, bottom) in pixels, drawn as ``v2.RandomResizedCrop`` draws one."""
        area = height * width
        u = torch.rand(n, self.tries, 2, generator=generator, dtype=torch.float64)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * u[..., 1])
        w = torch.sqrt(target * aspect).round()
        h = torch.sqrt(target / aspect).round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
        w, h = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0]
        fw, fh = _centre_crop(height, width, self.ratio)  # when none fits
        fallback = ~fits.any(1)
        w = torch.where(fallback, float(fw), w)
        h = torch.where(fallback, float(fh), h)
        offset = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        top = torch.where(fallback, (height - h) // 2, (offset[:, 0] * (height - h + 1)).floor())
        left = torch.where(fallback, (width - w) // 2, (offset[:, 1] * (width - w + 1)).floor())
        return torch.stack([left, top, left + w, top + h], 1).float()

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        elif x.dtype != torch.float32:
            x = x.float()
        n, _, height, width = x.shape
        seed = int(np.random.SeedSequence([self.seed, self.epoch, self.step]).generate_state(1)[0])
        self.step += 1
        generator = torch.Generator().manual_seed(seed)
        boxes = self.crop_boxes(n, height, width, generator)
        flips = torch.rand(n, generator=generator) < self.hflip
        angles = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * self.rotate
        # One host-to-device copy of every parameter, queued without waiting for the device (CUDA stages a small
        # pageable copy at once).
        params = torch.cat([boxes, flips[:, None].float(), angles[:, None].float()], 1)
        params = params.to(x.device, non_blocking=True)
        left, top, right, bottom, flip, angle = params.unbind(1)
        rows = _resize_weights(top, bottom - top, height, self.size[0])  # (B, H, H')
        cols = _resize_weights(left, right - left, width, self.size[1])  # (B, W, W')
        if self.hflip > 0:
            cols = torch.where(flip[:, None, None] > 0, cols.flip(1), cols)
        y = rows[:, None] @ x @ cols[:, None].transpose(-1, -2)
        if self.rotate > 0:
            y = _rotate(y, angle)
        return y


def _resize_weights(start: Tensor, length: Tensor, size_in: int, size_out: int) -> Tensor:
    """(B, size_out, size_in): row ``o`` weighs the input pixels that output pixel ``o`` of the window
    ``[start, start + length)`` resized to ``size_out`` averages, as torchvision's (and Pillow's) antialiased
    bilinear resize does: a triangle filter, widened by the downscale factor, renormalised inside the window."""
    scale = (length / size_out)[:, None, None]
    support = scale.clamp(min=1.0)
    o = torch.arange(size_out, device=start.device, dtype=torch.float32)[None, :, None]
    j = torch.arange(size_in, device=start.device, dtype=torch.float32)[None, None, :]
    begin = start[:, None, None]
    centre = begin + (o + 0.5) * scale
    w = (1 - ((j + 0.5 - centre) / support).abs()).clamp(min=0)
    w = w * ((j >= begin) & (j < begin + length[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def _rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """Rotate each image of (B, C, H, W) about its centre by ``degrees[b]``; bilinear, zeros outside."""
    _, _, h, w = x.shape
    a = torch.deg2rad(degrees)
    cos, sin = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(a)
    # affine_grid works in coordinates normalised to [-1, 1] per axis: a rotation in pixels, re-expressed there.
    theta = torch.stack([torch.stack([cos, -sin * h / w, zero], 1), torch.stack([sin * w / h, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
