"""compare.py trains to a plateau: the stop rule, the step budget, the paired step stream, Holm's correction,
the texture patches' disjoint regions, and compare_report.py's combined paragraph."""

import argparse
import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import compare, compare_report, textures
from gray_effnet.augment import BatchAugment
from gray_effnet.engine import EvalResult, make_optimizer_and_schedule
from gray_effnet.folders import load_folder


class FakeTraining:
    """Chunks that only count, and evaluations that return scripted validation losses."""

    def __init__(self, losses):
        self.losses, self.chunks, self.evaluated = list(losses), [], []

    def train_chunk(self, i: int) -> None:
        self.chunks.append(i)

    def evaluate_at(self, step: int) -> float:
        self.evaluated.append(step)
        return self.losses[len(self.evaluated) - 1]


class TestPlateauStop:
    def test_stops_after_patience_evaluations_without_improvement(self):
        # Best 0.70 at the 3rd evaluation; then 0.70 (equal), 0.71 (worse) and 0.6995 (better by less than
        # min_delta) do not improve: the 3rd of those is the plateau.
        fake = FakeTraining([1.0, 0.8, 0.70, 0.70, 0.71, 0.6995, 0.1, 0.1])
        end = compare.train_to_plateau(fake.train_chunk, fake.evaluate_at, budget=100, eval_every=10, patience=3,
                                       min_delta=0.001)
        assert end == compare.RunEnd(steps=60, stop="plateau", evals=6, best_step=30)
        assert fake.chunks == [0, 1, 2, 3, 4, 5] and fake.evaluated == [10, 20, 30, 40, 50, 60]

    def test_improvement_resets_the_count(self):
        fake = FakeTraining([1.0, 1.0, 0.5, 0.5, 0.5, 0.5])
        end = compare.train_to_plateau(fake.train_chunk, fake.evaluate_at, budget=60, eval_every=10, patience=3)
        assert (end.stop, end.steps, end.best_step) == ("plateau", 60, 30)

    def test_keeps_improving_stops_on_the_budget(self):
        fake = FakeTraining([1 / (i + 1) for i in range(20)])
        end = compare.train_to_plateau(fake.train_chunk, fake.evaluate_at, budget=120, eval_every=10, patience=2,
                                       min_delta=0.001)
        assert end == compare.RunEnd(steps=120, stop="budget", evals=12, best_step=120)
        assert fake.chunks == list(range(12))

    def test_no_plateau_stop_inside_the_warmup(self):
        fake = FakeTraining([1.0] * 10)
        end = compare.train_to_plateau(fake.train_chunk, fake.evaluate_at, budget=100, eval_every=10, patience=2,
                                       not_before=50)
        assert (end.stop, end.steps) == ("plateau", 50)  # flat from the start: the plateau counts from step 30

    def test_patience_zero_trains_to_the_budget(self):
        fake = FakeTraining([1.0] * 10)
        end = compare.train_to_plateau(fake.train_chunk, fake.evaluate_at, budget=100, eval_every=10, patience=0)
        assert (end.stop, end.steps, end.evals) == ("budget", 100, 10)

    def test_a_non_finite_loss_never_improves(self):
        p = compare.Plateau(patience=2)
        assert not p.update(10, math.nan) and p.best == math.inf
        assert not p.update(20, 1.0) and p.best_step == 20
        assert not p.update(30, math.inf)
        assert p.update(40, math.nan)

    def test_budget_must_be_whole_intervals(self):
        fake = FakeTraining([1.0])
        with pytest.raises(ValueError, match="budget 25 must be a positive multiple of eval_every 10"):
            compare.train_to_plateau(fake.train_chunk, fake.evaluate_at, budget=25, eval_every=10, patience=1)


