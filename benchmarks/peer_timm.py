"""Our train.py against timm's train.py: same folder, same ImageNet weights, same epochs, batch and size.

Both scripts train ``tf_efficientnet_lite0`` from the bundled ImageNet weights on one gray ImageFolder, each
in a fresh subprocess of this Python, timed from process start to exit (imports, data scan, checkpoints and
evaluation included: what a user waits for). Each round runs every config once, timm then ours, and the
next round ours then timm, so that a machine that slows down halfway moves both alike; the ratio
ours/timm is taken per round and its median is reported with its range.

The configs (``--configs``):

* ``defaults``: each script at its defaults plus the shared settings. timm also gets the issue's reference
  flags (``--opt adamw --lr 1e-3 --hflip 0 --device cpu``) and what the data dictates (``--in-chans 1``,
  ``--num-classes``, the split names). Goal: ours takes at most 0.6x timm's time.
* ``channels_last``: both with their channels_last flag. Goal: at most 0.85x (issue 22; issue 8 asked 1.0x).
* ``pack``: ours from a pack of the same folder (``python -m gray_effnet pack``, made once before the runs and
  timed; its augmentation runs per batch), both with their channels_last flag. Goal: at most 0.75x, and ours'
  accuracy within 0.5 points of ours from the files (``channels_last``), which the report states.
* ``--ours-extra-config NAME=ARGS`` adds a config: ours with ARGS, timm with its ``channels_last`` flags, goal
  1.0x (e.g. an "ours best" config).

In every config the goal also asks for ours' best validation accuracy (median over rounds) to be at least
timm's.

The data: scikit-learn's 1,797 bundled 8x8 digits, upsampled to ``--image-size`` and made into ``--n-images``
distinct 8-bit gray images by seeded random shifts, scales and noise, split 80/20 per class into ``train/``
and ``val/`` (both scripts read that split as it is). Written once into ``--data-dir`` and reused while its
``.complete`` marker matches. The weights: ``gray_effnet.weights.pretrained_weights_file`` (the bundled
efficientnet-lite0 package); ours reads it through ``--pretrained`` (its default), timm through
``--pretrained --pretrained-path`` a copy under timm's own key names (written to ``peer_timm-weights/`` beside
the data folder), from which timm sums the RGB stem into one channel (``--in-chans 1``). Before any run,
the script checks in-process that timm's loader really takes every tensor from that file.

Writes into ``--output`` (default ``benchmarks/results/peer_timm/``): ``runs.csv`` (one row per run, with the
machine, versions, thread settings and the exact command, rewritten after every run), ``results.md`` (per
config: median seconds, the ratio with its range, accuracies, goals; the run order and exact commands) and
``logs/`` (each run's stdout and stderr). Checkpoints go to a scratch folder that is removed at the end.

timm's train.py is not part of this project; take it from timm's repository. The runs so far used the
file at commit aa4b5850c1543fa488abf260f18390eda46cf85d (1.0.29.dev0 on main; it runs against timm 1.0.31):

    git -C pytorch-image-models show aa4b5850c1543fa488abf260f18390eda46cf85d:train.py > /tmp/timm_train/train.py

    python benchmarks/peer_timm.py --timm-train-py /tmp/timm_train/train.py
    python benchmarks/peer_timm.py --timm-train-py /tmp/timm_train/train.py --n-images 200 --epochs 1 --rounds 1 \\
        --configs defaults --output /tmp/peer_smoke                                        # a smoke test
    python benchmarks/peer_timm.py --timm-train-py /tmp/timm_train/train.py --ours-extra-config "best=--amp bf16"
"""

import argparse
import csv
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from gray_effnet import GrayEfficientNet
from gray_effnet.cli import workers_count
from gray_effnet.folders import default_cache_dir
from gray_effnet.weights import (
    classifier_keys,
    first_conv_name,
    fit_state_dict,
    pretrained_weights_file,
    read_weights_file,
)

if __package__:  # imported as benchmarks.peer_timm (the tests)
    from ._common import RESULTS_DIR, HelpFormatter, command_line, environment, fmt, format_table, write_csv
