"""Mutation check: plant deliberate bugs in a temporary copy of the repository and see which the tests catch.

A test suite that only checks that code runs lets wrong results through. Each mutation below is one small,
plausible bug (a transposed matrix, a flag that does nothing, a seed that ignores the epoch). The script makes
one temporary copy of the repository (tracked and untracked, non-ignored files); for each mutation it edits one
file there, runs the tests that should notice (with ``-x``), and puts the file back.
A mutation is *caught* when those tests fail, *survived* when they pass. The working tree is never touched.

    python tools/mutate.py                          # all mutations, report to tools/mutation_report.md
    python tools/mutate.py --only amp-ignored --only optimizer-never-steps --report -   # to stdout

Each mutation replaces a snippet that must occur exactly once in its file; when the code has moved on and it
does not, the mutation is reported as *not applicable* rather than silently skipped. The unmutated copy runs
the union of the selected tests first: a failure there makes every verdict meaningless, so the script stops.
"""

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPORT = ROOT / "tools" / "mutation_report.md"


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str  # what a user would see
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files; run with -x in this order


TE = "tests/test_engine.py"
TT = "tests/test_train.py"

MUTATIONS = [
    # -- the eight of issue 13: each passed the whole suite before it ---------------------------------------
    Mutation("optimizer-never-steps", "training learns nothing", "gray_effnet/engine.py",
             "        scaler.step(optimizer)\n", "        pass  # scaler.step(optimizer)\n",
             (f"{TE}::TestTrainOneEpoch::test_weights_change_and_loss_drops", f"{TT}::TestLearning")),
    Mutation("confusion-transposed", "precision and recall swap", "gray_effnet/engine.py",
             "targets[labelled] * num_classes + pred[labelled]", "pred[labelled] * num_classes + targets[labelled]",
             (f"{TE}::TestEvaluate",)),
    Mutation("correct-column-inverted", "predictions.csv marks right as wrong", "gray_effnet/evaluation.py",
             "int(target == pred)", "int(target != pred)",
             (f"{TE}::TestEvaluate", "tests/test_predict.py")),
    Mutation("softmax-over-batch", "probabilities normalised over the batch, not the classes",
             "gray_effnet/engine.py", "probs = logits.softmax(-1)", "probs = logits.softmax(0)",
             (f"{TE}::TestEvaluate", "tests/test_predict.py")),
    Mutation("exif-wrong-way", "EXIF-rotated photos turned the wrong way (same shape)", "gray_effnet/images.py",
             "img = ImageOps.exif_transpose(img)",
             "img = ImageOps.exif_transpose(img).transpose(Image.Transpose.ROTATE_180)",
             ("tests/test_data.py::TestReadGray",)),
    Mutation("amp-ignored", "--amp bf16/fp16 trains in float32", "train.py",
             "autocast, scaler = amp_setup(device, args.amp)", 'autocast, scaler = amp_setup(device, "none")',
             (f"{TT}::TestSpeedFlags::test_bf16_channels_last",)),
    Mutation("worker-seeds-ignore-epoch", "every epoch repeats the same augmentations", "gray_effnet/data.py",
             "torch.Generator().manual_seed(seed * 100003 + epoch)", "torch.Generator().manual_seed(seed)",
             ("tests/test_data.py::TestLoader",)),
    Mutation("explain-pretrained-ignored", "explain --pretrained traces a random network",
             "gray_effnet/explain.py", "adapter=adapter, pretrained=pretrained, weights=weights",
             "adapter=adapter, pretrained=False, weights=weights", ("tests/test_explain.py",)),
    # -- more of the same kind ------------------------------------------------------------------------------
    Mutation("autocast-unused-in-training", "train_one_epoch ignores its autocast", "gray_effnet/engine.py",
             "        with autocast():\n            logits = model(images)\n            loss = criterion(",
             "        with nullcontext():\n            logits = model(images)\n            loss = criterion(",
             (f"{TE}::TestTrainOneEpoch::test_bf16_autocast_gives_bf16_logits",)),
    Mutation("clip-before-unscale", "--clip-grad clips the fp16-scaled gradients", "gray_effnet/engine.py",
             "            scaler.unscale_(optimizer)", "            pass  # scaler.unscale_(optimizer)",
             (f"{TE}::TestTrainOneEpoch::test_clip_grad_bounds_the_norm_the_optimizer_sees",)),
    Mutation("clip-norm-wrong", "--clip-grad clips to 100x the asked norm", "gray_effnet/engine.py",
             "clip_grad_norm_(model.parameters(), clip_grad)", "clip_grad_norm_(model.parameters(), clip_grad * 100)",
             (f"{TE}::TestTrainOneEpoch::test_clip_grad_bounds_the_norm_the_optimizer_sees",)),
    Mutation("channels-last-ignored", "--channels-last leaves the parameters NCHW", "train.py",
             "model.to(memory_format=torch.channels_last)", "model.to(memory_format=torch.contiguous_format)",
             (f"{TT}::TestSpeedFlags::test_bf16_channels_last",)),
    Mutation("precision-recall-swapped", "per_class returns (recall, precision)", "gray_effnet/engine.py",
             "return tp / c.sum(0), tp / c.sum(1)", "return tp / c.sum(1), tp / c.sum(0)",
             (f"{TE}::TestEvaluate",)),
    Mutation("eval-loss-per-batch", "val_loss averages batch means, not images", "gray_effnet/engine.py",
             "[labelled]).double() * labelled.sum()", "[labelled]).double()",
             (f"{TE}::TestEvaluate",)),
    Mutation("train-loss-per-batch", "train_loss averages batch means, not images", "gray_effnet/engine.py",
             "loss_sum += loss.detach().double() * n", "loss_sum += loss.detach().double()",
             (f"{TE}::TestTrainOneEpoch::test_weights_change_and_loss_drops",)),
    Mutation("probability-of-target", "predictions.csv gives the true class's probability",
             "gray_effnet/engine.py", "gather(1, pred[:, None])", "gather(1, targets.clamp(min=0)[:, None])",
             (f"{TE}::TestEvaluate", "tests/test_predict.py")),
    Mutation("scheduler-epoch-ignored", "the LR schedule restarts every epoch", "gray_effnet/engine.py",
             "num_updates=epoch * steps_per_epoch + step + 1", "num_updates=step + 1",
             (f"{TE}::TestTrainOneEpoch::test_scheduler_gets_the_global_step",)),
    Mutation("printed-val-acc-is-train-acc", "the epoch log prints train accuracy as val accuracy", "train.py",
             "acc {row.val_acc:.4f}{auc}", "acc {row.train_acc:.4f}{auc}",
             (f"{TT}::TestLearning",)),
    Mutation("predict-ignores-img-size", "predict resizes to 224 whatever the checkpoint says",
             "gray_effnet/evaluation.py", "img_size or model.img_size or model.model.pretrained_cfg",
             "img_size or None or model.model.pretrained_cfg",
             ("tests/test_predict.py",)),
    Mutation("wide-batches-not-scaled", "8-bit images in a 16-bit data set stay 0..255", "gray_effnet/data.py",
             "img = img.float().div_(255)", "img = img.float()",
             ("tests/test_data.py::TestLoader",)),
    Mutation("loader-generator-not-reseeded", "a resumed run's workers draw other augmentations",
             "gray_effnet/data.py", "    loader.generator = torch.Generator().manual_seed(seed * 100003 + epoch)\n",
             "    pass\n", ("tests/test_data.py::TestLoader", f"{TT}::TestResume::test_equals_uninterrupted")),
    Mutation("train-loader-epoch-fixed", "train.py shuffles every epoch the same way", "train.py",
             "set_loader_epoch(train_loader, epoch, args.seed)", "set_loader_epoch(train_loader, 0, args.seed)",
             (f"{TT}::TestLearning",)),
    Mutation("resume-rng-not-restored", "a resumed run draws other dropout masks", "train.py",
             '            set_rng_state(state["rng"])', "            pass",
             (f"{TT}::TestResume::test_equals_uninterrupted",)),
    Mutation("uint8-not-scaled", "uint8 input reaches the stem as 0..255", "gray_effnet/model.py",
             "return x.to(dtype).div_(255)", "return x.to(dtype)", ("tests/test_model.py::TestInputs",)),
    Mutation("sum-stats-not-averaged", "the sum stem normalises with the red channel's statistics",
             "gray_effnet/adapters.py", "return (x - self.mean1).div_(self.std1)",
             "return (x - self.mean[:, :1]).div_(self.std[:, :1])",
             ("tests/test_adapters.py::TestShapes::test_stem_output_equals_stock_timm_stem",)),
    # -- the eight of issue 24: an independent audit planted each, and each passed the whole suite then ---------
    Mutation("ddp-every-rank-is-rank-0", "under torchrun every rank trains on the same images",
             "gray_effnet/data.py", "num_replicas=world_size, rank=rank,", "num_replicas=world_size, rank=0,",
             ("tests/test_ddp.py",)),
    Mutation("sample-seed-ignores-index", "every image of an epoch gets the same crop, flip and rotation",
             "gray_effnet/data.py", "yield index, (base ^ (index * 0x94D049BB133111EB)) & (2**63 - 1)",
             "yield index, base", ("tests/test_data.py::TestSampleSeeds",)),
    Mutation("pack-hflip-is-vflip", "a pack's --hflip flips images upside down", "gray_effnet/augment.py",
             "K.RandomHorizontalFlip(p=hflip)", "K.RandomVerticalFlip(p=hflip)",
             ("tests/test_pack.py::TestBatchAugment",)),
    Mutation("monochrome1-window-not-inverted", "MONOCHROME1 images stay white-is-low under --intensity window",
             "gray_effnet/dicom.py", '    if photometric == "MONOCHROME1":',
             '    if photometric == "MONOCHROME1" and intensity.kind != "window":',
             ("tests/test_dicom.py::TestMonochrome1",)),
    Mutation("full-uses-bits-allocated", "12-bit DICOM in 16-bit words reaches the model as 0..1/16",
             "gray_effnet/dicom.py", 'bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)',
             'bits = int(ds.get("BitsAllocated") or 16)', ("tests/test_dicom.py::TestPhysicalUnits",)),
    Mutation("governor-share-not-per-thread", "a 2-thread run on shared cores keeps fighting at 1.1 cores",
             "gray_effnet/speed.py", "if share < self.min_share * self.threads:", "if share < self.min_share:",
             ("tests/test_speed.py::TestThreadGovernor",)),
    Mutation("resume-intensity-unchecked", "--resume with another --intensity trains on another scale", "train.py",
             '"num_classes": len(source.classes), "intensity": intensity, "task": task,',
             '"num_classes": len(source.classes), "task": task,',
             (f"{TT}::TestResume::test_other_intensity_refused",)),
    Mutation("evaluate-reads-full", "--evaluate reads images with 'full', not the checkpoint's mapping",
             "gray_effnet/evaluation.py", "intensity or model.intensity)",
             'intensity or "full")', (f"{TT}::TestEvaluateUsesTheCheckpointsMapping",)),
    # -- issue 20: multi-label learning and metrics -----------------------------------------------------------
    Mutation("bce-mask-ignored", "unknown labels train as negatives", "gray_effnet/tasks.py",
             "return torch.where(known, losses, 0.0).sum(), known.sum()", "return losses.sum(), known.sum()",
             ("tests/test_metrics.py::TestMaskedBCE",)),
    Mutation("train-acc-counts-unknown", "train_acc counts unknown labels as right or wrong", "gray_effnet/tasks.py",
             "return ((logits >= 0) == (targets > 0.5))[known].sum(), known.sum()",
             "return ((logits >= 0) == (targets > 0.5)).sum(), known.sum()",
             ("tests/test_metrics.py::TestCountCorrect", f"{TE}::TestTrainOneEpochMultiLabel")),
    Mutation("undefined-auc-counted-as-half", "a finding with one class pulls the macro AUC toward 0.5",
             "gray_effnet/metrics.py", "defined = values[~np.isnan(values)]",
             "defined = np.nan_to_num(values, nan=0.5)", ("tests/test_metrics.py::TestUndefined",)),
    Mutation("youden-ignores-fpr", "the threshold calls (nearly) everything positive", "gray_effnet/metrics.py",
             "np.argmax((tpr - fpr)[1:])", "np.argmax(tpr[1:])", ("tests/test_metrics.py::TestYouden",)),
    Mutation("ddp-auc-per-rank", "under torchrun each rank reports the AUC of its own share", "gray_effnet/engine.py",
             "parts = _all_gather(mine)", "parts = [mine]", ("tests/test_ddp.py",)),
    Mutation("predict-ignores-thresholds", "predict calls findings present at 0.5, not at the checkpoint's thresholds",
             "gray_effnet/evaluation.py", "result.thresholds = list(model.thresholds or",
             "result.thresholds = list(None or", ("tests/test_multilabel.py::TestPredict",)),
    Mutation("select-by-ignored", "best.safetensors is by accuracy whatever --select-by says",
             "gray_effnet/checkpoint.py", "column, higher = SELECT_BY[select_by]",
             'column, higher = SELECT_BY["acc"]', ("tests/test_checkpoint.py::TestBestEpoch",
                                                   "tests/test_multilabel.py::TestTrain")),
    Mutation("thresholds-not-saved", "a multi-label checkpoint keeps no thresholds", "train.py",
             "        unwrapped.thresholds = result.thresholds", "        pass",
             ("tests/test_multilabel.py::TestTrain",)),
    # -- controls: bugs the suite caught before issue 13, to show the harness sees a failing test ------------
    Mutation("control: fold-top-border-dropped", "fold's top border rows are wrong", "gray_effnet/adapters.py",
             "((slice(0, top), slice(0, w)), top), ", "", ("tests/test_adapters.py::TestFold",)),
    Mutation("control: split-leaks", "validation images are trained on", "gray_effnet/folders.py",
             "        train += items[n_val:]", "        train += items", ("tests/test_data.py::TestSplit",)),
]


