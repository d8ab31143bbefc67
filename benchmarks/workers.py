"""Loader workers against reading in the training process, on the CPU, by what an image costs to read.

On the CPU the loader workers and the model step's OpenMP threads share the cores: a worker that decodes while the
step runs takes a core from one thread, and the others wait for it at the next barrier. Reading in the training
process (``--workers 0``) costs the reading itself, between steps, and nothing else. Which is faster depends on
how an image's reading compares with the training step's time per image, which ``train.py --workers auto``
measures (``gray_effnet.speed.choose_workers``). This script trains on synthetic X-ray-like PNG folders of
growing cost to read (``synthetic.py``; the same images at 8 or 16 bits and several source sizes, all trained at
``--img-size``) with ``--workers 0``, ``--workers 2`` and ``--workers auto``, in a rotating order per round, and
reports per folder:

* ``read_ms`` and ``step_ms``: what ``auto`` measured (its log line), and their ratio ``read_over_step``;
* ``img_s_0`` and ``img_s_2``: training images per second (``metrics.csv``, the epochs after the first, median
  over rounds) with 0 and 2 workers, and ``in_process_speedup`` = ``img_s_0 / img_s_2``;
* ``auto``: what ``auto`` chose, ``img_s_auto``, and ``auto_ok``: whether it chose the faster of the two (or one
  within 3% of it: closer than the machine's drift).

Example:
    python benchmarks/workers.py --rounds 2
"""

import argparse
import csv
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

if __package__:  # imported as benchmarks.workers (the tests)
    from ._common import HelpFormatter, default_output, environment, report
else:  # run as a script: this folder is first on sys.path
    from _common import HelpFormatter, default_output, environment, report

ROOT = Path(__file__).resolve().parent.parent
# (source side, bits, images): growing costs to read, each an epoch of a few seconds at 32x32 on 2 cores
SETS = ((64, 8, 2048), (256, 8, 2048), (512, 8, 1024), (1024, 8, 768), (1024, 16, 512))
WORKERS = ("0", "2", "auto")
COLUMNS = ["source", "images", "read_ms", "step_ms", "read_over_step", "img_s_0", "img_s_2", "in_process_speedup",
           "auto", "img_s_auto", "auto_ok"]
AUTO_LINE = re.compile(r"^loader: (in this process|\d+ workers?) \(auto: reading an image took ([\d.]+) ms here, "
                       r"a training step ([\d.]+) ms an image", re.MULTILINE)
TOLERANCE = 0.03  # auto counts as right when its choice is within this fraction of the faster one


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--sets", nargs="+", default=[f"{s}x{b}x{n}" for s, b, n in SETS], metavar="SIDExBITSxN",
                   help="the folders: source side, bit depth (8 or 16) and number of images")
    p.add_argument("--img-size", nargs=2, type=int, default=[32, 32], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2, help="at least 2: the first is warm-up")
    p.add_argument("--rounds", type=int, default=2, help="repeats of every run")
    p.add_argument("--train-args", default="", help="more train.py arguments, as one string")
    p.add_argument("--work", default=None, help="folder for the data (default: a temporary one)")
    p.add_argument("--csv", default=None, help="default: benchmarks/results/workers-cpu.csv (and .md)")
    return p


def parse_set(spec: str) -> tuple[int, int, int]:
    try:
        side, bits, n = (int(x) for x in spec.split("x"))
    except ValueError:
        raise SystemExit(f"--sets: {spec!r} is not SIDExBITSxN (e.g. 256x8x2048)") from None
    if bits not in (8, 16) or side < 8 or n < 8:
        raise SystemExit(f"--sets: {spec!r}: bits must be 8 or 16, the side and the images at least 8")
    return side, bits, n


def parse_auto(log: str) -> tuple[int, float, float]:
    """(workers, read ms, step ms) from ``--workers auto``'s log line."""
    found = AUTO_LINE.search(log)
    if found is None:
        raise ValueError("no 'loader: ... (auto: reading an image took ...' line in train.py's output")
    choice, read, step = found.groups()
    return (0 if choice == "in this process" else int(choice.split()[0])), float(read), float(step)


