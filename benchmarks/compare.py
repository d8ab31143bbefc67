"""Which adapter should I pick? Every adapter trained to a plateau along a learning curve, with paired seeds.

For each number of training images per class (``--per-class``) and each seed, every arm trains on the same seeded
stratified subset (nested: the 5 images of a class are among its 10), in the same batch order, with the same
augmentation, head init and dropout masks, and is scored on the same validation split. So differences between
adapters are paired by seed: each adapter's difference to ``repeat`` gets a 95% t interval and a paired t test,
and the claims in "what to pick" are made after Holm's correction over all the adapter-vs-``repeat``
comparisons of the sweep. The arms: every ``--adapters`` from the pretrained weights, optionally the same network
from random init (``--scratch``: what the pretrained weights are worth at each size), and optionally an adapter
with a scaled stem learning rate (``--stem-lr sum=3``).

**Each run trains to a plateau.** It evaluates every ``--eval-every`` steps and stops once the validation loss has
not improved by more than ``--min-delta`` for ``--patience`` evaluations in a row (never inside the warmup); its
step budget grows with the subset (``--epochs`` of it, at least ``--min-steps``, at most ``--max-steps``), and a run
that reaches it without a plateau is recorded as stopped on the budget and counted in the report. The learning
rate follows ``train.py``'s warmup, then holds its peak: with no decay planned over the budget, where a run
plateaus does not depend on how long it could have trained. Each run is scored by the accuracy of its evaluation
with the lowest validation loss, the checkpoint early stopping keeps (``--metric``). The stop is per run; the
batch order and the crops are functions of (seed, epoch, step) only, so a run that stops early saw exactly the
first steps of a longer one.

Runs are in-process, in ``--jobs`` worker processes: a ``train.py`` subprocess per run would spend seconds
importing torch, scanning the folder and starting loaders, more than a small-subset run trains. The
images are decoded once, resized to ``--img-size`` and kept as one tensor; training crops them on the device
with the batch augmentation ``train.py`` uses for packs (``gray_effnet.augment.BatchAugment``). The optimizer,
schedule, step and evaluation are ``gray_effnet.engine``'s. ``--data``: the demo digits, ``textures``
(``benchmarks/textures.py``: patches of scikit-image's textures, train and validation from disjoint regions), or
a folder.

Writes, into ``--output``: ``results.csv`` (one row per run, appended as runs finish: its steps, and whether it
stopped on a plateau or on the budget), ``evals.csv`` (every evaluation of every run: losses, the stem's
effective-kernel drift), ``summary.csv`` (per arm and size: mean, 95% interval, paired difference to ``repeat``,
its p and Holm-adjusted p, steps, budget stops), ``results.md`` (the tables and a "what to pick" paragraph
generated from the tests), ``learning_curve.png`` and ``sweep.json`` (the settings; a rerun with other settings
into the same folder is refused). Interrupted, the same command reruns only the missing runs. A sweep starts by
printing its plan and an estimate of its time (``--plan-only`` stops there); ``benchmarks/compare_report.py``
sets several sweeps side by side.

    python benchmarks/compare.py --plan-only                 # the CPU default's runs, budgets and estimated time
    python benchmarks/compare.py                             # the CPU default: the demo digits, Lite0's statistics
    python benchmarks/compare.py --stats imagenet-synthetic  # into benchmarks/results/curve-digits-imagenet-synthetic
    python benchmarks/compare.py --data textures             # into benchmarks/results/curve-textures-model
    python benchmarks/compare.py --gpu                       # the preset for a GPU: the same design, larger
    python benchmarks/compare.py --adapters repeat affine --per-class 5 all --seeds 2 --max-steps 20 --output /tmp/c
    python benchmarks/compare.py --report-only               # rewrite summary, results.md and the plot from results.csv
"""

import argparse
import csv
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
    from . import textures
    from ._common import HelpFormatter, command_line, environment, fmt, resolve_device
else:  # run as python benchmarks/compare.py, which puts this folder first on sys.path
    import textures
    from _common import HelpFormatter, command_line, environment, fmt, resolve_device

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "repeat"  # every arm's paired difference is taken to this one
BITWISE_REPEAT = ("broadcast",)  # same operands, same order: its runs equal repeat's to the last bit
# repeat's function with repeat's parameters, in another order of operations: its runs differ from repeat's by
# float rounding only, so its difference to repeat measures the noise floor, not the adapter (--adapters adds it).
SAME_AS_REPEAT = ("fold",)
SCRATCH = "scratch"
WARMUP_EVALS = 2  # the LR warmup, in evaluation intervals; no plateau stop inside it
ALPHA = 0.05  # the family-wise error rate of a sweep's claims (Holm), and 1 - the intervals' level
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEFAULT_ADAPTERS = [a for a in list_adapters()
                    if a not in BITWISE_REPEAT + SAME_AS_REPEAT and ADAPTERS[a].foldable]
