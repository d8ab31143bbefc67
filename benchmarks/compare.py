"""Which adapter should I pick? Every adapter trained along a learning curve, with paired seeds and intervals.

For each number of training images per class (``--per-class 5 10 25 100 all``) and each seed, every arm
trains on the same seeded stratified subset (nested: the 5 images of a class are among its 10), in the
same batch order, with the same augmentation, head init and dropout masks, and is scored on the same
validation split. So differences between adapters are paired by seed, and each adapter's difference to
``repeat`` gets its own 95% t interval. The arms: every ``--adapters`` from the pretrained weights, the
same network from random init (``--no-pretrained``, the ``scratch`` arm: what the pretrained weights are
worth at each size), and optionally an adapter with a scaled stem learning rate (``--stem-lr sum=3``).

Runs are in-process, in ``--jobs`` worker processes: a ``train.py`` subprocess per run would spend seconds
importing torch, scanning the folder and starting loaders, more than a small-subset run trains. The
images are decoded once, resized to ``--img-size`` and kept as one tensor; training crops them on the device
with the batch augmentation ``train.py`` uses for packs (``gray_effnet.augment.BatchAugment``, seeded by the run's
seed, epoch and step). The optimizer, schedule, step and evaluation are ``gray_effnet.engine``'s.

Writes, into ``--output``: ``results.csv`` (one row per run, appended as runs finish), ``epochs.csv`` (every
epoch of every run: losses, the stem's effective-kernel drift), ``summary.csv`` (per arm and size: mean,
95% interval, paired difference to ``repeat``), ``results.md`` (the tables and a "what to pick" paragraph
generated from the intervals), ``learning_curve.png`` and ``sweep.json`` (the settings; a rerun with other
settings into the same folder is refused). Interrupted, the same command reruns only the missing runs.

    python benchmarks/compare.py                         # the CPU default: demo digits, Lite0, ~30 min on 2 idle cores
    python benchmarks/compare.py --gpu                   # the preset for a GPU (benchmarks/gpu.sh runs it)
    python benchmarks/compare.py --adapters repeat affine --per-class 5 all --seeds 2 --epochs 1 --output /tmp/c
    python benchmarks/compare.py --stats imagenet-synthetic --stem-lr sum=3 --output benchmarks/results/curve-in
    python benchmarks/compare.py --report-only           # rewrite summary, results.md and the plot from results.csv
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from torch import Tensor, nn

from gray_effnet import ADAPTERS, GrayEfficientNet, list_adapters
from gray_effnet.augment import BatchAugment, build_transforms
from gray_effnet.data import Batch, GrayImageFolder, collate
from gray_effnet.engine import amp_setup, evaluate, make_optimizer_and_schedule, train_one_epoch
from gray_effnet.folders import load_folder, prepare_digits

if __package__:  # imported as benchmarks.compare (the tests)
    from ._common import HelpFormatter, command_line, environment, fmt, resolve_device
else:  # run as python benchmarks/compare.py, which puts this folder first on sys.path
    from _common import HelpFormatter, command_line, environment, fmt, resolve_device

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "repeat"  # every arm's paired difference is taken to this one
BITWISE_REPEAT = ("broadcast",)  # same operands, same order: its runs equal repeat's to the last bit
SCRATCH = "scratch"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Settings a preset fills in when the command line does not give them; the CPU one fits about 30 min on 2 cores.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu", "amp": "none", "channels_last": False, "img_size": (32, 32), "batch_size": 32,
            "epochs": 3, "min_steps": 40, "evals": 3, "seeds": 5, "jobs": None},
    "gpu": {"device": "cuda", "amp": "bf16", "channels_last": True, "img_size": (64, 64), "batch_size": 64,
            "epochs": 8, "min_steps": 100, "evals": 4, "seeds": 5, "jobs": 1},
}
RESULT_COLUMNS = ["arm", "adapter", "per_class", "seed", "pretrained", "stem_lr_scale", "train_images", "best_val_acc",
                  "final_val_acc", "final_val_loss", "epochs", "steps", "seconds", "img_per_s", "stem_drift",
                  "stem_drift_epoch1", "device", "commit"]
EPOCH_COLUMNS = ["arm", "per_class", "seed", "epoch", "step", "lr", "train_loss", "train_acc", "val_acc", "val_loss",
                 "stem_drift", "seconds"]
# What defines the runs: a sweep folder holds runs of one setting only.
SWEEP_KEYS = ["data", "model", "stats", "img_size", "batch_size", "epochs", "min_steps", "evals", "lr", "weight_decay",
              "label_smoothing", "drop_rate", "crop_scale", "val_split", "amp"]


# -- arms and runs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One line of the learning curve: an adapter, from pretrained weights or not, with a stem LR factor."""

    label: str
    adapter: str
    pretrained: bool = True
    stem_lr_scale: float = 1.0


