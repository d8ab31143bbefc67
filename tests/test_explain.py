"""The channel trace and the equivalence report."""

import subprocess
import sys

import pytest
import torch

from gray_effnet import list_adapters
from gray_effnet.explain import equivalence, trace

from .conftest import make_model


def _stages(model, h=128, w=128):
    x = torch.zeros(1, 1, h, w, dtype=torch.uint8)
    return {s.name: s for s in trace(model, x)}


class TestTrace:
    def test_broadcast_changes_channels_at_normalisation(self):
        stages = _stages(make_model("efficientnet_b0", "broadcast"))
        assert stages["input"].shape == (1, 1, 128, 128) and stages["input"].dtype == "uint8"
        assert stages["scaling"].shape == (1, 1, 128, 128) and stages["scaling"].dtype == "float32"
        assert stages["normalisation"].shape == (1, 3, 128, 128)
        assert "channels 1 -> 3 HERE" in stages["normalisation"].note
        assert "(1, 3, 1, 1)" in stages["normalisation"].note
        assert stages["stem conv"].shape == (1, 32, 64, 64)
        assert stages["bn1"].shape == (1, 32, 64, 64)
        assert stages["classifier"].shape == (1, 10)

    @pytest.mark.parametrize("adapter", ["sum", "fold"])
    def test_one_channel_stems_never_make_three(self, adapter):
        stages = _stages(make_model("tf_efficientnet_lite0", adapter), 84, 112)
        assert stages["normalisation"].shape == (1, 1, 84, 112)
        assert "HERE" not in stages["normalisation"].note
        assert stages["stem conv"].shape == (1, 32, 42, 56)


class TestEquivalence:
    def test_rows(self):
        model = make_model("efficientnet_b0", "broadcast")
        x = torch.randint(0, 256, (1, 1, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        rows = {r["adapter"]: r for r in equivalence(model, x)}
        assert list(rows) == list_adapters()
        assert rows["repeat"]["logits_max_abs"] == 0 and rows["broadcast"]["stem_max_abs"] == 0
        assert rows["fold"]["stem_max_abs"] < 1e-5
        assert rows["sum"]["stem_max_abs"] > 1e-2  # ImageNet statistics are not uniform
        assert model.adapter == "broadcast"  # the report works on copies


@pytest.mark.slow
class TestCli:
    def test_explain_command(self):
        out = subprocess.run(
            [sys.executable, "-m", "gray_effnet", "explain", "--model", "efficientnet_b0", "--adapter", "broadcast",
             "--img-size", "128", "128"], capture_output=True, text=True, check=True, timeout=300,
        ).stdout
        assert "(1, 3, 128, 128)" in out and "channels 1 -> 3 HERE" in out
        assert "random init" in out
        for adapter in list_adapters():
            assert f"\n{adapter} " in out

    def test_explain_pretrained(self):
        out = subprocess.run(
            [sys.executable, "-m", "gray_effnet", "explain", "--pretrained", "--adapter", "fold"],
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout
        assert "weights: pretrained ImageNet" in out

    def test_error_has_no_traceback(self):
        res = subprocess.run([sys.executable, "-m", "gray_effnet", "explain", "--model", "efficientnet_b0",
                              "--weights", "/does/not/exist.pth"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2
        assert "error: weights file /does/not/exist.pth does not exist" in res.stderr
        assert "Traceback" not in res.stderr