# Settings a preset fills in when the command line does not give them. The CPU one trades seeds, sizes, image
# size and arms for time (docs/benchmarks.md says which); --plan-only prints its estimate on this machine.
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {"device": "cpu", "amp": "none", "channels_last": False, "img_size": (32, 32), "batch_size": 32,
            "per_class": ["5", "25", "100"], "seeds": 6, "adapters": DEFAULT_ADAPTERS, "scratch": False,
            "epochs": 15, "min_steps": 250, "max_steps": 400, "eval_every": 10, "patience": 4, "jobs": None},
    "gpu": {"device": "cuda", "amp": "bf16", "channels_last": True, "img_size": (64, 64), "batch_size": 64,
            "per_class": ["5", "10", "25", "100", "all"], "seeds": 10, "adapters": DEFAULT_ADAPTERS + ["fold"],
            "scratch": True, "epochs": 30, "min_steps": 400, "max_steps": 2000, "eval_every": 20, "patience": 5,
            "jobs": 1},
}
RESULT_COLUMNS = ["arm", "adapter", "per_class", "seed", "pretrained", "stem_lr_scale", "train_images", "best_val_acc",
                  "final_val_acc", "final_val_loss", "best_val_loss", "val_acc_at_best_loss", "stop", "steps",
                  "budget", "best_step", "evals", "epochs", "seconds", "wall_s", "img_per_s", "stem_drift",
                  "stem_drift_first", "device", "commit"]
EVAL_COLUMNS = ["arm", "per_class", "seed", "eval", "step", "epoch", "lr", "train_loss", "train_acc", "val_acc",
                "val_loss", "best_val_loss", "stem_drift", "seconds"]
# What defines the runs: a sweep folder holds runs of one setting only.
SWEEP_KEYS = ["data", "data_params", "model", "stats", "img_size", "batch_size", "epochs", "min_steps", "max_steps",
              "eval_every", "patience", "min_delta", "lr", "weight_decay", "label_smoothing", "drop_rate",
              "crop_scale", "val_split", "amp"]
METRICS = ("val_acc_at_best_loss", "best_val_acc", "final_val_acc")


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


class StepStream:
    """A run's training steps as one stream: epoch after epoch of ``batches``, each batch cropped at its (epoch, step).

    ``chunk(n)`` hands the next ``n`` steps to ``engine.train_one_epoch`` (a loader of ``n`` batches). The order comes
    from the ``Batches``' seeded generator and the crops from ``augment`` at (seed, epoch, step in the epoch), so
    what a step trains on does not depend on where the chunks are cut or where the run stops: a run that stops on
    a plateau saw exactly the first steps of one that goes on.
    """

    def __init__(self, batches: Batches, augment: BatchAugment) -> None:
        self.batches, self.augment, self.steps = batches, augment, 0
        self._stream = self._all()

    def _all(self) -> Iterator[Batch]:
        epoch = 0
        while True:
            self.augment.set_epoch(epoch)
            for i, batch in enumerate(self.batches):
                self.augment.step = i  # train_one_epoch augments this batch before it asks for the next
                self.steps += 1
                yield batch
            epoch += 1

    @property
    def epochs(self) -> float:
        """The epochs of the subset seen so far."""
        return self.steps / len(self.batches)

    def chunk(self, n: int) -> "_Chunk":
        return _Chunk(self._stream, n)


class _Chunk:
    def __init__(self, stream: Iterator[Batch], n: int) -> None:
        self.stream, self.n = stream, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.n):
            yield next(self.stream)


