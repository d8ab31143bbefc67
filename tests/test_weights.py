"""Weights: bundled Lite0/1/2, local files, untrusted pickles, offline hub, checkpoints of this project."""

import math
import time

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from gray_effnet import GrayEfficientNet, WeightsError, list_adapters, load_model, save_weights
from gray_effnet.weights import bundled_weights_path, pretrained_weights_file, read_weights_file

from .helpers import PicklePayload, gray_batch, make_model


def _photo(name: str, size=(224, 224)) -> torch.Tensor:
    data = pytest.importorskip("skimage.data")
    rgb = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(rgb, size=size, mode="bilinear", antialias=True, align_corners=False)


class TestBundled:
    @pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
    def test_maps_onto_timm(self, name):
        if bundled_weights_path(name) is None:
            pytest.skip(f"the weights package for {name} is not installed")
        model = GrayEfficientNet(name, pretrained=True)
        raw, _ = read_weights_file(bundled_weights_path(name))
        ours = model.timm_state_dict()
        assert len(raw) == len(ours)
        for (src_key, src), (key, value) in zip(raw.items(), ours.items()):
            assert torch.equal(src, value), (src_key, key)

    @pytest.mark.parametrize("photo", ["chelsea", "coffee"])
    def test_gray_photo_keeps_rgb_top1_under_every_adapter(self, photo, lite0_pretrained):
        """Real weights, a real photo: the RGB model's top-1 survives turning the photo gray."""
        rgb = _photo(photo)
        stock = timm.create_model("tf_efficientnet_lite0").eval()
        stock.load_state_dict(lite0_pretrained.timm_state_dict())
        mean = torch.tensor(lite0_pretrained.mean).view(1, 3, 1, 1)
        std = torch.tensor(lite0_pretrained.std).view(1, 3, 1, 1)
        gray = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
        with torch.no_grad():
            rgb_top1 = stock((rgb - mean) / std).argmax(-1)
            assert rgb_top1.item() in (281, 282, 285, 967, 968)  # tabby / tiger / Egyptian cat, espresso / cup
            for adapter in list_adapters():
                assert torch.equal(lite0_pretrained.set_adapter(adapter)(gray).argmax(-1), rgb_top1), adapter

    def test_wrong_shapes_fail_loudly(self, tmp_path):
        raw, _ = read_weights_file(bundled_weights_path("tf_efficientnet_lite0"))
        raw["_conv_stem.weight"] = torch.zeros(16, 3, 3, 3)
        path = tmp_path / "broken.pth"
        torch.save(raw, path)
        with pytest.raises(WeightsError, match=r"_conv_stem.weight \(16, 3, 3, 3\) does not fit conv_stem.weight"):
            GrayEfficientNet("tf_efficientnet_lite0", weights=str(path))

    def test_num_classes_resets_classifier(self, lite0_pretrained):
        model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=9, pretrained=True)
        assert model.model.classifier.weight.shape == (9, 1280)
        torch.testing.assert_close(model.stem.conv.weight, lite0_pretrained.stem.conv.weight)
        assert model.model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1)  # head_init_std
        assert not model.model.classifier.bias.any()
        timm_init = GrayEfficientNet("tf_efficientnet_lite0", num_classes=9, pretrained=True, head_init_std=None)
        assert timm_init.model.classifier.weight.std() > 0.1

    def test_head_init_starts_near_uniform(self):
        """Real weights, real digits: the first loss is near log(10) with head_init_std, far above it without."""
        digits = pytest.importorskip("sklearn.datasets").load_digits()
        x = F.interpolate(torch.from_numpy(digits.images[:128] / 16.0).float()[:, None], size=(64, 64),
                          mode="bilinear", align_corners=False)
        y = torch.from_numpy(digits.target[:128])
        losses = {}
        for std in (0.01, None):
            torch.manual_seed(0)
            model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=10, pretrained=True, head_init_std=std)
            with torch.no_grad():
                losses[std] = F.cross_entropy(model.eval()(x), y).item()
        assert losses[0.01] == pytest.approx(math.log(10), abs=0.3)
        assert losses[None] > 2 * math.log(10)

    def test_loaded_classifier_kept(self, tmp_path):
        src = make_model("efficientnet_b0", "repeat", num_classes=10)
        path = save_weights(src, tmp_path / "w.safetensors")
        model = GrayEfficientNet("efficientnet_b0", num_classes=10, weights=str(path))
        assert torch.equal(model.model.classifier.weight, src.model.classifier.weight)


