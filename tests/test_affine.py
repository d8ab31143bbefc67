"""The learnable ``affine`` stem and fold's algebra written once (``fold_weights``), used by fold, affine and export."""

import copy

import pytest
import torch
from timm.optim import create_optimizer_v2

from gray_effnet import InputError, load_model, save_weights
from gray_effnet.adapters import AffineStem, FoldedWeights, FoldStem, FoldTerms, conv_forward, fold_weights
from gray_effnet.explain import format_report, trace
from gray_effnet.export import FrozenFoldStem, export

from .helpers import MODELS, SIZES, gray_batch, make_model

# A map far from the identity, different per channel, with a shift that moves the image off its mean.
SCALE = (1.25, 0.8, 1.1)
SHIFT = (0.1, -0.05, 0.2)


def trained_affine(name: str, scale=SCALE, shift=SHIFT):
    """A model with the ``affine`` stem and a learned-looking map."""
    model = make_model(name, "affine")
    with torch.no_grad():
        model.stem.scale.copy_(torch.tensor(scale))
        model.stem.shift.copy_(torch.tensor(shift))
    return model


def reference_stem(model, x: torch.Tensor) -> torch.Tensor:
    """Independent reference: the map and the normalisation by hand on 3 channels, then the stock conv."""
    stem = model.stem
    a, b = stem.scale.view(1, 3, 1, 1), stem.shift.view(1, 3, 1, 1)
    # The statistics as the stem holds them (float32, then the model's dtype), so float64 tests compare like with like.
    mean, std = stem.mean.to(x.dtype), stem.std.to(x.dtype)
    rgb = torch.cat([x, x, x], dim=1)
    return stem.conv((a * rgb + b - mean) / std)


def assert_exact(out: torch.Tensor, ref: torch.Tensor, atol: float = 1e-5) -> None:
    diff = (out - ref).abs()
    assert diff.max() <= atol
    # The borders are where a wrong padding rule would show: check them on their own too.
    for edge in (diff[..., 0, :], diff[..., -1, :], diff[..., :, 0], diff[..., :, -1]):
        assert edge.max() <= atol


class TestFoldWeights:
    def test_shapes(self):
        w = torch.randn(8, 3, 3, 3)
        folded = fold_weights(w, (0.4, 0.5, 0.6), (0.2, 0.3, 0.25))
        assert isinstance(folded, FoldedWeights)
        assert folded.weight.shape == folded.offset_weight.shape == (8, 1, 3, 3)

    def test_reference_values(self):
        """Against the normalised 3-channel conv of a gray image, on the interior and the padded borders."""
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False).double()
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        scale, shift = torch.tensor(SCALE).double(), torch.tensor(SHIFT).double()
        x = torch.rand(2, 1, 13, 10, dtype=torch.float64)
        m, s = torch.tensor(mean).double().view(1, 3, 1, 1), torch.tensor(std).double().view(1, 3, 1, 1)
        ref = conv((scale.view(1, 3, 1, 1) * x + shift.view(1, 3, 1, 1) - m) / s)
        weight, offset_weight = fold_weights(conv.weight, mean, std, scale, shift)
        out = conv_forward(conv, x, weight) - conv_forward(conv, torch.ones_like(x[:1]), offset_weight)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)

    def test_identity_map_is_fold(self):
        w = torch.randn(8, 3, 3, 3)
        mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
        plain = fold_weights(w, mean, std)
        identity = fold_weights(w, mean, std, torch.ones(3), torch.zeros(3))
        torch.testing.assert_close(identity, plain, rtol=1e-6, atol=1e-6)

    def test_stems_use_it(self, monkeypatch):
        """One definition: FoldStem, AffineStem and the export's FrozenFoldStem all call fold_weights."""
        import gray_effnet.adapters as adapters

        calls = []
        real = adapters.fold_weights
        monkeypatch.setattr(adapters, "fold_weights", lambda *a, **k: calls.append(1) or real(*a, **k))
        for adapter in ("fold", "affine"):
            make_model("efficientnet_b0", adapter).stem.folded_weights()
        FrozenFoldStem.from_adapter(make_model("efficientnet_b0", "repeat").stem)
        assert len(calls) == 3