# -- the step budget and the plateau --------------------------------------------------------------------------
def step_budget(train_images: int, batch_size: int, cfg: argparse.Namespace) -> int:
    """The most steps a run may take: ``--epochs`` of its subset, within [``--min-steps``, ``--max-steps``].

    It grows with the subset, so a larger subset is not cut short by a budget sized for a small one; rounded up to
    whole evaluation intervals, so the last step is evaluated.
    """
    steps_per_epoch = max(1, train_images // batch_size)
    steps = min(cfg.max_steps, max(cfg.min_steps, math.ceil(cfg.epochs * steps_per_epoch)))
    return cfg.eval_every * math.ceil(steps / cfg.eval_every)


@dataclass
class Plateau:
    """Early stopping on the validation loss: it has plateaued when ``patience`` evaluations in a row did not
    improve on the best by more than ``min_delta`` (a non-finite loss never improves). ``patience`` 0: never."""

    patience: int
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = 0
    since: int = 0  # evaluations since the best

    def update(self, step: int, loss: float) -> bool:
        """Record the loss of an evaluation after ``step`` steps; True when the loss has plateaued."""
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.since = loss, step, 0
        else:
            self.since += 1
        return 0 < self.patience <= self.since


@dataclass(frozen=True)
class RunEnd:
    steps: int
    stop: str  # "plateau" or "budget"
    evals: int
    best_step: int  # the step of the best validation loss


def train_to_plateau(train_chunk: Callable[[int], None], evaluate_at: Callable[[int], float], *, budget: int,
                     eval_every: int, patience: int, min_delta: float = 0.0, not_before: int = 0) -> RunEnd:
    """Train ``eval_every`` steps at a time, evaluating after each chunk, until a plateau or the budget.

    Args:
        train_chunk: trains chunk ``i`` (steps ``i * eval_every`` to ``(i + 1) * eval_every``).
        evaluate_at: the validation loss after ``step`` steps.
        budget: the most steps; a multiple of ``eval_every``.
        eval_every: steps between evaluations.
        patience: evaluations without improvement that make a plateau (``Plateau``); 0 trains to the budget.
        min_delta: the least decrease of the loss that counts as an improvement.
        not_before: no plateau stop before this step (the warmup, whose rising LR can stall the loss).
    """
    if budget < eval_every or budget % eval_every:
        raise ValueError(f"budget {budget} must be a positive multiple of eval_every {eval_every}")
    plateau = Plateau(patience, min_delta)
    step = evals = 0
    while step < budget:
        train_chunk(step // eval_every)
        step += eval_every
        evals += 1
        if plateau.update(step, evaluate_at(step)) and step >= not_before:
            return RunEnd(step, "plateau", evals, plateau.best_step)
    return RunEnd(step, "budget", evals, plateau.best_step)


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
    """Train one arm on one subset with one seed to a plateau or its budget; returns its results and eval rows."""
    start = time.perf_counter()
    data, arm, seed = _DATA, spec.arm, spec.seed
    device = torch.device(cfg.device)
    idx = subset(data.train_y, spec.per_class, seed)
    x, y = data.train_x[idx], data.train_y[idx]
    batch_size = min(cfg.batch_size, len(idx))
    batches = Batches(x, y, batch_size, torch.Generator().manual_seed(seed))  # batch order: the same for every arm
    # Crops from (seed, epoch, step) only, outside the global RNG that dropout draws from: the same for every arm.
    augment = BatchAugment(cfg.img_size, crop_scale=cfg.crop_scale, seed=seed)
    stream = StepStream(batches, augment)
    every = cfg.eval_every
    budget = step_budget(len(idx), batch_size, cfg)
    val = fixed_batches(data.val_x, data.val_y, 256)

    torch.manual_seed(seed)  # head init (and, for scratch, the whole network) and dropout: the same for every arm
    model = build_model(arm, cfg, len(data.classes)).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    # train.py's recipe on one process, counted in chunks of one evaluation interval: a warmup of two intervals,
    # then the peak LR held, so that where a run plateaus does not depend on its budget (no decay planned for it).
    optimizer, scheduler, _ = make_optimizer_and_schedule(
        parameters(model, arm, cfg.weight_decay), lr=cfg.lr, batch_size=batch_size, world_size=1,
        weight_decay=cfg.weight_decay, epochs=budget // every, steps_per_epoch=every, warmup_epochs=WARMUP_EVALS,
        decay=False)
    autocast, scaler = amp_setup(device, cfg.amp)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    k0 = effective_kernel(model)
    rows: list[dict] = []
    train: dict[str, float] = {"seconds": 0.0}

    def train_chunk(i: int) -> None:
        stats = train_one_epoch(model, stream.chunk(every), optimizer=optimizer, scheduler=scheduler,
                                criterion=criterion, device=device, epoch=i, autocast=autocast, scaler=scaler,
                                channels_last=cfg.channels_last, log_every=every, progress=False, augment=augment)
        train.update(stats, seconds=train["seconds"] + stats["seconds"])

    def evaluate_at(step: int) -> float:
        result = evaluate(model, val, device=device, num_classes=len(data.classes), autocast=autocast,
                          channels_last=cfg.channels_last, progress=False)
        best = min([result.loss] + [r["val_loss"] for r in rows])
        rows.append({"arm": arm.label, "per_class": spec.per_class, "seed": seed, "eval": len(rows) + 1, "step": step,
                     "epoch": stream.epochs, "lr": optimizer.param_groups[0]["lr"], "train_loss": train["train_loss"],
                     "train_acc": train["train_acc"], "val_acc": result.acc, "val_loss": result.loss,
                     "best_val_loss": best, "stem_drift": drift(k0, model),
                     "seconds": train["seconds"]})
        return result.loss

    end = train_to_plateau(train_chunk, evaluate_at, budget=budget, eval_every=every, patience=cfg.patience,
                           min_delta=cfg.min_delta, not_before=WARMUP_EVALS * every)
    best = next(r for r in rows if r["step"] == end.best_step) if end.best_step else rows[-1]
    return {
        "arm": arm.label, "adapter": arm.adapter, "per_class": spec.per_class, "seed": seed,
        "pretrained": arm.pretrained, "stem_lr_scale": arm.stem_lr_scale, "train_images": len(idx),
        "best_val_acc": max(r["val_acc"] for r in rows), "final_val_acc": rows[-1]["val_acc"],
        "final_val_loss": rows[-1]["val_loss"], "best_val_loss": best["val_loss"],
        "val_acc_at_best_loss": best["val_acc"], "stop": end.stop, "steps": end.steps, "budget": budget,
        "best_step": end.best_step, "evals": end.evals, "epochs": stream.epochs, "seconds": train["seconds"],
        "wall_s": time.perf_counter() - start,
        "img_per_s": end.steps * batch_size / train["seconds"] if train["seconds"] > 0 else float("nan"),
        "stem_drift": rows[-1]["stem_drift"], "stem_drift_first": rows[0]["stem_drift"],
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


def t_pvalue(values: Sequence[float]) -> float:
    """Two-sided p of the one-sample t test of mean 0 (for paired differences: the paired t test); NaN below 2.

    No spread: 1 when every value is 0, else 0 (the limit of the test as the spread shrinks).
    """
    v = [float(x) for x in values]
    if len(v) < 2:
        return math.nan
    mean, sd = statistics.fmean(v), statistics.stdev(v)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = abs(mean) / (sd / math.sqrt(len(v)))
    try:
        from scipy import stats

        return float(2 * stats.t.sf(t, len(v) - 1))
    except ImportError:
        return _t_two_sided(t, len(v) - 1)


def _t_two_sided(t: float, df: int) -> float:
    """P(|T| >= t) for Student's t with an integer ``df``, in closed form (Abramowitz and Stegun 26.7.3-4)."""
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: A = 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)), terms up to cos^(df-3)
        term = total = 1.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:  # even: A = sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...), terms up to cos^(df-2)
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        a = s * total
    return min(1.0, max(0.0, 1.0 - a))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given; NaN stays NaN and is not counted.

    Sorted ascending, the i-th of m p-values (from 0) is multiplied by m - i, made non-decreasing and capped at 1;
    rejecting where the adjusted p is below alpha keeps the family-wise error rate at alpha.
    """
    finite = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        out[i] = running
    return out


def _size_order(pc: str) -> tuple[int, int]:
    return (1, 0) if pc == "all" else (0, int(pc))


def _mean(runs: Sequence[dict], key: str) -> float:
    values = [float(r[key]) for r in runs if r.get(key) not in (None, "")]
    return statistics.fmean(values) if values else math.nan


def summarise(rows: Sequence[dict], metric: str) -> list[dict]:
    """Per arm and size: mean and 95% interval of ``metric``, and the paired difference to ``repeat``.

    The difference gets its 95% t interval, the paired t test's ``p`` and, for the adapter arms (all but
    ``scratch``), ``p_holm``: Holm's adjustment over every adapter-vs-``repeat`` comparison in ``rows``, the family.
    ``budget_stops`` counts the runs that reached their step budget without a plateau (None for runs recorded
    before compare.py stopped on plateaus).
    """
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
            stops = [r.get("stop") for r in runs]
            row = {"arm": arm, "per_class": pc, "n": len(runs), "train_images": _mean(runs, "train_images"),
                   "metric": metric, "mean": mean, "ci_low": lo, "ci_high": hi,
                   "final_val_loss": _mean(runs, "final_val_loss"), "steps": _mean(runs, "steps"),
                   "budget": max((int(r["budget"]) for r in runs if r.get("budget") not in (None, "")), default=None),
                   "budget_stops": None if None in stops or "" in stops else stops.count("budget"),
                   "img_per_s": _mean(runs, "img_per_s"), "stem_drift": _mean(runs, "stem_drift")}
            pairs = [float(r[metric]) - float(by_key[(REFERENCE, pc, int(r["seed"]))][metric])
                     for r in runs if (REFERENCE, pc, int(r["seed"])) in by_key]
            if arm != REFERENCE and pairs:
                d, dlo, dhi = t_interval(pairs)
                row.update(n_pairs=len(pairs), diff=d, diff_low=dlo, diff_high=dhi, p=t_pvalue(pairs))
            out.append(row)
    family = [r for r in out if "p" in r and r["arm"] != SCRATCH]
    for r, adjusted in zip(family, holm([r["p"] for r in family])):
        r["p_holm"] = adjusted
    return out


def _pts(v: float) -> str:
    return f"{100 * v:+.1f}"


def _p(v: float) -> str:
    return "<0.001" if v < 0.001 else f"{v:.3f}"


def detected(r: dict, alpha: float = ALPHA) -> bool:
    """Whether a cell's difference to ``repeat`` is a claim: its Holm-adjusted p is below ``alpha``."""
    return r.get("p_holm") is not None and not math.isnan(r["p_holm"]) and r["p_holm"] < alpha


