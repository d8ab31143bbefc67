"""Multi-label data end to end: train.py (select-by, pos-weight, resume), --evaluate and predict.

Until label tables arrive (issue 20's data side), ``FindingsSource`` stands in for one: image files, each with a
yes (1), no (0) or unknown (NaN) per finding, behind the data-source interface that train.py and the evaluation
path ask. It hands the loader whole batches (``__getitems__``) with float (B, K) targets.
"""

import contextlib
import csv
import io
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.utils.data import Dataset

import train
from gray_effnet import GrayEfficientNet, load_model, save_weights
from gray_effnet.__main__ import main as gray_main
from gray_effnet.augment import build_transforms
from gray_effnet.checkpoint import STATE_NAME, read_checkpoint
from gray_effnet.data import Batch, GrayImageFolder
from gray_effnet.evaluation import evaluate_checkpoint, report_predictions
from gray_effnet.images import ScanResult, read_gray
from gray_effnet.intensity import parse_intensity
from gray_effnet.metrics import finding_metrics
from gray_effnet.sources import DataSource
from gray_effnet.tasks import pos_weight_from_prevalence

from .test_train import FAST, _Crash, assert_same_run, metrics

NAN = math.nan
FINDINGS = ["bright", "striped", "dotted"]


class FindingsDataset(Dataset):
    """(path, labels) rows read as the folders' images are; batches with float (B, K) targets."""

    def __init__(self, rows: list[tuple[str, list[float]]], transform, intensity: str):
        self.images = GrayImageFolder([(p, i) for i, (p, _) in enumerate(rows)], transform, intensity=intensity)
        self.targets = torch.tensor([y for _, y in rows], dtype=torch.float32).view(len(rows), -1)
        self.wide = self.images.wide

    def __len__(self) -> int:
        return len(self.images)

    def __getitems__(self, indices: list[int]) -> Batch:
        items = [self.images[i] for i in indices]
        good = [(img, self.targets[i], path) for i, (img, _, path) in zip(indices, items)]
        return Batch(torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), [g[2] for g in good], 0)


class FindingsSource(DataSource):
    """A stand-in for a label table: given train and val rows of (path, one label per finding)."""

    task = "multi"

    def __init__(self, root: Path, findings: list[str], splits: dict[str, list[tuple[str, list[float]]]]):
        self.root, self.classes, self.presplit, self.val_split = Path(root), list(findings), True, 0.0
        self.scan = ScanResult(bad=[], modes=Counter({"L": sum(map(len, splits.values()))}), wide=False)
        self.ignored, self._splits = [], splits

    def samples(self, split):
        return self._splits["train"] + self._splits["val"] if split == "all" else self._splits[split]

    def pos_fraction(self) -> np.ndarray:
        return np.nanmean(np.array([y for _, y in self._splits["train"]], dtype=float), axis=0)

    def settings(self, img_size, intensity, default_size=(64, 64)):
        return tuple(int(s) for s in (img_size or default_size)), str(parse_intensity(intensity or "full"))

    def dataset(self, split, img_size, intensity, *, augment=None, class_names=None):
        rows = self.samples(split)
        if class_names is not None:  # columns in the checkpoint's order
            rows = [(p, [y[self.classes.index(c)] for c in class_names]) for p, y in rows]
        transform = build_transforms(img_size, train=augment is not None, crop_scale=augment.crop_scale if augment
                                     else 1.0)
        return FindingsDataset(rows, transform, intensity)

    def describe(self, wide):
        return f"data: {self.root}: {len(self.classes)} findings, {len(self.samples('train'))} train / " \
               f"{len(self.samples('val'))} val images (test stand-in)"