class TestConstantSchedule:
    def test_warmup_then_the_peak_held(self):
        """engine.make_optimizer_and_schedule(decay=False): the same warmup as train.py's, then no decay."""
        params = [torch.nn.Parameter(torch.zeros(2, 2))]
        optimizer, scheduler, lr = make_optimizer_and_schedule(
            params, lr=2e-3, batch_size=32, world_size=1, weight_decay=0.01, epochs=10, steps_per_epoch=10,
            warmup_epochs=2, decay=False)
        assert lr == pytest.approx(1e-3)
        group = optimizer.param_groups[0]
        assert group["lr"] == pytest.approx(0.01 * lr)
        scheduler.step_update(10)  # halfway through the 20-step warmup
        assert group["lr"] == pytest.approx(0.01 * lr + 10 * 0.99 * lr / 20)
        for step in (20, 50, 100, 10_000):
            scheduler.step_update(step)
            assert group["lr"] == pytest.approx(lr)

    def test_stem_group_keeps_its_scale(self):
        params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0},
                  {"params": [torch.nn.Parameter(torch.zeros(2, 2))], "lr_scale": 3.0}]
        optimizer, scheduler, lr = make_optimizer_and_schedule(
            params, lr=1e-3, batch_size=64, world_size=1, weight_decay=0.01, epochs=1, steps_per_epoch=10,
            warmup_epochs=0, decay=False)
        scheduler.step_update(5)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, 3 * lr])


class TestStepBudget:
    cfg = argparse.Namespace(epochs=15, min_steps=120, max_steps=300, eval_every=10)

    @pytest.mark.parametrize("images, batch, steps", [
        (50, 32, 120),  # 1 step an epoch: 15 epochs are below the floor
        (250, 32, 120),  # 7 steps an epoch: 105, the floor
        (400, 32, 180),  # 12 steps an epoch: 15 epochs
        (1000, 32, 300),  # 31 steps an epoch: 465, the cap
        (10, 10, 120),  # a batch of the whole subset
    ])
    def test_grows_with_the_subset_within_its_bounds(self, images, batch, steps):
        assert compare.step_budget(images, batch, self.cfg) == steps

    def test_rounded_up_to_whole_evaluation_intervals(self):
        cfg = argparse.Namespace(epochs=1, min_steps=125, max_steps=125, eval_every=10)
        assert compare.step_budget(50, 32, cfg) == 130


def stream_images(seed: int, x: torch.Tensor, y: torch.Tensor, chunk: int, steps: int) -> list[torch.Tensor]:
    """What run_one's training sees through StepStream, ``chunk`` steps at a time: each batch after its crop."""
    augment = BatchAugment((16, 16), crop_scale=0.5, seed=seed)
    stream = compare.StepStream(compare.Batches(x, y, 4, torch.Generator().manual_seed(seed)), augment)
    out = []
    while len(out) < steps:
        out += [augment(b.images) for b in stream.chunk(chunk)]  # train_one_epoch augments each batch as it comes
    return out[:steps]


class TestStepStream:
    x = torch.randint(0, 256, (12, 1, 16, 16), dtype=torch.uint8)
    y = torch.arange(12) % 3

    def test_steps_do_not_depend_on_the_chunks(self):
        """Batch order and crops are functions of (seed, epoch, step): wherever an evaluation cuts, whenever a run
        stops, its k-th step is the same."""
        a = stream_images(3, self.x, self.y, chunk=2, steps=10)
        b = stream_images(3, self.x, self.y, chunk=5, steps=10)
        assert all(torch.equal(p, q) for p, q in zip(a, b))
        short = stream_images(3, self.x, self.y, chunk=7, steps=4)  # a run that stopped early: a prefix
        assert all(torch.equal(p, q) for p, q in zip(short, a))

    def test_matches_batches_epoch_by_epoch(self):
        """The same batches and crops as iterating ``Batches`` with ``set_epoch`` (the epoch-wise loop)."""
        batches = compare.Batches(self.x, self.y, 4, torch.Generator().manual_seed(3))
        augment = BatchAugment((16, 16), crop_scale=0.5, seed=3)
        reference = []
        for epoch in range(3):
            augment.set_epoch(epoch)
            reference += [augment(b.images) for b in batches]
        streamed = stream_images(3, self.x, self.y, chunk=4, steps=9)
        assert all(torch.equal(p, q) for p, q in zip(reference, streamed))
        assert not torch.equal(streamed[0], streamed[3])  # epochs differ

    def test_counts_epochs(self):
        stream = compare.StepStream(compare.Batches(self.x, self.y, 4, torch.Generator()),
                                    BatchAugment((16, 16), seed=0))
        list(stream.chunk(4))
        assert stream.steps == 4 and stream.epochs == pytest.approx(4 / 3)


