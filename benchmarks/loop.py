"""Loop efficiency: train.py's training throughput against the bare training step of the same model, in one run.

* ``bare``: the training step alone (forward, cross-entropy, backward, train.py's AdamW) on a random batch that
  stays on the device: train.py's model, loss and optimizer settings (its parser's defaults), nothing else.
* ``files``: ``train.py`` itself, a subprocess, on a folder of synthetic X-ray-like PNGs (``synthetic.py``), at
  its defaults: each image is decoded in the first epoch and kept in memory after (``--ram-cache auto``).
* ``files-nocache``: the same with ``--ram-cache off``: every epoch decodes every file.
* ``pack``: ``train.py`` on the same folder packed by ``python -m gray_effnet pack`` (timed too).

All of them run at the same model, adapter, batch, image size, memory format, autocast, device and threads, eagerly:
train.py gets them as flags (``--channels-last on|off``, ``--amp``, ``--threads``, ``--compile off``), so that its
own choices (the CPU probe, the thread governor, compiling) stay out. ``--rounds`` repeats the runs (files,
files-nocache, then pack); the bare step is timed in a block of ``--bare-steps`` before the first run and after
every run, so that each run has a block on either side. Their spread shows how much the machine drifted (on a
shared virtual machine it can change by 1.5x within a minute): each run is compared with the mean of its two
neighbouring blocks, and the medians over rounds are reported with their range.

From train.py's ``metrics.csv``: ``img_per_s`` and ``seconds`` (``train_one_epoch``'s own timing) of every epoch
but the first, which pays for the loader's start and the first step. Reported for each run:

* ``efficiency``: its img/s over the bare img/s of its neighbouring blocks; the median over rounds, with
  ``eff_min`` and ``eff_max``. Goals, printed beside it: CPU >= 0.95 from a pack and >= 0.85 from 8-bit files;
  CUDA >= 0.9 from a pack.
* ``startup_s``: from launching train.py to its ``training ...`` line, printed just before the first epoch
  (imports, data scan, model, output folder). train.py flushes every line; this script stamps each as it
  arrives, and the stamped log is kept beside the CSV.
* ``first_step_s``: ``startup_s`` plus the first epoch's training time beyond a warm epoch's (loader start,
  allocation, kernel choice): an estimate, since train.py prints nothing at its first step.
* ``ready_s``: the time to the first step after the imports: what the ``training`` line says (``ready N s after
  the imports``, timed by train.py from the end of its imports) plus the first epoch's extra time as above.
  ``imports_s``: ``startup_s`` minus that line's figure (the interpreter and train.py's imports). Goal: ``ready_s``
  at most 3 s on a repeat run (the runs here are repeats of their kind's start: same caches, no probe).
* ``loader_ms``: the data path alone, in this process with no worker and no model, at the run's threads:
  milliseconds per training image for one pass over the training split (files-nocache: read, decode, crop and
  resize each image, collate; files: the same from the images kept in memory, a second pass; pack: index the
  memory map, then the batch augmentation). The ``bare`` row holds
  the training step's own milliseconds per image there, so the two read side by side: the data path's share of
  the cores. ``decode_ms`` (files): the part of it that reads and decodes the files alone (``read_gray``, no crop,
  resize or collate): what no faster transform can remove, so ``step / (step + decode_ms)`` bounds the files
  run's efficiency where the loader and the model share the cores.
* ``epoch_s``: wall time between consecutive ``epoch N:`` lines, median over the warm epochs; ``outside_s``:
  ``epoch_s`` minus the epoch's ``seconds``, the time each epoch spends outside the training steps (validation,
  checkpoint, logs); ``outside_share``: its fraction of ``epoch_s``.

Interrupted (Ctrl-C, SIGTERM), it stops the train.py run or the packing under way (``_child.py``).

Example:
    python benchmarks/loop.py --device cpu                                    # the CPU goals, 8-bit files
    python benchmarks/loop.py --device cuda --img-size 224 224 --bits 16 --workers 8
    python benchmarks/loop.py --smoke --device cpu --csv /tmp/loop.csv       # tiny: a check that it runs
"""