@dataclass(frozen=True)
class RunSpec:
    arm: Arm
    per_class: str  # an integer as text, or "all"
    seed: int

    @property
    def key(self) -> tuple[str, str, int]:
        return self.arm.label, self.per_class, self.seed


def make_arms(adapters: Sequence[str], scratch: bool, stem_lr: Sequence[str]) -> list[Arm]:
    arms = [Arm(a, a) for a in adapters]
    for spec in stem_lr:
        adapter, _, factor = spec.partition("=")
        if adapter not in list_adapters() or not factor:
            raise SystemExit(f"--stem-lr {spec!r}: expected ADAPTER=FACTOR with ADAPTER one of {list_adapters()}")
        arms.append(Arm(f"{adapter}*{float(factor):g}lr", adapter, stem_lr_scale=float(factor)))
    if scratch:
        arms.append(Arm(SCRATCH, REFERENCE, pretrained=False))
    return arms


def plan(arms: Sequence[Arm], per_class: Sequence[str], seeds: int) -> list[RunSpec]:
    """Every run, seed-major: an interrupted sweep has whole seeds done, so paired differences come early."""
    return [RunSpec(arm, pc, seed) for seed in range(seeds) for pc in per_class for arm in arms]


# -- data: decoded once, one tensor ----------------------------------------------------------------------------
@dataclass
class Data:
    root: str
    classes: list[str]
    train_x: Tensor  # (N,1,H,W) uint8 (float32 for files deeper than 8 bit)
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor


def load_data(root: Path, img_size: Sequence[int], val_split: float) -> Data:
    """The folder's seeded stratified split (seed 0, whatever the run seed: one validation set for all)."""
    folder = load_folder(root, val_split=val_split, seed=0)
    resize = build_transforms(img_size, train=False)

    def decode(samples) -> tuple[Tensor, Tensor]:
        ds = GrayImageFolder(samples, resize, wide=folder.scan.wide)
        batch = collate([ds[i] for i in range(len(ds))])
        return batch.images, batch.targets

    return Data(str(root), folder.classes, *decode(folder.train), *decode(folder.val))


