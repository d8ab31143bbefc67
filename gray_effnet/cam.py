"""Class-activation maps: where in a gray image the evidence for a class lies (Grad-CAM).

Grad-CAM (Selvaraju et al., https://arxiv.org/abs/1610.02391) weighs each channel of the last feature map by the
mean gradient of the class score over its positions, sums the channels and keeps the positive part. For timm's
EfficientNets, whose head is an average pool and a linear layer, that equals the CAM of Zhou et al.
(https://arxiv.org/abs/1512.04150): the classifier's row of the class applied at each position.

The maps come from the model's own forward, the 1-channel model through whichever stem adapter it uses: a
forward pre-hook on timm's ``global_pool`` takes the feature map there, so ``repeat``, ``broadcast`` and ``fold``
give the same map up to float rounding. The backward runs through the head only.

Hand-written rather than captum's ``LayerGradCam`` or pytorch-grad-cam: the computation is the few lines of
``grad_cam``, and either package would be one more dependency (pytorch-grad-cam pulls in OpenCV) for it.

Command line:
    python -m gray_effnet cam --weights runs/x/best.safetensors --images a.png folder/ --output cams/
"""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from .augment import build_transforms
from .checkpoint import load_model
from .errors import InputError
from .files import atomic_write
from .images import is_image_file, read_gray
from .model import GrayEfficientNet

__all__ = ["CamResult", "feature_module", "grad_cam", "jet", "overlay", "resolve_class", "write_cams"]


@dataclass
class CamResult:
    """Grad-CAM maps of a batch.

    Attributes:
        maps: (B, H, W) at the input's size, in [0, 1], each divided by its own maximum; all zeros where the
            class has no positive evidence anywhere.
        raw: (B, h, w) at the feature map's size, before upsampling and scaling.
        targets: (B,) the class each map explains.
        probs: (B, K) the probabilities of the batch: softmax, or a sigmoid per finding for a multi-label model.
    """

    maps: Tensor
    raw: Tensor
    targets: Tensor
    probs: Tensor


def feature_module(net: nn.Module) -> nn.Module:
    """The module of a timm CNN whose input is the last feature map: its global pool (``forward_head``'s first step)."""
    for name in ("global_pool", "head.global_pool"):
        try:
            return net.get_submodule(name)
        except AttributeError:
            continue
    raise InputError(f"{type(net).__name__} has no global_pool (nor head.global_pool) where its last feature map "
                     "could be taken for Grad-CAM")


