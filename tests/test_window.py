"""The window adapters: ``window`` (fixed CT windows) and ``wso`` (learned, Lee et al. 2018, arXiv:1812.00572).

Shapes, uint8/float agreement and gradients come from the tests parametrised over ``list_adapters()``; here are
the windows' own values, options and errors, saving, ``set_adapter``, export and the train.py round trip.
"""

import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from timm.optim import create_optimizer_v2

from gray_effnet import GrayEfficientNet, InputError, WeightsError, list_adapters, load_model, save_weights
from gray_effnet.adapters import ADAPTERS, create_adapter
from gray_effnet.explain import equivalence, format_report, trace
from gray_effnet.export import export

from .helpers import MODELS, SIZES, gray_batch, make_model

WINDOWED = ["window", "wso"]
CT = {"windows": [[40, 80], [80, 200], [600, 2800]], "range": [-1024, 3071]}
CT_RANGE = "range:-1024:3071"


def ct_model(adapter: str, name: str = "efficientnet_b0", **kwargs) -> GrayEfficientNet:
    torch.manual_seed(0)
    return GrayEfficientNet(name, adapter=adapter, num_classes=3, intensity=CT_RANGE, adapter_kwargs=CT,
                            **kwargs).eval()


def hu_ramp(h: int = 64, w: int = 80) -> tuple[torch.Tensor, np.ndarray]:
    """A (1, 1, H, W) input whose pixels run from -1100 to 3100 HU, and those HU values."""
    hu = np.linspace(-1100, 3100, h * w).reshape(h, w)
    return torch.from_numpy(np.clip((hu + 1024) / 4095, 0, 1)).float()[None, None], hu


class TestRegistry:
    def test_registered_after_the_foldable_ones(self):
        assert list_adapters()[-2:] == WINDOWED
        assert all(ADAPTERS[a].foldable for a in list_adapters()[:-2])
        assert not any(ADAPTERS[a].foldable for a in WINDOWED)


class TestWindowValues:
    def test_channels_are_the_ct_windows(self):
        stem = ct_model("window").stem
        x, hu = hu_ramp()
        hu = np.clip(hu, -1024, 3071)  # what the range mapping leaves of the ramp
        with torch.no_grad():
            channels = stem.windowed(x)[0].double().numpy()
        for i, (c, w) in enumerate(CT["windows"]):  # an independent computation in HU
            np.testing.assert_allclose(channels[i], np.clip((hu - c + w / 2) / w, 0, 1), atol=2e-4)
        assert channels[0][hu < 0].max() == 0 and channels[0][hu > 80].min() == 1  # brain: 0..80 HU

    def test_then_the_stock_normalisation_and_conv(self):
        model = ct_model("window")
        x, _ = hu_ramp()
        mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
        with torch.no_grad():
            ref = model.stem.conv((model.stem.windowed(x) - mean) / std)
            torch.testing.assert_close(model.stem(x), ref)

    @pytest.mark.parametrize("size", SIZES)
    def test_default_is_repeat(self, size):
        """No windows given: the whole range in every channel, which the clip leaves as it is."""
        x = gray_batch(2, *size)
        with torch.no_grad():
            assert torch.equal(make_model("efficientnet_b0", "window").stem(x), make_model("efficientnet_b0").stem(x))

    def test_no_parameters_of_its_own(self):
        model = ct_model("window")
        assert [n for n, _ in model.stem.named_parameters()] == ["conv.weight"]
        assert not [k for k in model.state_dict() if "center" in k or "width" in k]