def subset(targets: Tensor, per_class: str, seed: int) -> Tensor:
    """Indices of ``per_class`` images of each class (all of a class that has fewer), seeded and nested.

    One permutation per class and seed, of which the first ``per_class`` are taken: the same for every arm,
    and the 5 images of a size-5 subset are among its 10.
    """
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in range(int(targets.max()) + 1):
        idx = (targets == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        picked.append(idx if per_class == "all" else idx[: int(per_class)])
    return torch.cat(picked).sort().values


class Batches:
    """An epoch of batches in an order drawn from ``g``; a loader for ``engine.train_one_epoch``.

    The batches are not augmented here: ``train_one_epoch(augment=BatchAugment(...))`` crops them on the device.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, g: torch.Generator) -> None:
        self.x, self.y, self.batch_size, self.g = x, y, batch_size, g

    def __len__(self) -> int:
        return len(self.x) // self.batch_size  # whole batches: BN needs more than one value per channel

    def __iter__(self) -> Iterator[Batch]:
        order = torch.randperm(len(self.x), generator=self.g)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            yield Batch(self.x[idx], self.y[idx], [], 0)


def fixed_batches(x: Tensor, y: Tensor, batch_size: int) -> list[Batch]:
    return [Batch(x[i:i + batch_size], y[i:i + batch_size], [], 0) for i in range(0, len(x), batch_size)]


# -- the model ------------------------------------------------------------------------------------------------
@torch.no_grad()
def reexpress_stats(model: GrayEfficientNet, mean: Sequence[float], std: Sequence[float]) -> float:
    """SYNTHETIC: re-express a ``repeat`` model's pretrained stem for other statistics, keeping its RGB function.

    The stem weight becomes ``w_c * std'_c / std_c``, so ``(x_c - mean'_c) / std'_c`` meets the same filters,
    up to the constant ``(mean_c - mean'_c) / std_c`` per channel. Inside the image that constant is one
    offset per output channel, which moves into the next BatchNorm's running mean; on the stem's border rows
    and columns (zero padding) it does not. Returns max |stem output change| on the interior of a random RGB
    image, as a check (float rounding).
    """
    stem, bn = model.stem, model.model.bn1
    old_mean, old_std = stem.mean.clone(), stem.std.clone()
    new_mean = torch.tensor(mean, dtype=old_mean.dtype).view(1, 3, 1, 1)
    new_std = torch.tensor(std, dtype=old_std.dtype).view(1, 3, 1, 1)
    x = torch.rand(1, 3, 32, 32)
    before = bn(stem.conv((x - old_mean) / old_std))
    w = stem.conv.weight
    offset = (w * ((old_mean - new_mean) / old_std)).sum((1, 2, 3))  # (O,): conv of the constant, interior
    w.mul_(new_std / old_std)
    bn.running_mean.add_(offset)  # inside, the conv output became z + offset; BN subtracts running_mean
    stem.mean.copy_(new_mean)
    stem.std.copy_(new_std)
    model.mean, model.std = tuple(mean), tuple(std)
    after = bn(stem.conv((x - new_mean) / new_std))
    return (after - before)[..., 1:-1, 1:-1].abs().max().item()


def build_model(arm: Arm, cfg: argparse.Namespace, num_classes: int) -> GrayEfficientNet:
    stats = {}
    if cfg.stats == "imagenet-synthetic" and not arm.pretrained:
        stats = {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}  # random init: the statistics are just numbers
    model = GrayEfficientNet(cfg.model, adapter="repeat", num_classes=num_classes, pretrained=arm.pretrained,
                             drop_rate=cfg.drop_rate, **stats)
    if cfg.stats == "imagenet-synthetic" and arm.pretrained:
        reexpress_stats(model.eval(), IMAGENET_MEAN, IMAGENET_STD)
    return model.set_adapter(arm.adapter)


def effective_kernel(model: GrayEfficientNet) -> Tensor | None:
    """The (O,1,k,k) kernel the stem applies to the gray image: comparable across adapters (None if not affine)."""
    stem = model.stem
    if not getattr(stem, "foldable", True):
        return None
    with torch.no_grad():
        return stem.folded_weights().weight.detach().float().clone()


def drift(k0: Tensor | None, model: GrayEfficientNet) -> float:
    k = effective_kernel(model)
    return float("nan") if k is None or k0 is None else ((k - k0).norm() / k0.norm()).item()


def parameters(model: GrayEfficientNet, arm: Arm, weight_decay: float) -> GrayEfficientNet | list[dict]:
    """What the optimizer gets: the model, or, when the arm scales its stem's LR, timm's weight-decay groups
    (no decay on 1-D parameters, as for a model) with the stem conv in a group of its own."""
    if arm.stem_lr_scale == 1.0:
        return model
    groups = param_groups_weight_decay(model, weight_decay)
    stem_weight = model.stem.conv.weight
    for group in list(groups):
        if any(p is stem_weight for p in group["params"]):
            group["params"] = [p for p in group["params"] if p is not stem_weight]
            # timm's schedulers multiply a group's scheduled LR by its lr_scale.
            groups.append({**group, "params": [stem_weight], "lr_scale": arm.stem_lr_scale})
    return groups


# -- one run --------------------------------------------------------------------------------------------------
_DATA: Data | None = None


def _init_worker(data: Data, threads: int) -> None:
    global _DATA
    _DATA = data
    torch.set_num_threads(threads)


def run_one(spec: RunSpec, cfg: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Train one arm on one subset with one seed; returns its results row and its epoch rows."""
    data, arm, seed = _DATA, spec.arm, spec.seed
    device = torch.device(cfg.device)
    idx = subset(data.train_y, spec.per_class, seed)
    x, y = data.train_x[idx], data.train_y[idx]
    batch_size = min(cfg.batch_size, len(idx))
    g = torch.Generator().manual_seed(seed)  # batch order, the same for every arm
    batches = Batches(x, y, batch_size, g)
    # Crops from (seed, epoch, step) only, outside the global RNG that dropout draws from: the same for every arm.
    augment = BatchAugment(cfg.img_size, crop_scale=cfg.crop_scale, seed=seed)
    steps_per_epoch = len(batches)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    total = epochs * steps_per_epoch
    eval_epochs = {round(epochs * (i + 1) / cfg.evals) - 1 for i in range(cfg.evals)} | {epochs - 1}
    val = fixed_batches(data.val_x, data.val_y, 256)

    torch.manual_seed(seed)  # head init (and, for scratch, the whole network) and dropout: the same for every arm
    model = build_model(arm, cfg, len(data.classes)).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # train.py's recipe on one process; the warmup is the first tenth of the run.
    optimizer, scheduler, _ = make_optimizer_and_schedule(
        parameters(model, arm, cfg.weight_decay), lr=cfg.lr, batch_size=batch_size, world_size=1,
        weight_decay=cfg.weight_decay, epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=epochs / 10)
    autocast, scaler = amp_setup(device, cfg.amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    k0 = effective_kernel(model)
    rows, accs, seconds, seen, result = [], [], 0.0, 0, None
    for epoch in range(epochs):
        augment.set_epoch(epoch)
        stats = train_one_epoch(model, batches, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
                                device=device, epoch=epoch, autocast=autocast, scaler=scaler,
                                channels_last=cfg.channels_last, log_every=max(steps_per_epoch, 1), progress=False,
                                augment=augment)
        seconds += stats["seconds"]
        seen += steps_per_epoch * batch_size
        row = {"arm": arm.label, "per_class": spec.per_class, "seed": seed, "epoch": epoch,
               "step": (epoch + 1) * steps_per_epoch, "lr": optimizer.param_groups[0]["lr"],
               "train_loss": stats["train_loss"], "train_acc": stats["train_acc"], "val_acc": None, "val_loss": None,
               "stem_drift": drift(k0, model), "seconds": stats["seconds"]}
        if epoch in eval_epochs:
            result = evaluate(model, val, device=device, num_classes=len(data.classes), autocast=autocast,
                              channels_last=cfg.channels_last, progress=False)
            accs.append(result.acc)
            row.update(val_acc=result.acc, val_loss=result.loss)
        rows.append(row)
    return {
        "arm": arm.label, "adapter": arm.adapter, "per_class": spec.per_class, "seed": seed,
        "pretrained": arm.pretrained, "stem_lr_scale": arm.stem_lr_scale, "train_images": len(idx),
        "best_val_acc": max(accs), "final_val_acc": accs[-1], "final_val_loss": result.loss, "epochs": epochs,
        "steps": total, "seconds": seconds, "img_per_s": seen / seconds if seconds > 0 else float("nan"),
        "stem_drift": rows[-1]["stem_drift"], "stem_drift_epoch1": rows[0]["stem_drift"],
    }, rows


# -- files ----------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Append ``rows``, flushed to disk: what a finished run wrote survives an interruption."""
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="raise")
        if new:
            writer.writeheader()
        writer.writerows([{c: row.get(c) for c in columns} for row in rows])
        f.flush()
        os.fsync(f.fileno())


def check_sweep(output: Path, cfg: argparse.Namespace) -> dict:
    """Write ``sweep.json``, or check that the folder's runs were made with the same settings."""
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items() if k in SWEEP_KEYS}
    path = output / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{output} holds runs made with other settings ({diff}, as (there, now)); "
                             "use another --output, or delete the folder to start over")
    elif (output / "results.csv").is_file():
        raise SystemExit(f"{output}/results.csv has no sweep.json beside it (an older compare.py?); "
                         "use another --output, or delete the folder")
    else:
        output.mkdir(parents=True, exist_ok=True)
        settings["command"] = command_line()  # the sweep's first command; not compared, a record
        path.write_text(json.dumps(settings, indent=2) + "\n")
    return json.loads(path.read_text())