import argparse
import csv
import importlib.util
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _child import child, sigterm_raises
from _common import HelpFormatter, Spread, default_output, environment, report, resolve_device, time_block
from synthetic import generate
from torch import nn

from gray_effnet import GrayEfficientNet
from gray_effnet.cache import attach_caches
from gray_effnet.cli import workers_count
from gray_effnet.data import make_loader, set_loader_epoch
from gray_effnet.engine import AMP_DTYPES, amp_setup, make_optimizer_and_schedule
from gray_effnet.images import read_gray
from gray_effnet.sources import Augmentation, open_source

ROOT = Path(__file__).resolve().parent.parent
TRAIN_PY = ROOT / "train.py"
# (device type, data source, bits of the files or None for any) -> the efficiency to reach.
GOALS = {("cpu", "pack", None): 0.95, ("cpu", "files", 8): 0.85, ("cuda", "pack", None): 0.9}
# Sizes when not given: the real measurement, and --smoke (a few seconds of work, for tests).
PROFILES = {
    "default": {"n_images": 1024, "source_size": 256, "img_size": None, "batch_size": None, "epochs": 3,
                "workers": None, "threads": None, "bare_steps": 20, "warmup": 5, "rounds": 2},
    "smoke": {"n_images": 24, "source_size": 48, "img_size": [32, 32], "batch_size": 4, "epochs": 2, "workers": 1,
              "threads": 1, "bare_steps": 2, "warmup": 1, "rounds": 1},
}
TABLE_COLUMNS = ["candidate", "img_per_s", "efficiency", "eff_min", "eff_max", "goal", "met", "startup_s",
                 "first_step_s", "imports_s", "ready_s", "loader_ms", "decode_ms", "epoch_s", "train_s", "outside_s",
                 "outside_share"]
READY_GOAL_S = 3.0  # time to the first step after the imports, on a repeat run
TRAINING_LINE = re.compile(r"^training ")  # train.py's last line before the first epoch
READY = re.compile(r"ready (\d+(?:\.\d+)?)s after the imports")  # on that line
EPOCH_LINE = re.compile(r"^epoch (\d+): ")  # train.py's line after each epoch's validation and checkpoint