def write_findings(root: Path, n: int, seed: int = 0) -> list[tuple[str, list[float]]]:
    """``n`` 40x40 PNGs showing their findings (bright, horizontal stripes, a dark dot).

    The first four images of every block of eight are labelled in full and hold both classes of every finding, so
    that a split in blocks of eight has both classes known in each finding; in the others a fifth of the labels
    are unknown."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        b0, b1 = i & 1, (i >> 1) & 1
        truth = [b0, b1, b0 ^ b1] if i % 8 < 4 else list(rng.random(3) < 0.5)
        a = rng.integers(60, 100, (40, 40)) + (100 if truth[0] else 0)
        if truth[1]:
            a[::4] = 255
        if truth[2]:
            a[15:25, 15:25] = 0
        path = root / f"{i:03d}.png"
        Image.fromarray(a.astype(np.uint8)).save(path)
        labels = [float(t) for t in truth]
        if i % 8 >= 4:  # unknown labels, never in the first four of a block
            labels = [NAN if rng.random() < 0.2 else y for y in labels]
        rows.append((str(path), labels))
    return rows


@pytest.fixture(scope="module")
def findings(tmp_path_factory) -> FindingsSource:
    root = tmp_path_factory.mktemp("findings")
    rows = write_findings(root / "images", 24)
    return FindingsSource(root / "images", FINDINGS, {"train": rows[:16], "val": rows[16:]})


@pytest.fixture
def use_source(monkeypatch):
    """Make train.py open ``source`` for any --data."""

    def use(source):
        monkeypatch.setattr(train, "open_source", lambda *a, **k: source)

    return use


MULTI = [*FAST, "--epochs", "2", "--batch-size", "8", "--no-pretrained", "--lr", "0.01"]


def run(*argv) -> str:
    """train.py's main; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    return printed.getvalue()


@pytest.fixture(scope="module")
def trained(findings, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("multi") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "open_source", lambda *a, **k: findings)
        printed = run("--data", findings.root, "--output", out, *MULTI)
    return out, printed


def sigmoid_of_files(weights: Path, paths: list[str]) -> torch.Tensor:
    """The checkpoint's probabilities for the files, read and resized here as evaluation does."""
    model = load_model(weights).eval()
    resize = build_transforms(model.img_size, train=False)
    with torch.no_grad():
        return model(torch.stack([resize(read_gray(p)) for p in paths])).sigmoid()


