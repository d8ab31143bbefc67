"""Class-activation maps (gray_effnet.cam) and ``python -m gray_effnet cam``."""

import numpy as np
import pytest
import torch
from PIL import Image

from gray_effnet import GrayEfficientNet, InputError, save_weights
from gray_effnet.__main__ import main
from gray_effnet.cam import find_image_files, grad_cam, jet, overlay, resolve_class, write_cams

from .helpers import MODELS, SIZES, gray_batch, make_model


def zhou_cam(model: GrayEfficientNet, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Independent reference: with an average pool and a linear head, Grad-CAM is the CAM of Zhou et al., the
    class's classifier row applied at each position of the last feature map, over the number of positions."""
    with torch.no_grad():
        feats = model.model.forward_features(model.prepare_input(x))  # (B, C, h, w)
        weight = model.model.get_classifier().weight[targets]  # (B, C)
        return torch.einsum("bc,bchw->bhw", weight, feats).relu() / (feats.shape[2] * feats.shape[3])


class TestGradCam:
    @pytest.mark.parametrize("size", SIZES)
    def test_shapes_and_range(self, size):
        model = make_model("tf_efficientnet_lite0", "broadcast")
        x = gray_batch(3, *size)
        cam = grad_cam(model, x)
        h, w = size
        assert cam.maps.shape == (3, h, w)
        assert cam.raw.shape == (3, -(-h // 32), -(-w // 32))  # TF 'same' padding rounds up
        assert cam.maps.min() >= 0 and cam.maps.max() <= 1
        assert torch.allclose(cam.maps.amax((1, 2))[cam.raw.amax((1, 2)) > 0], torch.tensor(1.0))
        assert cam.targets.tolist() == cam.probs.argmax(-1).tolist()
        torch.testing.assert_close(cam.probs, model(x).softmax(-1))

    @pytest.mark.parametrize("name", MODELS)
    def test_reference_zhou(self, name):
        model = make_model(name, "repeat")
        x = gray_batch(2, 96, 128, seed=1)
        targets = torch.tensor([2, 7])
        cam = grad_cam(model, x, targets)
        torch.testing.assert_close(cam.raw, zhou_cam(model, x, targets), rtol=1e-4, atol=1e-6)

    @pytest.mark.parametrize("name", MODELS)
    def test_repeat_broadcast_fold_equal(self, name):
        """The same weights through three stems (set_adapter swaps in place) give the same map."""
        model = make_model(name, "repeat")
        x = gray_batch(2, 67, 45, seed=2)
        ref = grad_cam(model, x)
        for adapter in ("broadcast", "fold"):
            model.set_adapter(adapter)
            assert model.adapter == adapter
            cam = grad_cam(model, x)
            assert cam.targets.tolist() == ref.targets.tolist()
            scale = ref.raw.abs().max().item()
            torch.testing.assert_close(cam.raw, ref.raw, rtol=1e-4, atol=1e-5 * scale)
            torch.testing.assert_close(cam.maps, ref.maps, rtol=1e-4, atol=1e-4)

    def test_target_per_image_and_mode_restored(self):
        model = make_model("efficientnet_b0", "fold").train()
        x = gray_batch(2, 64, 64)
        cam = grad_cam(model, x, torch.tensor([1, 4]))
        assert cam.targets.tolist() == [1, 4]
        assert model.training
        assert all(p.grad is None for p in model.parameters())  # no parameter gradient written
        assert grad_cam(model, x, 3).targets.tolist() == [3, 3]

    def test_frozen_parameters(self):
        model = make_model("efficientnet_b0", "broadcast").requires_grad_(False)
        x = gray_batch(1, 64, 64)
        torch.testing.assert_close(grad_cam(model, x, 5).raw, zhou_cam(model, x, torch.tensor([5])),
                                   rtol=1e-4, atol=1e-6)

    def test_uint8_input(self):
        model = make_model("efficientnet_b0", "broadcast")
        x = (gray_batch(1, 64, 64) * 255).round().to(torch.uint8)
        torch.testing.assert_close(grad_cam(model, x).maps, grad_cam(model, x.float() / 255).maps)

    def test_target_out_of_range(self):
        model = make_model("efficientnet_b0", "broadcast")
        with pytest.raises(InputError, match="target class 10 is outside the model's 10 classes"):
            grad_cam(model, gray_batch(1, 64, 64), 10)


def squares(n: int, seed: int, size: int = 128, side: int = 64, stride: int = 32):
    """Dim noise; every second image (class 1) has one bright square, placed on the feature grid at random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, size, size, generator=g) * 0.3
    y = torch.arange(n) % 2
    corners = (torch.randint(0, (size - side) // stride + 1, (n, 2), generator=g) * stride).tolist()
    for i, (top, left) in enumerate(corners):
        if y[i]:
            x[i, 0, top:top + side, left:left + side] = 1.0
    return x, y, corners


class TestSquarePeak:
    def test_map_peaks_inside_the_square(self, lite0_pretrained):
        """A model whose class is decided by one bright square: its map of that class peaks inside the square.

        The ImageNet backbone stays; the 2-class head is fitted (cross-entropy, L-BFGS) on the pooled features of
        32 images. The square covers a quarter of the image, so chance alone puts a peak inside 1 time in 4.
        """
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=2, pretrained=True).eval()
        x, y, _ = squares(32, seed=0)
        with torch.no_grad():
            pooled = model.model.forward_head(model.model.forward_features(model.prepare_input(x)), pre_logits=True)
        head = model.model.get_classifier()
        opt = torch.optim.LBFGS(head.parameters(), max_iter=100)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(pooled), y) + 1e-3 * head.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        x, y, corners = squares(40, seed=1)
        cam = grad_cam(model, x, 1)
        assert (cam.probs.argmax(-1) == y).float().mean() >= 0.9
        inside = 0
        for i in torch.nonzero(y).flatten().tolist():
            r, c = divmod(int(cam.maps[i].flatten().argmax()), x.shape[-1])
            top, left = corners[i]
            inside += top <= r < top + 64 and left <= c < left + 64
        assert inside >= 18, f"{inside} of 20 maps peak inside the square"


class TestOverlay:
    def test_jet_matches_matplotlib(self):
        mpl = pytest.importorskip("matplotlib")
        v = np.linspace(0, 1, 101)
        # matplotlib looks colours up in a 256-entry table: up to 1/256 of the steepest slope (4.5) apart
        np.testing.assert_allclose(jet(v), mpl.colormaps["jet"](v)[:, :3], atol=0.02)

    def test_overlay(self):
        gray = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
        out = overlay(gray, np.zeros_like(gray), alpha=0.5)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        np.testing.assert_allclose(out[..., 2] / 255, 0.5 * gray + 0.25, atol=1 / 255)  # jet(0) is (0, 0, 0.5)


@pytest.fixture
def checkpoint(tmp_path):
    model = GrayEfficientNet("efficientnet_b0", adapter="fold", num_classes=3, class_names=["cat", "dog", "owl"],
                             img_size=(64, 64))
    return save_weights(model.eval(), tmp_path / "w.safetensors")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 65535, (200, 300), dtype=np.uint16)).save(folder / "sub" / "b.png")
    (folder / "broken.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("not an image either")
    return folder


class TestCamCommand:
    def test_writes_one_png_per_image(self, checkpoint, images, tmp_path, capsys):
        out = tmp_path / "cams"
        assert main(["cam", "--weights", str(checkpoint), "--images", str(images), str(images / "a.png"),
                     "--output", str(out), "--no-progress"]) == 0
        printed = capsys.readouterr().out
        assert sorted(p.name for p in out.iterdir()) == ["a_cam.png", "b_cam.png"]  # a.png once, by its real path
        assert "skipped" in printed and "broken.png" in printed
        assert Image.open(out / "a_cam.png").size == (30 * 5, 40 * 5)  # enlarged by a whole factor to >= 128
        assert Image.open(out / "b_cam.png").size == (300, 200)  # its own size
        assert Image.open(out / "a_cam.png").mode == "RGB"
        assert "predicted" in printed and "2 class-activation map(s)" in printed

    def test_target_by_name(self, checkpoint, images, tmp_path, capsys):
        assert main(["cam", "--weights", str(checkpoint), "--images", str(images / "a.png"), "--output",
                     str(tmp_path / "c"), "--target", "owl", "--no-progress"]) == 0
        assert "map of owl" in capsys.readouterr().out

    @pytest.mark.parametrize("argv, message", [
        (["--target", "cow"], "--target 'cow' is not a class of the checkpoint; its classes are cat, dog, owl"),
        (["--images", "{tmp}/nothing"], "no such file or folder"),
        (["--images", "{tmp}/empty"], "no image files there"),
        (["--output", "{tmp}/file.txt"], "is a file; name a folder"),
    ])
    def test_errors(self, checkpoint, images, tmp_path, capsys, argv, message):
        (tmp_path / "empty").mkdir()
        (tmp_path / "file.txt").write_text("x")
        base = {"--weights": str(checkpoint), "--images": str(images), "--output": str(tmp_path / "out")}
        for flag, value in zip(argv[::2], argv[1::2]):
            base[flag] = value.format(tmp=tmp_path)
        assert main(["cam", *[a for kv in base.items() for a in kv]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err

    def test_no_progress_bar_without_a_terminal(self, checkpoint, images, tmp_path, capsys):
        write_cams(checkpoint, [images / "a.png"], tmp_path / "c", progress=True)
        err = capsys.readouterr().err
        assert "img/s" not in err and "cam:" not in err

    def test_find_image_files_and_resolve_class(self, images):
        assert [p.name for p in find_image_files([images])] == ["a.png", "broken.png", "b.png"]
        assert resolve_class("dog", ["cat", "dog"], 2) == 1 and resolve_class("0", ["cat", "dog"], 2) == 0
        assert resolve_class(None, ["cat"], 1) is None


class TestMultiLabelProbabilities:
    def test_sigmoid_per_finding(self):
        """A multi-label model's CAM reports each finding's own sigmoid, not a softmax over the findings."""
        torch.manual_seed(0)
        model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=3, class_names=["a", "b", "c"], task="multi")
        x = torch.rand(2, 1, 64, 64)
        cam = grad_cam(model, x)
        with torch.no_grad():
            want = model.eval()(x).sigmoid()
        assert torch.allclose(cam.probs, want, atol=1e-5) and not torch.allclose(cam.probs.sum(-1), torch.ones(2))
