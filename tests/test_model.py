"""GrayEfficientNet: inputs, errors, state dicts."""

import pytest
import timm
import torch

from gray_effnet import ADAPTERS, GrayEfficientNet, list_adapters

from .helpers import MODELS, gray_batch, make_model, stock_stem


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("adapter", list_adapters())
class TestInputs:
    def test_uint8_and_float_agree(self, name, adapter, device):
        model = make_model(name, adapter).to(device)
        g = torch.Generator().manual_seed(1)
        raw = torch.randint(0, 256, (2, 1, 64, 80), dtype=torch.uint8, generator=g).to(device)
        with torch.no_grad():
            out = model(raw)
            assert torch.equal(out, model(raw.float() / 255))
            # and the scaling is /255 into [0, 1]: the stem sees what it sees on the float image, which for the
            # exact adapters is what timm's stem sees (intensity windows are not: see test_window.py)
            torch.testing.assert_close(model.stem(model.prepare_input(raw)), model.stem(raw.float() / 255),
                                       rtol=0, atol=0)
            if ADAPTERS[adapter].foldable:
                torch.testing.assert_close(model.stem(model.prepare_input(raw)), stock_stem(model, raw.float() / 255),
                                           rtol=1e-5, atol=1e-5)


class TestErrors:
    @pytest.fixture
    def model(self):
        return make_model("efficientnet_b0", "fold")

    def test_three_channels(self, model):
        with pytest.raises(ValueError, match=r"expected 1 channel, \(B, 1, H, W\); got 3 channels \(2, 3, 64, 64\)"):
            model(torch.rand(2, 3, 64, 64))

    def test_two_d(self, model):
        with pytest.raises(ValueError, match=r"expected a 4-D \(B, 1, H, W\) gray batch; got a 2-D tensor \(64, 64\)"):
            model(torch.rand(64, 64))

    def test_empty_batch(self, model):
        with pytest.raises(ValueError, match=r"got an empty batch \(0, 1, 64, 64\); expected at least 1 image"):
            model(torch.rand(0, 1, 64, 64))

    def test_too_small(self, model):
        with pytest.raises(ValueError, match="image 16x64 is smaller than the network's total stride 32"):
            model(torch.rand(1, 1, 16, 64))

    def test_integer_dtype(self, model):
        with pytest.raises(ValueError, match=r"expected uint8 in \[0, 255\] or float in \[0, 1\]; got dtype torch.int"):
            model(torch.zeros(1, 1, 64, 64, dtype=torch.int16))

    def test_unknown_model(self):
        with pytest.raises(ValueError, match="unknown timm model 'efficientnet_b9'; did you mean"):
            GrayEfficientNet("efficientnet_b9")

    def test_unknown_adapter(self):
        with pytest.raises(ValueError, match="unknown adapter 'keras'; choose one of: repeat, broadcast, sum, fold"):
            GrayEfficientNet("efficientnet_b0", adapter="keras")

    def test_class_names_count(self):
        with pytest.raises(ValueError, match="2 class names for num_classes=3"):
            GrayEfficientNet("efficientnet_b0", num_classes=3, class_names=["a", "b"])


class TestFamilies:
    @pytest.mark.parametrize("name", ["efficientnet_b3", "tf_efficientnet_b2", "tf_efficientnet_lite4",
                                      "tf_efficientnetv2_s", "efficientnetv2_rw_t"])
    def test_builds_and_runs(self, name):
        model = GrayEfficientNet(name, adapter="fold", num_classes=4).eval()
        x = gray_batch(1, 64, 96)
        with torch.no_grad():
            assert model(x).shape == (1, 4)
            torch.testing.assert_close(model.stem(x), stock_stem(model, x), rtol=1e-5, atol=1e-5)
        assert model.stem_name == "conv_stem"
        assert model.mean == tuple(timm.create_model(name).pretrained_cfg["mean"])


@pytest.mark.parametrize("adapter", list_adapters())
class TestTimmStateDict:
    def test_loads_into_plain_timm(self, adapter):
        if not ADAPTERS[adapter].foldable:
            pytest.skip("intensity windows are not the stock network on gray input")
        model = make_model("tf_efficientnet_lite0", adapter)
        if adapter == "affine":  # its map has no timm name: fold it into the weight first (test_affine covers it)
            model.set_adapter("repeat")
        in_chans = model.stem.in_chans
        plain = timm.create_model("tf_efficientnet_lite0", num_classes=10, in_chans=in_chans).eval()
        plain.load_state_dict(model.timm_state_dict())  # strict: the names are timm's own
        x = gray_batch(2, 64, 64)
        stats = model.stem
        mean = stats.mean1 if in_chans == 1 else stats.mean
        std = stats.std1 if in_chans == 1 else stats.std
        with torch.no_grad():
            ref = plain((x.expand(-1, in_chans, -1, -1) - mean) / std)
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4)

    def test_round_trip(self, adapter):
        model = make_model("efficientnet_b0", adapter)
        other = GrayEfficientNet("efficientnet_b0", adapter=adapter, num_classes=10).eval()
        other.load_timm_state_dict(model.timm_state_dict())
        x = gray_batch(1, 64, 64)
        with torch.no_grad():
            assert torch.equal(other(x), model(x))