class TestWsoValues:
    def test_k_and_u_as_in_the_paper(self):
        stem = ct_model("wso").stem
        assert stem.upper == 1.0 and stem.eps == pytest.approx(1 / 255)
        assert stem.k == pytest.approx(2 * math.log(254))  # 2 ln(U / eps - 1), U = 255 and eps = 1 in the paper

    def test_window_edges_map_to_eps_and_u_minus_eps(self):
        stem = ct_model("wso").stem
        edges = [v for c, w in CT["windows"] for v in (c - w / 2, c, c + w / 2)]
        x = torch.tensor([(v + 1024) / 4095 for v in edges], dtype=torch.float32).view(1, 1, 1, -1)
        with torch.no_grad():
            out = stem.windowed(x)[0, :, 0].double()  # (3, 9): every channel at every edge
        for i in range(3):
            lo, mid, hi = out[i, 3 * i: 3 * i + 3].tolist()
            assert lo == pytest.approx(1 / 255, abs=1e-4) and mid == pytest.approx(0.5, abs=1e-4)
            assert hi == pytest.approx(254 / 255, abs=1e-4)

    def test_starts_close_to_window(self):
        """The sigmoid is a soft clip: on the ramp, within a few hundredths of the fixed windows."""
        x, _ = hu_ramp()
        with torch.no_grad():
            diff = (ct_model("wso").stem.windowed(x) - ct_model("window").stem.windowed(x)).abs()
        assert diff.mean() < 0.05 and diff.max() < 0.25  # most at c -+ w/4: sigmoid(k/4) = 0.94 against 0.75

    def test_windows_learn(self):
        model = ct_model("wso").train()
        before = model.stem.window_table()
        opt = torch.optim.Adam(model.stem.windows.parameters(), lr=1e-2)
        x = gray_batch(4, 64, 64)
        model(x).logsumexp(-1).sum().backward()
        grads = [p.grad for p in model.stem.windows.parameters()]
        assert all(g is not None and g.abs().min() > 0 for g in grads)
        opt.step()
        after = model.stem.window_table()
        assert all(a != pytest.approx(b, rel=1e-6) for a, b in zip(after, before))
        assert all(w > 0 for _, w in after)  # the log-width parametrisation keeps widths positive

    def test_windows_not_weight_decayed(self):
        model = ct_model("wso")
        groups = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.01).param_groups
        no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
        assert {id(p) for p in model.stem.windows.parameters()} <= no_decay

    def test_state_dict_names(self):
        keys = set(ct_model("wso").timm_state_dict())
        assert {"conv_stem.windows.center", "conv_stem.windows.log_width", "conv_stem.weight"} <= keys


class TestOptions:
    @pytest.mark.parametrize("adapter", WINDOWED)
    @pytest.mark.parametrize(("options", "message"), [
        ({"windows": [[40, 80]] * 2}, "windows must be 3 \\[center, width\\] pairs"),
        ({"windows": "40:80"}, "windows must be 3 \\[center, width\\] pairs"),
        ({"windows": [[40, 80], [80, 0], [600, 2800]]}, "window widths must be positive; got \\[\\[80.0, 0.0\\]\\]"),
        ({"windows": [[40, 80], [80], [600, 2800]]}, "each window \\(\\[center, width\\]\\) must be 2 finite numbers"),
        ({"windows": [[40, math.nan]] * 3}, "each window .* must be 2 finite numbers; got \\[40, nan\\]"),
        ({"range": [3071, -1024]}, "range must be \\[low, high\\] with low < high"),
        ({"range": [0]}, "range \\(the physical values that 0 and 1 stand for\\) must be 2 finite numbers"),
        ({"width": 3}, "takes windows, range; got width"),
    ])
    def test_errors(self, adapter, options, message):
        with pytest.raises(InputError, match=f"adapter '{adapter}': {message}" if "takes" not in message else message):
            create_adapter(adapter, torch.nn.Conv2d(3, 8, 3), (0.5,) * 3, (0.5,) * 3, **options)

    def test_other_adapters_take_none(self):
        with pytest.raises(InputError, match="adapter 'fold' takes no options; got windows"):
            GrayEfficientNet("efficientnet_b0", adapter="fold", adapter_kwargs={"windows": CT["windows"]})

    @pytest.mark.parametrize("intensity", ["full", "range:-1000:3000"])
    def test_range_must_be_the_datas(self, intensity):
        with pytest.raises(InputError, match=f"over range \\[-1024, 3071\\], but the data's intensity mapping is "
                                             f"'{intensity}'; map the data with the same 'range:LO:HI'"):
            GrayEfficientNet("efficientnet_b0", adapter="window", intensity=intensity, adapter_kwargs=CT)

    @pytest.mark.parametrize("adapter", WINDOWED)
    def test_describe(self, adapter):
        meta = ct_model(adapter).describe()
        assert meta["adapter"] == adapter and meta["intensity"] == CT_RANGE
        assert meta["adapter_kwargs"] == {"windows": [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]],
                                          "range": [-1024.0, 3071.0]}
        assert make_model("efficientnet_b0", "fold").describe()["adapter_kwargs"] == {}


