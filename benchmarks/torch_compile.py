"""``torch.compile`` for training, measured: what compiling costs, what a step gains, and when it pays.

For each image size, one process builds train.py's bare training step twice (``loop.bare_step``: the model,
loss and AdamW at train.py's defaults, a fixed batch on the device), eager and under ``torch.compile``, from the
same weights. It times the compiled model's first step (tracing, compiling, then the step: ``compile_s`` is
that minus an eager step), warms both up, then times them in blocks, interleaved round by round
(``_common.interleave``). A second process then compiles again with the same Inductor cache folder: a repeat
run's ``compile_s`` (``warm_compile_s``; the folder is a fresh temporary one, so the first process starts cold).

``speedup`` is the eager step's seconds over the compiled step's (per round, median). ``break_even_steps`` is
the number of training steps after which compiling has paid for itself (cold and with the cache warm):
``compile_s / (eager_s - compiled_s)``; ``never`` when the compiled step is not faster. Compare it with a run's
length: ``epochs x ceil(train images / batch)``.

The threads, memory format and autocast are the ones a run would use: ``--threads`` (default: torch's count
here), ``--channels-last on|off``, ``--amp``.

Example:
    python benchmarks/torch_compile.py                          # 32x32, 64x64 and 224x224 at train.py's batch
    python benchmarks/torch_compile.py --sizes 32 --rounds 2 --steps 2 --csv /tmp/compile.csv   # a quick check
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _child import sigterm_raises
from _common import (
    Candidate,
    HelpFormatter,
    default_output,
    environment,
    interleave,
    report,
    resolve_device,
    synchronize,
)
from loop import add_step_arguments, bare_step, resolve_step, train_defaults

from gray_effnet.engine import AMP_DTYPES

COLUMNS = ["img_size", "batch_size", "eager_step_s", "compiled_step_s", "speedup", "compile_s", "warm_compile_s",
           "break_even_steps", "warm_break_even_steps"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 64, 224], help="square image sides to measure")
    add_step_arguments(p)
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed block (default: 10, or 3 from 128x128 up, where a step takes seconds)")
    p.add_argument("--rounds", type=int, default=3, help="timed blocks of each, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each after the first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="default: benchmarks/results/compile-<device>.csv (and .md)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: one size, as JSON
    return p


def child(args: argparse.Namespace) -> dict:
    """In a process of its own: the first compiled step, then (unless ``first_only``) both steps timed."""
    job = json.loads(args.child)
    device = resolve_device(args.device)
    torch.set_num_threads(job["threads"])
    defaults = train_defaults()
    ns = argparse.Namespace(model=job["model"], adapter=job["adapter"], img_size=[job["size"]] * 2,
                            batch_size=job["batch_size"], amp=job["amp"], seed=args.seed)
    channels_last = job["channels_last"] == "on"
    eager = bare_step(ns, defaults, device, channels_last)
    compiled = bare_step(ns, defaults, device, channels_last, compile=True)
    eager()  # allocations, kernel choice: what the eager step pays once too
    synchronize(device)
    start = time.perf_counter()
    compiled()  # tracing and compiling (forward and backward), then the step
    synchronize(device)
    first = time.perf_counter() - start
    out = {"first_compiled_s": first}
    if job["first_only"]:
        return out
    candidates = [Candidate("eager", eager, job["batch_size"]), Candidate("compiled", compiled, job["batch_size"])]
    for cand in candidates:
        for _ in range(args.warmup):
            cand.step()
    interleave(candidates, args.rounds, job["steps"], device, desc=f"{job['size']}x{job['size']}", memory=False)
    out["eager_steps"], out["compiled_steps"] = candidates[0].seconds, candidates[1].seconds
    return out


def run_child(job: dict, args: argparse.Namespace, cache: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(job), "--seed", str(args.seed)]
    if args.device:
        cmd += ["--device", args.device]
    cmd += ["--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {job['size']}x{job['size']} measurement failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def break_even(compile_s: float, eager_s: float, compiled_s: float) -> float | str:
    """Steps after which ``compile_s`` is repaid by the per-step saving; ``never`` when there is none."""
    saving = eager_s - compiled_s
    return math.ceil(compile_s / saving) if saving > 0 else "never"


def main(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    defaults = train_defaults()
    resolve_step(args, defaults, device)
    torch.set_num_threads(args.threads)
    amp, channels_last, batch, threads = args.amp, args.channels_last, args.batch_size, args.threads
    rows = []
    for size in args.sizes:
        job = {"size": size, "model": args.model, "adapter": args.adapter,
               "batch_size": batch, "amp": amp, "channels_last": channels_last, "threads": threads,
               "steps": args.steps or (10 if size < 128 else 3), "first_only": False}
        with tempfile.TemporaryDirectory(prefix="gray-effnet-inductor-") as cache:
            print(f"{size}x{size}: compiling with an empty cache, then timing ...", flush=True)
            cold = run_child(job, args, Path(cache))
            print(f"{size}x{size}: compiling again with the cache from the first ...", flush=True)
            warm = run_child({**job, "first_only": True}, args, Path(cache))
        eager_s = statistics.median(cold["eager_steps"])
        compiled_s = statistics.median(cold["compiled_steps"])
        speedup = statistics.median(e / c for e, c in zip(cold["eager_steps"], cold["compiled_steps"]))
        compile_s = max(cold["first_compiled_s"] - eager_s, 0.0)
        warm_compile_s = max(warm["first_compiled_s"] - eager_s, 0.0)
        rows.append({"img_size": f"{size}x{size}", "batch_size": batch, "eager_step_s": eager_s,
                     "compiled_step_s": compiled_s, "speedup": speedup, "compile_s": compile_s,
                     "warm_compile_s": warm_compile_s,
                     "break_even_steps": break_even(compile_s, eager_s, compiled_s),
                     "warm_break_even_steps": break_even(warm_compile_s, eager_s, compiled_s),
                     "rounds": args.rounds, "steps_per_block": job["steps"],
                     **environment(device, str(AMP_DTYPES[amp] or torch.float32).removeprefix("torch."),
                                   model=job["model"], adapter=job["adapter"], amp=amp,
                                   memory_format="nhwc" if channels_last == "on" else "nchw")})
        print(f"{size}x{size}: eager {eager_s:.3f}s, compiled {compiled_s:.3f}s a step; compiling took "
              f"{compile_s:.0f}s ({warm_compile_s:.0f}s with the cache)", flush=True)
    return rows


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    if args.child:
        print(json.dumps(child(args)))
        sys.exit(0)
    with sigterm_raises():  # SIGTERM unwinds: subprocess.run kills the timed child under way
        rows = main(args)
    csv_path = Path(args.csv) if args.csv else default_output(f"compile-{rows[0]['device']}", ".csv")
    notes = ["speedup: eager step seconds over compiled (median of the rounds' ratios). compile_s: the compiled "
             "model's first step minus an eager step (tracing and compiling forward and backward), with an empty "
             "Inductor cache; warm_compile_s: the same in a new process with the first one's cache (a repeat "
             "run). break_even_steps: compile_s over the per-step saving ('never': no saving)."]
    header = f"{rows[0]['model']} ({rows[0]['adapter']})  {rows[0]['device_name']}  torch {rows[0]['torch']}"
    report(rows, COLUMNS, csv_path, "torch.compile for training: cost, gain, break-even", notes, header=header)