def budget_note(summary: Sequence[dict]) -> str:
    """A sentence on the runs that stopped on their step budget rather than on a plateau, per arm and size."""
    known = [r for r in summary if r.get("budget_stops") is not None]
    if not known:
        return ("These runs were recorded before compare.py trained to a plateau: each trained a fixed number of "
                "steps, so the comparison partly measures that step budget.")
    runs, stops = sum(r["n"] for r in known), sum(r["budget_stops"] for r in known)
    if not stops:
        return f"All {runs} runs stopped on a validation-loss plateau, before their step budget."
    cells = ", ".join(f"`{r['arm']}` at {r['per_class']} ({r['budget_stops']} of {r['n']})"
                      for r in known if r["budget_stops"])
    return (f"**{stops} of {runs} runs stopped on their step budget** before a plateau: {cells}. Where that is "
            "many, the comparison there still partly measures the budget (raise `--max-steps`).")


def what_to_pick(summary: Sequence[dict], n_seeds: int, metric: str, alpha: float = ALPHA) -> str:
    """A paragraph that claims a difference only where Holm's correction over the sweep's comparisons allows it."""
    compared = [r for r in summary if "diff" in r and not math.isnan(r.get("diff_low", math.nan))]
    if not compared:
        return ("Not enough paired runs for intervals yet (at least 2 seeds of an arm and of `repeat` per size): "
                "no difference can be claimed.\n\n" + budget_note(summary))
    family = [r for r in compared if r["arm"] != SCRATCH]
    lines, gains, losses = [], [], []

    def where(rs: Sequence[dict], with_p: bool = True) -> str:
        return ", ".join(f"{r['per_class']} ({_pts(r['diff'])} points, [{_pts(r['diff_low'])}, "
                         f"{_pts(r['diff_high'])}]" + (f", Holm p {_p(r['p_holm'])})" if with_p else ")")
                         for r in rs)

    for arm in dict.fromkeys(r["arm"] for r in compared):
        cells = [r for r in compared if r["arm"] == arm]
        if arm == SCRATCH:  # not an adapter: outside the family, with its own 95% intervals
            below = [r for r in cells if r["diff_high"] < 0]
            rest = [r["per_class"] for r in cells if r not in below]
            lines.append("- from random init (not in the family; 95% intervals): "
                         + "; ".join(([f"below `repeat` at {where(below, False)} images per class"] if below else [])
                                     + ([f"no detectable difference at {', '.join(rest)}"] if rest else [])) + ".")
            continue
        better = [r for r in cells if detected(r, alpha) and r["diff"] > 0]
        worse = [r for r in cells if detected(r, alpha) and r["diff"] < 0]
        rest = [r for r in cells if r not in better and r not in worse]
        parts = []
        if better:
            parts.append(f"above `repeat` at {where(better)} images per class")
            gains.append((arm, better, worse))
        if worse:
            parts.append(f"below `repeat` at {where(worse)} images per class")
            losses.append((arm, worse))
        if rest:
            largest = max(rest, key=lambda r: abs(r["diff"]))
            text = (f"no detectable difference at {', '.join(r['per_class'] for r in rest)} (largest mean difference "
                    f"{_pts(largest['diff'])} points, at {largest['per_class']})")
            nominal = [r["per_class"] for r in rest if r["diff_low"] > 0 or r["diff_high"] < 0]
            if nominal:
                text += (f"; at {', '.join(nominal)} its 95% interval alone excludes 0, but the difference does not "
                         "survive the correction")
            parts.append(text)
        lines.append(f"- `{arm}`: " + "; ".join(parts) + ".")
    if gains:
        picks = "; ".join(f"`{arm}` at {', '.join(r['per_class'] for r in better)} images per class"
                          + (f" (but below it at {', '.join(r['per_class'] for r in worse)})" if worse else "")
                          for arm, better, worse in gains)
        verdict = (f"**What to pick.** After Holm's correction, the runs support an accuracy gain over `repeat` for "
                   f"{picks}. Everywhere else there is no detectable difference.")
    elif losses:
        below = "; ".join(f"`{arm}` at {', '.join(r['per_class'] for r in worse)} images per class"
                          for arm, worse in losses)
        verdict = (f"**What to pick.** No adapter beat `repeat` detectably at any size, and {below} did worse: keep "
                   "`repeat` (or `broadcast`, the same network, or `fold`, its 1-channel form).")
    else:
        verdict = ("**What to pick.** No detectable difference between any adapter and `repeat` at any size, so "
                   "accuracy gives no reason to prefer one here; choose by what else you need (a 1-channel stem, "
                   "export, timm compatibility): see the adapter table in docs/adapters.md.")
    halves = [100 * (r["diff_high"] - r["diff_low"]) / 2 for r in family]
    sure = (f"**How sure.** The family is the {len(family)} adapter-vs-`repeat` comparisons of this sweep. A claim "
            f"above needs its paired t test's p, Holm-adjusted over the family, below {alpha:g}: the chance that any "
            f"claim here is a false positive is at most {alpha:.0%}. The brackets are each comparison's own "
            f"{1 - alpha:.0%} interval, not corrected. With {n_seeds} seeds the intervals' median half-width is "
            f"{statistics.median(halves) if halves else math.nan:.1f} points: differences smaller than that would "
            "mostly go undetected. One data set, one model: the answer holds for this setting, not in general.")
    head = (f"Paired by seed ({metric}, in accuracy points: the mean difference to `repeat`, its {1 - alpha:.0%} "
            "t interval, and the paired t test's p after Holm's correction):")
    return "\n".join([head, "", *lines, "", verdict, "", sure, "", budget_note(summary)])


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
        if a.get_legend_handles_labels()[0]:  # the difference panel is empty when repeat is the only arm
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