def train_defaults() -> argparse.Namespace:
    """train.py's parser defaults (model, adapter, batch, image size, loss and optimizer settings)."""
    spec = importlib.util.spec_from_file_location("_loop_train", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_args_parser().parse_args([])


def goal(device_type: str, source: str, bits: int) -> float | None:
    return GOALS.get((device_type, source, None), GOALS.get((device_type, source, bits)))


# -- the bare step ------------------------------------------------------------------------------------
def bare_step(args: argparse.Namespace, defaults: argparse.Namespace, device: torch.device, channels_last: bool,
              compile: bool = False, fused: bool | None = None):
    """One training step of train.py's model on a fixed batch already on ``device``, as a callable.

    ``compile``: the model under ``torch.compile`` (train.py's ``--compile``); its first call compiles.
    ``fused``: ``make_optimizer_and_schedule``'s (default: train.py's choice).
    """
    torch.manual_seed(args.seed)
    model = GrayEfficientNet(args.model, adapter=args.adapter, num_classes=2, img_size=args.img_size,
                             drop_rate=defaults.drop_rate).to(device)
    if channels_last:  # train.py's order: to(device) -> channels_last -> optimizer
        model.to(memory_format=torch.channels_last)
    model.train()
    run = torch.compile(model) if compile else model  # train.py's order: channels_last -> optimizer -> compile
    optimizer, _, _ = make_optimizer_and_schedule(  # train.py's recipe; the schedule is not stepped
        model, lr=defaults.lr, batch_size=args.batch_size, world_size=1, weight_decay=defaults.weight_decay,
        epochs=1, steps_per_epoch=1, warmup_epochs=0, decay=False, fused=fused)
    criterion = nn.CrossEntropyLoss(label_smoothing=defaults.label_smoothing)
    autocast, scaler = amp_setup(device, args.amp)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch_size, 1, *args.img_size, generator=g).to(device)  # what the stem gets: [0, 1] floats
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (args.batch_size,), generator=g).to(device)

    def step() -> None:
        with autocast():
            loss = criterion(run(x), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    step.model = run  # what it trains, for a caller that compares weights (optimizer.py)
    return step


# -- train.py runs --------------------------------------------------------------------------------------
@dataclass
class TrainRun:
    """What one train.py run printed and wrote: when its lines arrived, and its metrics.csv rows."""

    name: str
    returncode: int
    startup_s: float | None = None
    ready_line_s: float | None = None  # what the training line says: from the end of the imports to that line
    epoch_ends: dict[int, float] = field(default_factory=dict)  # epoch -> seconds after launch
    metrics: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        """img/s and seconds of the warm epochs, the epoch wall time, and the time outside the steps."""
        rows = {int(r["epoch"]): r for r in self.metrics}
        warm = [e for e in sorted(rows) if e >= 1]
        imports_s = (self.startup_s - self.ready_line_s
                     if self.startup_s is not None and self.ready_line_s is not None else None)
        if self.returncode != 0 or not warm:
            return {"img_per_s": None, "train_s": None, "startup_s": self.startup_s, "first_step_s": None,
                    "imports_s": imports_s, "ready_s": None, "epoch_s": None, "outside_s": None,
                    "outside_share": None}
        train_s = statistics.median(rows[e]["seconds"] for e in warm)
        walls = {e: self.epoch_ends[e] - self.epoch_ends[e - 1] for e in warm
                 if e in self.epoch_ends and e - 1 in self.epoch_ends}
        epoch_s = statistics.median(walls.values()) if walls else None
        outside_s = statistics.median(walls[e] - rows[e]["seconds"] for e in walls) if walls else None
        first_extra = rows[0]["seconds"] - train_s if 0 in rows else None
        extra = max(first_extra, 0.0) if first_extra is not None else None
        first_step_s = self.startup_s + extra if self.startup_s is not None and extra is not None else None
        ready_s = self.ready_line_s + extra if self.ready_line_s is not None and extra is not None else None
        return {"img_per_s": statistics.median(rows[e]["img_per_s"] for e in warm), "train_s": train_s,
                "startup_s": self.startup_s, "first_step_s": first_step_s, "imports_s": imports_s, "ready_s": ready_s,
                "epoch_s": epoch_s, "outside_s": outside_s,
                "outside_share": outside_s / epoch_s if outside_s is not None and epoch_s else None}


def run_logged(name: str, cmd: list[str], log_path: Path) -> TrainRun:
    """Run ``cmd``, stamping each output line with the seconds since launch into ``log_path`` and on stdout."""
    run = TrainRun(name, returncode=-1)
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        log.write(f"# {' '.join(cmd)}\n")
        with child(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, cwd=ROOT,
                   env=env) as proc:  # stopped if this process is interrupted or terminated
            for line in proc.stdout:
                t = time.perf_counter() - start
                log.write(f"{t:9.3f}  {line}")
                print(f"[{name} {t:7.2f}s] {line}", end="", flush=True)
                if run.startup_s is None and TRAINING_LINE.match(line):
                    run.startup_s = t
                    if ready := READY.search(line):
                        run.ready_line_s = float(ready.group(1))
                if m := EPOCH_LINE.match(line):
                    run.epoch_ends[int(m.group(1))] = t
            run.returncode = proc.wait()
    return run


def loader_ms(data: Path, args: argparse.Namespace, defaults: argparse.Namespace, cached: bool = False) -> float:
    """Milliseconds per training image of train.py's data path for ``data`` (a folder or a pack), no model;
    ``cached``: an epoch after the first, from the images a RAM cache kept (train.py's default)."""
    source = open_source(str(data), seed=args.seed)
    size, intensity = source.settings(args.img_size, None)
    augmentation = Augmentation(crop_scale=defaults.crop_scale, hflip=defaults.hflip, rotate=defaults.rotate)
    dataset = source.dataset("train", size, intensity, augment=augmentation)
    batch_augment = source.batch_augment(size, augmentation, seed=args.seed)
    loader = make_loader(dataset, args.batch_size, train=True, workers=0, seed=args.seed)
    if cached:
        attach_caches([loader], None)
    for epoch in range(2 if cached else 1):
        set_loader_epoch(loader, epoch, args.seed)
        images, start = 0, time.perf_counter()
        for batch in loader:
            x = batch.images if batch_augment is None else batch_augment(batch.images)
            images += len(x)
    return 1000 * (time.perf_counter() - start) / max(images, 1)


def decode_ms(data: Path, args: argparse.Namespace) -> float:
    """Milliseconds per training image to read and decode the files of ``data`` (a folder) alone, as train.py's
    workers do before cropping (``read_gray``; one pass, in this process)."""
    paths = [path for path, _ in open_source(str(data), seed=args.seed).samples("train")]
    start = time.perf_counter()
    for path in paths:
        read_gray(path)
    return 1000 * (time.perf_counter() - start) / max(len(paths), 1)


def read_metrics(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(r[k]) for k in ("epoch", "img_per_s", "seconds")} for r in csv.DictReader(f)]


