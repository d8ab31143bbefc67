"""benchmarks/compare.py: paired subsets, intervals, the generated paragraph, and a tiny resumable sweep."""

import csv
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import compare

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
    def cell(arm, pc, diff, low, high):
        return {"arm": arm, "per_class": pc, "diff": diff, "diff_low": low, "diff_high": high}

    def test_claims_only_what_the_intervals_support(self):
        summary = [
            {"arm": "repeat", "per_class": "5"},
            self.cell("affine", "5", 0.04, 0.01, 0.07),  # excludes 0: better
            self.cell("affine", "all", 0.01, -0.01, 0.03),  # includes 0
            self.cell("sum", "5", 0.05, -0.01, 0.11),  # larger mean, but the interval includes 0
            self.cell("sum", "all", -0.03, -0.05, -0.01),  # worse
            self.cell("scratch", "5", -0.4, -0.5, -0.3),
        ]
        text = compare.what_to_pick(summary, 5, "best_val_acc")
        assert "- `affine`: above `repeat` at 5 (+4.0 points, [+1.0, +7.0]) images per class" in text
        assert "no difference the intervals can detect at all" in text
        assert "- `sum`: below `repeat` at all (-3.0 points" in text
        assert "`sum`: above" not in text
        assert "- from random init: below `repeat` at 5" in text
        assert "The intervals support an accuracy gain over `repeat` for `affine` at 5 images per class." in text
        assert "4 adapter intervals at 95%" in text  # scratch is not counted among the adapters

    def test_no_winner(self):
        summary = [self.cell("fold", "5", 0.0, -0.01, 0.01), self.cell("sum", "5", 0.02, -0.01, 0.05)]
        text = compare.what_to_pick(summary, 5, "best_val_acc")
        assert "No adapter beat `repeat` on this data with 95% confidence at any size" in text
        assert "above" not in text

    def test_too_few_seeds(self):
        text = compare.what_to_pick([self.cell("fold", "5", 0.0, math.nan, math.nan)], 1, "best_val_acc")
        assert "no difference can be claimed" in text


class TestPairing:
    def test_subset_stratified_nested_and_seeded(self):
        targets = torch.arange(3).repeat_interleave(20)
        five, ten = compare.subset(targets, "5", seed=1), compare.subset(targets, "10", seed=1)
        assert torch.bincount(targets[five]).tolist() == [5, 5, 5]
        assert set(five.tolist()) <= set(ten.tolist())
        assert torch.equal(compare.subset(targets, "5", seed=1), five)
        assert not torch.equal(compare.subset(targets, "5", seed=2), five)
        assert len(compare.subset(targets, "all", seed=0)) == 60

    def test_crop_seeded(self):
        x = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
        a = compare.random_resized_crop(x, 0.5, torch.Generator().manual_seed(3))
        b = compare.random_resized_crop(x, 0.5, torch.Generator().manual_seed(3))
        assert a.shape == (4, 1, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
        assert 0 <= a.min() and a.max() <= 1
        assert not torch.allclose(a, x.float() / 255)

    def test_stem_lr_group(self):
        model = make_model("tf_efficientnet_lite0", "sum")
        arm = compare.Arm("sum*3lr", "sum", stem_lr_scale=3.0)
        optimizer = compare.make_optimizer(model, arm, lr=1e-3, weight_decay=0.01)
        weight = model.stem.conv.weight
        groups = [g for g in optimizer.param_groups if any(p is weight for p in g["params"])]
        assert len(groups) == 1 and groups[0]["params"] == [weight] and groups[0]["lr_scale"] == 3.0
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
        scheduler = compare.CosineLRScheduler(optimizer, t_initial=10, t_in_epochs=False)
        scheduler.step_update(1)
        assert groups[0]["lr"] == pytest.approx(3 * optimizer.param_groups[0]["lr"])

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
    ARGS = ["--adapters", "repeat", "broadcast", "--per-class", "2", "all", "--seeds", "2", "--epochs", "1",
            "--min-steps", "2", "--evals", "1", "--batch-size", "8", "--img-size", "32", "32", "--jobs", "1"]

    def run(self, data: Path, out: Path, *extra: str):
        args = compare.get_args_parser().parse_args([*self.ARGS, "--data", str(data), "--output", str(out), *extra])
        return compare.main(args)

    def test_tiny_sweep_resume_and_report(self, tmp_path, capsys):
        data = write_folder(tmp_path / "data")
        out = tmp_path / "out"
        summary = self.run(data, out)
        rows = compare.read_rows(out / "results.csv")
        assert len(rows) == 3 * 2 * 2  # (repeat, broadcast, scratch) x (2, all) x 2 seeds
        for col in ("adapter", "per_class", "seed", "pretrained", "best_val_acc", "final_val_loss", "epochs",
                    "seconds", "img_per_s"):
            assert all(r[col] not in ("", None) for r in rows), col
        assert {r["train_images"] for r in rows if r["per_class"] == "2"} == {"6"}
        # Paired: broadcast is bitwise repeat, so with the same subset, order, crops, head and dropout it trains
        # to the very same numbers; any unpaired randomness would show here.
        by = {(r["arm"], r["per_class"], r["seed"]): r for r in rows}
        for pc in ("2", "all"):
            for seed in ("0", "1"):
                rep, bro = by[("repeat", pc, seed)], by[("broadcast", pc, seed)]
                assert (rep["final_val_loss"], rep["stem_drift"]) == (bro["final_val_loss"], bro["stem_drift"])
        assert by[("scratch", "2", "0")]["pretrained"] == "False"
        assert {r["arm"] for r in summary} == {"repeat", "broadcast", "scratch"}
        assert (out / "summary.csv").is_file() and (out / "learning_curve.png").stat().st_size > 10_000
        md = (out / "results.md").read_text()
        assert "**What to pick.**" in md and "| arm | per_class | n | mean |" in md
        with open(out / "epochs.csv") as f:
            assert len(list(csv.DictReader(f))) >= len(rows)

        # Interrupted after all but one run: the same command runs that one only.
        lines = (out / "results.csv").read_text().splitlines()
        (out / "results.csv").write_text("\n".join(lines[:-1]) + "\n")
        capsys.readouterr()
        self.run(data, out)
        assert "11 runs done, 1 to run" in capsys.readouterr().out
        assert len(compare.read_rows(out / "results.csv")) == 12
        self.run(data, out)
        assert "12 runs done, 0 to run" in capsys.readouterr().out

        with pytest.raises(SystemExit, match="holds runs made with other settings"):
            self.run(data, out, "--epochs", "2")
        (out / "results.md").unlink()
        self.run(data, out, "--epochs", "2", "--report-only")  # the folder's settings, not the command line's
        assert "**What to pick.**" in (out / "results.md").read_text()