class TestSetAdapter:
    @pytest.mark.parametrize("name", MODELS)
    @pytest.mark.parametrize("adapter", WINDOWED)
    def test_keeps_the_stem_weight(self, name, adapter):
        model = make_model(name, "repeat")
        model.intensity = CT_RANGE
        weight = model.stem.conv.weight
        model.set_adapter(adapter, CT)
        assert model.stem.conv.weight is weight and model.stem.options() == {k: [list(map(float, w)) if
                                                                                  isinstance(w, list) else float(w)
                                                                                  for w in v] for k, v in CT.items()}
        with torch.no_grad():
            out = model(gray_batch(2, *SIZES[0]))
        assert torch.isfinite(out).all()
        assert model.set_adapter("repeat").stem.conv.weight is weight and model.stem.options() == {}

    def test_same_name_other_windows_rebuilds(self):
        model = ct_model("window")
        model.set_adapter("window", {**CT, "windows": [[0, 100]] * 3})
        np.testing.assert_allclose(model.stem.window_table(), [(0, 100)] * 3, rtol=1e-6)


class TestSaveLoad:
    @pytest.mark.parametrize("adapter", WINDOWED)
    def test_round_trip_keeps_learned_windows(self, adapter, tmp_path):
        model = ct_model(adapter, name="tf_efficientnet_lite0")
        if adapter == "wso":
            with torch.no_grad():
                model.stem.windows.center.add_(0.01)  # as if trained: no longer the initial windows
                model.stem.windows.log_width.sub_(0.1)
        path = save_weights(model, tmp_path / "m.safetensors")
        loaded = load_model(path).eval()
        assert loaded.adapter == adapter and loaded.intensity == CT_RANGE
        np.testing.assert_allclose(loaded.stem.window_table(), model.stem.window_table(), rtol=1e-6)
        x = gray_batch(2, 64, 80)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        if adapter == "wso":
            assert loaded.stem.window_table()[0][0] == pytest.approx(40 + 0.01 * 4095, rel=1e-5)


    def test_weights_file_starts_from_learned_windows(self, tmp_path):
        """--weights of a wso checkpoint (fine-tuning further) keeps its learned windows, not the given ones."""
        model = ct_model("wso", name="tf_efficientnet_lite0")
        with torch.no_grad():
            model.stem.windows.center.add_(0.01)
        path = save_weights(model, tmp_path / "m.safetensors")
        again = ct_model("wso", name="tf_efficientnet_lite0", weights=str(path))
        assert torch.equal(again.stem.windows.center, model.stem.windows.center)
        with pytest.raises(WeightsError, match="holds the learned intensity windows of a 'wso' stem"):
            GrayEfficientNet("tf_efficientnet_lite0", adapter="fold", num_classes=3, weights=str(path))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
class TestExport:
    @pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
    @pytest.mark.parametrize("adapter", WINDOWED)
    def test_exported_as_is_and_checked(self, adapter, fmt, tmp_path):
        if fmt == "onnx":
            pytest.importorskip("onnx")
        model = ct_model(adapter, name="tf_efficientnet_lite0", img_size=(64, 80))
        if adapter == "wso":
            with torch.no_grad():
                model.stem.windows.center.add_(0.01)
        weights = save_weights(model, tmp_path / "m.safetensors")
        result = export(weights, fmt, tmp_path / f"m.{fmt}")
        assert f"its {adapter!r} stem as trained (intensity windows, 3-channel conv)" in str(result)
        if result.max_abs_diff is not None:
            assert result.max_abs_diff <= result.tolerance
        x, _ = hu_ramp(67, 45)  # another size than the export's example
        with torch.no_grad():
            ref = model(x)
        if fmt == "torchscript":
            with torch.no_grad():
                out = torch.jit.load(str(tmp_path / "m.torchscript"))(x)
        else:
            ort = pytest.importorskip("onnxruntime")
            out = torch.from_numpy(ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"image": x.numpy()})[0])
        assert (out - ref).abs().max() <= 1e-4