def speed(output: Path) -> float:
    """Training images per second: the median over the epochs after the first (metrics.csv)."""
    with open(output / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return statistics.median(float(r["img_per_s"]) for r in rows[1:])


def train(args, data: Path, workers: str, output: Path) -> tuple[float, str]:
    from _child import child  # run as a script: this folder is first on sys.path
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--workers", workers, "--epochs",
           str(args.epochs), "--img-size", *map(str, args.img_size), "--batch-size", str(args.batch_size),
           "--no-progress", "--no-report", "--output", str(output), *args.train_args.split()]
    with child(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT) as proc:
        log, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"train.py failed ({proc.returncode}): {' '.join(cmd)}\n{log[-3000:]}")
    return speed(output), log


def summarize(name: str, n: int, runs: dict[str, list[float]], autos: list[tuple[int, float, float]]) -> dict:
    """One folder's row from its runs' img/s (by --workers value) and auto's (workers, read ms, step ms)."""
    med = {w: statistics.median(v) for w, v in runs.items()}
    chosen = statistics.mode(a[0] for a in autos)
    read, step = statistics.median(a[1] for a in autos), statistics.median(a[2] for a in autos)
    best = max(med["0"], med["2"])
    return {"source": name, "images": n, "read_ms": read, "step_ms": step, "read_over_step": read / step,
            "img_s_0": med["0"], "img_s_2": med["2"], "in_process_speedup": med["0"] / med["2"],
            "auto": "in process" if chosen == 0 else f"{chosen} workers", "img_s_auto": med["auto"],
            "auto_ok": med[str(chosen)] >= (1 - TOLERANCE) * best,
            "auto_choices": " ".join(str(a[0]) for a in autos),
            **{f"img_s_{w}_all": " ".join(f"{x:.1f}" for x in v) for w, v in runs.items()}}


def main(args) -> list[dict]:
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2: the first is warm-up")
    from synthetic import generate  # run as a script: this folder is first on sys.path

    sets = [parse_set(s) for s in args.sets]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        folders = []
        for side, bits, n in tqdm(sets, desc="data"):
            folders.append((f"{side}x{side} {bits}-bit PNG", n, generate(work / f"xray{bits}-{n}-{side}", n, side,
                                                                         bits=bits)))
        steps = [(r, i) for r in range(args.rounds) for i in range(len(folders))]
        results = [({w: [] for w in WORKERS}, []) for _ in folders]
        for r, i in tqdm(steps, desc="rounds x folders"):
            order = WORKERS[r % len(WORKERS):] + WORKERS[:r % len(WORKERS)]  # each value goes first in turn
            for w in order:
                out = Path(tempfile.mkdtemp(dir=scratch))
                img_s, log = train(args, folders[i][2], w, out)
                results[i][0][w].append(img_s)
                if w == "auto":
                    results[i][1].append(parse_auto(log))
                time.sleep(1)
        env = environment(torch.device("cpu"), "float32", img_size=f"{args.img_size[0]}x{args.img_size[1]}",
                          batch_size=args.batch_size, epochs=args.epochs, rounds=args.rounds,
                          train_args=args.train_args or "(none)")
        for (name, n, _), (runs, autos) in zip(folders, results):
            rows.append({**summarize(name, n, runs, autos), **env})
    return rows


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    rows = main(args)
    csv_path = Path(args.csv) if args.csv else default_output("workers-cpu", ".csv")
    notes = ["img_s_*: training images per second with --workers 0, 2 and auto (train.py's metrics.csv, the epochs "
             "after the first, median over rounds). read_ms, step_ms: what auto measured (the median over its "
             "runs): an image's reading in the training process, and a training step's time per image (a copy of "
             "the model, up to 16 images). in_process_speedup: img_s_0 / img_s_2. auto_ok: auto chose the faster, "
             f"or one within {TOLERANCE:.0%} of it."]
    report(rows, COLUMNS, csv_path, "Loader workers against reading in the training process (CPU)", notes,
           header=f"{rows[0]['device_name']}  torch {rows[0]['torch']}")