# -- statistics -----------------------------------------------------------------------------------------------
def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided Student t quantile (scipy when installed; else a table for 95%, normal beyond 30 df)."""
    try:
        from scipy import stats

        return float(stats.t.ppf(0.5 + level / 2, df))
    except ImportError:
        if level != 0.95:
            raise
        table = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
                 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
                 2.045, 2.042]
        return table[df - 1] if df <= 30 else 1.960


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its t interval; NaN bounds with fewer than 2 values."""
    v = [float(x) for x in values]
    if not v:
        return (math.nan,) * 3
    mean = statistics.fmean(v)
    if len(v) < 2:
        return mean, math.nan, math.nan
    half = t_quantile(len(v) - 1, level) * statistics.stdev(v) / math.sqrt(len(v))
    return mean, mean - half, mean + half


def _size_order(pc: str) -> tuple[int, int]:
    return (1, 0) if pc == "all" else (0, int(pc))


def summarise(rows: Sequence[dict], metric: str) -> list[dict]:
    """Per arm and size: mean and 95% interval of ``metric``, and the paired difference to ``repeat``."""
    by_key = {(r["arm"], r["per_class"], int(r["seed"])): r for r in rows}
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    sizes = sorted({r["per_class"] for r in rows}, key=_size_order)
    out = []
    for pc in sizes:
        for arm in arms:
            runs = [r for (a, p, _), r in by_key.items() if a == arm and p == pc]
            if not runs:
                continue
            mean, lo, hi = t_interval([float(r[metric]) for r in runs])
            row = {"arm": arm, "per_class": pc, "n": len(runs),
                   "train_images": statistics.fmean(float(r["train_images"]) for r in runs),
                   "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi,
                   "final_val_loss": statistics.fmean(float(r["final_val_loss"]) for r in runs),
                   "img_per_s": statistics.fmean(float(r["img_per_s"]) for r in runs),
                   "stem_drift": statistics.fmean(float(r["stem_drift"]) for r in runs)}
            pairs = [float(r[metric]) - float(by_key[(REFERENCE, pc, int(r["seed"]))][metric])
                     for r in runs if (REFERENCE, pc, int(r["seed"])) in by_key]
            if arm != REFERENCE and pairs:
                d, dlo, dhi = t_interval(pairs)
                row.update(n_pairs=len(pairs), diff=d, diff_low=dlo, diff_high=dhi)
            out.append(row)
    return out