class TestRunRecord:
    """run_one with a real model but scripted evaluations: what a plateau and a budget stop write."""

    @pytest.fixture
    def cfg(self):
        args = compare.get_args_parser().parse_args(
            ["--adapters", "repeat", "--img-size", "32", "32", "--batch-size", "4", "--min-steps", "6",
             "--max-steps", "6", "--eval-every", "2", "--patience", "1", "--min-delta", "0"])
        compare.apply_preset(args)
        args.device = "cpu"
        data = compare.Data("x", ["a", "b"], torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8),
                            torch.arange(8) % 2, torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8),
                            torch.arange(4) % 2)
        compare._init_worker(data, torch.get_num_threads())
        return args

    def fake_evaluate(self, monkeypatch, losses):
        calls = iter(losses)
        monkeypatch.setattr(compare, "evaluate", lambda *a, **k: EvalResult(loss=next(calls), acc=0.5,
                                                                            confusion=torch.zeros(2, 2)))

    def test_plateau_is_recorded(self, cfg, monkeypatch):
        self.fake_evaluate(monkeypatch, [1.0, 2.0, 0.5])  # worse at step 4: patience 1 stops there
        row, evals = compare.run_one(compare.RunSpec(compare.Arm("repeat", "repeat"), "all", 0), cfg)
        assert (row["stop"], row["steps"], row["budget"], row["evals"], row["best_step"]) == ("plateau", 4, 6, 2, 2)
        assert row["best_val_loss"] == 1.0 and row["final_val_loss"] == 2.0
        assert [r["step"] for r in evals] == [2, 4] and [r["best_val_loss"] for r in evals] == [1.0, 1.0]
        assert row["epochs"] == pytest.approx(2.0)  # 8 images in batches of 4: 2 steps an epoch

    def test_budget_stop_is_recorded(self, cfg, monkeypatch):
        self.fake_evaluate(monkeypatch, [1.0, 0.9, 0.8])
        row, evals = compare.run_one(compare.RunSpec(compare.Arm("repeat", "repeat"), "all", 0), cfg)
        assert (row["stop"], row["steps"], row["evals"], row["best_step"]) == ("budget", 6, 3, 6)
        assert set(compare.RESULT_COLUMNS) - set(row) == {"device", "commit"}
        assert set(evals[0]) == set(compare.EVAL_COLUMNS)


class TestHolm:
    def test_hand_computed_case(self):
        """Sorted: 0.01 <= 0.05/4 is rejected; 0.03 > 0.05/3 stops the procedure, so 0.04 and 0.2 are kept too.
        Adjusted: 0.01*4 = 0.04; 0.03*3 = 0.09; max(0.04*2, 0.09) = 0.09; 0.2*1 = 0.2."""
        adjusted = compare.holm([0.01, 0.04, 0.03, 0.2])
        assert adjusted == pytest.approx([0.04, 0.09, 0.09, 0.2])
        assert [p < 0.05 for p in adjusted] == [True, False, False, False]

    def test_step_down_rejects_more_than_bonferroni(self):
        """0.015 * 3 = 0.045 < 0.05: Holm rejects it, where Bonferroni (0.015 * 4 = 0.06) would not."""
        adjusted = compare.holm([0.01, 0.015, 0.03, 0.2])
        assert adjusted == pytest.approx([0.04, 0.045, 0.06, 0.2])

    def test_nan_is_left_out_of_the_family(self):
        adjusted = compare.holm([0.02, math.nan, 0.04])
        assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)

    def test_capped_at_one(self):
        assert compare.holm([0.6, 0.9]) == [1.0, 1.0]


