"""benchmarks/compare.py: paired subsets, intervals, the generated paragraph, and a tiny resumable sweep."""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import compare
from gray_effnet import engine
from gray_effnet.augment import BatchAugment
from gray_effnet.engine import make_optimizer_and_schedule

from .helpers import make_model


def write_folder(root: Path, classes: int = 3, per_class: int = 10, size: int = 20) -> Path:
    """Class folders of gray PNGs whose brightness depends on the class, plus noise."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(rng.normal(60 + 60 * c, 30, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


class TestStatistics:
    def test_t_interval_reference(self):
        mean, lo, hi = compare.t_interval([1.0, 2.0, 3.0])
        assert mean == 2.0
        assert hi - mean == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)  # t(0.975, 2) * sd / sqrt(n)
        assert mean - lo == pytest.approx(hi - mean)

    def test_one_value_has_no_interval(self):
        mean, lo, hi = compare.t_interval([0.5])
        assert mean == 0.5 and math.isnan(lo) and math.isnan(hi)

    def test_quantile_table_without_scipy(self, monkeypatch):
        monkeypatch.setitem(sys.modules, "scipy", None)
        assert compare.t_quantile(4) == pytest.approx(2.776)
        assert compare.t_quantile(100) == pytest.approx(1.96)

    def test_paired_difference(self):
        rows = []
        for seed, (rep, aff) in enumerate([(0.50, 0.55), (0.70, 0.74), (0.60, 0.66)]):
            rows += [{"arm": "repeat", "per_class": "5", "seed": seed, "train_images": 50, "best_val_acc": rep,
                      "final_val_loss": 1.0, "img_per_s": 1.0, "stem_drift": 0.1},
                     {"arm": "affine", "per_class": "5", "seed": seed, "train_images": 50, "best_val_acc": aff,
                      "final_val_loss": 1.0, "img_per_s": 1.0, "stem_drift": 0.1}]
        summary = {r["arm"]: r for r in compare.summarise(rows, "best_val_acc")}
        assert "diff" not in summary["repeat"]
        aff = summary["affine"]
        assert aff["diff"] == pytest.approx(0.05) and aff["n_pairs"] == 3
        # The seeds differ by 0.2 in accuracy, yet the paired interval is narrow and above 0.
        assert 0 < aff["diff_low"] < 0.05 < aff["diff_high"] < 0.1
        assert aff["ci_low"] < 0.5


class TestWhatToPick:
    @staticmethod
    def cell(arm, pc, diff, low, high, p_holm=None):
        return {"arm": arm, "per_class": pc, "n": 5, "diff": diff, "diff_low": low, "diff_high": high,
                "p_holm": p_holm, "budget_stops": 0}

    def test_claims_only_what_survives_the_correction(self):
        summary = [
            {"arm": "repeat", "per_class": "5", "n": 5, "budget_stops": 0},
            self.cell("affine", "5", 0.04, 0.01, 0.07, p_holm=0.01),  # survives Holm: better
            self.cell("affine", "all", 0.01, -0.01, 0.03, p_holm=0.6),  # includes 0
            self.cell("sum", "5", 0.05, 0.01, 0.09, p_holm=0.12),  # excludes 0, but not after the correction
            self.cell("sum", "all", -0.03, -0.05, -0.01, p_holm=0.02),  # worse
            self.cell("scratch", "5", -0.4, -0.5, -0.3),  # not in the family
        ]
        text = compare.what_to_pick(summary, 5, "best_val_acc")
        assert "- `affine`: above `repeat` at 5 (+4.0 points, [+1.0, +7.0], Holm p 0.010) images per class" in text
        assert "no detectable difference at all (largest mean difference +1.0 points, at all)." in text
        assert ("- `sum`: below `repeat` at all (-3.0 points, [-5.0, -1.0], Holm p 0.020) images per class; no "
                "detectable difference at 5 (largest mean difference +5.0 points, at 5); at 5 its 95% interval alone "
                "excludes 0, but the difference does not survive the correction.") in text
        assert "`sum`: above" not in text
        assert "- from random init (not in the family; 95% intervals): below `repeat` at 5 (-40.0 points" in text
        assert ("After Holm's correction, the runs support an accuracy gain over `repeat` for `affine` at 5 images "
                "per class.") in text
        assert "The family is the 4 adapter-vs-`repeat` comparisons of this sweep" in text  # scratch is not in it
        assert "median half-width is 2.5 points" in text  # of 3, 2, 4 and 2
        assert "All 30 runs stopped on a validation-loss plateau" in text

    def test_no_detectable_difference(self):
        summary = [self.cell("fold", "5", 0.0, -0.01, 0.01, 0.9), self.cell("sum", "5", 0.02, -0.01, 0.05, 0.4)]
        text = compare.what_to_pick(summary, 5, "best_val_acc")
        assert "No detectable difference between any adapter and `repeat` at any size" in text
        assert "above `repeat`" not in text and "below `repeat`" not in text

    def test_only_worse(self):
        text = compare.what_to_pick([self.cell("sum", "5", -0.05, -0.08, -0.02, 0.01)], 5, "best_val_acc")
        assert "No adapter beat `repeat` detectably at any size, and `sum` at 5 images per class did worse" in text

    def test_too_few_seeds(self):
        text = compare.what_to_pick([self.cell("fold", "5", 0.0, math.nan, math.nan)], 1, "best_val_acc")
        assert "no difference can be claimed" in text

    def test_summary_adjusts_over_the_adapter_family(self):
        rows = []
        for seed, (rep, aff, sm, scr) in enumerate([(0.50, 0.55, 0.50, 0.1), (0.70, 0.74, 0.71, 0.2),
                                                    (0.60, 0.66, 0.59, 0.1)]):
            for arm, acc in (("repeat", rep), ("affine", aff), ("sum", sm), ("scratch", scr)):
                rows.append({"arm": arm, "per_class": "5", "seed": seed, "train_images": 50, "best_val_acc": acc,
                             "final_val_loss": 1.0, "img_per_s": 1.0, "stem_drift": 0.1, "stop": "plateau",
                             "steps": 50, "budget": 120})
        summary = {r["arm"]: r for r in compare.summarise(rows, "best_val_acc")}
        aff, sm = summary["affine"], summary["sum"]
        assert compare.holm([aff["p"], sm["p"]]) == pytest.approx([aff["p_holm"], sm["p_holm"]])
        assert aff["p_holm"] == pytest.approx(2 * aff["p"])  # the smaller of two: times 2
        assert "p_holm" not in summary["scratch"] and summary["scratch"]["p"] < 0.05
        assert (summary["repeat"]["budget_stops"], summary["repeat"]["steps"], summary["repeat"]["budget"]) == \
            (0, 50, 120)


class TestPairing:
    def test_subset_stratified_nested_and_seeded(self):
        targets = torch.arange(3).repeat_interleave(20)
        five, ten = compare.subset(targets, "5", seed=1), compare.subset(targets, "10", seed=1)
        assert torch.bincount(targets[five]).tolist() == [5, 5, 5]
        assert set(five.tolist()) <= set(ten.tolist())
        assert torch.equal(compare.subset(targets, "5", seed=1), five)
        assert not torch.equal(compare.subset(targets, "5", seed=2), five)
        assert len(compare.subset(targets, "all", seed=0)) == 60

    @staticmethod
    def augmented_epochs(seed: int, x: torch.Tensor, y: torch.Tensor, epochs: int = 2) -> list[torch.Tensor]:
        """What run_one's training sees: Batches' order, then BatchAugment's crops, epoch by epoch."""
        batches = compare.Batches(x, y, 4, torch.Generator().manual_seed(seed))
        augment = BatchAugment((32, 32), crop_scale=0.5, seed=seed)
        out = []
        for epoch in range(epochs):
            augment.set_epoch(epoch)
            out += [augment(b.images) for b in batches]
        return out

    def test_batches_and_crops_are_paired_by_seed(self):
        """Every arm of a seed sees the same batches with the same crops, whatever the global RNG did."""
        x = torch.randint(0, 256, (12, 1, 32, 32), dtype=torch.uint8)
        y = torch.arange(12) % 3
        torch.manual_seed(1)
        a = self.augmented_epochs(3, x, y)
        torch.manual_seed(2)  # another arm's model init and dropout draws
        b = self.augmented_epochs(3, x, y)
        assert len(a) == 6 and all(t.shape == (4, 1, 32, 32) and t.dtype == torch.float32 for t in a)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        assert 0 <= min(t.min() for t in a) and max(t.max() for t in a) <= 1
        assert not torch.equal(a[0], a[3])  # epochs differ
        assert not all(torch.equal(p, q) for p, q in zip(a, self.augmented_epochs(4, x, y)))  # seeds differ

    def test_stem_lr_group(self):
        model = make_model("tf_efficientnet_lite0", "sum")
        arm = compare.Arm("sum*3lr", "sum", stem_lr_scale=3.0)
        optimizer, scheduler, _ = make_optimizer_and_schedule(
            compare.parameters(model, arm, weight_decay=0.01), lr=1e-3, batch_size=64, world_size=1,
            weight_decay=0.01, epochs=1, steps_per_epoch=10, warmup_epochs=0)
        weight = model.stem.conv.weight
        groups = [g for g in optimizer.param_groups if any(p is weight for p in g["params"])]
        assert len(groups) == 1 and groups[0]["params"] == [weight] and groups[0]["lr_scale"] == 3.0
        assert groups[0]["weight_decay"] == 0.01  # a 4-D weight keeps its decay in its own group
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
        scheduler.step_update(1)
        assert groups[0]["lr"] == pytest.approx(3 * optimizer.param_groups[0]["lr"])

    def test_unscaled_arm_gets_the_model(self):
        model = make_model("tf_efficientnet_lite0", "sum")
        assert compare.parameters(model, compare.Arm("sum", "sum"), weight_decay=0.01) is model


