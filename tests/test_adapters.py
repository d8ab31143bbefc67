"""One class per adapter concept, parametrised over list_adapters() x models, at non-square sizes."""

import copy

import pytest
import timm
import torch
from timm.models import adapt_input_conv

from gray_effnet import ADAPTERS, GrayEfficientNet, StemAdapter, list_adapters, register_adapter
from gray_effnet.adapters import create_adapter

from .helpers import MODELS, SIZES, gray_batch, make_model, stock_stem


class TestRegistry:
    def test_the_four(self):
        assert list_adapters()[:4] == ["repeat", "broadcast", "sum", "fold"]

    def test_unknown_lists_valid(self):
        with pytest.raises(ValueError, match="unknown adapter 'nope'; choose one of: repeat, broadcast, sum, fold"):
            GrayEfficientNet("efficientnet_b0", adapter="nope")

    def test_register_is_all_it_takes(self):
        @register_adapter("test_half")
        class HalfStem(StemAdapter):
            def normalize(self, x):
                return ((x - self.mean) / self.std) * 0.5

        try:
            assert "test_half" in list_adapters()
            model = make_model("efficientnet_b0", "test_half")
            x = gray_batch(1, 64, 64)
            ref = stock_stem(model, x) * 0.5  # the conv is linear and has no bias
            torch.testing.assert_close(model.stem(x), ref, rtol=1e-5, atol=1e-5)
        finally:
            del ADAPTERS["test_half"]

    def test_duplicate_name(self):
        with pytest.raises(ValueError, match="adapter 'fold' is already registered"):
            register_adapter("fold")(type("Again", (StemAdapter,), {}))

    def test_stem_must_be_rgb(self):
        conv = torch.nn.Conv2d(1, 8, 3)
        with pytest.raises(ValueError, match="expected a stem conv with 3 input channel"):
            create_adapter("repeat", conv, (0.5,) * 3, (0.5,) * 3)

    def test_stats_need_three_values(self):
        with pytest.raises(ValueError, match="mean must have 3 values"):
            create_adapter("fold", torch.nn.Conv2d(3, 8, 3), (0.5,), (0.5,) * 3)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("adapter", list_adapters())
class TestShapes:
    def test_logits(self, adapter, name, size, device):
        model = make_model(name, adapter, num_classes=7).to(device)
        with torch.no_grad():
            out = model(gray_batch(3, *size).to(device))
        assert out.shape == (3, 7) and out.device.type == device.type and out.dtype == torch.float32

    def test_stem_output_equals_stock_timm_stem(self, adapter, name, size, device):
        """Values, not shapes: timm's own first conv with the same weights (its in_chans=1 route for sum)."""
        if not ADAPTERS[adapter].foldable:
            pytest.skip("intensity windows are not the stock stem on gray input; their values: test_window.py")
        model = make_model(name, adapter).to(device)
        x = gray_batch(2, *size).to(device)
        with torch.no_grad():
            out = model.stem(x)
        ref = stock_stem(model, x)
        assert out.device.type == device.type and ref.abs().max() > 0.1
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    def test_stem_class_kept(self, adapter, name, size):
        stock = timm.create_model(name)
        conv = make_model(name, adapter).stem.conv
        assert type(conv) is type(stock.conv_stem)
        assert (conv.stride, conv.padding, conv.dilation) == (
            stock.conv_stem.stride, stock.conv_stem.padding, stock.conv_stem.dilation)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODELS)
class TestRepeat:
    def test_normalisation_is_per_channel(self, name, size, device):
        """(x - mean_c) / std_c on each of 3 copies of x, against the statistics in timm's pretrained_cfg."""
        model = make_model(name, "repeat").to(device)
        x = gray_batch(2, *size).to(device)
        cfg = timm.create_model(name).pretrained_cfg
        ref = torch.stack([(x[:, 0] - m) / s for m, s in zip(cfg["mean"], cfg["std"])], dim=1)
        torch.testing.assert_close(model.stem.normalize(x), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODELS)
class TestBroadcast:
    def test_bitwise_equal_to_repeat(self, name, size, device):
        x = gray_batch(2, *size).to(device)
        rep, bro = make_model(name, "repeat").to(device), make_model(name, "broadcast").to(device)
        with torch.no_grad():
            assert torch.equal(bro.stem(x), rep.stem(x))
            assert torch.equal(bro(x), rep(x))

    def test_normalisation_makes_three_channels(self, name, size):
        x = gray_batch(2, *size)
        assert make_model(name, "broadcast").stem.normalize(x).shape == (2, 3, *size)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODELS)