class TestTrain:
    def test_metrics_and_best_by_auc(self, trained, findings):
        out, printed = trained
        rows = metrics(out)
        assert len(rows) == 2 and all(0 <= float(r["val_auc"]) <= 1 for r in rows)
        assert all(0 <= float(r["val_ap"]) <= 1 and 0 <= float(r["train_acc"]) <= 1 for r in rows)
        aucs = [float(r["val_auc"]) for r in rows]
        best = int(np.argmax(aucs))  # the first of equals
        assert f"best val auc {aucs[best]:.4f} (epoch {best})" in printed
        assert "val loss is binary cross-entropy per known label" in printed and "by val auc" in printed
        _, meta = read_checkpoint(out / "best.safetensors")
        assert (meta["task"], meta["class_names"], meta["epoch"]) == ("multi", FINDINGS, best)
        assert meta["val_auc"] == pytest.approx(aucs[best], abs=1e-6)
        config = json.loads((out / "config.json").read_text())["resolved"]
        assert (config["task"], config["select_by"], config["pos_weight"]) == ("multi", "auc", None)

    def test_thresholds_are_youden_on_validation(self, trained, findings):
        """best.safetensors' thresholds are Youden's on its epoch's validation probabilities, computed here."""
        out, _ = trained
        val = findings.samples("val")
        probs = sigmoid_of_files(out / "best.safetensors", [p for p, _ in val])
        expected = finding_metrics(np.array([y for _, y in val]), probs.numpy())
        assert load_model(out / "best.safetensors").thresholds == pytest.approx(expected.threshold.tolist(),
                                                                               abs=1e-6)
        assert expected.macro_auc == pytest.approx(float(metrics(out)[read_checkpoint(
            out / "best.safetensors")[1]["epoch"]]["val_auc"]), abs=1e-5)

    def test_evaluate_reproduces_the_best_epoch(self, trained, findings, tmp_path, use_source, capsys):
        out, _ = trained
        use_source(findings)
        printed = run("--evaluate", "--weights", out / "best.safetensors", "--data", findings.root, "--output",
                      tmp_path, *FAST)
        best = read_checkpoint(out / "best.safetensors")[1]["epoch"]
        auc = re.search(r"macro ROC AUC ([\d.]+), macro average precision ([\d.]+)", printed)
        assert auc and auc.group(1) == f"{float(metrics(out)[best]['val_auc']):.3f}", printed
        with open(tmp_path / "eval_predictions.csv") as f:
            assert len(list(csv.DictReader(f))) == 8

    def test_select_by_loss_and_pos_weight(self, findings, tmp_path, use_source):
        use_source(findings)
        out = tmp_path / "run"
        printed = run("--data", findings.root, "--output", out, "--select-by", "loss", "--pos-weight", "auto",
                      *MULTI)
        losses = [float(r["val_loss"]) for r in metrics(out)]
        best = int(np.argmin(losses))
        assert f"best val loss {losses[best]:.4f} (epoch {best})" in printed
        assert read_checkpoint(out / "best.safetensors")[1]["epoch"] == best
        config = json.loads((out / "config.json").read_text())["resolved"]
        p = findings.pos_fraction()
        assert config["pos_weight"] == pytest.approx(((1 - p) / p).tolist(), rel=1e-6)
        assert config["pos_weight"] == pytest.approx(pos_weight_from_prevalence(p).tolist())

    def test_pos_weight_refused_for_single_label_data(self, tmp_path, capsys):
        data = tmp_path / "data"
        for c in ("a", "b"):
            (data / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((32, 32), 40 * i, np.uint8)).save(data / c / f"{i}.png")
        code = train.cli(["--data", str(data), "--output", str(tmp_path / "run"), "--pos-weight", "auto", *FAST])
        err = capsys.readouterr().err
        assert code == 2 and "--pos-weight auto is for multi-label data" in err
        assert not (tmp_path / "run").exists()

    def test_resume_equals_uninterrupted(self, trained, findings, tmp_path, use_source, monkeypatch):
        full, _ = trained
        use_source(findings)
        cut = tmp_path / "cut"
        real_save = train.save_checkpoint

        def save_then_crash(*args, **kwargs):
            real_save(*args, **kwargs)
            raise _Crash

        monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
        with pytest.raises(_Crash):
            run("--data", findings.root, "--output", cut, *MULTI)
        monkeypatch.setattr(train, "save_checkpoint", real_save)
        assert torch.load(cut / STATE_NAME, weights_only=True)["select_by"] == "auc"
        printed = run("--data", findings.root, "--output", cut, "--resume", *MULTI)
        assert re.search(r"resumed from .* \(best val_auc [\d.]+, epoch 0\)", printed)
        assert_same_run(cut, full)
        for name in ("last.safetensors", "best.safetensors"):
            assert read_checkpoint(cut / name)[1]["thresholds"] == pytest.approx(
                read_checkpoint(full / name)[1]["thresholds"], abs=1e-6)

    def test_resume_restores_the_thresholds(self, trained, findings, tmp_path, use_source):
        """Nothing left to train: the state's weights and thresholds come back, and nothing changes."""
        full, _ = trained
        use_source(findings)
        out = tmp_path / "run"
        shutil.copytree(full, out)
        printed = run("--data", findings.root, "--output", out, "--resume", *MULTI)
        assert "best val auc" in printed
        state = torch.load(out / STATE_NAME, weights_only=True)
        assert state["gray_effnet"]["thresholds"] == read_checkpoint(full / "last.safetensors")[1]["thresholds"]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=3, class_names=FINDINGS, img_size=(32, 40),
                             task="multi", thresholds=[0.3, 0.5, 0.55])
    return save_weights(model, tmp_path / "best.safetensors")


