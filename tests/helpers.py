"""Test helpers: seeded models and batches, independent references. Fixtures live in ``conftest.py``."""

import copy
import functools
import hashlib
import os
from pathlib import Path

import timm
import torch

from gray_effnet import GrayEfficientNet

MODELS = ["efficientnet_b0", "tf_efficientnet_b0", "tf_efficientnet_lite0"]
# Odd, non-square sizes: TF 'same' padding is asymmetric there, so borders are tested for real.
SIZES = [(67, 45), (64, 96)]


@functools.cache
def _base(name: str, num_classes: int) -> GrayEfficientNet:
    torch.manual_seed(0)
    model = GrayEfficientNet(name, adapter="repeat", num_classes=num_classes)
    # Random BN statistics and stem weights, so that no test passes only because of a trivial init.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def make_model(name: str, adapter: str = "repeat", num_classes: int = 10) -> GrayEfficientNet:
    """A fresh copy of a seeded random model, with ``adapter`` set from the 3-channel weights."""
    return copy.deepcopy(_base(name, num_classes)).set_adapter(adapter)


def gray_batch(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w, generator=g)


@functools.cache
def _timm_first_conv(name: str, in_chans: int) -> tuple[torch.nn.Module, dict]:
    stock = timm.create_model(name, in_chans=in_chans)
    return stock.get_submodule(stock.pretrained_cfg["first_conv"]), stock.pretrained_cfg


def stock_stem(model: GrayEfficientNet, x: torch.Tensor) -> torch.Tensor:
    """Independent reference for ``model.stem(x)``: timm's own first conv, holding ``model``'s weights.

    The conv (class, stride, padding) and the statistics come from a fresh ``timm.create_model``. A 3-channel
    stem gets the gray batch copied to 3 channels and normalised per channel; a 1-channel one (``sum``, timm's
    ``in_chans=1``) gets ``(x - mean(mean)) / mean(std)``, what timm's loader falls back to. It runs in float64
    on the CPU, so the reference adds no float32 rounding of its own.
    """
    state = model.timm_state_dict()
    conv, cfg = _timm_first_conv(model.model_name, 3)
    key = f"{cfg['first_conv']}.weight"
    in_chans = state[key].shape[1]
    if in_chans != 3:
        conv, cfg = _timm_first_conv(model.model_name, in_chans)
    conv = copy.deepcopy(conv).double()
    conv.weight.data = state[key].detach().cpu().double()
    if conv.bias is not None:
        conv.bias.data = state[f"{cfg['first_conv']}.bias"].detach().cpu().double()
    mean = torch.tensor(cfg["mean"], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=torch.float64).view(1, 3, 1, 1)
    if in_chans == 1:
        mean, std = mean.mean().view(1, 1, 1, 1), std.mean().view(1, 1, 1, 1)
    normalised = (torch.cat([x.detach().cpu().double()] * in_chans, dim=1) - mean) / std
    with torch.no_grad():
        return conv(normalised).to(x.device, torch.float32)


class PicklePayload:
    """Unpickling this runs a shell command that creates ``target``: a stand-in for a malicious checkpoint."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def tree_digest(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every entry below ``root`` (but ``skip`` and what is below it): a file's sha256, a link's target, "dir".

    Two equal digests mean that nothing below ``root`` was added, removed, replaced or changed by a byte."""
    digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            if skip is not None and (p == skip or skip in p.parents):
                continue
            rel = str(p.relative_to(root))
            if p.is_symlink():
                digest[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                digest[rel] = "dir"
            elif not p.is_file():
                digest[rel] = "special"  # a FIFO or a device: reading it could block
            else:
                digest[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return digest