class TestFold:
    def test_stem_within_1e5_of_repeat_borders_included(self, name, size, device):
        x = gray_batch(4, *size).to(device)
        fold = make_model(name, "fold").to(device)
        with torch.no_grad():
            ref = stock_stem(fold, x)
            out = fold.stem(x)
        diff = (out - ref).abs()
        assert diff.max() <= 1e-5
        # The borders are where a wrong padding rule would show: check them on their own too.
        for edge in (diff[..., 0, :], diff[..., -1, :], diff[..., :, 0], diff[..., :, -1]):
            assert edge.max() <= 1e-5

    def test_logits_match_repeat(self, name, size, device):
        x = gray_batch(2, *size).to(device)
        with torch.no_grad():
            ref = make_model(name, "repeat").to(device)(x)
            out = make_model(name, "fold").to(device)(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())

    def test_gradients_equal_repeat_float64(self, name, size):
        x = gray_batch(2, *size).double()
        grads = {}
        for adapter in ("repeat", "fold"):
            model = make_model(name, adapter).double().train()
            model(x).square().mean().backward()
            grads[adapter] = {n: p.grad for n, p in model.named_parameters()}
        assert grads["repeat"].keys() == grads["fold"].keys()
        # float64 rounding, relative to the gradients' scale (some, like a BN bias feeding another BN in
        # training mode, are zero in exact arithmetic and only rounding noise in either adapter).
        scale = max(g.abs().max().item() for g in grads["repeat"].values())
        for key, g in grads["repeat"].items():
            torch.testing.assert_close(grads["fold"][key], g, rtol=1e-9, atol=1e-11 * scale, msg=key)

    def test_trainable_parameter_is_the_rgb_weight(self, name, size):
        assert make_model(name, "fold").stem.conv.weight.shape[1] == 3

    def test_offset_differs_on_the_borders(self, name, size):
        fold = make_model(name, "fold")
        x = gray_batch(1, *size)
        offset = fold.stem.offset(x, fold.stem.folded_weights()[1])
        interior = offset[..., 1:-1, 1:-1]
        assert torch.allclose(interior, interior[..., :1, :1].expand_as(interior), atol=1e-6)
        # Somewhere on the border the zero padding shows (only bottom/right for TF 'same' on even sizes).
        assert not torch.allclose(offset, interior[..., :1, :1].expand_as(offset), atol=1e-3)


class TestFoldBorders:
    @pytest.mark.parametrize("name", MODELS)
    def test_no_interior_is_one_band(self, name):
        """A 3x3 image under a 3x3 stride-2 kernel: every output window reaches into the padding."""
        fold = make_model(name, "fold")
        x = gray_batch(2, 3, 3)
        assert fold.stem.border_taps((3, 3)).bands == ((slice(0, 2), slice(0, 2)),)
        with torch.no_grad():
            torch.testing.assert_close(fold.stem(x), stock_stem(fold, x), rtol=1e-5, atol=1e-5)

    def test_bands_are_the_padded_rows_and_columns(self):
        def bands(stem, size):
            return [((r.start, r.stop), (c.start, c.stop)) for r, c in stem.border_taps(size).bands]

        stem = make_model("efficientnet_b0", "fold").stem  # symmetric padding 1, stride 2
        assert bands(stem, (64, 96)) == [((0, 1), (0, 48)), ((1, 32), (0, 1))]  # even: the top row, left column
        assert bands(stem, (67, 45)) == [((0, 1), (0, 23)), ((33, 34), (0, 23)), ((1, 33), (0, 1)), ((1, 33), (22, 23))]
        tf_stem = make_model("tf_efficientnet_b0", "fold").stem  # TF 'same': extra padding bottom/right
        assert bands(tf_stem, (64, 96)) == [((31, 32), (0, 48)), ((0, 31), (47, 48))]
        missing = tf_stem.border_taps((64, 96)).missing
        assert missing.shape == (9, 48 + 31)
        assert missing[:, :47].sum(0).tolist() == [3.0] * 47  # the bottom row: the 3 taps of the kernel's last row
        assert missing[:, 47].sum().item() == 5.0  # the corner: last row and last column

    @pytest.mark.parametrize("name", MODELS)
    def test_channels_last_model_keeps_an_nhwc_stem_output(self, name):
        """The folded 1-channel weight must carry NHWC strides, or the conv hands every later layer NCHW."""
        model = make_model(name, "fold").train().to(memory_format=torch.channels_last)
        x = gray_batch(2, 48, 40).contiguous(memory_format=torch.channels_last)
        out = model.stem(x)
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()

    @pytest.mark.parametrize("name", MODELS)
    def test_gradient_to_the_offset_without_batch_statistics(self, name):
        """With bn1 frozen (eval) the offset constant's gradient is not zero: fold must keep it, as repeat has it."""
        grads = {}
        for adapter in ("repeat", "fold"):
            model = make_model(name, adapter).double().train()
            model.model.bn1.eval()
            model(gray_batch(2, 48, 40).double()).square().mean().backward()
            grads[adapter] = model.stem.conv.weight.grad
        torch.testing.assert_close(grads["fold"], grads["repeat"], rtol=1e-9, atol=1e-12)
        model = make_model(name, "fold").train()
        model(gray_batch(2, 48, 40))
        assert model.stem.feeds_batch_stats
        model.model.bn1.eval()
        model(gray_batch(2, 48, 40))
        assert not model.stem.feeds_batch_stats