def _pts(v: float) -> str:
    return f"{100 * v:+.1f}"


def what_to_pick(summary: Sequence[dict], n_seeds: int, metric: str) -> str:
    """A paragraph that claims a difference only where its 95% paired interval excludes 0."""
    compared = [r for r in summary if "diff" in r and not math.isnan(r.get("diff_low", math.nan))]
    if not compared:
        return ("Not enough paired runs for intervals yet (at least 2 seeds of an arm and of `repeat` per size): "
                "no difference can be claimed.")
    arms = list(dict.fromkeys(r["arm"] for r in compared))
    lines, better_somewhere = [], []
    for arm in arms:
        cells = [r for r in compared if r["arm"] == arm]
        better = [r for r in cells if r["diff_low"] > 0]
        worse = [r for r in cells if r["diff_high"] < 0]

        def where(rs: Sequence[dict]) -> str:
            return ", ".join(f"{r['per_class']} ({_pts(r['diff'])} points, [{_pts(r['diff_low'])}, "
                             f"{_pts(r['diff_high'])}])" for r in rs)

        what = "from random init" if arm == SCRATCH else f"`{arm}`"
        parts = []
        if better:
            parts.append(f"above `repeat` at {where(better)} images per class")
            if arm != SCRATCH:
                better_somewhere.append((arm, better, worse))
        if worse:
            parts.append(f"below `repeat` at {where(worse)} images per class")
        rest = [r for r in cells if r not in better and r not in worse]
        if rest:
            largest = max(rest, key=lambda r: abs(r["diff"]))
            parts.append(f"no difference the intervals can detect at {', '.join(r['per_class'] for r in rest)} "
                         f"(largest mean difference {_pts(largest['diff'])} points, at {largest['per_class']})")
        lines.append(f"- {what}: " + "; ".join(parts) + ".")
    n_intervals = len(compared) - sum(1 for r in compared if r["arm"] == SCRATCH)
    if better_somewhere:
        picks = "; ".join(
            f"`{arm}` at {', '.join(r['per_class'] for r in better)} images per class"
            + (f" (but below it at {', '.join(r['per_class'] for r in worse)})" if worse else "")
            for arm, better, worse in better_somewhere)
        verdict = (f"**What to pick.** The intervals support an accuracy gain over `repeat` for {picks}. "
                   "Where an adapter is not listed, it did as well as `repeat` within the intervals' resolution.")
    else:
        verdict = ("**What to pick.** No adapter beat `repeat` on this data with 95% confidence at any size, so "
                   "accuracy gives no reason to prefer one here; choose by what else you need (a 1-channel stem, "
                   "export, timm compatibility): see the adapter table in docs/adapters.md.")
    caveat = (f"These are {n_intervals} adapter intervals at 95%: about {n_intervals / 20:.1f} of them would exclude 0 "
              "by chance alone, so a difference at one size only is weak evidence. One data set, one model, "
              f"{n_seeds} seeds, short training: the answer holds for this setting, not in general.")
    head = (f"Paired by seed ({metric}, in accuracy points; 95% t interval of the per-seed difference to `repeat`):")
    return "\n".join([head, "", *lines, "", verdict, "", caveat])


