"""Does training from a pack reach the accuracy of training from the files? train.py both ways, paired by seed.

For each seed, ``train.py`` runs twice on the same images with the same settings: from the image folder (each
image read, cropped and resized by torchvision, one at a time) and from its pack (``python -m gray_effnet pack``
at the training size; each batch cropped on the device by ``gray_effnet.augment.BatchAugment``). The two
differ only in how the training crops are made (the validation images are resized alike), so the paired
difference of their best validation accuracy is the pack's cost in accuracy. Reported: each seed's pair, the
mean difference (pack - files, in points) with its 95% t interval, and whether the goal (within 0.5 points)
is met by the interval, by the mean only, or not.

The data by default is ``peer_timm.py``'s (5,000 generated 28x28 8-bit digits, split 80/20), the set on which
issue 22 saw the pack 1.3 points lower; ``--data`` takes any class-folder tree.

``--pack-size`` packs at a larger size than the training size: training then crops from the larger packed images
and evaluation resizes them (``gray_effnet.sources.PackSource``).

Example:
    python benchmarks/pack_accuracy.py --seeds 3
    python benchmarks/pack_accuracy.py --seeds 3 --pack-size 40 --output benchmarks/results/pack_accuracy/pack40
    python benchmarks/pack_accuracy.py --n-images 200 --seeds 2 --epochs 1 --output /tmp/pack_acc   # a smoke test
"""

import argparse
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gray_effnet.folders import default_cache_dir

if __package__:  # imported as benchmarks.pack_accuracy (the tests)
    from ._common import RESULTS_DIR, HelpFormatter, command_line, environment, fmt, format_table, write_csv
    from .compare import t_interval
    from .peer_timm import best_acc, make_pack, prepare_data
else:  # run as python benchmarks/pack_accuracy.py, which puts this folder first on sys.path
    from _common import RESULTS_DIR, HelpFormatter, command_line, environment, fmt, format_table, write_csv
    from compare import t_interval
    from peer_timm import best_acc, make_pack, prepare_data

ROOT = Path(__file__).resolve().parent.parent
GOAL_POINTS = 0.5
COLUMNS = ["seed", "files_acc", "pack_acc", "diff_points", "files_s", "pack_s"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="a class-folder tree (default: peer_timm.py's digits)")
    p.add_argument("--n-images", type=int, default=5000, help="peer_timm.py's digits: images before the split")
    p.add_argument("--image-size", type=int, default=28, help="peer_timm.py's digits: their side")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1, one pair of runs each")
    p.add_argument("--img-size", type=int, default=32, help="the square training size")
    p.add_argument("--pack-size", type=int, default=None,
                   help="the pack's square size (default: the training size); larger: training crops from more")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-args", default="", metavar="ARGS", help="more train.py arguments for both, one string")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "pack_accuracy",
                   help="runs.csv and results.md go here")
    return p


def verdict(diffs: list[float]) -> tuple[float, float, float, str]:
    """Mean paired difference (points) with its 95% interval, and what it says about the goal."""
    mean, low, high = t_interval(diffs) if len(diffs) > 1 else (diffs[0], float("nan"), float("nan"))
    if len(diffs) > 1 and -GOAL_POINTS <= low and high <= GOAL_POINTS:
        say = f"met: the whole 95% interval lies within {GOAL_POINTS} points"
    elif abs(mean) <= GOAL_POINTS:
        say = f"met by the mean only: the 95% interval reaches beyond {GOAL_POINTS} points"
    else:
        say = f"NOT met: the mean is beyond {GOAL_POINTS} points"
    return mean, low, high, say


def main(args: argparse.Namespace) -> int:
    if args.data is None:
        root = default_cache_dir() / f"peer_timm-digits-{args.n_images}x{args.image_size}"
        data, _ = prepare_data(root.resolve(), args.n_images, args.image_size)
    else:
        data = args.data.resolve()
    pack_size = args.pack_size or args.img_size
    pack, pack_s = make_pack(data, pack_size)
    print(f"data: {data}\npack: {pack} ({pack_s:.1f}s)", flush=True)
    output = args.output.resolve()
    (output / "logs").mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"), "float32", epochs=args.epochs, batch_size=args.batch_size,
                      img_size=f"{args.img_size}x{args.img_size}", pack_size=f"{pack_size}x{pack_size}", data=data.name,
                      train_args=args.train_args)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pack-accuracy-") as scratch:
        for seed in range(args.seeds):
            row = {"seed": seed}
            for name, source in (("files", data), ("pack", pack)):
                out = Path(scratch) / f"{name}-{seed}"
                s = str(args.img_size)
                cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(source), "--img-size", s, s,
                       "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--seed", str(seed),
                       "--output", str(out), "--no-progress", *shlex.split(args.train_args)]
                log = output / "logs" / f"{name}-{seed}.log"
                start = time.perf_counter()
                with open(log, "w") as f:
                    f.write(f"# {shlex.join(cmd)}\n")
                    f.flush()
                    rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
                row[f"{name}_s"] = round(time.perf_counter() - start, 1)
                row[f"{name}_acc"] = best_acc("ours", out)[0] if rc == 0 else None  # train.py's metrics.csv
                if rc != 0:
                    print(f"error: train.py failed (exit {rc}); its log: {log}", file=sys.stderr)
                    return 1
            row["diff_points"] = (row["pack_acc"] - row["files_acc"]) * 100
            rows.append({**row, **env})
            print(f"seed {seed}: files {row['files_acc']:.4f}, pack {row['pack_acc']:.4f} "
                  f"({row['diff_points']:+.2f} points)", flush=True)
            write_csv(rows, output / "runs.csv")
    mean, low, high, say = verdict([r["diff_points"] for r in rows])
    means = {k: statistics.mean(r[f"{k}_acc"] for r in rows) for k in ("files", "pack")}
    summary = (f"Pack - files, best validation accuracy over {len(rows)} seeds: {mean:+.2f} points (95% interval "
               f"{low:+.2f} to {high:+.2f}); goal within {GOAL_POINTS} points: {say}. Mean accuracy: files "
               f"{means['files']:.4f}, pack {means['pack']:.4f}.")
    lines = ["# Training from a pack against training from the files: accuracy, paired by seed", "", "```",
             command_line(), "```", "", *[f"- **{k}**: {fmt(v)}" for k, v in env.items()],
             f"- **pack**: `python -m gray_effnet pack` at {pack_size}x{pack_size} ({pack_s:.1f}s)", "",
             summary, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + format_table(rows, COLUMNS) + "\n\n" + summary + f"\n\nwrote {output / 'runs.csv'} and "
          f"{output / 'results.md'}")
    return 0


if __name__ == "__main__":
    from _child import sigterm_raises  # run as a script: this folder is first on sys.path

    with sigterm_raises():  # SIGTERM unwinds: subprocess.run kills the run under way
        sys.exit(main(get_args_parser().parse_args()))