class TestFoldCache:
    def test_cached_in_eval_and_refreshed_after_update(self):
        model = make_model("tf_efficientnet_b0", "fold")
        stem = model.stem
        x = gray_batch(2, 64, 96)
        with torch.no_grad():
            first = stem(x)
            assert len(stem._offsets) == 1
            torch.testing.assert_close(stem(x), first, rtol=0, atol=0)
            stem.conv.weight.mul_(1.5)  # an optimizer step is an in-place update like this
            after = stem(x)
            torch.testing.assert_close(after, stock_stem(model, x), rtol=1e-5, atol=1e-5)

    def test_one_entry_per_size(self):
        stem = make_model("efficientnet_b0", "fold").stem
        with torch.no_grad():
            for size in SIZES:
                stem(gray_batch(1, *size))
        assert len(stem._offsets) == len(SIZES)

    def test_not_cached_when_training(self):
        stem = make_model("efficientnet_b0", "fold").stem.train()
        stem(gray_batch(2, 64, 64)).sum().backward()
        assert stem._offsets == {}


@pytest.mark.parametrize("name", MODELS)
class TestSum:
    def test_weights_equal_adapt_input_conv(self, name):
        model = make_model(name, "repeat")
        rgb = model.stem.conv.weight.detach().clone()
        summed = model.set_adapter("sum").stem.conv.weight
        assert summed.shape[1] == 1
        assert torch.equal(summed, adapt_input_conv(1, rgb))

    def test_equals_timm_in_chans_1_route(self, name, tmp_path):
        """The whole timm route: load the 3-channel weights into timm.create_model(in_chans=1)."""
        model = make_model(name, "repeat")
        path = tmp_path / "rgb.pth"
        torch.save(model.timm_state_dict(), path)
        ref = timm.create_model(name, num_classes=10, in_chans=1, pretrained=True,
                                pretrained_cfg_overlay={"file": str(path)}).eval()
        ref.classifier.load_state_dict(model.model.classifier.state_dict())  # timm resets a 10-class head
        model.set_adapter("sum")
        assert torch.equal(model.stem.conv.weight, ref.conv_stem.weight)
        x = gray_batch(2, 64, 96)
        mean, std = sum(model.mean) / 3, sum(model.std) / 3  # what timm's loader falls back to
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref((x - mean) / std), rtol=1e-5, atol=1e-6)

    def test_not_repeat_under_imagenet_stats(self, name):
        x = gray_batch(2, 64, 96)
        with torch.no_grad():
            diff = (make_model(name, "sum").stem(x) - make_model(name, "repeat").stem(x)).abs().max()
        uniform = len(set(make_model(name).mean)) == 1 and len(set(make_model(name).std)) == 1
        if uniform:  # tf_efficientnet_lite0: mean = std = 0.5 for every channel, so sum is exact
            assert diff <= 1e-5
        else:
            assert diff > 1e-2


@pytest.mark.parametrize("name", MODELS)
class TestSetAdapter:
    def test_round_trip_identical(self, name):
        model = make_model(name, "repeat")
        x = gray_batch(2, 67, 45)
        with torch.no_grad():
            before = model(x)
            model.set_adapter("fold").set_adapter("repeat")
            assert torch.equal(model(x), before)

    def test_shared_parameters_kept(self, name):
        model = make_model(name, "repeat")
        weight = model.stem.conv.weight
        for adapter in ("broadcast", "fold", "repeat"):
            assert model.set_adapter(adapter).stem.conv.weight is weight

    def test_leaving_sum_is_exact(self, name):
        model = make_model(name, "sum")
        x = gray_batch(2, 64, 96)
        with torch.no_grad():
            before = model.stem(x)
            for adapter in ("repeat", "fold"):
                after = copy.deepcopy(model).set_adapter(adapter).stem(x)
                torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("adapter", list_adapters())
class TestBackward:
    def test_every_parameter_gets_a_gradient(self, adapter, device):
        model = make_model("tf_efficientnet_lite0", adapter).to(device).train()
        model(gray_batch(2, 64, 96).to(device)).logsumexp(-1).sum().backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing
        assert model.stem.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tf_efficientnetv2_b0", "efficientnetv2_rw_t", "resnet18", "mobilenetv3_small_100"])
class TestOtherModels:
    def test_every_adapter_equals_stock_stem(self, name):
        x = gray_batch(2, 67, 45)
        base = GrayEfficientNet(name, adapter="repeat", num_classes=3).eval()
        with torch.no_grad():
            assert torch.equal(copy.deepcopy(base).set_adapter("broadcast").stem(x), base.stem(x))
            for adapter in (a for a in list_adapters() if ADAPTERS[a].foldable):  # windows: test_window.py
                model = copy.deepcopy(base).set_adapter(adapter)
                torch.testing.assert_close(model.stem(x), stock_stem(model, x), rtol=1e-5, atol=1e-5, msg=adapter)
                assert model(x).shape == (2, 3)


@pytest.mark.slow
class TestCompile:
    def test_compiled_fold_stem_equals_eager(self):
        stem = make_model("tf_efficientnet_b0", "fold").stem
        x = gray_batch(2, 67, 45)
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(stem)(x), stem(x), rtol=1e-5, atol=1e-5)