def data_name(settings: dict) -> str:
    """A sweep's data set in a word: ``digits``, ``textures``, or the folder's name."""
    return "textures" if settings.get("data_params") else Path(settings["data"]).name


def data_line(settings: dict) -> str:
    params = settings.get("data_params")
    if data_name(settings) == "textures" and params:
        return (f"textures (`benchmarks/textures.py`: {len(params['images'])} classes, {', '.join(params['images'])}; "
                f"{params['patch']}x{params['patch']} patches, {params['n_train']} train / {params['n_val']} val per "
                f"class from disjoint column ranges (train in the left {params['train_fraction']:.0%}, a "
                f"{params['gap']}-pixel gap), photometric={params['photometric']}, seed {params['seed']})")
    return f"{data_name(settings)} (`{settings['data']}`)" if data_name(settings) != "digits" else \
        "the demo digits (scikit-learn's 8x8 digits as PNGs)"


def training_line(settings: dict) -> str:
    """How a sweep's runs were stopped: the plateau rule and the step budget."""
    if "patience" not in settings:
        return (f"a fixed length: {settings.get('epochs')} epochs and at least {settings.get('min_steps')} steps "
                "(compare.py before it trained to a plateau)")
    return (f"to a plateau: an evaluation every {settings['eval_every']} steps, a stop after {settings['patience']} "
            f"without an improvement of the validation loss by more than {settings['min_delta']:g}; step budget "
            f"{settings['epochs']} epochs of the subset, within [{settings['min_steps']}, {settings['max_steps']}] "
            f"steps; train.py's warmup ({WARMUP_EVALS} evaluation intervals), then its peak LR held")


