"""The run report (gray_effnet.run_report): train.py writes it, `report RUN_DIR` writes it again, its numbers are
evaluate's; train.py --tensorboard; both without their optional packages."""

import base64
import csv
import html
import io
import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from gray_effnet import InputError, load_model, run_report
from gray_effnet.__main__ import main as gray_main
from gray_effnet.augment import build_transforms
from gray_effnet.data import GrayImageFolder, make_loader
from gray_effnet.engine import evaluate
from gray_effnet.folders import load_folder, prepare_digits
from gray_effnet.images import read_gray
from gray_effnet.run_report import roc_curves

pytest.importorskip("matplotlib")
sklearn_metrics = pytest.importorskip("sklearn.metrics")

FAST = ["--img-size", "32", "32", "--batch-size", "8", "--workers", "0", "--no-progress", "--channels-last", "off",
        "--threads", "1", "--lr", "0.02", "--warmup-epochs", "0", "--val-split", "0.4"]
SECTIONS = ["settings", "device", "curves", "evaluation", "confusion", "roc", "worst", "cam"]
FIGURES = ["curves", "confusion", "roc", "worst", "cam"]


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    """Digits 0 and 1, 24 each: 28 train / 20 val images at --val-split 0.4."""
    digits = prepare_digits(tmp_path_factory.mktemp("cache"), per_class=24)
    root = tmp_path_factory.mktemp("binary")
    for c in ("0", "1"):
        shutil.copytree(digits / c, root / c)
    return root


@pytest.fixture(scope="module")
def run(binary, tmp_path_factory) -> tuple[Path, str]:
    """A 2-epoch run with --tensorboard; its output folder and what it printed."""
    out = tmp_path_factory.mktemp("run") / "out"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        train.main(train.get_args_parser().parse_args(
            ["--data", str(binary), "--epochs", "2", "--output", str(out), "--tensorboard", *FAST]))
    return out, buf.getvalue()