class TestPredict:
    def test_rows_are_the_models_sigmoid(self, checkpoint, tmp_path, capsys):
        """Through the evaluation path with labels: p_ columns, y_ columns, findings at the thresholds, the table."""
        rows = write_findings(tmp_path / "images", 16, seed=1)
        source = FindingsSource(tmp_path / "images", ["dotted", "bright", "striped"],  # another order of columns
                                {"train": [], "val": [(p, [y[2], y[0], y[1]]) for p, y in rows]})
        ev = evaluate_checkpoint(checkpoint, source, split="all", workers=0, channels_last="off", progress=False,
                                 log=lambda *_: None)
        result, names = ev.result, ev.class_names
        printed = []
        out = report_predictions(result, names, tmp_path / "p.csv", labelled=True, log=printed.append)
        with open(out) as f:
            got = list(csv.DictReader(f))
        assert [r["path"] for r in got] == [p for p, _ in rows]
        probs = sigmoid_of_files(checkpoint, [p for p, _ in rows])
        assert 0.05 < probs.std().item()  # not a model that says the same of every image
        for row, p, (_, y) in zip(got, probs, rows):
            assert [float(row[f"p_{n}"]) for n in FINDINGS] == pytest.approx(p.tolist(), abs=1e-5)
            assert [row[f"y_{n}"] for n in FINDINGS] == ["" if math.isnan(v) else str(int(v)) for v in y]
            assert row["findings"] == "|".join(n for n, q, t in zip(FINDINGS, p, [0.3, 0.5, 0.55]) if q >= t)
        table = {line.split()[0]: line.split()[1:] for line in printed[0].splitlines()[3:]}
        for k, name in enumerate(FINDINGS):
            y = np.array([r[1][k] for r in rows])
            known = ~np.isnan(y)
            assert table[name][:2] == [f"{roc_auc_score(y[known], probs[known, k]):.3f}",
                                       f"{average_precision_score(y[known], probs[known, k]):.3f}"]
            assert table[name][2] == f"{[0.3, 0.5, 0.55][k]:.3f}"

    def test_flat_folder(self, checkpoint, tmp_path, capsys):
        rows = write_findings(tmp_path / "flat", 5, seed=2)
        out = tmp_path / "p.csv"
        assert gray_main(["predict", "--weights", str(checkpoint), "--data", str(tmp_path / "flat"), "--output",
                          str(out), "--workers", "0", "--channels-last", "off"]) == 0
        printed = capsys.readouterr().out
        with open(out) as f:
            got = list(csv.DictReader(f))
        probs = sigmoid_of_files(checkpoint, [p for p, _ in rows])
        hits = (probs >= torch.tensor([0.3, 0.5, 0.55])).sum(0).tolist()
        assert "5 images; findings called present: " in printed
        assert all(f"{n}: {h}" in printed for n, h in zip(FINDINGS, hits))
        for row, p in zip(got, probs):
            assert [float(row[f"p_{n}"]) for n in FINDINGS] == pytest.approx(p.tolist(), abs=1e-5)
            assert all(row[f"y_{n}"] == "" for n in FINDINGS)

    def test_class_folders_refused(self, checkpoint, tmp_path, capsys):
        for c in ("bright", "dotted"):
            write_findings(tmp_path / "data" / c, 2)
        assert gray_main(["predict", "--weights", str(checkpoint), "--data", str(tmp_path / "data")]) == 2
        err = capsys.readouterr().err
        assert "is labelled with one class per image, the checkpoint predicts findings (multi-label)" in err


class TestFindingsCsvIsSafe:
    def test_formula_cells_escaped(self, tmp_path):
        """A multi-label predictions CSV escapes cells that start like a formula, as the single-label one does."""
        import csv as csv_module

        from gray_effnet.engine import EvalResult
        from gray_effnet.evaluation import write_predictions

        result = EvalResult(loss=0.0, acc=1.0, confusion=torch.zeros(1, 2, 2), task="multi", paths=["=cmd.png"],
                            scores=torch.tensor([[0.9]]), targets=torch.tensor([[1.0]]), thresholds=[0.5])
        path = write_predictions(tmp_path / "p.csv", result, ["@finding"])
        with open(path, newline="") as f:
            header, row = list(csv_module.reader(f))
        assert header == ["path", "p_@finding", "y_@finding", "findings"]  # prefixed: never a formula
        assert row[0] == "'=cmd.png" and row[-1] == "'@finding"