# -- the report -------------------------------------------------------------------------------------------------
def plot(summary: Sequence[dict], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install -e '.[bench]')"
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm in dict.fromkeys(r["arm"] for r in summary):
        cells = [r for r in summary if r["arm"] == arm]
        xs = [r["train_images"] for r in cells]
        style = {"linestyle": "--", "color": "black"} if arm == SCRATCH else {}
        line, = ax.plot(xs, [r["mean"] for r in cells], marker="o", label=arm, **style)
        ax.fill_between(xs, [r["ci_low"] for r in cells], [r["ci_high"] for r in cells], alpha=0.15,
                        color=line.get_color())
        if arm != REFERENCE and all("diff" in r for r in cells):
            ax_diff.plot(xs, [100 * r["diff"] for r in cells], marker="o", label=arm, color=line.get_color(),
                         linestyle=style.get("linestyle", "-"))
            ax_diff.fill_between(xs, [100 * r["diff_low"] for r in cells], [100 * r["diff_high"] for r in cells],
                                 alpha=0.15, color=line.get_color())
    sizes = sorted({(r["per_class"], r["train_images"]) for r in summary}, key=lambda t: t[1])
    for a in (ax, ax_diff):
        a.set_xscale("log")
        a.set_xticks([t[1] for t in sizes], [f"{t[0]}/class" if t[0] != "all" else "all" for t in sizes])
        a.minorticks_off()
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    ax_diff.axhline(0, color="gray", linewidth=1)
    ax.set(xlabel="training images", ylabel=f"validation accuracy ({summary[0]['metric']})",
           title="accuracy, mean and 95% interval over seeds")
    ax_diff.set(xlabel="training images", ylabel="difference to repeat (points)",
                title="paired difference to repeat, 95% interval")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def write_report(output: Path, cfg: argparse.Namespace, settings: dict) -> list[dict]:
    rows = read_rows(output / "results.csv")
    if not rows:
        print("no finished runs yet")
        return []
    summary = summarise(rows, cfg.metric)
    write_csv(summary, output / "summary.csv")
    seeds = len({r["seed"] for r in rows})
    title = f"{settings['model']} on {Path(settings['data']).name}, {settings['img_size'][0]}x{settings['img_size'][1]}"
    note = plot(summary, output / "learning_curve.png", title)
    lines = [
        f"# Which adapter? {title}, {settings['stats']} statistics",
        "",
        "```",
        settings.get("command", "(not recorded)"),
        "```",
        "",
        f"This report: `{command_line()}`.",
        "",
        f"- **runs**: {len(rows)} ({seeds} seeds) on {', '.join(sorted({r.get('device', '?') for r in rows}))}, "
        f"commit {', '.join(sorted({r.get('commit', '?') for r in rows}))}",
        "- **settings**: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k not in ("data", "command")),
        f"- **data**: {settings['data']}: one validation split for every run; per_class images drawn per seed, "
        "the same for every arm and nested across sizes. `scratch` is `repeat` from random init.",
        "- **columns**: mean and 95% t interval over seeds; `diff`: paired difference to `repeat` with its interval "
        "(accuracy as a fraction); `final_val_loss`: plain cross-entropy (no label smoothing); `stem_drift`: "
        "relative change of the stem's effective kernel on the gray image (what it applies to x), start to end.",
    ]
    if settings["stats"] == "imagenet-synthetic":
        lines.append("- **SYNTHETIC statistics**: the pretrained Lite0 stem was re-expressed for ImageNet's "
                     "per-channel statistics (weights scaled by std'/std, the interior offset moved into bn1's "
                     "running mean), so its RGB function is kept except on the stem's border rows and columns. No "
                     "offline model pretrained with non-uniform statistics exists here; this stands in for one.")
    lines += ["", what_to_pick(summary, seeds, cfg.metric), "", "![learning curve](learning_curve.png)"
              if (output / "learning_curve.png").is_file() else note, ""]
    cols = ["arm", "per_class", "n", "mean", "ci_low", "ci_high", "diff", "diff_low", "diff_high", "final_val_loss",
            "stem_drift", "img_per_s"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|---|---|" + "---:|" * (len(cols) - 2))
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in summary]
    lines += ["", "Speed (`img_per_s`, training) is measured inside each run on a shared machine: treat it as "
              "noise unless the gap is large, and see `benchmarks/adapters.py` for a timing made to compare."]
    (output / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[lines.index("") + 1:]))
    print(f"\n{note}\nresults: {output / 'results.md'}")
    return summary


