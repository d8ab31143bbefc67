"""torch's fused AdamW against its foreach AdamW in train.py's training step, interleaved in one run.

For each image size, ``loop.bare_step`` builds train.py's training step (model, loss, AdamW from
``make_optimizer_and_schedule``, a fixed batch on the device) twice from the same weights: with ``fused=False``
(torch's foreach AdamW, what ``create_optimizer_v2`` gives by default) and ``fused=True`` (one kernel over every
parameter). Both are warmed up, then timed in blocks, interleaved round by round (``_common.interleave``).
``speedup`` is the median over rounds of foreach's seconds a step over fused's (above 1: fused is faster).

The two make the same update up to float rounding: ``max_weight_diff`` is the largest difference between the
weights of two more such models after ``--check-steps`` steps each (default 1), every step with the same dropout
draws. After one step it is rounding (about 1e-7); from the second on, Adam's division by the root of the squared
gradients magnifies such differences where a gradient is near zero (about 1e-3 after 3 steps at 32x32), so more
steps check less.

Example:
    python benchmarks/optimizer.py                              # 32x32 and 224x224, train.py's batch
    python benchmarks/optimizer.py --sizes 32 --rounds 2 --steps 2 --csv /tmp/optimizer.csv   # a quick check
"""

import argparse
import statistics
from pathlib import Path

import torch
from _common import Candidate, HelpFormatter, default_output, environment, interleave, report, resolve_device
from loop import add_step_arguments, bare_step, resolve_step, train_defaults

from gray_effnet.engine import AMP_DTYPES

COLUMNS = ["img_size", "batch_size", "foreach_step_s", "fused_step_s", "speedup", "speedup_min", "speedup_max",
           "max_weight_diff"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 224], help="square image sides to measure")
    add_step_arguments(p, channels_last="on")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per timed block (default: 10, or 2 from 128x128 up on the CPU)")
    p.add_argument("--rounds", type=int, default=5, help="timed blocks of each, interleaved")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    p.add_argument("--check-steps", type=int, default=1, help="steps of the same-update check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", default=None, help="default: benchmarks/results/optimizer-<device>.csv (and .md)")
    return p


def max_weight_diff(ns, defaults, device, channels_last: bool, steps: int) -> float:
    """The largest weight difference between a foreach-trained and a fused-trained model after ``steps`` steps
    from the same start, each step under the same seed (the same dropout)."""
    trained = []
    for fused in (False, True):
        step = bare_step(ns, defaults, device, channels_last, fused=fused)
        for k in range(steps):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(k)
                step()
        trained.append([p.detach() for p in step.model.parameters()])
    return max((a - b).abs().max().item() for a, b in zip(*trained))


def main(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    defaults = train_defaults()
    resolve_step(args, defaults, device, channels_last="on")
    torch.set_num_threads(args.threads)
    amp, channels_last, batch = args.amp, args.channels_last == "on", args.batch_size
    rows = []
    for size in args.sizes:
        ns = argparse.Namespace(model=args.model, adapter=args.adapter,
                                img_size=[size, size], batch_size=batch, amp=amp, seed=args.seed)
        steps = args.steps or (2 if size >= 128 and device.type == "cpu" else 10)
        foreach = Candidate("foreach", bare_step(ns, defaults, device, channels_last, fused=False), batch)
        fused = Candidate("fused", bare_step(ns, defaults, device, channels_last, fused=True), batch)
        for cand in (foreach, fused):
            for _ in range(args.warmup):
                cand.step()
        interleave([foreach, fused], args.rounds, steps, device, desc=f"{size}x{size}", memory=False)
        ratios = [a / b for a, b in zip(foreach.seconds, fused.seconds)]
        diff = max_weight_diff(ns, defaults, device, channels_last, args.check_steps)
        rows.append({"img_size": f"{size}x{size}", "batch_size": batch,
                     "foreach_step_s": statistics.median(foreach.seconds),
                     "fused_step_s": statistics.median(fused.seconds), "speedup": statistics.median(ratios),
                     "speedup_min": min(ratios), "speedup_max": max(ratios), "max_weight_diff": diff,
                     "rounds": args.rounds, "steps_per_block": steps,
                     **environment(device, str(AMP_DTYPES[amp] or torch.float32).removeprefix("torch."),
                                   model=ns.model, adapter=ns.adapter, amp=amp,
                                   memory_format="nhwc" if channels_last else "nchw")})
        print(f"{size}x{size}: foreach {rows[-1]['foreach_step_s']:.4f}s, fused {rows[-1]['fused_step_s']:.4f}s a "
              f"step: {rows[-1]['speedup']:.3f}x", flush=True)
    return rows


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    rows = main(args)
    csv_path = Path(args.csv) if args.csv else default_output(f"optimizer-{rows[0]['device']}", ".csv")
    notes = ["speedup: foreach AdamW's seconds a training step over fused AdamW's (median of the rounds' ratios; "
             "min and max over rounds). max_weight_diff: the largest difference between two models' weights after "
             f"{args.check_steps} step(s) from the same start with the same dropout, foreach against fused."]
    header = f"{rows[0]['model']} ({rows[0]['adapter']})  {rows[0]['device_name']}  torch {rows[0]['torch']}"
    report(rows, COLUMNS, csv_path, "Fused AdamW against foreach AdamW in the training step", notes, header=header)