def write_report(output: Path, cfg: argparse.Namespace, settings: dict) -> list[dict]:
    rows = read_rows(output / "results.csv")
    if not rows:
        print("no finished runs yet")
        return []
    metric = cfg.metric
    if metric not in rows[0]:  # runs of compare.py before it trained to a plateau
        print(f"note: {output / 'results.csv'} has no {metric} column; comparing best_val_acc")
        metric = "best_val_acc"
    summary = summarise(rows, metric)
    write_csv(summary, output / "summary.csv")
    seeds = len({r["seed"] for r in rows})
    title = f"{settings['model']} on {data_name(settings)}, {settings['img_size'][0]}x{settings['img_size'][1]}"
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
        "- **settings**: " + ", ".join(f"{k}={v}" for k, v in settings.items()
                                       if k not in ("data", "data_params", "command")),
        f"- **data**: {data_line(settings)}: one validation split for every run; per_class images drawn per "
        "seed, the same for every arm and nested across sizes. `scratch` is `repeat` from random init.",
        f"- **training**: {training_line(settings)}",
        "- **columns**: mean and 95% t interval over seeds; `diff`: paired difference to `repeat` with its interval "
        "(accuracy as a fraction), `p` its paired t test, `p_holm` that p after Holm's correction over the sweep's "
        "adapter comparisons; `steps`: mean steps taken, `budget` the most allowed, `budget_stops` the runs that "
        "reached it without a plateau; `final_val_loss`: plain cross-entropy (no label smoothing) at the stop; "
        "`stem_drift`: relative change of the stem's effective kernel on the gray image (what it applies to x), "
        "start to end.",
    ]
    if settings["stats"] == "imagenet-synthetic":
        lines.append("- **SYNTHETIC statistics**: the pretrained Lite0 stem was re-expressed for ImageNet's "
                     "per-channel statistics (weights scaled by std'/std, the interior offset moved into bn1's "
                     "running mean), so its RGB function is kept except on the stem's border rows and columns. No "
                     "offline model pretrained with non-uniform statistics exists here; this stands in for one.")
    lines += ["", what_to_pick(summary, seeds, metric), "", "![learning curve](learning_curve.png)"
              if (output / "learning_curve.png").is_file() else note, ""]
    cols = ["arm", "per_class", "n", "mean", "ci_low", "ci_high", "diff", "diff_low", "diff_high", "p", "p_holm",
            "steps", "budget", "budget_stops", "final_val_loss", "stem_drift", "img_per_s"]
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
    p.add_argument("--data", default="digits",
                   help="'digits' (the demo digits), 'textures' (benchmarks/textures.py's patches, its defaults) or an "
                        "ImageFolder tree (with train/ and val/ trees, their split is used)")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    # Intensity windows (window, wso) need physical units: benchmarks/windows.py compares them on CT data.
    p.add_argument("--adapters", nargs="+", default=None, choices=list_adapters(),
                   help=f"default {' '.join(DEFAULT_ADAPTERS)}: every registered adapter but broadcast, which trains "
                        "bitwise like repeat (tests/test_compare.py checks it), and fold, repeat's function with "
                        "repeat's parameters (its runs differ by rounding only: a noise-floor arm; the GPU preset "
                        "adds it)")
    p.add_argument("--per-class", nargs="+", default=None,
                   help="training images per class along the curve: integers and/or 'all' (preset)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell, 0..N-1 (preset)")
    p.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=None,
                   help="add the random-init arm (repeat, --no-pretrained; the GPU preset has it)")
    p.add_argument("--stem-lr", nargs="*", default=[], metavar="ADAPTER=FACTOR",
                   help="extra arms: ADAPTER with its stem conv's learning rate times FACTOR (e.g. sum=3)")
    p.add_argument("--stats", default="model", choices=("model", "imagenet-synthetic"),
                   help="the model's own statistics, or Lite0 re-expressed for ImageNet's (synthetic)")
    p.add_argument("--metric", default=METRICS[0], choices=METRICS,
                   help="what the summary and the paragraph compare: the validation accuracy at the run's lowest "
                        "validation loss (the checkpoint early stopping keeps), the best of its evaluations (a "
                        "maximum over noisy evaluations: optimistic), or the last")
    p.add_argument("--gpu", action="store_true", help="the GPU preset: the same design, larger (PRESETS in the code)")
    g = p.add_argument_group("training (defaults: the preset)")
    g.add_argument("--img-size", nargs=2, type=int, default=None, metavar=("H", "W"))
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--epochs", type=float, default=None, help="step budget: this many epochs of the subset ...")
    g.add_argument("--min-steps", type=int, default=None, help="... but at least this many steps ...")
    g.add_argument("--max-steps", type=int, default=None, help="... and at most this many")
    g.add_argument("--eval-every", type=int, default=None, help="steps between validation passes")
    g.add_argument("--patience", type=int, default=None,
                   help="stop after this many validation passes without improvement (0: train to the budget)")
    g.add_argument("--min-delta", type=float, default=0.001,
                   help="the least decrease of the validation loss that counts as an improvement")
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate for a batch of 64, as train.py")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--drop-rate", type=float, default=0.2)
    g.add_argument("--crop-scale", type=float, default=0.8, help="smallest area of the random resized crop")
    g.add_argument("--val-split", type=float, default=0.2, help="for a folder without train/ and val/")
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=None)
    g.add_argument("--amp", default=None, choices=("none", "bf16", "fp16"))
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--jobs", type=int, default=None,
                   help="runs at once, in worker processes (default: one per CPU core, 1 thread each; on CUDA 1)")
    g.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (a sweep in chunks)")
    g.add_argument("--plan-only", action="store_true",
                   help="print the runs, their step budgets and the estimated time (a few seconds of probing), then "
                        "stop")
    g.add_argument("--report-only", action="store_true", help="only rewrite summary, results.md and the plot")
    g.add_argument("--output", default=None,
                   help="the sweep's folder (default: benchmarks/results/curve-DATA-STATS, e.g. curve-digits-model)")
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
    if args.seeds < 1 or args.eval_every < 1 or args.patience < 0 or args.epochs <= 0:
        raise SystemExit("--seeds, --eval-every and --epochs must be positive, --patience at least 0")
    if not 1 <= args.min_steps <= args.max_steps:
        raise SystemExit(f"--min-steps {args.min_steps} and --max-steps {args.max_steps}: need 1 <= min <= max")
    if args.output is None:
        kind = args.data if args.data in ("digits", "textures") else Path(args.data).name
        args.output = str(ROOT / "benchmarks" / "results" / f"curve-{kind}-{args.stats}")
    return args