def write_csv(rows: Sequence[dict], path: Path) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# -- main -----------------------------------------------------------------------------------------------------
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder tree; default: the demo digits")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    # Intensity windows (window, wso) need physical units: benchmarks/windows.py compares them on CT data.
    p.add_argument("--adapters", nargs="+",
                   default=[a for a in list_adapters() if a not in BITWISE_REPEAT and ADAPTERS[a].foldable],
                   choices=list_adapters(),
                   help="default: every registered adapter but broadcast, which trains bitwise like repeat "
                        "(tests/test_compare.py checks it), so its runs would cost time and say nothing new")
    p.add_argument("--per-class", nargs="+", default=["5", "10", "25", "100", "all"],
                   help="training images per class along the curve: integers and/or 'all'")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell, 0..N-1 (preset: 5)")
    p.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=True,
                   help="add the random-init arm (repeat, --no-pretrained)")
    p.add_argument("--stem-lr", nargs="*", default=[], metavar="ADAPTER=FACTOR",
                   help="extra arms: ADAPTER with its stem conv's learning rate times FACTOR (e.g. sum=3)")
    p.add_argument("--stats", default="model", choices=("model", "imagenet-synthetic"),
                   help="the model's own statistics, or Lite0 re-expressed for ImageNet's (synthetic)")
    p.add_argument("--metric", default="best_val_acc", choices=("best_val_acc", "final_val_acc"),
                   help="what the summary and the paragraph compare")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU preset (CUDA, bf16, channels_last, 64x64, 8 epochs, 100 steps at least)")
    g = p.add_argument_group("training (defaults: the preset)")
    g.add_argument("--img-size", nargs=2, type=int, default=None, metavar=("H", "W"))
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--epochs", type=int, default=None, help="epochs of a run, at least")
    g.add_argument("--min-steps", type=int, default=None, help="small subsets train more epochs, up to this many steps")
    g.add_argument("--evals", type=int, default=None, help="validation passes per run, evenly spaced, one at the end")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate for a batch of 64, as train.py")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--drop-rate", type=float, default=0.2)
    g.add_argument("--crop-scale", type=float, default=0.8, help="smallest area of the random resized crop")
    g.add_argument("--val-split", type=float, default=0.2)
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None)
    g.add_argument("--amp", default=None, choices=("none", "bf16", "fp16"))
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--jobs", type=int, default=None,
                   help="runs at once, in worker processes (default: one per CPU core, 1 thread each; on CUDA 1)")
    g.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (a sweep in chunks)")
    g.add_argument("--report-only", action="store_true", help="only rewrite summary, results.md and the plot")
    g.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "learning_curve"))
    return p


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    preset = PRESETS["gpu" if args.gpu else "cpu"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.img_size = tuple(args.img_size)
    for pc in args.per_class:
        if pc != "all" and not (pc.isdigit() and int(pc) > 0):
            raise SystemExit(f"--per-class: {pc!r} is neither a positive integer nor 'all'")
    if args.evals < 1 or args.seeds < 1:
        raise SystemExit("--evals and --seeds must be at least 1")
    return args


def main(args: argparse.Namespace) -> list[dict]:
    args = apply_preset(args)
    device = resolve_device(args.device)
    args.device = str(device)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.jobs is None:
        args.jobs = 1 if device.type == "cuda" else cpus
    threads = max(1, cpus // args.jobs) if device.type == "cpu" else torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # a cap set on purpose (a shared machine) wins
        threads = min(threads, max(1, int(os.environ["OMP_NUM_THREADS"])))
    output = Path(args.output)
    if args.report_only:  # the folder's own settings, whatever this command line says
        if not (output / "sweep.json").is_file():
            raise SystemExit(f"--report-only: {output} has no sweep.json")
        return write_report(output, args, json.loads((output / "sweep.json").read_text()))
    root = Path(args.data) if args.data else prepare_digits()
    args.data = str(root)
    settings = check_sweep(output, args)

    arms = make_arms(args.adapters, args.scratch, args.stem_lr)
    done = {(r["arm"], r["per_class"], int(r["seed"])) for r in read_rows(output / "results.csv")}
    todo = [s for s in plan(arms, args.per_class, args.seeds) if s.key not in done]
    if args.max_runs is not None:
        todo = todo[: args.max_runs]
    data = load_data(root, args.img_size, args.val_split)
    print(f"{root}: {len(data.classes)} classes, {len(data.train_y)} train / {len(data.val_y)} val images, "
          f"{args.img_size[0]}x{args.img_size[1]}; {len(arms)} arms x {len(args.per_class)} sizes x {args.seeds} seeds;"
          " "
          f"{len(done)} runs done, {len(todo)} to run, {args.jobs} job(s) x {threads} thread(s)")
    env = environment(device, "float32" if args.amp == "none" else args.amp)
    where = env["device_name"]
    if device.type == "cpu":  # the threads the runs use, not this process's
        where = f"{where.rsplit(' (', 1)[0]} ({args.jobs} job(s) x {threads} thread(s))"
    extra = {"device": where, "commit": env["commit"]}
    start = time.perf_counter()

    def record(i: int, row: dict, epoch_rows: list[dict]) -> None:
        row.update(extra)
        append_rows(output / "epochs.csv", epoch_rows, EPOCH_COLUMNS)
        append_rows(output / "results.csv", [row], RESULT_COLUMNS)  # last: the run counts as done only now
        elapsed = time.perf_counter() - start
        print(f"[{i}/{len(todo)}, {elapsed:.0f}s] {row['arm']:>10} per_class={row['per_class']:>4} seed={row['seed']}: "
              f"best {row['best_val_acc']:.4f} final {row['final_val_acc']:.4f} in {row['epochs']} epochs "
              f"({row['seconds']:.1f}s, stem drift {row['stem_drift']:.3g})", flush=True)

    try:
        if args.jobs == 1:
            _init_worker(data, threads if device.type == "cpu" else torch.get_num_threads())
            for i, spec in enumerate(todo, 1):
                record(i, *run_one(spec, args))
        elif todo:
            ctx = torch.multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_init_worker,
                                     initargs=(data, threads)) as pool:
                pending = {pool.submit(run_one, spec, args) for spec in todo}
                i = 0
                try:
                    while pending:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            i += 1
                            record(i, *fut.result())
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are in results.csv; the same command runs only the missing ones",
              file=sys.stderr)
        sys.exit(130)
    return write_report(output, args, settings)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