def copy_repo(dest: Path) -> None:
    """Copy the tracked and untracked, non-ignored files (what a commit or a clean checkout would hold)."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(copy: Path, tests: list[str], timeout: float, python: str) -> tuple[str, str, float]:
    """(outcome, detail, seconds) of pytest on ``tests`` in ``copy``; outcome is passed/failed/timeout/error."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}  # no stale .pyc of the old code
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"no result within {timeout:.0f} s", time.perf_counter() - start
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return "passed", "", seconds
    if proc.returncode in (1, 2):  # 1: a test failed; 2: interrupted, e.g. an import error in collection
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, flags=re.M)
        return "failed", ", ".join(failed) or out.strip().splitlines()[-1], seconds
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return "error", f"pytest exit code {proc.returncode}: {last}", seconds


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return re.search(r"Model name:\s*(.+)", out).group(1).strip()
    except (OSError, subprocess.CalledProcessError, AttributeError):
        return platform.processor() or platform.machine()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=None, metavar="NAME", help="run only these mutations")
    p.add_argument("--report", default=str(DEFAULT_REPORT), help="Markdown report path; '-' prints it")
    p.add_argument("--timeout", type=float, default=300, help="seconds per pytest run")
    p.add_argument("--budget", type=float, default=900, help="stop starting mutations after this many seconds")
    p.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    args = p.parse_args()
    mutations = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if not mutations:
        p.error(f"no mutation named {args.only}; known: {', '.join(m.name for m in MUTATIONS)}")

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gray_effnet-mutate-") as tmp:
        copy = Path(tmp)
        copy_repo(copy)
        where = subprocess.run([args.python, "-c", "import gray_effnet; print(gray_effnet.__file__)"], cwd=copy,
                               env={**os.environ, "PYTHONPATH": str(copy)}, capture_output=True, text=True)
        if not where.stdout.startswith(str(copy)):
            raise SystemExit(f"the copy's gray_effnet is not the one imported: {where.stdout or where.stderr}")
        union = list(dict.fromkeys(t for m in mutations for t in m.tests))
        print(f"baseline: the unmutated copy, {len(union)} test selections", flush=True)
        outcome, detail, baseline_s = run_tests(copy, union, args.timeout * 2, args.python)
        if outcome != "passed":
            raise SystemExit(f"the unmutated copy does not pass its tests ({outcome}): {detail}")
        for m in mutations:
            if time.perf_counter() - start > args.budget:
                rows.append((m, "not run", f"time budget of {args.budget:.0f} s spent", 0.0))
                continue
            target = copy / m.path
            text = target.read_text()
            if text.count(m.old) != 1:
                rows.append((m, "not applicable", f"the snippet occurs {text.count(m.old)} times in {m.path}", 0.0))
                continue
            target.write_text(text.replace(m.old, m.new))
            try:
                outcome, detail, seconds = run_tests(copy, list(m.tests), args.timeout, args.python)
            finally:
                target.write_text(text)
            verdict = {"failed": "caught", "passed": "SURVIVED"}.get(outcome, outcome)
            rows.append((m, verdict, detail, seconds))
            print(f"{verdict:>8}  {m.name} ({seconds:.0f} s) {detail}", flush=True)
    total = time.perf_counter() - start
    report = format_report(rows, args, baseline_s, total)
    if args.report == "-":
        print(report)
    else:
        Path(args.report).write_text(report)
        print(f"report: {args.report}")
    return 0 if all(r[1] == "caught" for r in rows) else 1