class TestFoldTerms:
    def test_named_tuple(self):
        stem = make_model("tf_efficientnet_b0", "fold").stem
        terms = stem._terms(gray_batch(1, 64, 96))
        assert isinstance(terms, FoldTerms)
        assert terms.weight.shape == (32, 1, 3, 3) and terms.bias.shape == (32,)
        assert terms.correction.shape == (32, 48 + 31) and len(terms.border.bands) == 2  # bottom row, right column


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", MODELS)
class TestAffine:
    def test_starts_as_repeat(self, name, size):
        x = gray_batch(2, *size)
        model = make_model(name, "affine")
        assert model.stem.scale.tolist() == [1.0] * 3 and model.stem.shift.tolist() == [0.0] * 3
        with torch.no_grad():
            assert_exact(model.stem(x), make_model(name, "repeat").stem(x))
            ref = make_model(name, "repeat")(x)
            torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())

    def test_equals_independent_reference_borders_included(self, name, size):
        model = trained_affine(name)
        x = gray_batch(3, *size)
        with torch.no_grad():
            ref = reference_stem(model, x)
            assert not torch.allclose(ref, make_model(name, "repeat").stem(x), atol=1e-2)  # the map matters
            assert_exact(model.stem(x), ref)

    def test_gradients_equal_reference_float64(self, name, size):
        """Gradients of the folded stem equal those of the unfolded 3-channel computation, map included."""
        x = gray_batch(2, *size).double()
        model = trained_affine(name).double().train()
        model.stem(x).square().mean().backward()
        ref = copy.deepcopy(trained_affine(name)).double().train()
        reference_stem(ref, x).square().mean().backward()
        for key in ("scale", "shift", "conv.weight"):
            got, want = model.stem.get_parameter(key).grad, ref.stem.get_parameter(key).grad
            assert want.abs().max() > 0
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=key)

    def test_frozen_fold_matches(self, name, size):
        """The export's stem folds the learned map too, exactly."""
        model = trained_affine(name)
        x = gray_batch(2, *size)
        stem = FrozenFoldStem.from_adapter(model.stem)
        assert stem.conv.weight.shape[1] == 1
        with torch.no_grad():
            assert_exact(stem(x), reference_stem(model, x))