def train_command(args: argparse.Namespace, data: Path, output: Path, channels_last: bool,
                  extra: Sequence[str] = ()) -> list[str]:
    """train.py with every setting that the bare step shares given explicitly, and ``extra`` flags."""
    cmd = [sys.executable, str(TRAIN_PY), "--data", str(data), "--img-size", *map(str, args.img_size),
           "--model", args.model, "--adapter", args.adapter, "--batch-size", str(args.batch_size),
           "--epochs", str(args.epochs), "--workers", str(args.workers), "--amp", args.amp,
           "--channels-last", "on" if channels_last else "off", "--compile", "off", "--threads", str(args.threads),
           "--device", args.device, "--seed", str(args.seed), "--output", str(output), "--no-progress"]
    return cmd + ([] if args.pretrained else ["--no-pretrained"]) + list(extra)


# -- the options of the step, shared with torch_compile.py and optimizer.py ---------------------------------
def add_step_arguments(p, channels_last: str = "on on CUDA, off on the CPU") -> None:
    """The options that say which training step runs; ``resolve_step`` fills in those left out."""
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--model", default=None, help="default: train.py's")
    p.add_argument("--adapter", default=None, help="default: train.py's")
    p.add_argument("--batch-size", type=int, default=None, help="default: train.py's")
    p.add_argument("--amp", default=None, choices=list(AMP_DTYPES), help="default: bf16 on CUDA, none on the CPU")
    p.add_argument("--channels-last", default=None, choices=("on", "off"), help=f"default: {channels_last}")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's count here)")


def resolve_step(args: argparse.Namespace, defaults: argparse.Namespace, device: torch.device,
                 channels_last: str | None = None) -> None:
    """Fill in ``add_step_arguments``' options left out: train.py's model, adapter and batch, bf16 on CUDA,
    channels_last (``channels_last``, else on CUDA only) and torch's thread count."""
    for key in ("model", "adapter", "batch_size"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(defaults, key))
    args.amp = args.amp or ("bf16" if device.type == "cuda" else "none")
    args.channels_last = args.channels_last or channels_last or ("on" if device.type == "cuda" else "off")
    args.threads = args.threads or torch.get_num_threads()


# -- main ---------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, a check that it runs: 24 images of 48x48 at 32x32, batch 4, 2 epochs, 1 thread")
    g = p.add_argument_group("what runs (defaults: train.py's)")
    add_step_arguments(g)
    g.add_argument("--img-size", nargs=2, type=int, default=None, metavar=("H", "W"))
    g.add_argument("--workers", type=workers_count, default=None,
                   help="loader processes of the files run, or auto (default: train.py's)")
    g.add_argument("--epochs", type=int, default=None, help="train.py epochs, at least 2: the first is warm-up")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                   help="train.py from ImageNet weights (the speed is the same; startup_s includes loading them)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="the PNG folder, written first unless it holds this set (default: in --work)")
    g.add_argument("--n-images", type=int, default=None, help="images in the folder (default: 1024)")
    g.add_argument("--source-size", type=int, default=None, help="side of the square PNGs (default: 256)")
    g.add_argument("--bits", type=int, default=8, choices=(8, 16), help="bit depth of the PNGs")
    g = p.add_argument_group("timing and output")
    g.add_argument("--bare-steps", type=int, default=None, help="steps per timed block of the bare step (default: 20)")
    g.add_argument("--rounds", type=int, default=None,
                   help="rounds of train.py runs: files, files-nocache, pack (default: 2)")
    g.add_argument("--warmup", type=int, default=None, help="untimed bare steps first (default: 5)")
    g.add_argument("--work", default=None, help="folder for the pack and train.py's runs (default: a temporary one)")
    g.add_argument("--csv", default=None, help="default: benchmarks/results/loop-<device>.csv")
    g.add_argument("--md", default=None, help="default: the CSV path with .md")
    return p