class TestPairedTest:
    @pytest.mark.parametrize("values", [[0.01, 0.03, 0.02], [0.05, -0.01, 0.02, 0.04, 0.0], [-0.1, -0.12]])
    def test_matches_scipy(self, values):
        stats = pytest.importorskip("scipy.stats")
        assert compare.t_pvalue(values) == pytest.approx(stats.ttest_1samp(values, 0.0).pvalue, rel=1e-9)

    @pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 8, 11, 30])
    @pytest.mark.parametrize("t", [0.0, 0.5, 2.0, 4.3, 12.0])
    def test_closed_form_without_scipy(self, df, t):
        stats = pytest.importorskip("scipy.stats")
        assert compare._t_two_sided(t, df) == pytest.approx(2 * stats.t.sf(t, df), abs=1e-12)

    def test_no_spread(self):
        assert compare.t_pvalue([0.0, 0.0, 0.0]) == 1.0
        assert compare.t_pvalue([0.02, 0.02]) == 0.0
        assert math.isnan(compare.t_pvalue([0.1]))


# -- the textures ----------------------------------------------------------------------------------------------
SMALL = textures.Params(images=("brick", "grass", "gravel"), patch=16, n_train=40, n_val=12, train_fraction=0.6)


@pytest.fixture(scope="module")
def texture_set(tmp_path_factory):
    pytest.importorskip("skimage")
    root = textures.generate(tmp_path_factory.mktemp("tex") / "set", SMALL)
    return root, json.loads((root / textures.RECORD).read_text())


class TestTextures:
    def test_no_validation_pixel_in_a_region_any_training_patch_touches(self, texture_set):
        root, record = texture_set
        for name in SMALL.images:
            touched = np.zeros((textures.SOURCE_SIZE, textures.SOURCE_SIZE), bool)
            for p in record["patches"]:
                if p["cls"] == name and p["split"] == "train":
                    top, left, h, w = p["box"]
                    touched[top:top + h, left:left + w] = True
            assert touched.any()
            columns = touched.any(axis=0).nonzero()[0]
            for p in record["patches"]:
                if p["cls"] == name and p["split"] == "val":
                    top, left, h, w = p["box"]
                    assert not touched[top:top + h, left:left + w].any(), p
                    assert left - columns.max() > SMALL.patch, p  # a gap of at least one patch between them

    def test_every_file_is_its_recorded_box(self, texture_set):
        """The record is what the files hold: each PNG is its box of the source, restyled as recorded."""
        root, record = texture_set
        sources = {name: textures.load_source(name)[0] for name in SMALL.images}
        assert len(record["patches"]) == len(SMALL.images) * (SMALL.n_train + SMALL.n_val)
        for p in record["patches"]:
            top, left, h, w = p["box"]
            expected = textures.restyle(sources[p["cls"]][top:top + h, left:left + w], *p["mean_std"])
            assert np.array_equal(np.asarray(Image.open(root / p["file"])), expected), p["file"]

    def test_presplit_folder_and_recorded_parameters(self, texture_set):
        root, record = texture_set
        folder = load_folder(root)
        assert folder.presplit and folder.classes == sorted(SMALL.images)
        assert (len(folder.train), len(folder.val)) == (3 * SMALL.n_train, 3 * SMALL.n_val)
        assert textures.read_params(root) == record["params"]
        assert record["params"]["seed"] == 0 and record["params"]["gap"] == SMALL.patch

    def test_random_photometrics_hide_the_exposure(self, texture_set):
        root, record = texture_set
        means = {name: [] for name in SMALL.images}
        for p in record["patches"]:
            if p["split"] == "train":
                means[p["cls"]].append(np.asarray(Image.open(root / p["file"]), np.float64).mean())
        for values in means.values():  # every class spans most of the drawn range of means
            assert min(values) < 90 and max(values) > 166

    def test_reused_when_the_same_refused_when_not(self, texture_set, tmp_path):
        root, _ = texture_set
        assert textures.generate(root, SMALL) == root
        with pytest.raises(ValueError, match="holds another texture set"):
            textures.generate(root, textures.Params(images=SMALL.images, patch=16, n_train=40, n_val=12, seed=1))
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "mine.txt").write_text("x")
        with pytest.raises(ValueError, match="is not a complete texture set"):
            textures.generate(tmp_path / "busy", SMALL)

    def test_same_parameters_same_pixels(self, texture_set, tmp_path):
        root, record = texture_set
        again = textures.generate(tmp_path / "again", SMALL)
        assert (again / textures.RECORD).read_text() == (root / textures.RECORD).read_text()
        first = record["patches"][0]["file"]
        assert np.array_equal(np.asarray(Image.open(again / first)), np.asarray(Image.open(root / first)))

    @pytest.mark.parametrize("params, message", [
        (dict(gap=8), "gap must be at least one patch"),
        (dict(train_fraction=0.95), r"the val columns \[502, 512\) are narrower than a patch"),
        (dict(images=("brick", "nosuch")), "need 2 or more distinct names"),
        (dict(photometric="warm"), "photometric must be one of"),
        (dict(n_val=0), "must be at least 1"),
    ])
    def test_bad_parameters(self, params, message, tmp_path):
        with pytest.raises(ValueError, match=message):
            textures.generate(tmp_path / "t", textures.Params(**{"patch": 16, **params}))