def resolve_data(name: str) -> tuple[Path, dict | None]:
    """The folder ``--data`` names and, for the textures, the parameters it was made with."""
    if name == "digits":
        return prepare_digits(), None
    if name == "textures":
        root = textures.prepare_textures()
        return root, textures.read_params(root)
    return Path(name), textures.read_params(name)


# -- the plan and its time ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Speed:
    """What a run's parts take on this machine, measured by ``probe_speed``."""

    setup_s: float  # building and placing a model
    step_s: float  # a training step at --batch-size
    eval_img_s: float  # one validation image


def probe_speed(data: Data, cfg: argparse.Namespace, threads: int) -> Speed:
    """Time a model build, training steps (after two warm-up steps) and a validation pass, with ``threads``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        device = torch.device(cfg.device)
        start = time.perf_counter()
        model = build_model(Arm(REFERENCE, REFERENCE), cfg, len(data.classes)).to(device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        setup = time.perf_counter() - start
        n = min(cfg.batch_size, len(data.train_y))
        batch = Batch(data.train_x[:n], data.train_y[:n], [], 0)
        optimizer, scheduler, _ = make_optimizer_and_schedule(
            model, lr=cfg.lr, batch_size=n, world_size=1, weight_decay=cfg.weight_decay, epochs=1, steps_per_epoch=5,
            warmup_epochs=0)
        autocast, scaler = amp_setup(device, cfg.amp)
        kw = {"optimizer": optimizer, "scheduler": None, "criterion": nn.CrossEntropyLoss(), "device": device,
              "epoch": 0, "autocast": autocast, "scaler": scaler, "channels_last": cfg.channels_last,
              "progress": False, "augment": BatchAugment(cfg.img_size, crop_scale=cfg.crop_scale, seed=0)}
        train_one_epoch(model, [batch] * 2, **kw)
        steps = train_one_epoch(model, [batch] * 5, **kw)
        val = fixed_batches(data.val_x[:256], data.val_y[:256], 256)
        args = {"device": device, "num_classes": len(data.classes), "autocast": autocast,
                "channels_last": cfg.channels_last, "progress": False}
        evaluate(model, val, **args)
        start = time.perf_counter()
        evaluate(model, val, **args)  # its .item() waits for the device
        return Speed(setup, steps["seconds"] / 5, (time.perf_counter() - start) / len(val[0].targets))
    finally:
        torch.set_num_threads(old)


def run_seconds(spec: RunSpec, data: Data, cfg: argparse.Namespace, speed: Speed) -> float:
    """The most a run can take: every step of its budget, and an evaluation every ``--eval-every`` steps."""
    n = len(subset(data.train_y, spec.per_class, spec.seed))
    batch_size = min(cfg.batch_size, n)
    budget = step_budget(n, batch_size, cfg)
    step_s = speed.step_s * batch_size / cfg.batch_size  # a smaller batch (a tiny subset) is about as much faster
    return speed.setup_s + budget * step_s + budget / cfg.eval_every * len(data.val_y) * speed.eval_img_s


def describe_plan(todo: Sequence[RunSpec], data: Data, cfg: argparse.Namespace) -> str:
    sizes = list(dict.fromkeys(s.per_class for s in todo))
    budgets = []
    for pc in sizes:
        n = len(subset(data.train_y, pc, 0))
        budgets.append(f"{pc + '/class' if pc != 'all' else 'all'} ({n} images): "
                       f"{step_budget(n, min(cfg.batch_size, n), cfg)}")
    return (f"step budgets: {'; '.join(budgets)}; a validation pass ({len(data.val_y)} images) every "
            f"{cfg.eval_every} steps, a plateau after {cfg.patience} without improvement")


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
    root, args.data_params = resolve_data(args.data)
    args.data = str(root)
    if not args.plan_only:
        settings = check_sweep(output, args)

    arms = make_arms(args.adapters, args.scratch, args.stem_lr)
    done = {(r["arm"], r["per_class"], int(r["seed"])) for r in read_rows(output / "results.csv")}
    todo = [s for s in plan(arms, args.per_class, args.seeds) if s.key not in done]
    if args.max_runs is not None:
        todo = todo[: args.max_runs]
    data = load_data(root, args.img_size, args.val_split)
    print(f"{root}: {len(data.classes)} classes, {len(data.train_y)} train / {len(data.val_y)} val images, "
          f"{args.img_size[0]}x{args.img_size[1]}; {len(arms)} arms ({', '.join(a.label for a in arms)}) x "
          f"{len(args.per_class)} sizes x {args.seeds} seeds = {len(arms) * len(args.per_class) * args.seeds} runs; "
          f"{len(done)} done, {len(todo)} to run, {args.jobs} job(s) x {threads} thread(s)")
    print(describe_plan(plan(arms, args.per_class, 1), data, args))
    if todo:
        speed = probe_speed(data, args, threads)
        most = sum(run_seconds(spec, data, args, speed) for spec in todo) / min(args.jobs, len(todo))
        print(f"time: at most {most / 60:.1f} min for the {len(todo)} runs if every run trains to its budget; plateau "
              f"stops end most sooner (probed here: {speed.step_s * 1000:.0f} ms a step at batch {args.batch_size}, "
              f"{speed.eval_img_s * 1000:.2f} ms a validation image, {speed.setup_s:.1f} s a model, "
              f"{threads} thread(s); runs in parallel jobs share the machine, so take it as +-30%)", flush=True)
    if args.plan_only:
        return []
    env = environment(device, "float32" if args.amp == "none" else args.amp)
    where = env["device_name"]
    if device.type == "cpu":  # the threads the runs use, not this process's
        where = f"{where.rsplit(' (', 1)[0]} ({args.jobs} job(s) x {threads} thread(s))"
    extra = {"device": where, "commit": env["commit"]}
    start = time.perf_counter()

    def record(i: int, row: dict, eval_rows: list[dict]) -> None:
        row.update(extra)
        append_rows(output / "evals.csv", eval_rows, EVAL_COLUMNS)
        append_rows(output / "results.csv", [row], RESULT_COLUMNS)  # last: the run counts as done only now
        elapsed = time.perf_counter() - start
        left = elapsed / i * (len(todo) - i)
        print(f"[{i}/{len(todo)}, {elapsed:.0f}s, ~{left / 60:.0f} min left] {row['arm']:>10} "
              f"per_class={row['per_class']:>4} seed={row['seed']}: best {row['best_val_acc']:.4f} final "
              f"{row['final_val_acc']:.4f}, {row['stop']} at step {row['steps']} of {row['budget']} "
              f"({row['wall_s']:.1f}s, stem drift {row['stem_drift']:.3g})", flush=True)

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