class TestRecipe:
    """engine.make_optimizer_and_schedule, the recipe compare.py shares with train.py."""

    def test_scaled_lr_warmup_and_cosine(self):
        model = make_model("tf_efficientnet_lite0", "fold")
        optimizer, scheduler, lr = make_optimizer_and_schedule(
            model, lr=2e-3, batch_size=16, world_size=2, weight_decay=0.05, epochs=4, steps_per_epoch=10,
            warmup_epochs=0.5)
        assert lr == pytest.approx(2e-3 * 16 * 2 / 64)  # --lr is for a global batch of 64
        group = optimizer.param_groups[0]
        assert group["lr"] == pytest.approx(0.01 * lr)  # the warmup starts at 1% of the peak
        scheduler.step_update(4)  # linear, over int(0.5 epochs * 10 steps) = 5 steps
        assert group["lr"] == pytest.approx(0.01 * lr + 4 * 0.99 * lr / 5)
        scheduler.step_update(5)  # then timm's cosine, its steps counted from the start of the run, down to 1%
        assert group["lr"] == pytest.approx(0.01 * lr + 0.99 * lr * (1 + math.cos(math.pi * 5 / 40)) / 2)
        scheduler.step_update(40)
        assert group["lr"] == pytest.approx(0.01 * lr)

    def test_adamw_without_decay_on_1d_parameters(self):
        model = make_model("tf_efficientnet_lite0", "fold")
        optimizer, _, _ = make_optimizer_and_schedule(
            model, lr=1e-3, batch_size=64, world_size=1, weight_decay=0.05, epochs=1, steps_per_epoch=1,
            warmup_epochs=0)
        assert isinstance(optimizer, torch.optim.AdamW)
        decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        assert len(decay) == len(list(model.parameters()))
        assert all(decay[id(p)] == (0.05 if p.ndim > 1 else 0.0) for p in model.parameters())

    def test_fused_adamw_on_the_cpu_and_the_same_update_as_foreach(self):
        """torch's fused AdamW where it has one (here, the CPU), foreach when asked; the same steps from the same start
        end at the same weights up to float rounding, param groups (weight decay on 2-D parameters only) included."""
        trained = []
        for fused in (None, False):
            torch.manual_seed(0)
            model = make_model("tf_efficientnet_lite0", "fold")
            start = [p.detach().clone() for p in model.parameters()]
            optimizer, scheduler, _ = make_optimizer_and_schedule(
                model, lr=2e-3, batch_size=8, world_size=1, weight_decay=0.05, epochs=1, steps_per_epoch=3,
                warmup_epochs=0, fused=fused)
            assert optimizer.defaults["fused"] is (True if fused is None else None)
            for k in range(3):
                torch.manual_seed(k)  # the same batch and dropout for both
                loss = model(torch.rand(8, 1, 32, 32)).logsumexp(1).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step_update(k + 1)
            trained.append([p.detach().clone() for p in model.parameters()])
        moved = max((a - b).abs().max().item() for a, b in zip(trained[0], start))
        assert moved > 1e-4  # the steps changed the weights, so equality below means something
        for a, b in zip(*trained):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

    def test_parameter_groups_given_as_generators_keep_every_parameter(self):
        """The groups are read twice (the devices, then the optimizer): a generator must not arrive empty."""
        model = make_model("tf_efficientnet_lite0", "fold")
        optimizer, _, _ = make_optimizer_and_schedule(
            [{"params": (p for p in model.parameters()), "weight_decay": 0.0}], lr=1e-3, batch_size=8,
            world_size=1, weight_decay=0.05, epochs=1, steps_per_epoch=1, warmup_epochs=0)
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    def test_a_device_without_fused_adamw_gets_foreach(self, monkeypatch):
        monkeypatch.setattr(engine, "FUSED_DEVICES", {"cuda"})  # as if the CPU had none
        optimizer, _, _ = make_optimizer_and_schedule(
            make_model("tf_efficientnet_lite0", "fold"), lr=1e-3, batch_size=8, world_size=1, weight_decay=0.05,
            epochs=1, steps_per_epoch=1, warmup_epochs=0)
        assert not optimizer.defaults["fused"]

    def test_reexpressed_statistics_keep_the_interior(self):
        model = make_model("tf_efficientnet_lite0", "repeat")
        err = compare.reexpress_stats(model, compare.IMAGENET_MEAN, compare.IMAGENET_STD)
        assert err < 1e-4
        assert model.mean == compare.IMAGENET_MEAN and model.stem.mean.flatten().tolist() == pytest.approx(
            list(compare.IMAGENET_MEAN))
        x = torch.rand(1, 1, 64, 64)
        with torch.no_grad():  # sum is no longer repeat: the point of the synthetic statistics
            assert (model.stem(x) - make_model("tf_efficientnet_lite0", "sum").stem(x)).abs().max() > 1e-2


