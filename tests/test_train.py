"""train.py end to end on a tiny digits subset: outputs, resume, kills, NaN, evaluate, torchrun."""

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_pre_hook

import train
from gray_effnet import GrayEffnetError, NonFiniteLossError, WeightsError, load_model, speed
from gray_effnet.augment import build_transforms
from gray_effnet.checkpoint import STATE_NAME, read_checkpoint
from gray_effnet.folders import prepare_digits
from gray_effnet.images import UnreadableImageWarning, read_gray

from .helpers import PicklePayload

ROOT = Path(__file__).resolve().parents[1]
# No choice by the clock in runs that are compared: no channels_last timing probe, and a fixed thread count (the
# ThreadGovernor would drop to 1 thread at a moment that depends on whatever else shares the cores).
FAST = ["--img-size", "32", "32", "--batch-size", "16", "--workers", "0", "--no-progress", "--log-every", "2",
        "--channels-last", "off", "--threads", "1", "--no-report"]  # the report has tests of its own


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    pytest.importorskip("sklearn")
    return prepare_digits(tmp_path_factory.mktemp("cache"), per_class=12)


def run(*argv: str) -> None:
    train.main(train.get_args_parser().parse_args([str(a) for a in argv]))


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def comparable(rows: list[dict]) -> list[dict]:
    """Metric rows without the wall-clock columns."""
    clock = ("img_per_s", "seconds", "data_wait_s", "val_seconds", "process_peak_mem_mb")
    return [{k: float(v) for k, v in r.items() if k not in clock} for r in rows]