# -- the combined report ---------------------------------------------------------------------------------------
def write_sweep(folder: Path, stats: str, diffs: dict[str, list[float]], stop: str = "plateau",
                data: str = "/cache/digits") -> Path:
    """A sweep folder from made-up runs: ``repeat`` at 0.6 + 0.1 * seed, each arm at that plus its diff per seed."""
    folder.mkdir(parents=True)
    settings = {"data": data, "data_params": None, "model": "tf_efficientnet_lite0", "stats": stats,
                "img_size": [32, 32], "batch_size": 32, "epochs": 15, "min_steps": 120, "max_steps": 300,
                "eval_every": 10, "patience": 4, "min_delta": 0.001,
                "command": f"python benchmarks/compare.py --stats {stats}"}
    (folder / "sweep.json").write_text(json.dumps(settings))
    rows = []
    for seed in range(4):
        for arm, per_seed in {"repeat": [0.0] * 4, **diffs}.items():
            rows.append({"arm": arm, "adapter": arm, "per_class": "5", "seed": seed, "train_images": 50,
                         "val_acc_at_best_loss": 0.6 + 0.1 * seed + per_seed[seed], "final_val_loss": 1.0, "stop": stop,
                         "steps": 100, "budget": 120, "img_per_s": 100.0, "stem_drift": 0.01, "device": "cpu",
                         "commit": "abc"})
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder


class TestCombinedReport:
    def test_paragraph_from_the_intervals(self, tmp_path):
        own = write_sweep(tmp_path / "own", "model", {"sum": [0.001, -0.002, 0.0, 0.001],
                                                       "affine": [0.01, -0.02, 0.015, 0.0]})
        imnet = write_sweep(tmp_path / "in", "imagenet-synthetic", {"sum": [-0.05, -0.055, -0.048, -0.052],
                                                                     "affine": [0.01, -0.02, 0.015, 0.0]})
        combined = compare_report.combine([own, imnet], tmp_path / "out")
        text = combined["paragraph"]
        assert text.startswith("**For an EfficientNet pretrained with ImageNet's per-channel statistics**: pick "
                               "`broadcast`")
        assert "no adapter beat `repeat` detectably" in text and "Which models those are: in timm " in text
        assert "avoid `sum`, below `repeat` at 5 per class on the digits" in text
        assert "The evidence: on the digits, `sum`: below `repeat` at 5 (-5.1 points, Holm p " in text
        assert "`affine`: no detectable difference at any size" in text
        assert "With Lite0's own statistics" in text and "on the digits: `sum`: no detectable difference" in text
        assert "0 of 12 runs stopped on their step budget" in text and "SYNTHETIC" in text
        md = (tmp_path / "out" / "results.md").read_text()
        assert md.count("| arm | 5 / class | budget stops |") == 2 and "(**-5.1 [" in md
        with open(tmp_path / "out" / "summary.csv", newline="") as f:
            assert {r["sweep"] for r in csv.DictReader(f)} == {"digits, model statistics",
                                                              "digits, imagenet-synthetic statistics"}
        assert [s["stats"] for s in json.loads((tmp_path / "out" / "combined.json").read_text())["sweeps"]] == \
            ["model", "imagenet-synthetic"]

    def test_a_gain_and_the_budget_are_reported(self, tmp_path):
        imnet = write_sweep(tmp_path / "in", "imagenet-synthetic", {"affine": [0.04, 0.05, 0.045, 0.05]},
                            stop="budget")
        text = compare_report.combine([imnet], tmp_path / "out")["paragraph"]
        assert "try `affine` at 5 per class on the digits, where it beat `repeat` detectably" in text
        assert "8 of 8 runs stopped on their step budget" in text

    def test_without_imagenet_statistics_it_says_nothing(self, tmp_path):
        own = write_sweep(tmp_path / "own", "model", {"sum": [0.0, 0.01, -0.01, 0.0]})
        text = compare_report.combine([own], tmp_path / "out")["paragraph"]
        assert "these sweeps say nothing, since none used ImageNet statistics" in text


class TestWhatToPickBudget:
    def test_budget_stops_named_per_cell(self):
        summary = [{"arm": "repeat", "per_class": "5", "n": 4, "budget_stops": 1},
                   {"arm": "sum", "per_class": "5", "n": 4, "budget_stops": 0},
                   {"arm": "sum", "per_class": "100", "n": 4, "budget_stops": 3}]
        assert compare.budget_note(summary).startswith(
            "**4 of 12 runs stopped on their step budget** before a plateau: `repeat` at 5 (1 of 4), `sum` at 100 "
            "(3 of 4).")
        assert compare.budget_note([{"arm": "sum", "per_class": "5", "n": 4, "budget_stops": 0}]) == \
            "All 4 runs stopped on a validation-loss plateau, before their step budget."
        assert "recorded before compare.py trained to a plateau" in compare.budget_note([{"budget_stops": None}])


class TestReadmeRegions:
    """tools/readme.py renders compare_report.py's combined.json into docs/adapters.md and the README."""

    def test_combined_report_renders_without_machine_paths(self, tmp_path, monkeypatch):
        spec = importlib.util.spec_from_file_location("readme_tool", compare.ROOT / "tools" / "readme.py")
        readme = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(readme)
        monkeypatch.setattr(compare_report, "command_line", lambda: "python benchmarks/compare_report.py A B")
        own = write_sweep(tmp_path / "own", "model", {"sum": [0.0, 0.01, -0.01, 0.0]})
        imnet = write_sweep(tmp_path / "in", "imagenet-synthetic", {"sum": [-0.05, -0.055, -0.048, -0.052]})
        compare_report.combine([own, imnet], tmp_path / "out")
        monkeypatch.setattr(readme, "COMBINED", tmp_path / "out" / "combined.json")
        region = readme.compare()
        assert region.startswith("`python benchmarks/compare_report.py A B` sets 2 sweeps of `benchmarks/compare.py`")
        assert "**digits, imagenet-synthetic statistics**. `python benchmarks/compare.py --stats imagenet-synthetic`" \
            in region  # a folder outside the repository is named, not linked
        assert "| sum | 0.699 (**-5.1 [" in region and region.endswith(readme.pick())  # repeat's mean is 0.75
        page = "".join(f"<!-- generated:{n} -->\n<!-- /generated:{n} -->\n" for n in ("compare", "pick"))
        rendered = readme.render(page, compare.ROOT / "docs" / "adapters.md")
        assert "avoid `sum`" in rendered
        assert "([results.md](../benchmarks/results/adapter_choice/results.md))" in rendered  # relative to the page
        assert str(tmp_path) not in rendered