class TestExplain:
    @pytest.mark.parametrize(("adapter", "label"), [("window", "fixed"), ("wso", "learned")])
    def test_prints_the_windows(self, adapter, label):
        model = ct_model(adapter)
        if adapter == "wso":
            with torch.no_grad():
                model.stem.windows.center.add_(10 / 4095)  # +10 HU
        x = torch.zeros(1, 1, 64, 64)
        text = format_report(model, trace(model, x), equivalence(model, x), "random")
        assert f"Intensity windows ({label}), one per channel, in physical units, input 0..1 = -1024..3071:" in text
        center = 50 if adapter == "wso" else 40
        assert f"channel 0: center {center}" in text and "channel 2: center" in text and "width 2800" in text
        assert "window, wso: intensity windows, different from repeat by design" in text


@pytest.mark.slow
class TestTrainPy:
    def test_dicom_wso_train_evaluate_predict(self, tmp_path, capsys):
        """train.py on a DICOM folder with learned windows; --evaluate and predict reuse the saved mapping."""
        pydicom = pytest.importorskip("pydicom")
        from pydicom.data import get_testdata_file

        train = pytest.importorskip("train")
        from gray_effnet.__main__ import main as cli

        data = tmp_path / "data"
        for cls, name in (("ct", "CT_small.dcm"), ("mr", "MR_small.dcm")):
            (data / cls).mkdir(parents=True)
            for i in range(4):
                shutil.copy(get_testdata_file(name, download=False), data / cls / f"IM{i:04d}")
        assert pydicom.dcmread(data / "ct" / "IM0000").Modality == "CT"
        out = tmp_path / "run"
        args = ["--data", data, "--output", out, "--adapter", "wso", "--no-pretrained", "--epochs", "1",
                "--intensity", "range", "-1024", "3071", "--windows", "40:80", "80:200", "600:2800",
                "--img-size", "32", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--val-split", "0.25"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            train.main(train.get_args_parser().parse_args([str(a) for a in args]))
        model = load_model(out / "last.safetensors")
        assert model.adapter == "wso" and model.intensity == CT_RANGE
        assert model.describe()["adapter_kwargs"]["windows"] == [[40.0, 80.0], [80.0, 200.0], [600.0, 2800.0]]
        assert not np.allclose(model.stem.window_table(), CT["windows"], rtol=1e-6)  # one step moved them
        capsys.readouterr()
        train.main(train.get_args_parser().parse_args(
            ["--evaluate", "--weights", str(out / "last.safetensors"), "--data", str(data), "--workers", "0",
             "--no-progress", "--val-split", "0.25", "--output", str(tmp_path / "eval")]))
        assert "on 2 images" in capsys.readouterr().out
        assert cli(["predict", "--weights", str(out / "last.safetensors"), "--data", str(data / "ct"),
                    "--workers", "0", "--output", str(tmp_path / "p.csv")]) == 0
        assert "4 images predicted as" in capsys.readouterr().out

    @pytest.mark.parametrize(("argv", "message"), [
        (["--adapter", "wso"], "--adapter wso needs windows in physical units and the range they are read in"),
        (["--adapter", "window", "--windows", "40:80", "80:200", "600:2800"], "the intensity mapping is 'full'"),
        (["--adapter", "fold", "--windows", "40:80"], "--windows is for --adapter window or wso"),
        (["--adapter", "window", "--intensity", "range", "0", "1", "--windows", "40:80"],
         "--adapter window needs 3 windows, one per stem channel; got 1"),
    ])
    def test_cli_errors(self, argv, message, tmp_path):
        train = pytest.importorskip("train")
        with pytest.raises(InputError, match=message):
            train.main(train.get_args_parser().parse_args([*argv, "--output", str(tmp_path), "--no-pretrained",
                                                           "--data", str(tmp_path / "none")]))