def table(page: str, table_id: str) -> list[list[str]]:
    """The cells of the table with that id, row by row (the header row first)."""
    body = re.search(rf'<table id="{table_id}">(.*?)</table>', page, re.S)
    assert body, f"no table {table_id}"
    return [[html.unescape(c) for c in re.findall(r"<t[dh]>(.*?)</t[dh]>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)]


def figures(page: str) -> dict[str, tuple[bytes, int, int]]:
    """figure name -> (embedded PNG, width and height attributes)."""
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)" width="(\d+)" height="(\d+)"[^>]*>'
                       r"<figcaption>.*?<code>[\w.-]+/(\w+)\.png</code>", page, re.S)
    return {name: (base64.b64decode(data), int(w), int(h)) for data, w, h, name in found}


def evaluated_checkpoint(out: Path, binary: Path):
    """A run's best checkpoint, the validation split made here, and evaluate's result on it."""
    model = load_model(out / "best.safetensors")
    folder = load_folder(binary, val_split=0.4, seed=0)
    ds = GrayImageFolder(folder.val, build_transforms(model.img_size, train=False))
    result = evaluate(model, make_loader(ds, 8, train=False, workers=0), device=torch.device("cpu"), num_classes=2,
                      keep_predictions=True, progress=False)
    return model, folder, result


@pytest.fixture(scope="module")
def evaluated(run, binary):
    return evaluated_checkpoint(run[0], binary)


class TestReportPage:
    def test_printed_with_its_time(self, run):
        out, printed = run
        assert re.search(rf"^report: {re.escape(str(out))}/report\.html \(\d+\.\ds\)$", printed, re.M)

    def test_every_section(self, run):
        page = (run[0] / "report.html").read_text()
        for section in SECTIONS:
            assert re.search(rf'<section id="{section}"><h2>', page), section
        assert sorted(figures(page)) == sorted(FIGURES)
        assert "tf_efficientnet_lite0" in page and "broadcast" in page  # settings
        config = json.loads((run[0] / "config.json").read_text())
        assert f"cpu: {html.escape(config['resolved']['device_name'])}" in page
        assert "best epoch" in page.lower()

    def test_self_contained(self, run):
        page = (run[0] / "report.html").read_text()
        assert "<script" not in page.lower()
        assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing loaded from anywhere

    def test_images_decode_at_their_size_and_match_the_files(self, run):
        page = (run[0] / "report.html").read_text()
        for name, (data, w, h) in figures(page).items():
            img = Image.open(io.BytesIO(data))
            assert img.size == (w, h), name
            gray = np.asarray(img.convert("L"), dtype=np.float32)
            assert gray.std() > 10 and (gray < 128).mean() > 0.005, f"{name} looks blank"
            assert (run[0] / "report" / f"{name}.png").read_bytes() == data


class TestGallery:
    def test_tiles_keep_their_aspect_ratio_and_sit_under_their_captions(self):
        """A black 16x32 image and a black 32x16 one on white: each fills the largest box of its aspect ratio that
        fits its cell, centred, below its caption's text."""
        black_wide, black_tall = np.zeros((16, 32)), np.zeros((32, 16))
        fig = run_report.gallery_figure([[(black_wide, "wide"), (black_tall, "tall")]], 2, ["row"])
        img = np.asarray(Image.open(io.BytesIO(run_report._png(fig))).convert("L"))
        dpi, left = run_report.DPI, 0.3  # the row title's strip
        assert img.shape == (round(2.5 * dpi), round((2 * 2.1 + left) * dpi))
        for c, aspect in ((0, 2.0), (1, 0.5)):
            x0, x1 = round((left + 2.1 * c) * dpi), round((left + 2.1 * (c + 1)) * dpi)
            cell = img[:, x0:x1]
            ys, xs = np.nonzero(cell < 20)
            ys, xs = ys[ys >= 0.45 * dpi], xs[ys >= 0.45 * dpi]  # the image, below the caption strip
            width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
            assert width / height == pytest.approx(aspect, rel=0.03)
            assert max(width, height) >= 1.9 * dpi  # as large as the cell allows
            assert (xs.min() + xs.max()) / 2 == pytest.approx((x1 - x0) / 2, abs=2)  # centred
            caption = cell[: int(0.45 * dpi)]
            assert (caption < 128).any()  # its caption's text
        assert (img[:, : int(left * dpi)] < 128).any()  # the row title


class TestReportNumbers:
    def test_confusion_is_evaluates(self, run, evaluated):
        page = (run[0] / "report.html").read_text()
        rows = table(page, "confusion-counts")
        assert rows[0] == ["true \\ predicted", "0", "1"]
        assert [[int(v) for v in r[1:]] for r in rows[1:]] == evaluated[2].confusion.tolist()
        assert f"Accuracy <b>{evaluated[2].acc:.4f}</b> on 20 labelled images" in page

    def test_worst_are_the_highest_loss_images(self, run, evaluated):
        """Losses computed here image by image, without evaluate: the table is their top 16, highest first."""
        model, folder, _ = evaluated
        resize = build_transforms(model.img_size, train=False)
        losses = {}
        with torch.no_grad():
            for path, label in folder.val:
                logits = model(resize(read_gray(path))[None])
                losses[path] = torch.nn.functional.cross_entropy(logits, torch.tensor([label])).item()
        want = sorted(losses, key=losses.get, reverse=True)[:16]
        rows = table((run[0] / "report.html").read_text(), "worst-table")[1:]
        assert [r[0] for r in rows] == want
        assert [float(r[5]) for r in rows] == pytest.approx([losses[p] for p in want], abs=1e-4)

    def test_auc_is_sklearns(self, run, evaluated):
        result = evaluated[2]
        y = [t for _, t, _, _ in result.predictions]
        want = sklearn_metrics.roc_auc_score(y, result.probs[:, 1].numpy())
        (name, auc, pos, neg), = table((run[0] / "report.html").read_text(), "auc")[1:]
        assert name == "1 (vs 0)" and float(auc) == pytest.approx(want, abs=1e-4) and (pos, neg) == ("10", "10")

    def test_eval_result_keeps_probs_and_losses(self, evaluated):
        result = evaluated[2]
        assert result.probs.shape == (20, 2) and result.losses.shape == (20,)
        torch.testing.assert_close(result.probs.sum(1), torch.ones(20))
        assert result.probs.argmax(1).tolist() == [p for _, _, p, _ in result.predictions]
        assert result.losses.mean().item() == pytest.approx(result.loss, rel=1e-5)


class TestRocCurves:
    def test_masked_multilabel_columns_are_sklearns(self):
        rng = np.random.default_rng(0)
        scores, targets = rng.random((50, 3)), rng.integers(0, 2, (50, 3))
        mask = rng.random((50, 3)) > 0.3
        targets[:, 2] = np.where(mask[:, 2], 1, targets[:, 2])  # the known labels of column 2 are all positive
        curves, notes = roc_curves(scores, targets, mask, names=["a", "b", "c"])
        assert [c.name for c in curves] == ["a", "b"]
        assert notes == [f"c: no ROC curve, {mask[:, 2].sum()} positive and 0 negative images"]
        for k, c in enumerate(curves):
            m = mask[:, k]
            assert c.auc == pytest.approx(sklearn_metrics.roc_auc_score(targets[m, k], scores[m, k]))
            fpr, tpr, _ = sklearn_metrics.roc_curve(targets[m, k], scores[m, k])
            np.testing.assert_array_equal(c.fpr, fpr)
            np.testing.assert_array_equal(c.tpr, tpr)
            assert (c.positives, c.negatives) == (targets[m, k].sum(), (1 - targets[m, k]).sum())

    def test_shapes_refused(self):
        with pytest.raises(InputError, match=r"scores and targets must both be \(N, K\); got \(4, 2\) and \(4,\)"):
            roc_curves(np.zeros((4, 2)), np.zeros(4))
        with pytest.raises(InputError, match=r"mask must be \(4, 2\) like the scores; got \(4, 1\)"):
            roc_curves(np.zeros((4, 2)), np.zeros((4, 2)), np.ones((4, 1)))


class TestAfterTraining:
    """train.py keeps the best epoch's validation (with its predictions) and draws the report from it."""

    def test_the_best_epoch_is_not_evaluated_again(self, binary, tmp_path, monkeypatch):
        kept = []
        real = train.evaluate
        monkeypatch.setattr(train, "evaluate", lambda *a, **k: kept.append(k["keep_predictions"]) or real(*a, **k))
        monkeypatch.setattr(run_report, "evaluate", lambda *a, **k: pytest.fail("the best epoch evaluated again"))
        out = tmp_path / "out"
        train.main(train.get_args_parser().parse_args(["--data", str(binary), "--epochs", "1", "--output", str(out),
                                                       *FAST]))
        assert kept == [True]
        page, (_, _, fresh) = (out / "report.html").read_text(), evaluated_checkpoint(out, binary)
        rows = table(page, "confusion-counts")
        assert [[int(v) for v in r[1:]] for r in rows[1:]] == fresh.confusion.tolist()

    def test_no_report_keeps_no_predictions(self, binary, tmp_path, monkeypatch):
        kept = []
        real = train.evaluate
        monkeypatch.setattr(train, "evaluate", lambda *a, **k: kept.append(k["keep_predictions"]) or real(*a, **k))
        train.main(train.get_args_parser().parse_args(["--data", str(binary), "--epochs", "1", "--output",
                                                       str(tmp_path / "out"), "--no-report", *FAST]))
        assert kept == [False]

    def test_resumed_after_its_best_epoch_evaluates_best(self, run, binary, tmp_path, monkeypatch):
        """A resumed run whose best epoch came before the resume has no kept validation: best.safetensors is
        evaluated for the report. (The resumed epoch is made to lose: best_epoch says the first one is best.)"""
        out = tmp_path / "out"
        shutil.copytree(run[0], out, ignore=shutil.ignore_patterns("report*", "tensorboard"))
        calls = []
        real = run_report.evaluate
        monkeypatch.setattr(run_report, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
        monkeypatch.setattr(train, "best_epoch", lambda history, select_by: 0)
        train.main(train.get_args_parser().parse_args(["--data", str(binary), "--epochs", "3", "--output", str(out),
                                                       "--resume", *FAST]))
        assert len(calls) == 1
        _, _, result = evaluated_checkpoint(out, binary)
        rows = table((out / "report.html").read_text(), "confusion-counts")
        assert [[int(v) for v in r[1:]] for r in rows[1:]] == result.confusion.tolist()


class TestRegenerate:
    def test_report_subcommand_from_the_folder_alone(self, run, tmp_path, capsys):
        out = tmp_path / "copy"
        shutil.copytree(run[0], out, ignore=shutil.ignore_patterns("report*", "tensorboard"))
        assert gray_main(["report", str(out), "--no-progress"]) == 0
        assert re.search(rf"^report: {re.escape(str(out))}/report\.html \(\d+\.\ds\)$", capsys.readouterr().out, re.M)
        page, before = (out / "report.html").read_text(), (run[0] / "report.html").read_text()
        assert sorted(figures(page)) == sorted(FIGURES)
        for table_id in ("confusion-counts", "worst-table", "auc"):
            assert table(page, table_id) == table(before, table_id)
        assert sorted(p.name for p in (out / "report").iterdir()) == sorted(f"{f}.png" for f in FIGURES)

    def test_not_a_run_folder(self, tmp_path, capsys):
        assert gray_main(["report", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {tmp_path} is not a training run folder: no config.json (train.py writes one)\n"

    def test_no_report(self, run, binary, tmp_path, capsys):
        train.main(train.get_args_parser().parse_args(["--evaluate", "--weights", str(run[0] / "best.safetensors"),
                                                       "--data", str(binary), "--output", str(tmp_path),
                                                       "--no-report", *FAST]))
        assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("report")]
        assert [p.name for p in tmp_path.iterdir()] == ["eval_predictions.csv"]

    def test_evaluate_and_predict_write_theirs(self, run, binary, capsys):
        out = run[0]
        train.main(train.get_args_parser().parse_args(
            ["--evaluate", "--weights", str(out / "best.safetensors"), "--data", str(binary), *FAST]))
        assert re.search(r"^report: .*/eval_report\.html \(\d+\.\ds\)$", capsys.readouterr().out, re.M)
        assert 'id="confusion-counts"' in (out / "eval_report.html").read_text()
        pred_csv = out / "pred.csv"
        assert gray_main(["predict", "--weights", str(out / "best.safetensors"), "--data", str(binary),
                          "--output", str(pred_csv), "--workers", "0", "--channels-last", "off"]) == 0
        assert f"report: {out}/pred_report.html" in capsys.readouterr().out
        assert sorted(figures((out / "pred_report.html").read_text())) == sorted(FIGURES)
        assert sorted(p.name for p in (out / "pred_report").iterdir()) == sorted(f"{f}.png" for f in FIGURES)


class TestTensorBoard:
    def test_event_files(self, run):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(run[0] / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        assert set(acc.Tags()["scalars"]) == {"train/loss", "train/acc", "val/loss", "val/acc", "lr",
                                              "speed/img_per_s"}
        assert [e.step for e in acc.Scalars("val/acc")] == [0, 1]
        with open(run[0] / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert [e.value for e in acc.Scalars("val/acc")] == pytest.approx([float(r["val_acc"]) for r in rows], abs=1e-5)
        assert acc.Tags()["images"] == ["val/cam"] and len(acc.Images("val/cam")) == 2
        grid = Image.open(io.BytesIO(acc.Images("val/cam")[-1].encoded_image_string))
        assert grid.size == (8 * 32, 32)  # 8 validation images of 32x32 in a row, classes in turn
        assert np.asarray(grid).std() > 10

    def test_missing_package_is_one_error_line_before_any_work(self, binary, tmp_path, monkeypatch, capsys):
        monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard raises ImportError
        out = tmp_path / "out"
        assert train.cli(["--data", str(binary), "--output", str(out), "--tensorboard", *FAST]) == 2
        assert capsys.readouterr().err == ('error: --tensorboard needs the tensorboard package: '
                                           'pip install "gray_effnet[tensorboard]"\n')
        assert not out.exists()


class TestWithoutMatplotlib:
    def test_training_says_how_to_get_the_report(self, binary, tmp_path, monkeypatch, capsys):
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        out = tmp_path / "out"
        train.main(train.get_args_parser().parse_args(
            ["--data", str(binary), "--epochs", "1", "--output", str(out), *FAST]))
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("report")]
        assert lines == ['report: not written: it needs matplotlib; pip install "gray_effnet[report]"']
        assert (out / "best.safetensors").is_file() and not (out / "report.html").exists()

    def test_report_subcommand_is_an_error_line(self, run, monkeypatch, capsys):
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        assert gray_main(["report", str(run[0])]) == 2
        assert capsys.readouterr().err == 'error: the report needs matplotlib: pip install "gray_effnet[report]"\n'


# -- multi-label: the digits as a label table (even, gt4, loop; a 4's loop is uncertain, -1: unknown) -------------
FINDINGS = ["even", "gt4", "loop"]
TABLE = ["--label-columns", *FINDINGS, "--group-column", "patient"]


@pytest.fixture(scope="module")
def digits_table(tmp_path_factory) -> Path:
    """100 digits, 10 of each, with labels.csv; no --split-column: 12 patients train, 8 val at --val-split 0.4."""
    from gray_effnet.tables import prepare_digits_table

    return prepare_digits_table(tmp_path_factory.mktemp("table-cache"), per_class=10)


@pytest.fixture(scope="module")
def multi_run(digits_table, tmp_path_factory) -> tuple[Path, str]:
    """A 2-epoch multi-label run with --tensorboard; its output folder and what it printed."""
    out = tmp_path_factory.mktemp("multi") / "out"
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        train.main(train.get_args_parser().parse_args(
            ["--data", str(digits_table), "--labels", str(digits_table / "labels.csv"), *TABLE, "--epochs", "2",
             "--output", str(out), "--tensorboard", *FAST]))
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def multi_evaluated(multi_run, digits_table):
    """Computed here file by file, not by evaluate: the validation images (split.csv), their labels (labels.csv,
    -1 and blank unknown), the best checkpoint's logits, sigmoid probabilities and masked BCE per image."""
    out = multi_run[0]
    with open(out / "split.csv") as f:
        val = [r["path"] for r in csv.DictReader(f) if r["split"] == "val"]
    with open(digits_table / "labels.csv") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    paths = [str(digits_table / p) for p in val]
    targets = torch.tensor([[float(rows[p][n]) if rows[p][n] in ("0", "1") else math.nan for n in FINDINGS]
                            for p in val])
    model = load_model(out / "best.safetensors").eval()
    resize = build_transforms(model.img_size, train=False)
    with torch.no_grad():
        logits = model(torch.stack([resize(read_gray(p)) for p in paths]))
    known = ~targets.isnan()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.nan_to_num(0), reduction="none")
    losses = torch.where(known, bce, 0.0).sum(1) / known.sum(1)
    return model, paths, targets, logits.sigmoid(), losses


class TestMultiLabelReport:
    def test_printed_and_every_section(self, multi_run):
        out, printed = multi_run
        assert re.search(rf"^report: {re.escape(str(out))}/report\.html \(\d+\.\ds\)$", printed, re.M)
        page = (out / "report.html").read_text()
        for section in SECTIONS:
            assert re.search(rf'<section id="{section}"><h2>', page), section
        assert sorted(figures(page)) == sorted(FIGURES)
        assert "ROC curves per finding" in page and "Confusion at each finding's threshold" in page
        assert table(page, "findings")[0] == ["finding", "ROC AUC", "average precision", "threshold", "prevalence",
                                              "labels known"]
        assert [r[0] for r in table(page, "findings")[1:]] == FINDINGS
        assert "<td>label_columns</td>" in page and "<td>label_smoothing</td>" not in page  # single-label's only

    def test_images_decode_and_are_not_blank(self, multi_run):
        page = (multi_run[0] / "report.html").read_text()
        for name, (data, w, h) in figures(page).items():
            img = Image.open(io.BytesIO(data))
            assert img.size == (w, h), name
            gray = np.asarray(img.convert("L"), dtype=np.float32)
            assert gray.std() > 10 and (gray < 128).mean() > 0.005, f"{name} looks blank"
            assert (multi_run[0] / "report" / f"{name}.png").read_bytes() == data

    def test_best_epoch_by_auc(self, multi_run):
        with open(multi_run[0] / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        aucs = [float(r["val_auc"]) for r in rows]
        best = int(np.argmax(aucs))
        page = (multi_run[0] / "report.html").read_text()
        assert f"Best epoch {best} of 2 by validation auc: macro ROC AUC {aucs[best]:.4f}" in page

    def test_auc_per_finding_is_sklearns(self, multi_run, multi_evaluated):
        _, _, targets, probs, _ = multi_evaluated
        page = (multi_run[0] / "report.html").read_text()
        findings, curves = table(page, "findings")[1:], table(page, "auc")[1:]
        assert [r[0] for r in curves] == FINDINGS
        for k, name in enumerate(FINDINGS):
            known = ~targets[:, k].isnan()
            y, s = targets[known, k].numpy(), probs[known, k].numpy()
            want = sklearn_metrics.roc_auc_score(y, s)
            assert float(findings[k][1]) == pytest.approx(want, abs=1e-4), name
            assert float(curves[k][1]) == pytest.approx(want, abs=1e-4), name
            assert float(findings[k][2]) == pytest.approx(sklearn_metrics.average_precision_score(y, s), abs=1e-4)
            assert (int(curves[k][2]), int(curves[k][3])) == (int(y.sum()), int((1 - y).sum()))
            assert int(findings[k][5]) == int(known.sum())

    @staticmethod
    def assert_confusion_close(got: list[str], y: torch.Tensor, scores: torch.Tensor, threshold: float) -> None:
        """TN, FP, FN, TP of ``got`` are those of ``scores >= threshold``, but for scores within float noise of
        the threshold: Youden's threshold is a validation image's own score, which another batch size can move by
        1e-7 to either side."""
        called = scores >= threshold
        want = [int((~y & ~called).sum()), int((~y & called).sum()), int((y & ~called).sum()), int((y & called).sum())]
        got = [int(v) for v in got]
        edge = int(((scores - threshold).abs() < 1e-5).sum())
        assert got[0] + got[1] == int((~y).sum()) and got[2] + got[3] == int(y.sum())
        assert sum(abs(g - w) for g, w in zip(got, want)) <= 2 * edge, (got, want)

    def test_confusion_is_at_the_checkpoints_thresholds(self, multi_run, multi_evaluated):
        model, _, targets, probs, _ = multi_evaluated
        rows = table((multi_run[0] / "report.html").read_text(), "confusion-counts")[1:]
        assert [r[0] for r in rows] == FINDINGS
        for k, row in enumerate(rows):
            known = ~targets[:, k].isnan()
            assert float(row[1]) == pytest.approx(model.thresholds[k], abs=1e-3)
            self.assert_confusion_close(row[2:6], targets[known, k] > 0.5, probs[known, k], model.thresholds[k])

    def test_worst_are_the_highest_masked_bce(self, multi_run, multi_evaluated):
        model, paths, targets, probs, losses = multi_evaluated
        order = sorted(range(len(paths)), key=lambda i: -losses[i].item())[:16]
        rows = table((multi_run[0] / "report.html").read_text(), "worst-table")[1:]
        assert [r[0] for r in rows] == [paths[i] for i in order]
        assert [float(r[4]) for r in rows] == pytest.approx([losses[i].item() for i in order], abs=1e-4)
        for r, i in zip(rows, order):
            labels = ", ".join(f"{n} {'?' if math.isnan(t) else int(t)}" for n, t in zip(FINDINGS, targets[i].tolist()))
            assert r[1] == labels
            near = [abs(probs[i, k].item() - t) < 1e-5 for k, t in enumerate(model.thresholds)]
            if not any(near):  # else one finding is called or not by float noise (see assert_confusion_close)
                assert r[2] == (", ".join(n for k, n in enumerate(FINDINGS) if probs[i, k] >= model.thresholds[k])
                                or "none")
            assert [float(v.split()[1]) for v in r[3].split(", ")] == pytest.approx(probs[i].tolist(), abs=1e-3)

    def test_evaluate_keeps_each_images_masked_bce(self, multi_run, multi_evaluated, digits_table):
        from gray_effnet.evaluation import evaluate_checkpoint
        from gray_effnet.sources import open_source
        from gray_effnet.tables import TableOptions

        _, paths, _, probs, losses = multi_evaluated
        source = open_source(digits_table, val_split=0.4, seed=0, table=TableOptions(
            labels=str(digits_table / "labels.csv"), label_columns=FINDINGS, group_column="patient"))
        result = evaluate_checkpoint(multi_run[0] / "best.safetensors", source, split="val", workers=0,
                                     channels_last="off", progress=False, log=lambda line: None).result
        assert result.probs is None and result.losses.shape == (len(paths),)
        index = [result.paths.index(p) for p in paths]
        torch.testing.assert_close(result.losses[index], losses, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(result.scores[index], probs, atol=1e-5, rtol=1e-4)

    def test_report_subcommand_from_the_folder_alone(self, multi_run, digits_table, tmp_path, capsys):
        out = tmp_path / "copy"
        shutil.copytree(multi_run[0], out, ignore=shutil.ignore_patterns("report*", "tensorboard"))
        assert gray_main(["report", str(out), "--no-progress"]) == 0
        assert re.search(rf"^report: {re.escape(str(out))}/report\.html", capsys.readouterr().out, re.M)
        page, before = (out / "report.html").read_text(), (multi_run[0] / "report.html").read_text()
        assert sorted(figures(page)) == sorted(FIGURES)
        for table_id in ("label-counts", "findings", "auc"):
            assert table(page, table_id) == table(before, table_id), table_id
        # Evaluated in batches of 64 here, of 8 in training: the same numbers up to float noise, which can move an
        # image whose probability is the threshold (Youden's: a validation score) to the other side of it.
        now, then = table(page, "confusion-counts")[1:], table(before, "confusion-counts")[1:]
        for a, b in zip(now, then):
            assert a[:2] == b[:2] and sum(abs(int(x) - int(z)) for x, z in zip(a[2:6], b[2:6])) <= 2, (a, b)
        now, then = table(page, "worst-table")[1:], table(before, "worst-table")[1:]
        assert [r[:2] for r in now] == [r[:2] for r in then]
        assert [float(r[4]) for r in now] == pytest.approx([float(r[4]) for r in then], abs=2e-4)

    def test_report_subcommand_finds_a_moved_table_with_labels(self, multi_run, digits_table, tmp_path, capsys):
        out = tmp_path / "copy"
        shutil.copytree(multi_run[0], out, ignore=shutil.ignore_patterns("report*", "tensorboard"))
        config = json.loads((out / "config.json").read_text())
        config["args"]["labels"] = config["resolved"]["labels"] = str(tmp_path / "gone.csv")
        (out / "config.json").write_text(json.dumps(config))
        assert gray_main(["report", str(out), "--no-progress"]) == 2
        assert capsys.readouterr().err == (f"error: the run's label table {tmp_path / 'gone.csv'} is not there; name "
                                           "where it is now with --labels FILE.csv\n")
        moved = tmp_path / "moved.csv"
        shutil.copy(digits_table / "labels.csv", moved)
        assert gray_main(["report", str(out), "--labels", str(moved), "--no-progress"]) == 0
        before = (multi_run[0] / "report.html").read_text()
        assert table((out / "report.html").read_text(), "findings") == table(before, "findings")

    def test_evaluate_and_predict_write_theirs(self, multi_run, digits_table, tmp_path, capsys):
        out = multi_run[0]
        flags = ["--data", str(digits_table), "--labels", str(digits_table / "labels.csv"), *TABLE]
        train.main(train.get_args_parser().parse_args(
            ["--evaluate", "--weights", str(out / "best.safetensors"), "--output", str(tmp_path), *flags, *FAST]))
        assert re.search(r"^report: .*/eval_report\.html \(\d+\.\ds\)$", capsys.readouterr().out, re.M)
        page = (tmp_path / "eval_report.html").read_text()
        assert sorted(figures(page)) == sorted(FIGURES)
        assert table(page, "findings") == table((out / "report.html").read_text(), "findings")
        pred_csv = tmp_path / "pred.csv"
        assert gray_main(["predict", "--weights", str(out / "best.safetensors"), *flags, "--output", str(pred_csv),
                          "--workers", "0", "--channels-last", "off", "--threads", "1", "--no-progress"]) == 0
        assert f"report: {tmp_path}/pred_report.html" in capsys.readouterr().out
        page = (tmp_path / "pred_report.html").read_text()
        assert sorted(figures(page)) == sorted(FIGURES)
        assert sum(int(r[5]) for r in table(page, "findings")[1:]) > 200  # every image of the table, test rows too

    def test_tensorboard(self, multi_run):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(multi_run[0] / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        assert {"val/auc", "val/ap", "val/loss"} <= set(acc.Tags()["scalars"])
        with open(multi_run[0] / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert [e.value for e in acc.Scalars("val/auc")] == pytest.approx([float(r["val_auc"]) for r in rows],
                                                                          abs=1e-5)
        assert acc.Tags()["images"] == ["val/cam"] and len(acc.Images("val/cam")) == 2
        grid = Image.open(io.BytesIO(acc.Images("val/cam")[-1].encoded_image_string))
        assert grid.size == (8 * 32, 32) and np.asarray(grid).std() > 10


class TestOlderMetrics:
    def test_rows_without_the_added_columns_are_read(self, tmp_path):
        """A metrics.csv written before data_wait_s, val_seconds, val_auc and val_ap existed still gives its curves."""
        from gray_effnet.checkpoint import ADDED_COLUMNS, METRIC_COLUMNS
        from gray_effnet.run_report import read_metrics

        old = [c for c in METRIC_COLUMNS if c not in ADDED_COLUMNS]
        path = tmp_path / "metrics.csv"
        path.write_text(",".join(old) + "\n" + ",".join("1" for _ in old) + "\n")
        rows, notes = read_metrics(path)
        assert not notes and len(rows) == 1
        assert all(math.isnan(rows[0][c]) for c in ADDED_COLUMNS) and rows[0]["val_acc"] == 1.0