def assert_same_run(got: Path, want: Path) -> None:
    """Two runs' metrics (timings aside) and last weights are equal: a resumed run against an uninterrupted one."""
    for row, ref in zip(comparable(metrics(got)), comparable(metrics(want)), strict=True):
        assert row == pytest.approx(ref, rel=1e-5, abs=1e-6)
    a, _ = read_checkpoint(want / "last.safetensors")
    b, _ = read_checkpoint(got / "last.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


class _Crash(Exception):
    pass



LEARN = ["--epochs", "5", "--lr", "0.02", "--warmup-epochs", "0", "--crop-scale", "1"]


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> tuple[Path, str, list[list[int]]]:
    """One run shared by the tests below: 5 epochs of the broadcast stem on 96 digits (about 6 s).

    Returns the output folder, what the run printed and the targets of each training step, in order.
    """
    out = tmp_path_factory.mktemp("trained") / "run"
    printed = io.StringIO()
    steps = []

    class Recorded(torch.nn.CrossEntropyLoss):
        def forward(self, logits, target):
            if torch.is_grad_enabled():
                steps.append(target.tolist())
            return super().forward(logits, target)

    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setattr(torch.nn, "CrossEntropyLoss", Recorded)
        run("--data", digits, "--adapter", "broadcast", "--output", out, *LEARN, *FAST)
    return out, printed.getvalue(), steps


class TestLearning:
    def test_loss_falls_and_accuracy_is_far_above_chance(self, trained):
        """96 training images of 10 digits, 5 epochs: a network that does not learn cannot pass this.

        Measured with 1 and 2 threads: train loss 2.27 -> 1.05-1.12, val loss 2.5-2.7 -> 1.0-1.3, best val
        accuracy 0.85-0.90 on 20 images. Fewer epochs left too little margin across thread counts."""
        rows = comparable(metrics(trained[0]))
        assert rows[-1]["train_loss"] < 0.6 * rows[0]["train_loss"]
        assert rows[-1]["val_loss"] < 0.75 * rows[0]["val_loss"]
        assert max(r["val_acc"] for r in rows) >= 0.6  # chance is 0.1
        assert rows[-1]["train_acc"] >= 0.6

    def test_each_epoch_a_new_order(self, trained):
        """The loader is told the epoch: 6 steps of 16 a epoch, the labels in another order each time."""
        steps = trained[2]
        assert [len(s) for s in steps] == [16] * 30
        epochs = [tuple(t for step in steps[i:i + 6] for t in step) for i in range(0, 30, 6)]
        assert len(set(epochs)) == 5

    def test_printed_numbers_are_the_metrics(self, trained):
        out, printed, _ = trained
        rows = metrics(out)
        lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
        assert len(lines) == len(rows) == 5
        for line, row in zip(lines, rows):
            numbers = re.match(r"epoch (\d+): train loss ([\d.]+) acc ([\d.]+) \| val loss ([\d.]+) acc ([\d.]+)", line)
            assert numbers, line
            epoch, *values = numbers.groups()
            assert epoch == row["epoch"]
            for value, key in zip(values, ["train_loss", "train_acc", "val_loss", "val_acc"]):
                # 4 decimals printed, 6 significant digits in the CSV: both rounded from the same float
                assert float(value) == pytest.approx(float(row[key]), abs=6e-5), (line, key)
        best = max(float(r["val_acc"]) for r in rows)
        assert f"best val acc {best:.4f}" in printed

    def test_first_lines_say_compile_and_readiness(self, trained):
        """--compile auto's decision and reason (30 steps: too few to repay compiling), and the training line's
        time since the imports."""
        printed = trained[1]
        decided = r"^compile: off \(auto: (30 training steps; at 32x32 compiling pays .* after about \d+|no C\+\+ comp)"
        assert re.search(decided, printed, flags=re.M)
        assert re.search(r"^training .*; ready \d+\.\ds after the imports$", printed, flags=re.M)


class TestDemoPath:
    def test_outputs(self, trained):
        out, printed, _ = trained
        rows = metrics(out)
        assert [r["epoch"] for r in rows] == ["0", "1", "2", "3", "4"]
        assert list(rows[0])[:8] == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "img_per_s",
                                     "seconds"]
        config = json.loads((out / "config.json").read_text())
        assert config["args"]["adapter"] == "broadcast" and config["versions"]["torch"] == torch.__version__
        model = load_model(out / "best.safetensors")
        assert (model.adapter, model.num_classes, model.img_size) == ("broadcast", 10, (32, 32))
        assert model.class_names == [str(d) for d in range(10)]
        _, meta = read_checkpoint(out / "last.safetensors")
        assert meta["epoch"] == 4
        _, best_meta = read_checkpoint(out / "best.safetensors")
        best_row = max(rows, key=lambda r: float(r["val_acc"]))  # the first epoch with the best accuracy
        assert best_meta["epoch"] == int(best_row["epoch"])
        from_state = load_model(out / STATE_NAME).eval()  # the resume file rebuilds the same model
        last = load_model(out / "last.safetensors").eval()
        x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
        with torch.no_grad():
            assert torch.equal(from_state(x), last(x))
        assert not list(out.glob(".*.tmp"))
        assert "best val acc" in printed and "evaluate: python train.py --evaluate" in printed

    def test_evaluate_reproduces_the_best_epoch_and_each_prediction(self, trained, digits, tmp_path, capsys):
        """--evaluate's printed accuracy is best.safetensors' val_acc in metrics.csv, and each row of
        predictions.csv is what the model gives for that file, read and resized here."""
        out, _, _ = trained
        run("--evaluate", "--weights", out / "best.safetensors", "--data", digits, "--output", tmp_path, *FAST)
        printed = capsys.readouterr().out
        accuracy = re.search(r"accuracy ([\d.]+) on (\d+) images", printed)
        best = max(float(r["val_acc"]) for r in metrics(out))
        assert accuracy and accuracy.group(1) == f"{best:.4f}" and accuracy.group(2) == "20"
        assert "precision" in printed and "confusion matrix" in printed
        with open(tmp_path / "eval_predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 20
        model = load_model(out / "best.safetensors").eval()
        resize = build_transforms((32, 32), train=False)
        images = torch.stack([resize(read_gray(r["path"])) for r in rows])
        with torch.no_grad():
            probs = model(images).softmax(-1)
        for row, p in zip(rows, probs):
            assert row["target"] == Path(row["path"]).parent.name  # the class folder
            assert row["prediction"] == model.class_names[int(p.argmax())], row
            assert float(row["probability"]) == pytest.approx(p.max().item(), abs=1e-5)
            assert row["correct"] == str(int(row["prediction"] == row["target"]))
        assert sum(int(r["correct"]) for r in rows) / len(rows) == pytest.approx(best)


@pytest.fixture(scope="module")
def twelve_bit(tmp_path_factory) -> tuple[Path, Path]:
    """16-bit PNGs holding 12-bit values (dark 0..1500, bright 2000..4095), and a run trained on them with
    --intensity 12: read with ``full`` instead, they would reach the model 16 times darker."""
    tmp = tmp_path_factory.mktemp("twelve_bit")
    rng = np.random.default_rng(0)
    for cls, (lo, hi) in {"dark": (0, 1500), "bright": (2000, 4096)}.items():
        (tmp / "data" / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(lo, hi, (40, 40)).astype(np.uint16)).save(tmp / "data" / cls / f"{i}.png")
    out = tmp / "run"
    assert train.cli(["--data", str(tmp / "data"), "--epochs", "1", "--val-split", "0.4", "--intensity", "12",
                      "--no-pretrained", "--output", str(out), *FAST]) == 0
    return tmp / "data", out / "best.safetensors"


class TestEvaluateUsesTheCheckpointsMapping:
    """--evaluate and predict read the images as the checkpoint was trained to see them (its --intensity)."""

    @staticmethod
    def expected(weights: Path, paths: list[str]) -> dict[str, tuple[str, float]]:
        """(class, probability) of each file, computed here: read with the mapping '12', resized as evaluation does."""
        model = load_model(weights).eval()
        assert model.intensity == "12"
        resize = build_transforms(model.img_size, train=False)

        def probs(intensity):
            with torch.no_grad():
                return model(torch.stack([resize(read_gray(p, intensity)) for p in paths])).softmax(-1)

        want = probs("12")
        assert (want - probs("full")).abs().max() > 1e-3  # the other mapping would give other numbers
        return {p: (model.class_names[int(q.argmax())], q.max().item()) for p, q in zip(paths, want)}

    @staticmethod
    def check(rows: list[dict], want: dict[str, tuple[str, float]], printed: str) -> None:
        assert sorted(r["path"] for r in rows) == sorted(want)
        for row in rows:
            assert row["target"] == Path(row["path"]).parent.name
            assert row["prediction"] == want[row["path"]][0], row
            assert float(row["probability"]) == pytest.approx(want[row["path"]][1], abs=1e-5), row
        correct = sum(want[r["path"]][0] == r["target"] for r in rows)
        assert f"accuracy {correct / len(rows):.4f} on {len(rows)} images" in printed

    def test_evaluate(self, twelve_bit, tmp_path, capsys):
        data, weights = twelve_bit
        assert train.cli(["--evaluate", "--weights", str(weights), "--data", str(data), "--val-split", "0.4",
                          "--output", str(tmp_path), *FAST]) == 0
        with open(tmp_path / "eval_predictions.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 8  # 40% of 20
        self.check(rows, self.expected(weights, [r["path"] for r in rows]), capsys.readouterr().out)

    def test_predict(self, twelve_bit, tmp_path, capsys):
        from gray_effnet.__main__ import main as gray_main

        data, weights = twelve_bit
        out = tmp_path / "pred.csv"
        assert gray_main(["predict", "--weights", str(weights), "--data", str(data), "--output", str(out),
                          "--workers", "0", "--channels-last", "off"]) == 0
        with open(out) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 20
        self.check(rows, self.expected(weights, [r["path"] for r in rows]), capsys.readouterr().out)


class TestMessyFolder:
    def test_trains_through_bad_files_and_counts_them(self, digits, tmp_path, capsys):
        """Corrupt, empty, truncated, colour, 16-bit and non-image files in the class folders."""
        root = tmp_path / "messy"
        shutil.copytree(digits, root)
        rng = np.random.default_rng(0)
        (root / "0" / "empty.png").write_bytes(b"")
        (root / "1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (128, 128), dtype=np.uint8)).save(buf, format="JPEG")
        for d in range(10):  # a truncated JPEG in every class, so one lands in training whatever the split
            (root / str(d) / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        Image.new("RGBA", (8, 8), (200, 10, 10, 128)).save(root / "2" / "rgba.png")
        Image.new("CMYK", (8, 8), (0, 50, 100, 0)).save(root / "3" / "cmyk.jpg")
        Image.fromarray(rng.integers(0, 4096, (8, 8), dtype=np.uint16)).save(root / "4" / "deep.tif")
        (root / "5" / "notes.txt").write_text("not an image")
        (root / "6" / ".DS_Store").write_bytes(b"\0")
        out = tmp_path / "run"
        with pytest.warns(UnreadableImageWarning):
            run("--data", root, "--epochs", "1", "--output", out, *FAST)
        printed = capsys.readouterr().out
        assert "2 converted from colour, 2 unreadable skipped, 2 non-image files ignored; float32 batches" in printed
        row = metrics(out)[0]
        assert int(row["train_skipped"]) + int(row["val_skipped"]) == 10  # the truncated JPEGs, while reading
        assert "10 unreadable while training were skipped" in printed


class TestResume:
    def test_equals_uninterrupted(self, digits, tmp_path, monkeypatch):
        """With loader workers: their augmentation seeds must come from (seed, epoch), not from the process."""
        full, cut = tmp_path / "full", tmp_path / "cut"
        fast = [*FAST, "--workers", "2"]  # the last --workers wins
        run("--data", digits, "--epochs", "2", "--output", full, *fast)

        real_save = train.save_checkpoint

        def save_then_crash(*args, **kwargs):
            real_save(*args, **kwargs)
            raise _Crash  # the process dies right after epoch 0 is saved

        monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
        with pytest.raises(_Crash):
            run("--data", digits, "--epochs", "2", "--output", cut, *fast)
        monkeypatch.setattr(train, "save_checkpoint", real_save)
        run("--data", digits, "--epochs", "2", "--output", cut, "--resume", *fast)

        assert_same_run(cut, full)

    @pytest.mark.parametrize("flag, value", [("--adapter", "sum"), ("--model", "tf_efficientnet_lite1")])
    def test_other_settings_refused(self, digits, tmp_path, flag, value):
        out = tmp_path / "run"
        run("--data", digits, "--epochs", "1", "--output", out, *FAST)
        settings = ["--adapter", "fold", "--model", "tf_efficientnet_lite0"]
        settings[settings.index(flag) + 1] = value
        with pytest.raises(WeightsError, match="cannot resume from .*: it was made with other settings"):
            run("--data", digits, "--epochs", "2", "--output", out, "--resume", "--no-pretrained", *settings, *FAST)

    def test_other_intensity_refused(self, digits, tmp_path, capsys):
        """The images would reach the model on another scale: refused, one error line naming both mappings."""
        out = tmp_path / "run"
        run("--data", digits, "--epochs", "1", "--output", out, *FAST)  # the default mapping, full
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        code = train.cli(["--data", str(digits), "--epochs", "2", "--output", str(out), "--resume",
                          "--intensity", "minmax", *FAST])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1, err
        assert "intensity: the checkpoint has 'full', this run has 'minmax'" in err
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing written

    def test_auto_resume_starts_fresh_when_empty(self, digits, tmp_path, capsys):
        run("--data", digits, "--epochs", "1", "--output", tmp_path / "new", "--resume", *FAST)
        assert "nothing to resume" in capsys.readouterr().out
        assert len(metrics(tmp_path / "new")) == 1

    def test_pickle_payload_in_resume_file_refused(self, digits, tmp_path):
        out = tmp_path / "run"
        out.mkdir()
        marker = tmp_path / "pwned"
        torch.save({"epoch": 0, "payload": PicklePayload(marker)}, out / STATE_NAME)
        with pytest.raises(WeightsError, match="refusing to load .*last.state.pt: it holds pickled Python objects"):
            run("--data", digits, "--output", out, "--resume", *FAST)
        assert not marker.exists()

    def test_missing_explicit_path(self, digits, tmp_path):
        with pytest.raises(WeightsError, match="--resume .*: no checkpoint at"):
            run("--data", digits, "--output", tmp_path, "--resume", tmp_path / "nope", *FAST)


class TestNonFinite:
    def test_stops_naming_epoch_and_step_and_keeps_last_good(self, digits, tmp_path, monkeypatch):
        out = tmp_path / "run"
        calls = {"n": 0}
        real = torch.nn.CrossEntropyLoss

        class NanAfter(real):
            def forward(self, logits, target):
                loss = super().forward(logits, target)
                if torch.is_grad_enabled():
                    calls["n"] += 1
                    if calls["n"] == 6 + 3:  # 6 steps per epoch: epoch 1, step 3
                        return loss * float("nan")
                return loss

        monkeypatch.setattr(torch.nn, "CrossEntropyLoss", NanAfter)
        with pytest.raises(NonFiniteLossError, match="non-finite at epoch 1, step 3 \\(of 6\\)"):
            run("--data", digits, "--epochs", "3", "--output", out, *FAST)
        state = torch.load(out / STATE_NAME, weights_only=True)
        assert state["epoch"] == 0 and len(metrics(out)) == 1

    def test_bf16_has_no_scaler_fp16_has_one(self):
        from gray_effnet.engine import amp_setup

        assert not amp_setup(torch.device("cpu"), "bf16")[1].is_enabled()
        assert amp_setup(torch.device("cpu"), "fp16")[1].is_enabled()
        with pytest.raises(GrayEffnetError, match="amp must be one of none, bf16, fp16; got 'fp8'"):
            amp_setup(torch.device("cpu"), "fp8")


class TestFlags:
    def test_sync_bn_needs_cuda(self, digits, tmp_path):
        with pytest.raises(GrayEffnetError, match="--sync-bn needs CUDA devices; this run is on cpu"):
            run("--data", digits, "--output", tmp_path, "--sync-bn", *FAST)


class TestSpeedFlags:
    """The CUDA-oriented flags run on the CPU too, and each is observed changing the computation."""

    @pytest.fixture
    def observed(self, monkeypatch):
        """What every optimizer step of the run sees (gradient norm, 4-D parameters' memory formats) and the
        dtype of the logits that reach the training loss."""
        seen = {"logits": [], "grad_norm": [], "channels_last": [], "contiguous": []}

        class Watched(torch.nn.CrossEntropyLoss):
            def forward(self, logits, target):
                if torch.is_grad_enabled():
                    seen["logits"].append(logits.dtype)
                return super().forward(logits, target)

        def before_step(optimizer, args, kwargs):
            params = [p for g in optimizer.param_groups for p in g["params"]]
            grads = [p.grad.detach().double() for p in params if p.grad is not None]
            seen["grad_norm"].append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
            convs = [p for p in params if p.ndim == 4]
            seen["channels_last"].append(all(p.is_contiguous(memory_format=torch.channels_last) for p in convs))
            seen["contiguous"].append(all(p.is_contiguous() for p in convs))

        monkeypatch.setattr(torch.nn, "CrossEntropyLoss", Watched)
        handle = register_optimizer_step_pre_hook(before_step)
        yield seen
        handle.remove()

    def test_bf16_channels_last(self, digits, tmp_path, observed):
        out = tmp_path / "run"
        run("--data", digits, "--epochs", "1", "--output", out, "--amp", "bf16", *FAST, "--channels-last", "on")
        row = comparable(metrics(out))[0]
        assert all(math.isfinite(v) for v in row.values())
        assert observed["logits"] and set(observed["logits"]) == {torch.bfloat16}
        assert observed["channels_last"] and all(observed["channels_last"])
        assert not any(observed["contiguous"])  # the 3x3 stem and the k x k convs really are NHWC
        assert load_model(out / "last.safetensors").adapter == train.get_args_parser().get_default("adapter")
        assert not torch.load(out / STATE_NAME, weights_only=True)["scaler"]  # bf16 needs no GradScaler

    def test_fp16_clip_grad(self, digits, tmp_path, observed):
        out = tmp_path / "run"
        clip = 1e-3  # far below the gradient norm of any step here, so every step is clipped
        run("--data", digits, "--epochs", "1", "--output", out, "--amp", "fp16", "--clip-grad", clip, *FAST)
        row = comparable(metrics(out))[0]
        assert all(math.isfinite(v) for v in row.values())
        assert observed["logits"] and set(observed["logits"]) == {torch.float16}
        # The optimizer steps on unscaled gradients of norm `clip`. Steps with inf gradients are skipped: fused AdamW
        # gets the GradScaler's found-inf flag and leaves the weights alone (the finite metrics above), so the hook
        # sees those steps too, with non-finite norms; the first steps overflow fp16 at the initial scale.
        finite = [n for n in observed["grad_norm"] if math.isfinite(n)]
        assert finite and finite == pytest.approx([clip] * len(finite), rel=1e-3)
        assert all(observed["contiguous"])  # --channels-last off: NCHW
        assert torch.load(out / STATE_NAME, weights_only=True)["scaler"]  # a GradScaler only for fp16

    @pytest.mark.parametrize("break_even, line", [(1e9, "loader: in this process (auto: reading an image took "),
                                                  (0.0, "loader: 2 workers (auto: reading an image took ")])
    def test_workers_auto_reads_where_it_measured_faster(self, digits, tmp_path, capsys, monkeypatch, break_even,
                                                         line):
        """--workers auto (the default) measures, says what it chose, and the loaders use it."""
        monkeypatch.setattr(speed, "WORKERS_BREAK_EVEN", break_even)
        loaders = []
        real = train.make_loader
        monkeypatch.setattr(train, "make_loader", lambda *a, **k: loaders.append(k["workers"]) or real(*a, **k))
        run("--data", digits, "--epochs", "1", "--output", tmp_path / "run", *FAST, "--workers", "auto")
        out = capsys.readouterr().out
        want = 0 if break_even else speed.DEFAULT_WORKERS
        assert line in out and loaders == [want, want]
        assert f"; {want} loader worker" in out  # the threads line counts them
        assert json.loads((tmp_path / "run" / "config.json").read_text())["args"]["workers"] == "auto"

    def test_workers_not_a_number(self, capsys):
        with pytest.raises(SystemExit) as e:
            train.get_args_parser().parse_args(["--workers", "two"])
        assert e.value.code == 2 and "a number of loader processes, or auto; got 'two'" in capsys.readouterr().err

    def test_without_flags_nothing_changes(self, digits, tmp_path, observed):
        """The observers themselves: float32 logits and unclipped gradients when no flag is given."""
        run("--data", digits, "--epochs", "1", "--output", tmp_path / "run", *FAST)
        assert set(observed["logits"]) == {torch.float32}
        assert min(observed["grad_norm"]) > 1e-2 and all(observed["contiguous"])


def _start(args: list, out: Path, prelude: str = "") -> subprocess.Popen:
    code = f"import runpy, sys\n{prelude}\nsys.argv = {['train.py', *map(str, args)]!r}\n"
    code += "runpy.run_path('train.py', run_name='__main__')\n"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 240) -> None:
    end = time.time() + timeout
    while not pred():
        assert proc.poll() is None, f"train.py ended early:\n{proc.stdout.read()}"
        assert time.time() < end, "timed out"
        time.sleep(0.02)


@pytest.mark.slow
class TestKill:
    """kill -9 a real training process, then --resume: every epoch once, no half-written file trusted."""

    def _args(self, digits, out):
        return ["--data", digits, "--epochs", "2", "--output", out, "--img-size", "48", "48", "--batch-size", "8",
                "--workers", "0", "--no-progress"]

    def _resume_and_check(self, digits, out):
        res = subprocess.run([sys.executable, "train.py", *map(str, self._args(digits, out)), "--resume"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        assert [r["epoch"] for r in metrics(out)] == ["0", "1"]
        assert not list(out.glob(".*.tmp"))
        assert load_model(out / "best.safetensors").num_classes == 10
        return res.stdout

    def test_kill_during_epoch(self, digits, tmp_path):
        """Killed on the run's own signal: the log line of epoch 0, then a step of epoch 1 (of 12) announced."""
        out = tmp_path / "run"
        prelude = """
from torch.optim.optimizer import register_optimizer_step_post_hook
register_optimizer_step_post_hook(lambda *_: print("test: optimizer step done", flush=True))
"""
        proc = _start(self._args(digits, out), out, prelude)
        watchdog = threading.Timer(300, proc.kill)  # a hung run ends the loop below instead of the test run
        watchdog.start()
        seen = []
        for line in proc.stdout:  # blocks until the run prints; ends when the run ends
            seen.append(line)
            if line.startswith("epoch 0:"):
                seen = ["epoch 0 logged"]
            elif seen[0] == "epoch 0 logged" and line.startswith("test: optimizer step done"):
                break
        else:
            pytest.fail("train.py ended before a step of epoch 1:\n" + "".join(seen))
        watchdog.cancel()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Inside epoch 1: its checkpoint was not written, epoch 0's is the resume point.
        assert torch.load(out / STATE_NAME, weights_only=True)["epoch"] == 0
        assert [r["epoch"] for r in metrics(out)] == ["0"]
        assert "resumed from" in self._resume_and_check(digits, out)

    def test_kill_during_checkpoint_write(self, digits, tmp_path):
        out = tmp_path / "run"
        marker = tmp_path / "writing"
        # torch.save writes half of the epoch-1 state file, then the process hangs there until killed.
        prelude = f"""
import io, time, torch
_save = torch.save
def half_save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("epoch") == 1:
        buf = io.BytesIO(); _save(obj, buf, *a, **k)
        with open(f, "wb") as fh:
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2]); fh.flush()
        open({str(marker)!r}, "w").close(); time.sleep(600)
    return _save(obj, f, *a, **k)
torch.save = half_save
"""
        proc = _start(self._args(digits, out), out, prelude)
        _wait_for(marker.exists, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert list(out.glob(".*.tmp")), "the half-written temporary file should be there"
        assert torch.load(out / STATE_NAME, weights_only=True)["epoch"] == 0  # the complete previous one
        printed = self._resume_and_check(digits, out)
        assert "removed temporary files of an interrupted write" in printed


class TestExitWithoutTeardown:
    """train.py and ``python -m gray_effnet`` end through cli.exit_without_teardown: the exit code, what was
    printed, the atexit handlers and the other threads' work all arrive; only the modules' teardown is skipped."""

    def test_what_a_normal_exit_keeps(self, tmp_path):
        script = f"""
import atexit, sys, threading, time
from gray_effnet.cli import exit_without_teardown
out = {str(tmp_path)!r}
atexit.register(lambda: open(out + "/atexit", "w").write("ran"))
def late():
    time.sleep(0.3)
    open(out + "/thread", "w").write("done")
threading.Thread(target=late).start()
class Teardown:
    def __del__(self, open=open):  # builtins are gone by then
        open(out + "/teardown", "w").write("ran")
kept = Teardown()  # freed only by the interpreter's teardown
sys.stdout.write("x" * 100_000)  # more than a pipe's buffer, not flushed
sys.stderr.write("to stderr")
exit_without_teardown(3)
"""
        res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert res.returncode == 3, res.stderr
        assert res.stdout == "x" * 100_000 and res.stderr == "to stderr"
        assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
        assert not (tmp_path / "teardown").exists()

    def test_the_entry_points_use_it(self):
        for path in (ROOT / "train.py", ROOT / "gray_effnet" / "__main__.py"):
            tail = path.read_text().rstrip().splitlines()[-2:]
            assert tail[0] == 'if __name__ == "__main__":' and tail[1].startswith("    exit_without_teardown("), path


class TestCli:
    def test_untrusted_weights_error_without_traceback(self, digits, tmp_path):
        marker = tmp_path / "pwned"
        evil = tmp_path / "evil.pth"
        torch.save({"state_dict": {}, "payload": PicklePayload(marker)}, evil)
        res = subprocess.run([sys.executable, "train.py", "--data", str(digits), "--weights", str(evil),
                              "--output", str(tmp_path / "run"), *FAST], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 2
        assert "error: refusing to load" in res.stderr and "Traceback" not in res.stderr
        assert not marker.exists()


class TestRefusedRunsWriteNothing:
    """Arguments, data and resume files are checked before the output folder exists (issue 11)."""

    @pytest.mark.parametrize("argv, message", [
        (["--img-size", "16", "16"], "smaller than tf_efficientnet_lite0's total stride; use at least 32 32"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--model", "efficientnet_bo"], "unknown timm model 'efficientnet_bo'; did you mean"),
        (["--resume", "nowhere.state.pt"], "no checkpoint at"),
        (["--adapter", "wso"], "needs windows in physical units"),
        (["--workers", "-1"], "--workers must be 0 or more, or auto; got -1"),
    ])
    def test_refused_before_any_work(self, digits, tmp_path, capsys, argv, message):
        out = tmp_path / "run"
        code = train.cli(["--data", str(digits), "--output", str(out), *FAST, *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("error:") == 1
        assert not out.exists()

    def test_evaluate_under_torchrun(self, digits, tmp_path, capsys, monkeypatch):
        """Every rank would evaluate the whole split and write the same CSV and report."""
        monkeypatch.setenv("WORLD_SIZE", "2")
        code = train.cli(["--data", str(digits), "--evaluate", "--weights", str(tmp_path / "w.safetensors"), *FAST])
        err = capsys.readouterr().err
        assert code == 2 and "--evaluate runs in one process: start it with python, not torchrun" in err

    def test_bad_data_folder_writes_nothing(self, tmp_path, capsys):
        (tmp_path / "data" / "only_class").mkdir(parents=True)
        Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "data" / "only_class" / "0.png")
        out = tmp_path / "run"
        assert train.cli(["--data", str(tmp_path / "data"), "--output", str(out), *FAST]) == 2
        assert "a single class" in capsys.readouterr().err and not out.exists()


@pytest.mark.slow
class TestTorchrun:
    def test_two_process_gloo(self, digits, tmp_path):
        if shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists():
            pytest.skip("torchrun is not installed")
        out = tmp_path / "ddp"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--data", str(digits), "--epochs", "1", "--output", str(out), *FAST, "--workers", "auto"]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "on cpu x2" in res.stdout
        assert res.stdout.count("loader: ") == 1 and "(auto: reading an image took" in res.stdout  # rank 0's, sent
        assert res.stdout.count("epoch 0:") == 1  # rank-0 logging only
        assert len(metrics(out)) == 1
        assert load_model(out / "last.safetensors").adapter == train.get_args_parser().get_default("adapter")