@pytest.mark.slow
class TestSweep:
    ARGS = ["--adapters", "repeat", "broadcast", "--scratch", "--per-class", "2", "all", "--seeds", "2",
            "--epochs", "1", "--min-steps", "2", "--max-steps", "4", "--eval-every", "2", "--patience", "1",
            "--batch-size", "8", "--img-size", "32", "32", "--jobs", "1"]

    def run(self, data: Path, out: Path, *extra: str):
        args = compare.get_args_parser().parse_args([*self.ARGS, "--data", str(data), "--output", str(out), *extra])
        return compare.main(args)

    def test_tiny_sweep_resume_and_report(self, tmp_path, capsys):
        data = write_folder(tmp_path / "data")
        out = tmp_path / "out"
        summary = self.run(data, out)
        assert "step budgets: 2/class (6 images): 2; all (24 images): 4" in capsys.readouterr().out
        rows = compare.read_rows(out / "results.csv")
        assert len(rows) == 3 * 2 * 2  # (repeat, broadcast, scratch) x (2, all) x 2 seeds
        for col in ("adapter", "per_class", "seed", "pretrained", "best_val_acc", "final_val_loss", "epochs",
                    "seconds", "img_per_s", "stop", "steps", "budget", "best_step", "evals", "val_acc_at_best_loss"):
            assert all(r[col] not in ("", None) for r in rows), col
        assert {r["train_images"] for r in rows if r["per_class"] == "2"} == {"6"}
        assert all(r["stop"] in ("plateau", "budget") and int(r["steps"]) <= int(r["budget"]) for r in rows)
        assert {r["budget"] for r in rows if r["per_class"] == "all"} == {"4"}
        # Paired: broadcast is bitwise repeat, so with the same subset, order, crops, head and dropout it trains
        # to the very same numbers and stops at the same step; any unpaired randomness would show here.
        by = {(r["arm"], r["per_class"], r["seed"]): r for r in rows}
        for pc in ("2", "all"):
            for seed in ("0", "1"):
                rep, bro = by[("repeat", pc, seed)], by[("broadcast", pc, seed)]
                assert (rep["final_val_loss"], rep["stem_drift"], rep["steps"], rep["stop"]) == \
                    (bro["final_val_loss"], bro["stem_drift"], bro["steps"], bro["stop"])
        assert by[("scratch", "2", "0")]["pretrained"] == "False"
        assert {r["arm"] for r in summary} == {"repeat", "broadcast", "scratch"}
        assert (out / "summary.csv").is_file() and (out / "learning_curve.png").stat().st_size > 10_000
        md = (out / "results.md").read_text()
        assert "**What to pick.**" in md and "**How sure.**" in md and "| arm | per_class | n | mean |" in md
        with open(out / "evals.csv") as f:
            evals = list(csv.DictReader(f))
        assert len(evals) == sum(int(r["evals"]) for r in rows)

        # Interrupted after all but one run: the same command runs that one only.
        lines = (out / "results.csv").read_text().splitlines()
        (out / "results.csv").write_text("\n".join(lines[:-1]) + "\n")
        capsys.readouterr()
        self.run(data, out)
        assert "11 done, 1 to run" in capsys.readouterr().out
        assert len(compare.read_rows(out / "results.csv")) == 12
        self.run(data, out)
        assert "12 done, 0 to run" in capsys.readouterr().out

        with pytest.raises(SystemExit, match="holds runs made with other settings"):
            self.run(data, out, "--patience", "2")
        (out / "results.md").unlink()
        self.run(data, out, "--patience", "2", "--report-only")  # the folder's settings, not the command line's
        assert "**What to pick.**" in (out / "results.md").read_text()

    def test_plan_only_writes_nothing(self, tmp_path, capsys):
        data = write_folder(tmp_path / "data")
        assert self.run(data, tmp_path / "out", "--plan-only") == []
        out = capsys.readouterr().out
        assert "3 arms (repeat, broadcast, scratch) x 2 sizes x 2 seeds = 12 runs" in out
        assert "time: at most" in out and "ms a step at batch 8" in out
        assert not (tmp_path / "out").exists()

    def test_presplit_texture_folder(self, tmp_path, capsys):
        """--data with train/ and val/ (benchmarks/textures.py's layout): its split, and its parameters recorded."""
        pytest.importorskip("skimage")
        from benchmarks import textures

        params = textures.Params(images=("brick", "gravel"), patch=32, n_train=4, n_val=3)
        root = textures.generate(tmp_path / "tex", params)
        args = compare.get_args_parser().parse_args(
            ["--adapters", "repeat", "--per-class", "all", "--seeds", "1", "--min-steps", "2", "--max-steps", "2",
             "--eval-every", "2", "--batch-size", "4", "--jobs", "1", "--data", str(root), "--output",
             str(tmp_path / "out")])
        compare.main(args)
        assert "2 classes, 8 train / 6 val images" in capsys.readouterr().out
        settings = json.loads((tmp_path / "out" / "sweep.json").read_text())
        assert settings["data_params"]["patch"] == 32 and settings["data_params"]["seed"] == 0
        md = (tmp_path / "out" / "results.md").read_text()
        assert "textures (`benchmarks/textures.py`: 2 classes, brick, gravel" in md
