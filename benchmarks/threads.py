"""A training run alone, and with a second one on the same cores, per thread policy.

PyTorch's CPU threads spin between parallel regions before they sleep. Alone on the cores that is what makes
small kernels fast; beside another process it takes the time slices the other one needs. This script runs
``train.py`` (the demo digits, or ``--data``) under each policy, first alone and then two at once with the
same command, and reports the second epoch's seconds (the first includes start-up and the memory-format probe):

* ``train.py``: as it comes: its share of the cores, and ``gray_effnet.speed.ThreadGovernor``, which drops to
  1 thread once the CPU time the run gets shows the cores are shared;
* ``fixed``: ``--threads <cores>``, which turns the governor off: PyTorch's own behaviour;
* ``fixed, spin 3000``: the same with ``GOMP_SPINCOUNT=3000`` (libgomp's default is 300,000);
* ``fixed, passive``: the same with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once).

``shared/alone`` is a policy's shared epoch over its own lone epoch (the goal: at most 2.5); ``alone vs
fastest`` is its lone epoch over the fastest lone epoch of all policies (what the policy costs a lone run).
Rounds repeat the whole sequence; the medians are reported.

Example:
    python benchmarks/threads.py --rounds 2
"""

import argparse
import contextlib
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _child import child
from _common import HelpFormatter, default_output, environment, report
from tqdm import tqdm

from gray_effnet.speed import available_cores

ROOT = Path(__file__).resolve().parent.parent
CORES = str(available_cores())
POLICIES: dict[str, tuple[dict[str, str], list[str]]] = {  # name: (environment, train.py arguments)
    "train.py": ({}, []),
    "fixed": ({}, ["--threads", CORES]),
    "fixed, spin 3000": ({"GOMP_SPINCOUNT": "3000"}, ["--threads", CORES]),
    "fixed, passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["--threads", CORES]),
}
COLUMNS = ["policy", "alone_s", "shared_s", "shared_over_alone", "alone_vs_fastest", "goal", "met"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", default=None, help="a data folder or pack (default: the demo digits)")
    p.add_argument("--img-size", nargs=2, type=int, default=[64, 64], metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="repeats of the whole sequence")
    p.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    p.add_argument("--train-args", default="", help="more train.py arguments, as one string")
    p.add_argument("--csv", default=None, help="default: benchmarks/results/threads.csv (and .md)")
    return p


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    return {**env, **extra, "HF_HUB_OFFLINE": "1"}


def command(args, output: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, str(ROOT / "train.py"), *extra, "--epochs", "2", "--img-size", *map(str, args.img_size),
           "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--no-progress",
           "--output", str(output), *args.train_args.split()]
    return cmd + (["--data", args.data] if args.data else [])


def second_epoch_seconds(output: Path) -> float:
    with open(output / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["seconds"])


def run_together(args, env: dict[str, str], extra: list[str], scratch: Path, n: int) -> list[float]:
    """Start ``n`` identical runs at once; the second epoch's seconds of each."""
    outs = [Path(tempfile.mkdtemp(dir=scratch)) for _ in range(n)]
    with contextlib.ExitStack() as stack:  # each run is stopped if this process is interrupted or terminated
        procs = [stack.enter_context(child(command(args, out, extra), env=env, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)) for out in outs]
        for proc in procs:
            log, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"train.py failed ({proc.returncode}):\n{log[-3000:]}")
    return [second_epoch_seconds(out) for out in outs]


def main(args) -> list[dict]:
    times: dict[str, dict[str, list[float]]] = {p: {"alone": [], "shared": []} for p in args.policies}
    with tempfile.TemporaryDirectory() as scratch:
        run_together(args, clean_env({}), [], Path(scratch), 1)  # writes the demo digits once, warms the file cache
        steps = [(r, p, n) for r in range(args.rounds) for p in args.policies for n in (1, 2)]
        for _, policy, n in tqdm(steps, desc="runs"):
            env, extra = POLICIES[policy]
            seconds = run_together(args, clean_env(env), extra, Path(scratch), n)
            times[policy]["alone" if n == 1 else "shared"] += seconds
            time.sleep(1)
    fastest = min(statistics.median(t["alone"]) for t in times.values())
    env = environment(torch.device("cpu"), "float32", img_size=f"{args.img_size[0]}x{args.img_size[1]}",
                      batch_size=args.batch_size, workers=args.workers, rounds=args.rounds,
                      cores=available_cores(), data=args.data or "demo digits")
    rows = []
    for policy, t in times.items():
        alone, shared = statistics.median(t["alone"]), statistics.median(t["shared"])
        env_vars, extra = POLICIES[policy]
        setting = " ".join([*(f"{k}={v}" for k, v in env_vars.items()), *extra]) or "(as it comes)"
        rows.append({"policy": policy, "env": setting,
                     "alone_s": alone, "shared_s": shared, "shared_over_alone": shared / alone,
                     "alone_vs_fastest": alone / fastest, "goal": "<= 2.5", "met": shared / alone <= 2.5,
                     "alone_all": " ".join(f"{x:.2f}" for x in t["alone"]),
                     "shared_all": " ".join(f"{x:.2f}" for x in t["shared"]), **env})
    return rows


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    rows = main(args)
    csv_path = Path(args.csv) if args.csv else default_output("threads", ".csv")
    notes = ["Seconds of the second training epoch (train.py's metrics.csv), median over rounds and, when shared, "
             "over both runs. shared_over_alone: a policy's shared over its lone epoch; alone_vs_fastest: its lone "
             "epoch over the fastest lone epoch of any policy."]
    report(rows, COLUMNS, csv_path, "One training run alone and two on the same cores, per thread policy",
           notes, header=f"{rows[0]['device_name']}  torch {rows[0]['torch']}")