def format_report(rows, args, baseline_s: float, total: float) -> str:
    import torch

    caught = sum(r[1] == "caught" for r in rows)
    command = "python tools/mutate.py" + "".join(f" --only {shlex.quote(n)}" for n in args.only or [])
    lines = [
        "# Mutation check",
        "",
        f"`{command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC: **{caught} of "
        f"{len(rows)} mutations caught**.",
        "",
        f"- Machine: {cpu_model()} ({os.cpu_count()} CPUs), Python "
        f"{platform.python_version()}, torch {torch.__version__}.",
        f"- Each mutation edits one file of a temporary copy of the repository and runs only the tests listed "
        f"for it, with `pytest -x`; the unmutated copy passed all of them first ({baseline_s:.0f} s). "
        f"Total {total:.0f} s.",
        "- *caught*: those tests failed (the first failing test is named). *SURVIVED*: they passed.",
        "",
        "| mutation | the bug | file | tests run | result | caught by | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, verdict, detail, seconds in rows:
        tests = "<br>".join(f"`{t}`" for t in m.tests)
        detail = detail.replace("|", "\\|")
        lines.append(f"| `{m.name}` | {m.bug} | `{m.path}` | {tests} | {verdict} | {detail} | {seconds:.0f} |")
    lines += ["", "The edits, as `old` -> `new` (see `MUTATIONS` in `tools/mutate.py`):", ""]
    for m, *_ in rows:
        lines.append(f"- `{m.name}`: `{m.old.strip()!r}` -> `{m.new.strip()!r}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