class TestAffineModule:
    def test_parameters_in_state_dict(self):
        stem = make_model("efficientnet_b0", "affine").stem
        assert {"scale", "shift", "conv.weight"} <= set(stem.state_dict())
        assert isinstance(stem, FoldStem) and isinstance(stem, AffineStem)

    def test_cache_refreshed_after_map_update(self):
        model = trained_affine("tf_efficientnet_b0").eval()
        x = gray_batch(2, 64, 96)
        with torch.no_grad():
            first = model.stem(x)
            assert len(model.stem._offsets) == 1
            model.stem.shift.add_(0.3)  # an optimizer step on the map alone, in place
            after = model.stem(x)
            assert not torch.allclose(after, first, atol=1e-3)
            assert_exact(after, reference_stem(model, x))

    def test_trains_without_weight_decay_on_the_map(self):
        model = make_model("tf_efficientnet_lite0", "affine").train()
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-2, weight_decay=0.5)
        no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0]
        ids = {id(p) for g in no_decay for p in g["params"]}
        assert id(model.stem.scale) in ids and id(model.stem.shift) in ids
        target = torch.tensor([1, 2])
        for _ in range(3):
            loss = torch.nn.functional.cross_entropy(model(gray_batch(2, 64, 64)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert not torch.equal(model.stem.scale.detach(), torch.ones(3))
        assert not torch.equal(model.stem.shift.detach(), torch.zeros(3))


@pytest.mark.parametrize("name", MODELS)
class TestAffineSetAdapter:
    def test_entering_keeps_function_and_parameters(self, name):
        model = make_model(name, "repeat")
        weight = model.stem.conv.weight
        x = gray_batch(2, 67, 45)
        with torch.no_grad():
            before = model.stem(x)
            model.set_adapter("affine")
            assert model.stem.conv.weight is weight
            assert_exact(model.stem(x), before)

    def test_identity_map_leaves_with_the_same_parameter(self, name):
        model = make_model(name, "affine")
        weight = model.stem.conv.weight
        assert model.set_adapter("repeat").stem.conv.weight is weight

    def test_leaving_a_trained_map(self, name):
        """Exact when the channel means differ; an InputError that says why when they are equal (Lite0)."""
        model = trained_affine(name)
        x = gray_batch(2, 67, 45)
        uniform = len(set(model.mean)) == 1
        if uniform:
            with pytest.raises(InputError, match=r"cannot leave the 'affine' stem without changing its function.*"
                                                 r"equal channel means \(0\.5, 0\.5, 0\.5\)"):
                model.set_adapter("repeat")
            assert model.adapter == "affine"  # nothing changed
            return
        with torch.no_grad():
            ref = reference_stem(model, x)
            for adapter in ("repeat", "broadcast", "fold"):
                assert_exact(copy.deepcopy(model).set_adapter(adapter).stem(x), ref)

    def test_leaving_a_representable_map_with_equal_means(self, name):
        """b_c = (1 - a_c) mean_c keeps the offset repeat's: exact even under Lite0's equal means."""
        model = make_model(name)
        if len(set(model.mean)) != 1:
            pytest.skip("the channel means differ: every map can leave (test_leaving_a_trained_map)")
        shift = tuple((1 - a) * m for a, m in zip(SCALE, model.mean))
        model = trained_affine(name, SCALE, shift)
        x = gray_batch(2, 67, 45)
        with torch.no_grad():
            ref = reference_stem(model, x)
            assert_exact(model.set_adapter("repeat").stem(x), ref)


class TestAffineCheckpointExportExplain:
    def test_checkpoint_keeps_the_map(self, tmp_path):
        model = trained_affine("tf_efficientnet_lite0")
        path = save_weights(model, tmp_path / "best.safetensors")
        loaded = load_model(path).eval()
        assert loaded.adapter == "affine"
        assert loaded.stem.scale.tolist() == pytest.approx(SCALE) and loaded.stem.shift.tolist() == pytest.approx(SHIFT)
        x = gray_batch(2, 64, 80)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)

    @pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
    def test_export_torchscript(self, tmp_path):
        torch.manual_seed(0)
        model = trained_affine("tf_efficientnet_lite0")
        with torch.no_grad():
            model.model.classifier.weight.mul_(0.1)  # logits of a trained size, as in test_export
        path = save_weights(model, tmp_path / "best.safetensors")
        result = export(path, "torchscript", tmp_path / "m.pt", img_size=(64, 80))
        assert result.adapter == "affine" and result.max_abs_diff <= result.tolerance
        scripted = torch.jit.load(str(tmp_path / "m.pt"))
        assert not [n for n, p in scripted.named_parameters() if p.ndim == 4 and p.shape[1] == 3]

    def test_explain_prints_the_three_pairs(self):
        model = trained_affine("tf_efficientnet_lite0")
        stages = trace(model, torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
        text = format_report(model, stages, [], "random")
        assert ("learned gray -> RGB map a_c x + b_c: R (a=1.2500, b=+0.1000), G (a=0.8000, b=-0.0500), "
                "B (a=1.1000, b=+0.2000)") in text
        assert {s.name: s for s in stages}["normalisation"].shape == (1, 1, 64, 64)

    def test_explain_equivalence_says_why_not(self):
        """Lite0's equal means: a learned shift has no repeat to compare with; the report says so, not a crash."""
        from gray_effnet.explain import equivalence

        model = trained_affine("tf_efficientnet_lite0")
        x = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)
        rows = equivalence(model, x)
        assert rows == [{"adapter": "affine", "error": rows[0]["error"]}]
        text = format_report(model, trace(model, x), rows, "random")
        assert "not computed: cannot leave the 'affine' stem" in text and "a=1.2500" in text

    def test_explain_silent_for_other_adapters(self):
        model = make_model("tf_efficientnet_lite0", "fold")
        text = format_report(model, trace(model, torch.zeros(1, 1, 64, 64, dtype=torch.uint8)), [], "random")
        assert "learned" not in text


class TestAffineTimmStateDict:
    def test_map_kept_under_the_stem(self):
        state = trained_affine("efficientnet_b0").timm_state_dict()
        assert state["conv_stem.scale"].tolist() == pytest.approx(SCALE)
        assert state["conv_stem.shift"].tolist() == pytest.approx(SHIFT)
        assert state["conv_stem.weight"].shape[1] == 3

    def test_plain_timm_after_folding_the_map(self):
        """A trained map under ImageNet statistics leaves for repeat exactly, so plain timm gets the function."""
        import timm

        model = trained_affine("efficientnet_b0").eval()
        x = gray_batch(2, 67, 45)
        with torch.no_grad():
            ref = model(x)
        plain = timm.create_model("efficientnet_b0", num_classes=10).eval()
        plain.load_state_dict(model.set_adapter("repeat").timm_state_dict())  # strict
        with torch.no_grad():
            out = plain((x.expand(-1, 3, -1, -1) - model.stem.mean) / model.stem.std)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


class TestAffineWeightsFile:
    """``GrayEfficientNet(weights=...)`` (train.py --weights, explain --weights) with an affine checkpoint."""

    @staticmethod
    def saved(tmp_path, name):
        model = trained_affine(name).eval()
        return model, save_weights(model, tmp_path / "best.safetensors")

    def test_same_adapter_keeps_the_map(self, tmp_path):
        from gray_effnet import GrayEfficientNet

        model, path = self.saved(tmp_path, "tf_efficientnet_lite0")
        again = GrayEfficientNet("tf_efficientnet_lite0", adapter="affine", num_classes=10, weights=str(path)).eval()
        assert again.stem.scale.tolist() == pytest.approx(SCALE) and again.stem.shift.tolist() == pytest.approx(SHIFT)
        assert "a=1.2500, b=+0.1000" in again.stem.learned_note()
        x = gray_batch(2, 64, 80)
        with torch.no_grad():
            torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)

    def test_other_adapter_folds_the_map_or_says_why(self, tmp_path):
        from gray_effnet import GrayEfficientNet

        model, path = self.saved(tmp_path, "efficientnet_b0")  # ImageNet statistics: the map folds exactly
        again = GrayEfficientNet("efficientnet_b0", adapter="fold", num_classes=10, weights=str(path)).eval()
        x = gray_batch(2, 67, 45)
        with torch.no_grad():
            assert_exact(again.stem(x), reference_stem(model, x))
        (tmp_path / "lite0").mkdir()
        _, path = self.saved(tmp_path / "lite0", "tf_efficientnet_lite0")  # equal means: a learned shift cannot leave
        with pytest.raises(InputError, match="cannot leave the 'affine' stem"):
            GrayEfficientNet("tf_efficientnet_lite0", adapter="broadcast", num_classes=10, weights=str(path))