def grad_cam(model: GrayEfficientNet, images: Tensor, target: int | Tensor | None = None) -> CamResult:
    """Grad-CAM of ``images`` for ``target`` (default: each image's predicted class).

    The model is evaluated in eval mode (restored afterwards); no parameter gradient is written.

    Args:
        model: the unwrapped model (not DDP, not compiled: hooks must see its modules run).
        images: a batch the model takes, uint8 in [0, 255] or float in [0, 1].
        target: one class index for every image, or one per image.

    Shape:
        - images: (B, 1, H, W)
        - maps: (B, H, W); raw: (B, H / stride, W / stride)

    Example:
        >>> cam = grad_cam(model, torch.rand(2, 1, 96, 128))
        >>> cam.maps.shape, cam.raw.shape
        (torch.Size([2, 96, 128]), torch.Size([2, 3, 4]))
    """
    taken: list[Tensor] = []

    def take(module: nn.Module, args: tuple) -> tuple:
        # A leaf that needs a gradient: the backward stops here, and it works for frozen parameters too.
        feats = args[0].detach().requires_grad_()
        taken.append(feats)
        return (feats, *args[1:])

    was_training = model.training
    model.eval()
    handle = feature_module(model.model).register_forward_pre_hook(take)
    try:
        with torch.enable_grad():
            logits = model(images).float()
            n, k = logits.shape
            if target is None:
                targets = logits.argmax(-1)
            else:
                targets = torch.as_tensor(target, device=logits.device).long().expand(n)
                if bool(((targets < 0) | (targets >= k)).any()):
                    raise InputError(f"target class {target} is outside the model's {k} classes")
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), taken[-1])
    finally:
        handle.remove()
        model.train(was_training)
    feats = taken[-1].detach().float()
    weights = grads.float().mean((2, 3), keepdim=True)  # (B, C, h, w) -> (B, C, 1, 1): alpha of each channel
    raw = (weights * feats).sum(1).relu()  # (B, C, h, w) -> (B, h, w)
    maps = F.interpolate(raw[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    peak = maps.amax((1, 2), keepdim=True)
    maps = torch.where(peak > 0, maps / peak.clamp_min(torch.finfo(maps.dtype).tiny), torch.zeros_like(maps))
    # A multi-label model gives each finding its own sigmoid; a single-label one a softmax over the classes.
    probs = logits.detach().sigmoid() if getattr(model, "task", "single") == "multi" else logits.detach().softmax(-1)
    return CamResult(maps=maps.clamp(0, 1), raw=raw, targets=targets, probs=probs)


# matplotlib's jet: (position, value) breakpoints of red, green and blue, linear in between.
_JET = (((0, 0.35, 0.66, 0.89, 1), (0, 0, 1, 1, 0.5)),
        ((0, 0.125, 0.375, 0.64, 0.91, 1), (0, 0, 1, 1, 0, 0)),
        ((0, 0.11, 0.34, 0.65, 1), (0.5, 1, 1, 0, 0)))


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map, as matplotlib draws it (without needing it): values in [0, 1] -> RGB in [0, 1].

    Shape:
        - x: (...)
        - output: (..., 3), dark blue (0) to dark red (1)
    """
    x = np.clip(np.asarray(x, dtype=np.float32), 0, 1)
    return np.stack([np.interp(x, xp, fp) for xp, fp in _JET], axis=-1).astype(np.float32)


def overlay(gray: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A gray image with its heat map blended over it.

    Shape:
        - gray, cam: (H, W) in [0, 1]
        - output: (H, W, 3) uint8
    """
    rgb = (1 - alpha) * np.asarray(gray, dtype=np.float32)[..., None] + alpha * jet(cam)
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def resolve_class(target: str | None, class_names: Sequence[str] | None, num_classes: int) -> int | None:
    """``--target``: a class name of the checkpoint, or an index; None stays None (each image's prediction)."""
    if target is None:
        return None
    if class_names and target in class_names:
        return list(class_names).index(target)
    if target.lstrip("-").isdigit() and 0 <= int(target) < num_classes:
        return int(target)
    names = ", ".join(class_names) if class_names else f"0..{num_classes - 1}"
    raise InputError(f"--target {target!r} is not a class of the checkpoint; its classes are {names}")


def find_image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given, and the image files below folders (regular files, each real path once, sorted per folder)."""
    found, seen = [], set()
    for given in paths:
        given = Path(given)
        if given.is_dir():
            files = []
            for dirpath, dirnames, filenames in os.walk(given):  # no symlinked folders: the walk always ends
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                files += [Path(dirpath, f) for f in sorted(filenames)
                          if Path(dirpath, f).is_file() and is_image_file(os.path.join(dirpath, f))]
        elif given.is_file():
            files = [given]
        else:
            raise InputError(f"--images {given}: no such file or folder")
        for f in files:
            real = os.path.realpath(f)
            if real not in seen:
                seen.add(real)
                found.append(f)
    return found


def _display(img: Tensor, min_side: int = 128) -> np.ndarray:
    """(1, H, W) uint8 or float -> (H', W') float in [0, 1], enlarged by a whole factor (nearest) to ``min_side``."""
    a = img[0].float().div(255) if img.dtype == torch.uint8 else img[0].float()
    factor = max(1, math.ceil(min_side / min(a.shape)))
    return a.repeat_interleave(factor, 0).repeat_interleave(factor, 1).clamp(0, 1).numpy()


def write_cams(
    weights: str | os.PathLike,
    images: Sequence[str | os.PathLike],
    output: str | os.PathLike,
    *,
    target: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> list[tuple[Path, Path]]:
    """Write each image with its Grad-CAM overlaid, as ``OUTPUT/<name>_cam.png``; print one line per image.

    Each image is read as the checkpoint reads it (its intensity mapping), resized to its input size for the
    model, and drawn at its own size (enlarged to at least 128 pixels a side) with the map upsampled over it.
    An unreadable file is a named skip.

    Args:
        weights: a checkpoint of this project.
        images: files and folders (walked for image files).
        output: the folder to write into (made if needed).
        target: a class name or index whose map to draw; default: each image's predicted class.

    Returns:
        (image, written file) pairs.
    """
    files = find_image_files(images)
    if not files:
        raise InputError(f"--images {' '.join(map(str, images))}: no image files there")
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise InputError(f"--output {output} is a file; name a folder")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(weights).to(device).eval()
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    wanted = resolve_class(target, model.class_names, model.num_classes)
    size = model.img_size or tuple(model.model.pretrained_cfg["input_size"][1:])
    resize = build_transforms(size, train=False)
    output.mkdir(parents=True, exist_ok=True)

    written, used = [], set()
    bar = tqdm(total=len(files), desc="cam", unit="img", disable=None if progress else True, dynamic_ncols=True)
    for start in range(0, len(files), batch_size):
        originals, good = [], []
        for path in files[start:start + batch_size]:
            try:
                originals.append(read_gray(path, model.intensity))
                good.append(path)
            except Exception as e:  # noqa: BLE001 - any decoder error is a named skip
                tqdm.write(f"skipped {path} ({type(e).__name__}: {e})")
        if good:
            batch = torch.stack([resize(img.float().div(255) if img.dtype == torch.uint8 else img)
                                 for img in originals]).to(device)  # (B, 1, H, W) float in [0, 1]
            cam = grad_cam(model, batch, wanted)
            for path, img, m, t, p in zip(good, originals, cam.maps.cpu(), cam.targets.tolist(), cam.probs.cpu()):
                gray = _display(img)
                heat = F.interpolate(m[None, None], size=gray.shape, mode="bilinear", align_corners=False)[0, 0]
                name = f"{path.stem}_cam"
                while name in used:  # the same file name in two folders
                    name += "_"
                used.add(name)
                out = output / f"{name}.png"
                with atomic_write(out) as tmp:
                    Image.fromarray(overlay(gray, heat.clamp(0, 1).numpy())).save(tmp, format="PNG")
                pred = int(p.argmax())
                what = f"map of {names[t]} (p={p[t]:.3f}), predicted" if wanted is not None else "predicted"
                tqdm.write(f"{path}: {what} {names[pred]} (p={p[pred]:.3f}) -> {out}")
                written.append((path, out))
        bar.update(len(files[start:start + batch_size]))
    bar.close()
    return written