class TestLocalFiles:
    @pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
    def test_three_channel_timm_state_dict(self, tmp_path, suffix):
        src = make_model("efficientnet_b0", "repeat")
        path = tmp_path / f"w{suffix}"
        sd = {k: v.contiguous() for k, v in src.timm_state_dict().items()}
        save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
        model = GrayEfficientNet("efficientnet_b0", adapter="fold", num_classes=10, weights=str(path)).eval()
        x = gray_batch(2, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), src(x), rtol=1e-4, atol=1e-6)

    def test_prefixes_stripped(self, tmp_path):
        src = make_model("efficientnet_b0", "repeat")
        path = tmp_path / "ddp.pth"
        torch.save({f"module._orig_mod.{k}": v for k, v in src.timm_state_dict().items()}, path)
        model = GrayEfficientNet("efficientnet_b0", num_classes=10, weights=str(path))
        assert torch.equal(model.stem.conv.weight, src.stem.conv.weight)

    def test_one_channel_weights_spread_exactly(self, tmp_path):
        src = make_model("efficientnet_b0", "sum")
        path = tmp_path / "in_chans1.safetensors"
        save_file({k: v.contiguous() for k, v in src.timm_state_dict().items()}, str(path))
        model = GrayEfficientNet("efficientnet_b0", adapter="repeat", num_classes=10, weights=str(path)).eval()
        x = gray_batch(2, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model.stem(x), src.stem(x), rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("other, problem", [("efficientnet_b1", r"\d+ unexpected"),
                                                ("efficientnet_b2", "wrong shape")])
    def test_other_architecture(self, tmp_path, other, problem):
        path = tmp_path / f"{other}.safetensors"
        save_file(timm.create_model(other).state_dict(), str(path))
        with pytest.raises(WeightsError, match=f"does not fit efficientnet_b0: .*{problem}"):
            GrayEfficientNet("efficientnet_b0", weights=str(path))

    def test_missing_file(self):
        with pytest.raises(WeightsError, match="weights file /nope.pth does not exist"):
            GrayEfficientNet("efficientnet_b0", weights="/nope.pth")

    def test_corrupt_file(self, tmp_path):
        path = tmp_path / "junk.safetensors"
        path.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(WeightsError, match="cannot read .*junk.safetensors as safetensors"):
            GrayEfficientNet("efficientnet_b0", weights=str(path))



class TestUntrusted:
    def test_pickle_payload_refused_and_not_run(self, tmp_path):
        marker = tmp_path / "pwned"
        path = tmp_path / "evil.pth"
        torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": PicklePayload(marker)}, path)
        with pytest.raises(WeightsError, match="refusing to load .*evil.pth: it holds pickled Python objects"):
            GrayEfficientNet("efficientnet_b0", weights=str(path))
        with pytest.raises(WeightsError, match="refusing to load"):
            load_model(path)
        assert not marker.exists()


class TestHub:
    def test_offline_fails_fast_and_clearly(self, monkeypatch, tmp_path):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        start = time.perf_counter()
        with pytest.raises(WeightsError) as info:
            GrayEfficientNet("efficientnet_b0", pretrained=True)
        assert time.perf_counter() - start < 10
        message = str(info.value)
        assert "cannot get pretrained weights for 'efficientnet_b0'" in message
        assert "cannot be reached" in message and "--no-pretrained" in message and "weights=PATH" in message
        # No chained traceback from deep inside huggingface_hub.
        assert info.value.__cause__ is None and (info.value.__context__ is None or info.value.__suppress_context__)

    def test_cached_download_used_offline(self, monkeypatch, tmp_path):
        """A checkpoint already in torch hub's cache (timm's 'url' source) loads with no network."""
        src = make_model("efficientnet_b0", "repeat", num_classes=1000)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("TORCH_HOME", str(tmp_path))
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(src.timm_state_dict(), tmp_path / "hub" / "checkpoints" / "b0_test.pth")
        cfg = {**timm.create_model("efficientnet_b0").pretrained_cfg, "hf_hub_id": None,
               "url": "https://example.invalid/b0_test.pth"}
        path = pretrained_weights_file("efficientnet_b0", cfg)
        assert path == tmp_path / "hub" / "checkpoints" / "b0_test.pth"
        target = GrayEfficientNet("efficientnet_b0", adapter="fold", weights=str(path))
        assert torch.equal(target.stem.conv.weight, src.stem.conv.weight)
        assert torch.equal(target.model.classifier.weight, src.model.classifier.weight)  # the head too


@pytest.mark.parametrize("adapter", list_adapters())
class TestCheckpoints:
    def test_load_model_rebuilds(self, adapter, tmp_path):
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter=adapter, num_classes=3,
                                 class_names=["a", "b", "c"], img_size=(84, 112)).eval()
        path = save_weights(model, tmp_path / "best.safetensors", epoch=4)
        loaded = load_model(path).eval()
        assert (loaded.adapter, loaded.num_classes, loaded.class_names, loaded.img_size) == (
            adapter, 3, ["a", "b", "c"], (84, 112))
        x = gray_batch(2, 84, 112)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left nothing behind


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    """A plain timm state dict has no metadata to rebuild a model from (one case: no adapter is involved)."""
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in make_model("efficientnet_b0").timm_state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match="plain.safetensors is not a gray_effnet checkpoint .*GrayEfficientNet"):
        load_model(path)