def resolve_args(args: argparse.Namespace, defaults: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """Fill what the command line left out: the profile's sizes, then train.py's defaults, then the device's."""
    for key, value in PROFILES["smoke" if args.smoke else "default"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    resolve_step(args, defaults, device)
    for key in ("img_size", "workers"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(defaults, key))
    args.img_size = list(args.img_size or (64, 64))  # train.py's size when it is given none
    args.device = str(device)
    if args.epochs < 2:
        raise ValueError(f"--epochs must be at least 2 (the first is warm-up, not counted); got {args.epochs}")
    return args


def main(args: argparse.Namespace) -> tuple[list[dict], bool]:
    """Time the bare step and both train.py runs; returns the result rows and whether both runs succeeded.

    Raises:
        ValueError: ``--epochs`` below 2, or ``--data`` holds a synthetic set made with other settings.
        subprocess.CalledProcessError: packing failed.
    """
    device = resolve_device(args.device)
    defaults = train_defaults()
    args = resolve_args(args, defaults, device)
    torch.set_num_threads(args.threads)
    channels_last = args.channels_last == "on"
    out_csv = Path(args.csv or default_output(f"loop-{device.type}", ".csv"))
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gray-effnet-loop-"))
    try:
        data = Path(args.data or work / f"xray{args.bits}-{args.n_images}-{args.source_size}")
        start = time.perf_counter()
        generate(data, args.n_images, args.source_size, bits=args.bits, seed=args.seed)
        print(f"data: {data} ({time.perf_counter() - start:.1f}s)", flush=True)
        pack = work / f"pack-{args.img_size[0]}x{args.img_size[1]}"
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gray_effnet", "pack", "--data", str(data), "--img-size",
                        *map(str, args.img_size), "--output", str(pack), "--no-progress"], cwd=ROOT, check=True)
        pack_s = time.perf_counter() - start

        step = bare_step(args, defaults, device, channels_last)
        for _ in range(args.warmup):
            step()
        blocks: list[float] = []  # img/s of each timed block

        def bare_block() -> None:
            blocks.append(args.batch_size * args.bare_steps / time_block(step, args.bare_steps, device))
            print(f"bare step: {blocks[-1]:.1f} img/s", flush=True)

        # (name, data, train.py's extra flags, the data path's cost alone)
        candidates = [("files", data, [], loader_ms(data, args, defaults, cached=True)),
                      ("files-nocache", data, ["--ram-cache", "off"], loader_ms(data, args, defaults)),
                      ("pack", pack, [], loader_ms(pack, args, defaults))]
        decoding = decode_ms(data, args)
        print("data path alone: " + ", ".join(f"{c[0]} {c[3]:.2f} ms an image" for c in candidates)
              + f" (decoding the files: {decoding:.2f})", flush=True)
        runs: dict[str, list[tuple[TrainRun, float]]] = {c[0]: [] for c in candidates}  # (run, bare img/s around)
        bare_block()
        for rnd in range(args.rounds):
            for name, source, extra, _ in candidates:
                tag = name if rnd == 0 else f"{name}-r{rnd}"
                cmd = train_command(args, source, work / f"run-{tag}", channels_last, extra)
                run = run_logged(name, cmd, out_csv.with_name(f"{out_csv.stem}-{tag}.log"))
                run.metrics = read_metrics(work / f"run-{tag}" / "metrics.csv")
                bare_block()
                runs[name].append((run, (blocks[-2] + blocks[-1]) / 2))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)  # the temporary folder made above, with its checkpoints

    bare = Spread.of(blocks)
    dtype = str(AMP_DTYPES[args.amp] or torch.float32).removeprefix("torch.")
    env = environment(device, dtype, model=args.model, adapter=args.adapter, batch_size=args.batch_size,
                      img_size=f"{args.img_size[0]}x{args.img_size[1]}", amp=args.amp,
                      memory_format="nhwc" if channels_last else "nchw", workers=args.workers, epochs=args.epochs,
                      n_images=args.n_images, source=f"{args.source_size}x{args.source_size} {args.bits}-bit PNG",
                      pack_s=round(pack_s, 2), rounds=args.rounds, bare_steps=args.bare_steps,
                      bare_blocks=len(blocks))
    rows = [{"candidate": "bare", "img_per_s": bare.median, "bare_min": bare.min, "bare_max": bare.max,
             "loader_ms": 1000 / bare.median, "returncode": 0, **env}]
    for name, _, _, cost in candidates:
        done = runs[name]
        kind = name.split("-")[0]  # files-nocache has the files' goal
        target = goal(device.type, kind, args.bits)
        row = {"candidate": name, **median_summary(done), "loader_ms": cost,
               "decode_ms": decoding if kind == "files" else None}
        efficiency = row["efficiency"]
        met = None if target is None or efficiency is None else ("yes" if efficiency >= target else "NO")
        rows.append({**row, "goal": target, "met": met, "returncode": max(r.returncode for r, _ in done), **env})
    return rows, all(r.returncode == 0 for done in runs.values() for r, _ in done)