else:  # run as python benchmarks/peer_timm.py, which puts this folder first on sys.path
    from _common import RESULTS_DIR, HelpFormatter, command_line, environment, fmt, format_table, write_csv

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tf_efficientnet_lite0"
TOOLS = ("timm", "ours")
# The reference flags for timm's train.py, beyond the shared epochs, batch and size, and its --workers.
TIMM_REFERENCE = ["--opt", "adamw", "--lr", "1e-3", "--hflip", "0", "--device", "cpu"]
TIMM_CHANNELS_LAST = ["--channels-last"]
SUMMARY_COLUMNS = ["config", "rounds", "timm_s", "ours_s", "ratio", "ratio_min", "ratio_max", "goal", "timm_acc",
                   "ours_acc", "time_met", "acc_met"]


@dataclass(frozen=True)
class Config:
    """One pairing: the extra flags of each side, and the ratio ours/timm that the goal allows."""

    name: str
    ours: tuple[str, ...]
    timm: tuple[str, ...]
    goal: float
    data: str = "files"  # what ours reads: "files" (the folder) or "pack" (its pack)


def ours_channels_last_flag(train_py: Path = ROOT / "train.py") -> list[str]:
    """Our train.py's channels_last switch: ``--channels-last`` as a switch, or ``--channels-last on`` where it
    takes a value (``{auto,on,off}``). Read from its parser, so that the benchmark follows the script."""
    spec = importlib.util.spec_from_file_location("_peer_timm_train", train_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    action = next(a for a in module.get_args_parser()._actions if "--channels-last" in a.option_strings)
    if action.nargs == 0:
        return ["--channels-last"]
    return ["--channels-last", "on" if not action.choices or "on" in action.choices else "true"]


def builtin_configs() -> dict[str, Config]:
    return {
        "defaults": Config("defaults", (), (), 0.6),
        "channels_last": Config("channels_last", tuple(ours_channels_last_flag()), tuple(TIMM_CHANNELS_LAST), 0.85),
        "pack": Config("pack", tuple(ours_channels_last_flag()), tuple(TIMM_CHANNELS_LAST), 0.75, data="pack"),
    }


def make_pack(data: Path, img_size: int) -> tuple[Path, float]:
    """The pack of ``data`` at ``img_size`` beside it (``python -m gray_effnet pack``), and the seconds it took;
    an up-to-date pack is reused (its own staleness check), an outdated one rewritten."""
    pack = data.parent / f"{data.name}-pack-{img_size}"
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "gray_effnet", "pack", "--data", str(data), "--img-size", str(img_size),
           str(img_size), "--output", str(pack), "--no-progress"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"packing {data} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    return pack, time.perf_counter() - start


def pack_gap(summary: Sequence[dict[str, Any]]) -> str | None:
    """The sentence on ours' accuracy from the pack against from the files (both channels_last), or None."""
    acc = {s["config"]: s["ours_acc"] for s in summary}
    if acc.get("pack") is None or acc.get("channels_last") is None:
        return None
    gap = (acc["pack"] - acc["channels_last"]) * 100
    return (f"Ours from the pack against ours from the files (both channels_last): {gap:+.2f} points of best "
            f"validation accuracy (goal: within 0.5 points: {'met' if abs(gap) <= 0.5 else 'NOT met'}).")


def parse_extra_config(spec: str) -> Config:
    """``NAME=ARGS``: ours with ARGS against timm with its channels_last flags, goal 1.0x."""
    name, sep, ours = spec.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SystemExit(f"--ours-extra-config {spec!r}: expected NAME=ARGS, NAME of letters, digits, _ . -")
    return Config(name, tuple(shlex.split(ours)), tuple(TIMM_CHANNELS_LAST), 1.0)


# -- the data ----------------------------------------------------------------------------------------------
def make_images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct (size, size) uint8 gray digits and their labels, the same for the same arguments.

    Image ``i`` is digit ``i % 1797`` of scikit-learn's set (each digit once before any repeats), its 8x8
    pixels scaled to 0..255, resized bilinearly to about 70% of ``size`` times a random scale in [0.8, 1.15],
    placed at a random shift of up to 3 pixels from the centre, plus Gaussian noise (sigma 8 grey levels).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = np.empty((n, size, size), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    for i in range(n):
        src = i % len(digits.images)
        glyph = Image.fromarray(np.round(digits.images[src] * (255.0 / 16.0)).astype(np.uint8))
        side = min(size, max(4, round(0.7 * size * rng.uniform(0.8, 1.15))))
        glyph = np.asarray(glyph.resize((side, side), Image.BILINEAR), dtype=np.float32)
        top, left = ((size - side) // 2 + rng.integers(-3, 4, size=2)).clip(0, size - side)
        canvas = np.zeros((size, size), dtype=np.float32)
        canvas[top:top + side, left:left + side] = glyph
        canvas += rng.normal(0.0, 8.0, canvas.shape)
        images[i] = np.clip(np.round(canvas), 0, 255).astype(np.uint8)
        labels[i] = digits.target[src]
    if len({im.tobytes() for im in images}) != n:
        raise RuntimeError("make_images: two images came out equal; use another seed")
    return images, labels


def split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: the sorted train and val indices, ``val_fraction`` of each class in val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def prepare_data(root: Path, n: int, size: int, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """Write the split as ``root/{train,val}/<class>/<index>.png`` once; reuse it while ``.complete`` matches.

    Returns the folder and its record: the settings, the image counts and a digest of the pixels and labels.
    """
    settings = {"n_images": n, "image_size": size, "seed": seed, "val_fraction": 0.2}
    marker = root / ".complete"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if {k: record.get(k) for k in settings} == settings:
            return root, record
    if root.exists():
        shutil.rmtree(root)  # an interrupted or different write
    images, labels = make_images(n, size, seed)
    train, val = split(labels, settings["val_fraction"], seed)
    for part, idx in (("train", train), ("val", val)):
        for i in idx:
            folder = root / part / str(labels[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:05d}.png")
    digest = hashlib.sha256(images.tobytes() + labels.tobytes() + val.tobytes()).hexdigest()[:16]
    record = {**settings, "classes": len(np.unique(labels)), "train": len(train), "val": len(val), "sha256": digest}
    marker.write_text(json.dumps(record) + "\n")
    return root, record


# -- the weights --------------------------------------------------------------------------------------------
def timm_weights(path: Path) -> tuple[Path, Path]:
    """The bundled ImageNet weights under timm's key names, saved to ``path``; returns it and the source file.

    The source is what ours loads with ``--pretrained``: the same function finds it for both.
    """
    model = timm.create_model(MODEL, pretrained=False)
    source = pretrained_weights_file(MODEL, model.pretrained_cfg)
    state_dict, _ = read_weights_file(source)
    fitted, _ = fit_state_dict(state_dict, model.state_dict(), stem_key=f"{first_conv_name(model)}.weight",
                               std=model.pretrained_cfg["std"], head_keys=classifier_keys(model), source=str(source))
    model.load_state_dict(fitted, strict=True)  # every tensor, the ImageNet classifier included
    save_file({k: v.contiguous() for k, v in fitted.items()}, str(path))
    return path, source


def check_timm_loads(path: Path, num_classes: int) -> str:
    """Build the model as timm's train.py does with ``--pretrained-path`` and check what it loaded.

    Returns a sentence for the report; raises ``RuntimeError`` if any tensor is not the file's.
    """
    ref, _ = read_weights_file(path)
    model = timm.create_model(MODEL, pretrained=True, in_chans=1, num_classes=num_classes,
                              pretrained_cfg_overlay={"file": str(path), "num_classes": -1})
    got = model.state_dict()
    stem, head = f"{first_conv_name(model)}.weight", classifier_keys(model)
    same = [k for k in got if k != stem and k not in head and torch.equal(got[k], ref[k])]
    if len(same) != len(got) - 1 - len(head) or not torch.allclose(got[stem], ref[stem].sum(1, keepdim=True)):
        raise RuntimeError(f"timm did not load {path}: {len(same)} of {len(got) - 1 - len(head)} tensors equal")
    return (f"timm's loader (`pretrained_cfg_overlay={{'file': ...}}`, `in_chans=1`, as its train.py builds it) took "
            f"all {len(same)} tensors but the stem and classifier from the file, the stem as the RGB sum, and made "
            f"a fresh {num_classes}-class classifier")


def check_ours_loads(path: Path, num_classes: int) -> str:
    """Build the model as our train.py does with its defaults and check that it holds the same weights."""
    ref, _ = read_weights_file(path)
    model = GrayEfficientNet(MODEL, num_classes=num_classes, pretrained=True)  # train.py's defaults
    got = model.timm_state_dict()
    stem, head = f"{model.stem_name}.weight", classifier_keys(model.model)
    same = [k for k in got if k != stem and k not in head and torch.equal(got[k], ref[k])]
    stem_ok = got[stem].shape == ref[stem].shape and torch.equal(got[stem], ref[stem]) or torch.allclose(
        got[stem], ref[stem].sum(1, keepdim=True))
    if len(same) != len(got) - 1 - len(head) or not stem_ok:
        raise RuntimeError(f"ours did not load the bundled weights: {len(same)} of {len(got) - 1 - len(head)} "
                           "tensors equal")
    return f"ours (GrayEfficientNet with train.py's defaults, adapter {model.adapter!r}) holds the same {len(same)} " \
           "tensors and stem"


# -- the runs -----------------------------------------------------------------------------------------------
def timm_command(args: argparse.Namespace, cfg: Config, data: Path, weights: Path, out: Path,
                 num_classes: int) -> list[str]:
    s, b, e, w = str(args.img_size), str(args.batch_size), str(args.epochs), str(args.workers)
    return [sys.executable, str(args.timm_train_py), "--data-dir", str(data), "--train-split", "train",
            "--val-split", "val", "--model", MODEL, "--pretrained", "--pretrained-path", str(weights),
            "--in-chans", "1", "--num-classes", str(num_classes), "--input-size", "1", s, s, "-b", b,
            "--epochs", e, "--workers", w, *TIMM_REFERENCE, "--output", str(out), "--experiment", "run",
            *cfg.timm, *shlex.split(args.timm_args)]


def ours_command(args: argparse.Namespace, cfg: Config, data: Path, out: Path, pack: Path | None = None) -> list[str]:
    s = str(args.img_size)
    data = pack if cfg.data == "pack" else data
    return [sys.executable, str(ROOT / "train.py"), "--data", str(data), "--img-size", s, s,
            "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--workers", str(args.ours_workers),
            "--device", "cpu", "--output", str(out), "--no-progress", *cfg.ours, *shlex.split(args.ours_args)]


def best_acc(tool: str, out: Path) -> tuple[float | None, int]:
    """The best validation top-1 as a fraction and the number of epochs evaluated, from the run's own CSV."""
    path = out / "run" / "summary.csv" if tool == "timm" else out / "metrics.csv"
    if not path.is_file():
        return None, 0
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if tool == "timm":
        accs = [float(r["eval_top1"]) / 100 for r in rows]  # timm writes percent
    else:
        accs = [float(r["val_acc"]) for r in rows]
    return (max(accs) if accs else None), len(accs)


def loaded_weights(tool: str, log: str, out: Path) -> str:
    """What the run says about its weights: timm logs the file; ours records its arguments in config.json."""
    if tool == "timm":
        m = re.search(r"Loading pretrained weights from file \(([^)]*)\)", log)
        return f"file {m.group(1)}" if m else "NOT LOGGED"
    try:
        run_args = json.loads((out / "config.json").read_text())["args"]
    except (OSError, ValueError, KeyError):
        return "n/a (no config.json)"
    pretrained = run_args.get("pretrained") and not run_args.get("weights")
    m = re.search(r"(\d+) train / (\d+) val images \(given split\)", log)
    return ("bundled (--pretrained)" if pretrained else "NOT the bundled weights") + (
        f"; split {m.group(1)}/{m.group(2)}" if m else "; split not logged")


def run(cmd: Sequence[str], cwd: Path, log_path: Path, env: dict[str, str]) -> tuple[float, int]:
    """Run ``cmd`` with its output to ``log_path``; seconds from process start to exit, and its exit status."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write(f"# cwd: {cwd}\n# {shlex.join(cmd)}\n")
        log.flush()
        start = time.perf_counter()
        proc = subprocess.run(list(cmd), cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        return time.perf_counter() - start, proc.returncode


def tail(path: Path, lines: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- the report ---------------------------------------------------------------------------------------------
def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(rows: Sequence[dict[str, Any]], configs: Sequence[Config]) -> list[dict[str, Any]]:
    """Per config: median seconds and best accuracy of each tool, and the per-round ratio ours/timm.

    Only rounds in which both tools finished count. ``time_met``: the median ratio is at most the goal;
    ``acc_met``: ours' median best accuracy is at least timm's.
    """
    out = []
    for cfg in configs:
        by_round: dict[int, dict[str, dict]] = {}
        for r in rows:
            if r["config"] == cfg.name and r["returncode"] == 0 and r["best_acc"] is not None:
                by_round.setdefault(int(r["round"]), {})[r["tool"]] = r
        pairs = [p for _, p in sorted(by_round.items()) if set(p) == set(TOOLS)]
        ratios = [p["ours"]["seconds"] / p["timm"]["seconds"] for p in pairs]
        med = {t: _median([p[t]["seconds"] for p in pairs]) for t in TOOLS}
        acc = {t: _median([p[t]["best_acc"] for p in pairs]) for t in TOOLS}
        ratio = _median(ratios)
        out.append({
            "config": cfg.name, "rounds": len(pairs), "timm_s": med["timm"], "ours_s": med["ours"], "ratio": ratio,
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
            "goal": f"<= {cfg.goal:g}x", "timm_acc": acc["timm"], "ours_acc": acc["ours"],
            "time_met": "n/a" if ratio is None else "yes" if ratio <= cfg.goal else "no",
            "acc_met": "n/a" if ratio is None else "yes" if acc["ours"] >= acc["timm"] else "no",
        })
    return out


def write_report(path: Path, rows: Sequence[dict], summary: Sequence[dict], configs: Sequence[Config],
                 env: dict[str, Any], notes: Sequence[str]) -> None:
    lines = ["# Our train.py against timm's train.py (CPU)", "", "```", command_line(), "```", ""]
    lines += [f"- **{k}**: {fmt(v)}" for k, v in env.items()]
    lines += ["", *notes, "",
              "Seconds: each run's wall time from process start to exit, median over rounds. ratio: ours/timm per "
              "round, median (min-max). acc: best validation top-1 over the epochs, as a fraction, median over "
              "rounds. Goals: each config's (below), with ours' accuracy at least timm's.", ""]
    lines.append("| " + " | ".join(SUMMARY_COLUMNS) + " |")
    lines.append("|" + "|".join("---" if c in ("config", "goal", "time_met", "acc_met") else "---:"
                                for c in SUMMARY_COLUMNS) + "|")
    for s in summary:
        lines.append("| " + " | ".join(fmt(s[c]) for c in SUMMARY_COLUMNS) + " |")
    if (gap := pack_gap(summary)) is not None:
        lines += ["", gap]
    lines += ["", "## Configs", ""]
    for cfg in configs:
        lines.append(f"- `{cfg.name}`: ours `{shlex.join(cfg.ours) or '(defaults)'}`, timm "
                     f"`{shlex.join(cfg.timm) or '(defaults)'}`, goal <= {cfg.goal:g}x")
    lines += ["", "## Runs, in the order they ran", "",
              "| # | round | config | tool | seconds | best_acc | epochs | exit | log |",
              "|---:|---:|---|---|---:|---:|---:|---:|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['round']} | {r['config']} | {r['tool']} | {fmt(r['seconds'])} | {fmt(r['best_acc'])} "
                     f"| {r['epochs_done']} | {r['returncode']} | `{r['log']}` |")
    lines += ["", "Each run's exact command (run from a fresh scratch folder as its working directory; the "
              "output folders are scratch and were removed):", "", "```bash"]
    lines += [f"# {i}: round {r['round']}, {r['config']}, {r['tool']}\n{r['command']}" for i, r in enumerate(rows, 1)]
    lines += ["```", ""]
    path.write_text("\n".join(lines))


# -- main ---------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--timm-train-py", type=Path, required=True, help="timm's train.py (see above for how to get it)")
    p.add_argument("--configs", nargs="+", default=["defaults", "channels_last", "pack"],
                   help="built-in configs to run")
    p.add_argument("--ours-extra-config", action="append", default=[], metavar="NAME=ARGS",
                   help="one more config: ours with ARGS, timm with its channels_last flags (repeatable)")
    p.add_argument("--ours-args", default="", metavar="ARGS",
                   help="appended to every run of ours, one string: --ours-args='--seed 1'")
    p.add_argument("--timm-args", default="", metavar="ARGS", help="appended to every run of timm's, likewise")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every config once per tool")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=32, help="the square input size both train at")
    p.add_argument("--workers", type=int, default=2, help="timm's data loader processes")
    p.add_argument("--ours-workers", type=workers_count, default="auto",
                   help="ours' --workers (default: train.py's own, auto: on the CPU it reads in the training process "
                   "where that measures faster)")
    p.add_argument("--n-images", type=int, default=5000, help="images in the generated folder, before the split")
    p.add_argument("--image-size", type=int, default=28, help="side of the generated images")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where the generated folder goes (default: the gray_effnet cache, by settings)")
    p.add_argument("--output", type=Path, default=RESULTS_DIR / "peer_timm")
    p.add_argument("--scratch", type=Path, default=None,
                   help="keep the runs' output folders here (default: a temporary folder, removed)")
    return p


def main(args: argparse.Namespace) -> int:
    if not args.timm_train_py.is_file():
        raise SystemExit(f"--timm-train-py {args.timm_train_py}: no such file (the docstring says how to get it)")
    args.timm_train_py = args.timm_train_py.resolve()
    known = builtin_configs()
    unknown = [c for c in args.configs if c not in known]
    if unknown:
        raise SystemExit(f"--configs {' '.join(unknown)}: unknown; choose from {', '.join(known)}")
    configs = [known[c] for c in args.configs] + [parse_extra_config(s) for s in args.ours_extra_config]
    if len({c.name for c in configs}) != len(configs):
        raise SystemExit("two configs have the same name")
    if args.rounds < 2:
        print(f"note: --rounds {args.rounds}: the comparison asks for at least 2 rounds", file=sys.stderr)

    data_root = args.data_dir or default_cache_dir() / f"peer_timm-digits-{args.n_images}x{args.image_size}"
    data, data_record = prepare_data(data_root.resolve(), args.n_images, args.image_size)
    num_classes = data_record["classes"]
    print(f"data: {data}: {data_record['train']} train / {data_record['val']} val images, {num_classes} classes, "
          f"{args.image_size}x{args.image_size} uint8 (sha256 {data_record['sha256']})")

    scratch_ctx = tempfile.TemporaryDirectory(prefix="peer_timm-") if args.scratch is None else None
    scratch = Path(scratch_ctx.name) if scratch_ctx else args.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    # Beside the data, not in the scratch folder: the commands in the report then hold paths that stay.
    weights_dir = data.parent / "peer_timm-weights"
    weights_dir.mkdir(parents=True, exist_ok=True)
    weights, source = timm_weights(weights_dir / f"{MODEL}-timm-names.safetensors")
    weights_note = f"{check_timm_loads(weights, num_classes)}; {check_ours_loads(weights, num_classes)}"
    print(f"weights: {source} -> {weights}\n  {weights_note}")

    env_vars = {**os.environ, "HF_HUB_OFFLINE": "1"}  # both offline: any download attempt fails loudly
    env = environment(torch.device("cpu"), "float32", model=MODEL, epochs=args.epochs, batch_size=args.batch_size,
                      img_size=f"{args.img_size}x{args.img_size}", workers=args.workers, ours_workers=args.ours_workers,
                      omp_num_threads=os.environ.get("OMP_NUM_THREADS", "unset"),
                      omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
                      timm_train_py_sha256=hashlib.sha256(args.timm_train_py.read_bytes()).hexdigest()[:16])
    notes = [
        f"Data: {data_record['n_images']} generated {args.image_size}x{args.image_size} 8-bit gray digits "
        f"(seed {data_record['seed']}, sha256 {data_record['sha256']}), {data_record['train']} train / "
        f"{data_record['val']} val, the same `train/` and `val/` folders for both.",
        f"Weights: `{source.name}` (gray_effnet.weights.pretrained_weights_file); ours loads it with --pretrained, "
        f"timm a copy under timm's key names via --pretrained-path. {weights_note}.",
        f"Threads: both subprocesses inherit this environment (OMP_NUM_THREADS={env['omp_num_threads']}, "
        f"OMP_WAIT_POLICY={env['omp_wait_policy']}, HF_HUB_OFFLINE=1); torch.get_num_threads() here is "
        f"{env['threads']}. timm's script keeps torch's thread count; ours sets its own (its share of the cores, "
        "and 1 thread if it finds them shared: its log says which).",
    ]
    pack = None
    if any(cfg.data == "pack" for cfg in configs):
        pack, pack_s = make_pack(data, args.img_size)
        print(f"pack: {pack} ({pack_s:.1f}s; made once, not counted in the runs' time)")
        notes.append(f"Pack: `python -m gray_effnet pack` of the same folder at {args.img_size}x{args.img_size} "
                     f"took {pack_s:.1f}s here (or reused an up-to-date one), once, outside the runs' times.")
    output = args.output.resolve()
    output.mkdir(parents=True, exist_ok=True)
    plan = [(r, cfg, tool) for r in range(1, args.rounds + 1) for cfg in configs
            for tool in (TOOLS if r % 2 else TOOLS[::-1])]
    rows: list[dict[str, Any]] = []
    failed = None
    with tqdm(plan, desc="runs", dynamic_ncols=True) as bar:
        for rnd, cfg, tool in bar:
            bar.set_postfix_str(f"round {rnd} {cfg.name} {tool}")
            out = scratch / f"r{rnd}-{cfg.name}-{tool}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            cmd = (timm_command(args, cfg, data, weights, out, num_classes) if tool == "timm"
                   else ours_command(args, cfg, data, out, pack))
            log = output / "logs" / f"r{rnd}-{cfg.name}-{tool}.log"
            seconds, rc = run(cmd, out, log, env_vars)
            acc, epochs_done = best_acc(tool, out)
            rows.append({"round": rnd, "config": cfg.name, "tool": tool, "seconds": round(seconds, 2),
                         "best_acc": acc, "epochs_done": epochs_done, "returncode": rc,
                         "weights": loaded_weights(tool, log.read_text(errors="replace"), out),
                         "log": str(log.relative_to(output)), "command": shlex.join(cmd), **env})
            write_csv(rows, output / "runs.csv")
            tqdm.write(f"round {rnd} {cfg.name:>14} {tool:>4}: {seconds:7.1f} s, best acc {fmt(acc)}, exit {rc}")
            if args.scratch is None:
                shutil.rmtree(out, ignore_errors=True)
            if rc != 0 or acc is None or epochs_done != args.epochs:
                failed = (rnd, cfg.name, tool, log)
                break

    summary = summarise(rows, configs)
    write_report(output / "results.md", rows, summary, configs, env, notes)
    if scratch_ctx:
        scratch_ctx.cleanup()
    print("\n" + format_table(summary, SUMMARY_COLUMNS))
    if (gap := pack_gap(summary)) is not None:
        print(gap)
    print(f"\nwrote {output / 'runs.csv'} and {output / 'results.md'}")
    if failed:
        rnd, name, tool, log = failed
        print(f"\nround {rnd} {name} {tool} failed (log {log}); its last lines:\n{tail(log)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from _child import sigterm_raises  # run as a script: this folder is first on sys.path

    with sigterm_raises():  # SIGTERM unwinds: subprocess.run kills the run under way
        sys.exit(main(get_args_parser().parse_args()))
