"""Export: a folded 1-channel stem in ONNX and TorchScript, equivalent to the PyTorch model it came from."""

import functools
import importlib.util
import re
import subprocess
import sys

import pytest
import torch

from gray_effnet import ADAPTERS, GrayEfficientNet, InputError, WeightsError, list_adapters, load_model, save_weights
from gray_effnet.__main__ import main
from gray_effnet.adapters import FoldStem
from gray_effnet.export import FrozenFoldStem, export, exportable

from .helpers import MODELS, SIZES, gray_batch, make_model, stock_stem

IMG_SIZE = (64, 80)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(adapter)``: a saved random Lite0 (3 classes, img_size 64x80) trained with ``adapter``."""

    @functools.cache
    def make(adapter: str):
        torch.manual_seed(0)
        model = GrayEfficientNet("tf_efficientnet_lite0", adapter="repeat", num_classes=3, img_size=IMG_SIZE)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):  # random statistics, so no test passes on a trivial init
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
            # Random Lite0 logits reach ~50, where float32 rounding alone is ~1e-4; a trained head gives ~10.
            model.model.classifier.weight.mul_(0.1)
        path = tmp_path_factory.mktemp(adapter) / "best.safetensors"
        save_weights(model.set_adapter(adapter), path)
        return path

    return make


def _run(fmt: str, path, x: torch.Tensor) -> torch.Tensor:
    """Run an exported file the way a deployment would: onnxruntime, or torch.jit.load."""
    if fmt == "onnx":
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    with torch.no_grad():
        return torch.jit.load(str(path))(x)  # one call: the profiling executor only profiles, it compiles nothing


def _first_conv_in_chans(fmt: str, path, stem_name: str) -> int:
    """Input channels of the exported stem conv, read from the file; also checks that no 3-channel conv is left."""
    if fmt == "onnx":
        onnx = pytest.importorskip("onnx")
        graph = onnx.load(str(path)).graph
        dims = {t.name: list(t.dims) for t in graph.initializer}
        assert not [n for n, d in dims.items() if len(d) == 4 and d[1] == 3]
        first = next(n for n in graph.node if n.op_type == "Conv")  # ONNX nodes are in topological order
        return dims[first.input[1]][1]
    scripted = torch.jit.load(str(path))
    assert not [n for n, p in scripted.named_parameters() if p.ndim == 4 and p.shape[1] == 3]
    return functools.reduce(getattr, [*stem_name.split("."), "conv", "weight"], scripted).shape[1]


class TestFrozenFoldStem:
    @pytest.mark.parametrize("name", MODELS)
    @pytest.mark.parametrize("adapter", [a for a in list_adapters() if ADAPTERS[a].foldable])  # windows: test_window
    def test_matches_adapter(self, name, adapter, device):
        """Exact against every adapter, on odd sizes where TF 'same' padding is asymmetric."""
        model = make_model(name, adapter).to(device)
        stem = FrozenFoldStem.from_adapter(model.stem).to(device)
        assert stem.conv.weight.shape[1] == stem.offset_conv.weight.shape[1] == 1
        assert type(stem.conv) is type(model.stem.conv)  # Conv2dSame stays Conv2dSame
        with torch.no_grad():
            for h, w in SIZES:
                x = gray_batch(2, h, w).to(device)
                torch.testing.assert_close(stem(x), model.stem(x), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(stem(x), stock_stem(model, x), atol=1e-5, rtol=1e-5)

    def test_exportable_leaves_model(self):
        model = make_model("tf_efficientnet_lite0", "repeat")
        before = model.stem.conv.weight.clone()
        net = exportable(model)
        assert model.adapter == "repeat" and torch.equal(model.stem.conv.weight, before)
        assert not [m for m in net.modules() if isinstance(m, FoldStem)]  # its Python offset cache cannot export
        assert not [p for p in net.parameters() if p.requires_grad]


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")  # in _run, on purpose
class TestExport:
    @pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
    @pytest.mark.parametrize("adapter", ["fold", "sum"])
    def test_equivalent(self, fmt, adapter, checkpoint, tmp_path):
        weights = checkpoint(adapter)
        out = tmp_path / f"model.{fmt}"
        result = export(weights, fmt, out)
        assert out.is_file() and result.path == out
        assert result.max_abs_diff is not None and result.max_abs_diff <= result.tolerance
        assert result.check_shapes[0] == (2, 1, *IMG_SIZE)  # the checkpoint's img_size
        text = str(result)
        assert f"wrote {out} ({'ONNX opset 17' if fmt == 'onnx' else 'TorchScript'})" in text
        assert f"its {adapter!r} stem folded to 1 input channel, normalisation inside" in text
        assert "'image' float32 (batch, 1, height, width) in [0, 1]" in text and "'logits' float32 (batch, 3)" in text
        assert f"max |{'onnxruntime' if fmt == 'onnx' else 'torch.jit.load'} - PyTorch| = " in text

        model = load_model(weights).eval()
        assert _first_conv_in_chans(fmt, out, model.stem_name) == 1
        # Another batch size and an odd size than the export's example: batch, H and W are dynamic.
        x = gray_batch(3, 67, 45, seed=5)
        with torch.no_grad():
            ref = model(x)
        assert ref.abs().max() > 0.5  # not a trivially small output
        assert (_run(fmt, out, x) - ref).abs().max().item() <= 1e-4

    def test_without_onnxruntime(self, checkpoint, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` raises ImportError
        out = tmp_path / "m.onnx"
        result = export(checkpoint("fold"), "onnx", out, img_size=(96, 64))
        assert out.is_file() and result.max_abs_diff is None
        assert result.check_shapes[0] == (2, 1, 96, 64)
        assert "check:  skipped: onnxruntime is not installed (from a checkout: pip install -e '.[onnx]'" in str(result)

    def test_failed_check_keeps_old_file(self, checkpoint, tmp_path, monkeypatch):
        pytest.importorskip("onnxruntime")
        out = tmp_path / "m.onnx"
        out.write_bytes(b"old")
        # A stem that forgets the mean: the check must catch it, and nothing may replace the old file.
        monkeypatch.setattr(FrozenFoldStem, "forward", lambda self, x: self.conv(x))
        with pytest.raises(WeightsError, match=r"the exported onnx model differs from the PyTorch model .* by "):
            export(checkpoint("fold"), "onnx", out)
        assert out.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left

    def test_unknown_format(self, checkpoint, tmp_path):
        with pytest.raises(InputError, match="unknown export format 'tflite'; choose one of: onnx, torchscript"):
            export(checkpoint("fold"), "tflite", tmp_path / "m.tflite")

    def test_without_onnx(self, checkpoint, tmp_path, monkeypatch):
        monkeypatch.setitem(sys.modules, "onnx", None)
        with pytest.raises(InputError, match=r"needs the onnx package \(from a checkout: pip install -e '\.\[onnx\]'"):
            export(checkpoint("fold"), "onnx", tmp_path / "m.onnx")

    def test_too_small(self, checkpoint, tmp_path):
        with pytest.raises(InputError, match="image 16x64 is smaller than the network's total stride 32"):
            export(checkpoint("fold"), "onnx", tmp_path / "m.onnx", img_size=(16, 64))
        assert not (tmp_path / "m.onnx").exists()


class TestCLI:
    def _cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gray_effnet", "export", *args], capture_output=True, text=True)

    def test_export(self, checkpoint, tmp_path):
        out = tmp_path / "sub" / "best.onnx"
        proc = self._cli("--weights", str(checkpoint("sum")), "--format", "onnx", "--output", str(out))
        assert proc.returncode == 0, proc.stderr
        assert f"wrote {out} (ONNX opset 17)" in proc.stdout
        if importlib.util.find_spec("onnxruntime") is None:
            assert "onnxruntime is not installed" in proc.stdout
        else:  # installed (the test extra installs it): the check must have run, and passed
            diff = re.search(r"max \|onnxruntime - PyTorch\| = ([0-9.e+-]+)", proc.stdout)
            assert diff, proc.stdout
            assert float(diff.group(1)) <= 1e-4
        assert out.is_file()
        assert "Warning" not in proc.stderr  # the torch.jit deprecation notices are kept from users

    def test_missing_weights(self, tmp_path, capsys):
        # In-process: the subprocess above already covers `python -m`, and a second interpreter costs seconds.
        missing = tmp_path / "nope.safetensors"
        argv = ["export", "--weights", str(missing), "--format", "torchscript", "--output", str(tmp_path / "m.pt")]
        assert main(argv) == 2  # an exception here would fail the test: no traceback reaches the user
        assert capsys.readouterr().err == f"error: weights file {missing} does not exist\n"