def median_summary(done: list[tuple[TrainRun, float]]) -> dict[str, float | None]:
    """Medians over the rounds of one candidate's runs: each run's summary, and its efficiency against the mean of
    its neighbouring bare blocks; ``eff_min`` and ``eff_max``."""
    per_run = []
    for run, bare in done:
        s = run.summary()
        s["efficiency"] = s["img_per_s"] / bare if s["img_per_s"] is not None else None
        per_run.append(s)
    out: dict[str, float | None] = {}
    for key in per_run[0]:
        values = [s[key] for s in per_run if s[key] is not None]
        out[key] = statistics.median(values) if values else None
    effs = [s["efficiency"] for s in per_run if s["efficiency"] is not None]
    out["eff_min"], out["eff_max"] = (min(effs), max(effs)) if effs else (None, None)
    return out


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        with sigterm_raises():  # SIGTERM unwinds main(): its train.py or packing child is stopped, its folder removed
            rows, ok = main(args)
    except (ValueError, subprocess.CalledProcessError) as e:  # a folder of another set; packing failed
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    csv_path = args.csv or default_output(f"loop-{rows[0]['device']}", ".csv")
    md_path = args.md or str(csv_path).removesuffix(".csv") + ".md"
    r = rows[0]
    notes = ["efficiency: train.py's img/s (metrics.csv, epochs after the first, median) over the mean of the bare "
             f"step's blocks before and after that run; the median over {r['rounds']} round(s) (bare step: "
             f"{r['bare_blocks']} blocks, spread {r['bare_min']:.1f}-{r['bare_max']:.1f} img/s). "
             "startup_s: launch to train.py's 'training' line; first_step_s adds the first epoch's extra training "
             "time (an estimate); outside_s: epoch wall time minus its training seconds (validation, checkpoint).",
             f"Goals: CPU >= {GOALS[('cpu', 'pack', None)]} from a pack, >= {GOALS[('cpu', 'files', 8)]} from 8-bit "
             f"files; CUDA >= {GOALS[('cuda', 'pack', None)]} from a pack; ready_s (the first step after the imports) "
             f"<= {READY_GOAL_S}s. Packing took {r['pack_s']}s."]
    header = (f"{r['model']} ({r['adapter']})  {r['img_size']}  batch {r['batch_size']}  {r['memory_format']}  "
              f"amp {r['amp']}  {r['device_name']}  torch {r['torch']}  commit {r['commit']}")
    report(rows, TABLE_COLUMNS, csv_path, "Loop efficiency: train.py against the bare training step", notes,
           md_path, header)
    if not ok:
        print("error: a train.py run failed; its log is beside the CSV", file=sys.stderr)
    sys.exit(0 if ok else 1)
