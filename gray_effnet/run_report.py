"""The run report: one self-contained HTML page a person opens after training, ``RUN/report.html``.

It holds the run's settings and data, the machine it ran on, loss and accuracy per epoch with the best epoch
marked, and the best checkpoint on the validation split: per-class precision and recall, the confusion matrix,
ROC curves, the 16 images with the highest loss, and class-activation maps of right and wrong predictions.
A multi-label run (a sigmoid per finding, labels 1, 0 or unknown) gets the same page for its findings: the macro
ROC AUC per epoch beside the loss and accuracy, the best epoch by the run's --select-by; per finding its ROC AUC,
average precision, threshold and prevalence, a 2x2 confusion at its threshold and its ROC curve; the 16 images of
highest binary cross-entropy (over their known labels) with their labels and predicted findings; and maps of each
image's most probable finding.
The figures are embedded as base64 PNG and also written beside the page (``RUN/report/*.png``); the page has
no script and loads nothing, so it opens offline and can be mailed.

Written by train.py after the last epoch, by ``train.py --evaluate`` (``eval_report.html``) and by
``python -m gray_effnet predict`` on labelled images (``<predictions>_report.html``); written again from the
run folder alone by ``python -m gray_effnet report RUN_DIR``, which evaluates ``best.safetensors`` on the
validation split that config.json describes. Needs the optional extra: ``pip install "gray_effnet[report]"``.
"""

import argparse
import base64
import csv
import dataclasses
import html
import importlib.util
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

import gray_effnet

from .cam import grad_cam, overlay
from .checkpoint import ADDED_COLUMNS, METRIC_COLUMNS, SELECT_BY, load_model
from .checkpoint import best_epoch as checkpoint_best_epoch
from .cli import resolve_device, table_options
from .engine import EvalResult, evaluate
from .errors import DataError, InputError
from .evaluation import evaluate_checkpoint, number_text, use_checkpoint_thresholds
from .files import atomic_write
from .folders import prepare_digits
from .metrics import roc_auc, roc_curve
from .model import GrayEfficientNet
from .sources import open_source
from .table_options import TableOptions

__all__ = ["REPORT_HINT", "RocCurve", "read_metrics", "report_after_training", "report_line", "report_run",
           "report_unavailable", "roc_curves", "single_label_roc", "write_report"]

REPORT_HINT = 'pip install "gray_effnet[report]"'
WORST = 16  # images in the highest-loss gallery
CAMS = 4  # right and wrong predictions, each, in the class-activation gallery
DPI = 100


def _missing_packages() -> str | None:
    """The report's optional package (matplotlib, the ``report`` extra) when it is not installed, or None.

    Looked up without importing it: matplotlib is imported when a report is drawn, so training runs without it.
    """
    return None if importlib.util.find_spec("matplotlib") else "matplotlib"


def report_unavailable() -> str | None:
    """None when the report can be written; else the one line to print that says how to get it."""
    missing = _missing_packages()
    return f"report: not written: it needs {missing}; {REPORT_HINT}" if missing else None


# -- numbers ------------------------------------------------------------------------------------------
@dataclass
class RocCurve:
    """One ROC curve: false and true positive rates at each threshold, and the area under it."""

    name: str
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float
    positives: int
    negatives: int


def roc_curves(scores: np.ndarray | Tensor, targets: np.ndarray | Tensor, mask: np.ndarray | Tensor | None = None,
               names: Sequence[str] | None = None) -> tuple[list[RocCurve], list[str]]:
    """An ROC curve per column: the scores of column k ranked against whether target k is 1.

    Fits single-label tasks (one-hot targets, one column per class) and multi-label ones (a 0/1 target per
    label), where ``mask`` says which labels are known.

    Args:
        scores: higher means more likely positive (probabilities, logits).
        targets: 1 for positive, 0 for negative.
        mask: True where the entry counts; default: all.
        names: a name per column; default: its index.

    Shape:
        - scores, targets, mask: (N, K)

    Returns:
        The curves, and for each column without both positives and negatives (no curve), a note saying so.
    """
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise InputError(f"scores and targets must both be (N, K); got {scores.shape} and {targets.shape}")
    mask = np.ones(scores.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != scores.shape:
        raise InputError(f"mask must be {scores.shape} like the scores; got {mask.shape}")
    names = [str(k) for k in range(scores.shape[1])] if names is None else list(names)
    curves, notes = [], []
    for k, name in enumerate(names):
        s, t = scores[mask[:, k], k], targets[mask[:, k], k].astype(bool)
        pos, neg = int(t.sum()), int((~t).sum())
        if pos == 0 or neg == 0:
            notes.append(f"{name}: no ROC curve, {pos} positive and {neg} negative images")
            continue
        fpr, tpr, _ = roc_curve(t, s)
        curves.append(RocCurve(name, fpr, tpr, roc_auc(t, s), pos, neg))
    return curves, notes


def single_label_roc(result: EvalResult, names: Sequence[str], max_classes: int = 12
                     ) -> tuple[list[RocCurve], list[str]]:
    """ROC of a single-label result: the second class against the first for 2 classes, else one-vs-rest."""
    labelled = np.array([t >= 0 for _, t, _, _ in result.predictions], dtype=bool)
    k = len(names)
    if k > max_classes:
        return [], [f"no ROC curves: one-vs-rest curves of {k} classes would not be readable (at most {max_classes})"]
    targets = np.zeros((len(labelled), k), dtype=np.int64)
    rows = np.flatnonzero(labelled)
    targets[rows, [result.predictions[i][1] for i in rows]] = 1
    mask = np.repeat(labelled[:, None], k, axis=1)
    probs = result.probs.numpy()
    if k == 2:  # one curve says it all: the first class's is the same curve mirrored
        curves, notes = roc_curves(probs[:, 1:], targets[:, 1:], mask[:, 1:], [f"{names[1]} (vs {names[0]})"])
        return curves, notes
    return roc_curves(probs, targets, mask, [f"{n} (vs rest)" for n in names])


def read_metrics(path: Path) -> tuple[list[dict[str, float]], list[str]]:
    """The rows of a ``metrics.csv`` as numbers, and notes on rows that could not be read (skipped)."""
    rows, notes = [], []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f), start=2):
            try:
                rows.append({k: float(row[k] if k in row or k not in ADDED_COLUMNS else "nan") for k in METRIC_COLUMNS})
            except (KeyError, TypeError, ValueError):
                notes.append(f"{path.name} line {i}: not a row of numbers in the columns {METRIC_COLUMNS}; skipped")
    return rows, notes


def best_epoch(history: Sequence[dict[str, float]], select_by: str = "acc") -> int | None:
    """The position of the row train.py saved as best by ``select_by`` (``checkpoint.SELECT_BY``: the first of the
    highest val_acc or val_auc, or of the lowest val_loss); None when that column has no number."""
    column = SELECT_BY[select_by][0]
    if all(math.isnan(r[column]) for r in history):
        return None
    return checkpoint_best_epoch(list(history), select_by)


def run_select_by(config: dict | None, task: str) -> str:
    """The metric that picked the run's best.safetensors: its --select-by, else train.py's default for the task."""
    args, resolved = (config or {}).get("args") or {}, (config or {}).get("resolved") or {}
    for value in (args.get("select_by"), resolved.get("select_by")):
        if value in SELECT_BY:
            return value
    return "auc" if task == "multi" else "acc"


# -- figures: matplotlib's object interface, the Agg canvas, no pyplot state ------------------------------
def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # the optional [report] extra

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def curves_figure(history: Sequence[dict[str, float]], label_smoothing: float | None = None, select_by: str = "acc",
                  multi: bool = False):
    """Loss and accuracy per epoch, train and validation; multi-label adds the validation macro ROC AUC. The best
    epoch by ``select_by`` is starred."""
    panels = [("loss", "loss"), ("acc", "accuracy")]
    if multi:
        panels = [("loss", "loss"), ("acc", "accuracy per label at probability 0.5"), ("auc", "macro ROC AUC")]
    fig = _figure(10 if len(panels) == 2 else 13.5, 3.6)
    axes = fig.subplots(1, len(panels))
    epochs = [int(r["epoch"]) for r in history]
    best = best_epoch(history, select_by)
    smoothing = f", label smoothing {label_smoothing}" if label_smoothing else ""
    for ax, (key, title) in zip(axes, panels):
        if key != "auc":  # metrics.csv has no training AUC
            train_label = f"train{smoothing}" if key == "loss" else "train"
            ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", ms=3, label=train_label)
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", ms=3, label="validation",
                color="C1" if key == "auc" else None)
        if best is not None:
            ax.axvline(epochs[best], color="0.5", ls="--", lw=1)
            ax.plot([epochs[best]], [history[best][f"val_{key}"]], "*", ms=14, color="C3",
                    label=f"best epoch ({epochs[best]})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(epochs) < 12:
            ax.set_xticks(epochs)
        if key != "loss":
            ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    return fig


def confusion_figure(confusion: Tensor, names: Sequence[str]):
    k = len(names)
    side = min(max(1.5 + 0.6 * k, 4.0), 12.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    counts = confusion.double().numpy()
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # each true class's row sums to 1
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if k <= 20:
        for t in range(k):
            for p in range(k):
                n = int(counts[t, p])
                ax.text(p, t, f"{n}\n{rates[t, p]:.0%}" if n else "0", ha="center", va="center",
                        fontsize=8 if k <= 10 else 6, color="white" if rates[t, p] > 0.5 else "black" if n else "0.6")
    ticks = range(k)
    ax.set_xticks(ticks, [n[:12] for n in names], rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
    ax.set_yticks(ticks, [n[:12] for n in names])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    return fig


def roc_figure(curves: Sequence[RocCurve]):
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1, label="chance (AUC 0.5)")
    for c in curves:
        ax.plot(c.fpr, c.tpr, lw=1.5, label=f"{c.name}: AUC {c.auc:.3f}")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def gallery_figure(rows: Sequence[Sequence[tuple[np.ndarray, str]]], columns: int, row_titles=None):
    """Tiles in rows: (image, caption), the image (H, W) gray in [0, 1] or (H, W, 3) uint8.

    Every tile is an image on one axes that spans the figure, placed in inches: an axes per tile (with its ticks,
    even hidden) cost about 4 times as much to build and draw. Each cell is 2.1 x 2.5 inches: a two-line caption
    (0.45 inch), then the image, as large as fits with its aspect ratio kept.
    """
    cell_w, cell_h, caption_h, gap = 2.1, 2.5, 0.45, 0.08
    left = 0.3 if row_titles else 0.0
    width, height = cell_w * columns + left, cell_h * len(rows)
    fig = _figure(width, height, layout=None)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    box_w, box_h = cell_w - gap, cell_h - caption_h - 0.05
    for r, row in enumerate(rows):
        top = r * cell_h + caption_h  # the images' top edge, in inches from the figure's top
        for c, (img, caption) in enumerate(row[:columns]):
            scale = min(box_w / img.shape[1], box_h / img.shape[0])
            centre, w, h = left + (c + 0.5) * cell_w, img.shape[1] * scale, img.shape[0] * scale
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto",
                      extent=(centre - w / 2, centre + w / 2, top + h, top))
            ax.text(centre, top - 0.04, caption, ha="center", va="bottom", fontsize=8)
        if row_titles:
            ax.text(left - 0.08, top + box_h / 2, row_titles[r], rotation=90, va="center", ha="right", fontsize=10,
                    fontweight="bold")
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)  # inches, downwards
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays figsize * DPI
    return buf.getvalue()


# -- the page -----------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, attrs: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table{attrs}>{head}{body}</table>"


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;
padding:0 1em;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .5em;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right}
img{max-width:100%;height:auto;border:1px solid #eee}figure{margin:.5em 0}
figcaption,.note{font-size:.85em;color:#555}nav a{margin-right:1em}code{font-size:.9em}
details{margin:.5em 0}pre{font-size:.8em;background:#f8f8f8;padding:.5em;overflow-x:auto}
"""

SETTINGS = ("model", "adapter", "pretrained", "weights", "img_size", "intensity", "windows", "epochs", "batch_size",
            "lr", "weight_decay", "warmup_epochs", "label_smoothing", "drop_rate", "clip_grad", "crop_scale", "hflip",
            "rotate", "amp", "seed", "val_split", "data")


MULTI_SETTINGS = ("labels", "label_column", "label_columns", "label_sep", "uncertain", "group_column", "split_column",
                  "pos_weight")


class _Page:
    """The HTML being written, and the figure files beside it."""

    def __init__(self, folder: Path, stem: str) -> None:
        self.folder, self.stem, self.parts, self.files = folder, stem, [], []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, name: str, fig, caption: str) -> None:
        data = _png(fig)
        path = self.folder / f"{name}.png"
        with atomic_write(path) as tmp:
            tmp.write_bytes(data)
        self.files.append(path)
        w, h = (round(v * DPI) for v in fig.get_size_inches())
        src = base64.b64encode(data).decode("ascii")
        self.add(f'<figure><img src="data:image/png;base64,{src}" width="{w}" height="{h}" alt="{_e(caption)}">'
                 f"<figcaption>{_e(caption)} (also <code>{_e(self.stem)}/{name}.png</code>)</figcaption></figure>")


def _dataset_paths(dataset: Dataset) -> list[str]:
    """The source path of each item of a ``GrayImageFolder`` (its samples) or a ``PackedDataset`` (its paths)."""
    paths = getattr(dataset, "paths", None)
    return list(paths) if paths is not None else [s[0] for s in dataset.samples]


def _images(dataset: Dataset, paths: Sequence[str]) -> dict[str, Tensor]:
    """The (1, H, W) float images in [0, 1] of ``paths``, as the model was given them (resized)."""
    index = {p: i for i, p in enumerate(_dataset_paths(dataset))}
    out = {}
    for p in paths:
        item = dataset[index[p]] if p in index else None
        if item is not None:
            img = item[0]
            out[p] = img.float().div(255) if img.dtype == torch.uint8 else img.float()
    return out


def _settings_section(page: _Page, config: dict | None, data_note: str | None, result: EvalResult,
                      names: Sequence[str]) -> None:
    page.add('<section id="settings"><h2>Run settings and data</h2>')
    args = (config or {}).get("args") or {}
    resolved = (config or {}).get("resolved") or {}
    if args and result.task == "multi":  # no label smoothing (single-label only); the table, the weights, the metric
        keys = [k for k in SETTINGS if k != "label_smoothing"] + list(MULTI_SETTINGS)
        rows = [(k, args[k]) for k in keys if k in args and args[k] is not None and args[k] != []]
        page.add(_table(rows + [("select_by", run_select_by(config, "multi"))]))
    elif args:
        page.add(_table([(k, args[k]) for k in SETTINGS if k in args and args[k] is not None]))
    if resolved.get("command"):
        page.add(f"<p>Command: <code>{_e(resolved['command'])}</code></p>")
    if data_note:
        page.add(f"<p>Data: {_e(data_note.removeprefix('data: '))}</p>")
    elif resolved.get("data"):
        page.add(f"<p>Data: {_e(resolved['data'])}</p>")
    if result.task == "multi":
        _settings_counts_multi(page, result, names)
    else:
        per_class = result.confusion.sum(1).tolist()
        page.add(f"<p>{len(names)} classes; validation images per class:</p>")
        page.add(_table([per_class], header=names))
    if config:
        page.add("<details><summary>config.json</summary><pre>" + _e(json.dumps(config, indent=2)) + "</pre></details>")
    page.add("</section>")
    page.add('<section id="device"><h2>Where it ran</h2>')
    if resolved:
        versions = (config or {}).get("versions") or {}
        rows = [("device", f"{resolved.get('device', '?')}: {resolved.get('device_name', '?')}"),
                ("processes", resolved.get("world_size", "?")),
                ("CPU threads per process", resolved.get("threads", "?")),
                ("autocast", args.get("amp", "?")), ("channels_last", resolved.get("channels_last", "?")),
                ("commit", resolved.get("commit", "?")),
                ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()))]
        page.add(_table(rows))
    else:
        page.add('<p class="note">No config.json beside the weights: the training run is not known.</p>')
    page.add("</section>")


SELECTED = {"acc": "highest validation accuracy", "auc": "highest validation ROC AUC", "loss": "lowest validation loss"}


def _curves_section(page: _Page, run_dir: Path | None, config: dict | None, bar, task: str = "single") -> None:
    multi = task == "multi"
    page.add('<section id="curves"><h2>' + ("Loss, accuracy and ROC AUC" if multi else "Loss and accuracy")
             + " per epoch</h2>")
    path = run_dir / "metrics.csv" if run_dir is not None else None
    history, notes = read_metrics(path) if path is not None and path.is_file() else ([], [])
    if history:
        select_by = run_select_by(config, task)
        best = best_epoch(history, select_by)
        if multi:  # label smoothing is for single-label data: train.py does not apply it to findings
            page.figure("curves", curves_figure(history, None, select_by, multi=True),
                        "Training and validation loss and accuracy per known label (at probability 0.5), and the "
                        f"validation macro ROC AUC over the findings; the star marks the best epoch "
                        f"({SELECTED[select_by]}: --select-by {select_by}), whose weights are best.safetensors. The "
                        "loss is the binary cross-entropy per known label; the validation loss is without "
                        "--pos-weight.")
        else:
            smoothing = ((config or {}).get("args") or {}).get("label_smoothing")
            page.figure("curves", curves_figure(history, smoothing, select_by),
                        "Training and validation loss and accuracy; the star marks the best epoch "
                        f"({SELECTED[select_by]}), whose weights are best.safetensors. The validation loss is the "
                        "cross-entropy without label smoothing.")
        if best is not None:
            r = history[best]
            if multi:
                page.add(f"<p>Best epoch {int(r['epoch'])} of {len(history)} by validation {select_by}: macro ROC AUC "
                         f"{number_text(r['val_auc'], 4)}, accuracy per label {r['val_acc']:.4f}, loss "
                         f"{r['val_loss']:.4f}.</p>")
            else:
                page.add(f"<p>Best epoch {int(r['epoch'])} of {len(history)}: validation accuracy "
                         f"{r['val_acc']:.4f}, loss {r['val_loss']:.4f}"
                         + (f" (selected by validation {select_by})" if select_by != "acc" else "") + ".</p>")
    else:
        page.add(f'<p class="note">No metrics.csv in {_e(run_dir)}: no training history to draw.</p>')
    for note in notes:
        page.add(f'<p class="note">{_e(note)}</p>')
    bar.update()
    page.add("</section>")


def _evaluation_section(page: _Page, result: EvalResult, names: Sequence[str], what: str, bar) -> None:
    total = int(result.confusion.sum())
    page.add(f'<section id="evaluation"><h2>Evaluation: {_e(what)}</h2>')
    page.add(f"<p>Accuracy <b>{result.acc:.4f}</b> on {total} labelled images, loss {result.loss:.4f}"
             + (f"; {result.skipped} unreadable skipped" if result.skipped else "") + ".</p>")
    precision, recall = result.per_class()
    fmt = lambda v: "n/a" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
    page.add(_table([(n, fmt(p), fmt(r), int(c)) for n, p, r, c in
                     zip(names, precision.tolist(), recall.tolist(), result.confusion.sum(1).tolist())],
                    header=("class", "precision", "recall", "images")))
    page.add("</section>")
    page.add('<section id="confusion"><h2>Confusion matrix</h2>')
    page.figure("confusion", confusion_figure(result.confusion, names),
                "Rows: true class, columns: predicted class. Each cell: the count, and the fraction of its row.")
    rows = [[n, *(int(v) for v in result.confusion[i])] for i, n in enumerate(names)]
    page.add("<details><summary>counts as a table</summary>"
             + _table(rows, header=("true \\ predicted", *names), attrs=' id="confusion-counts"') + "</details>")
    bar.update()
    page.add("</section>")
    page.add('<section id="roc"><h2>ROC curves</h2>')
    curves, notes = single_label_roc(result, names)
    if curves:
        page.figure("roc", roc_figure(curves),
                    "Receiver operating characteristic from the softmax probabilities"
                    + (": the second class as positive." if len(names) == 2 else ", each class against the rest."))
        page.add(_table([(c.name, f"{c.auc:.4f}", c.positives, c.negatives) for c in curves],
                        header=("curve", "AUC", "positives", "negatives"), attrs=' id="auc"'))
    for note in notes:
        page.add(f'<p class="note">{_e(note)}</p>')
    bar.update()
    page.add("</section>")


def _worst_section(page: _Page, result: EvalResult, names: Sequence[str], dataset: Dataset | None, bar) -> None:
    page.add(f'<section id="worst"><h2>The {WORST} images with the highest loss</h2>')
    losses = result.losses.numpy()
    order = [i for i in np.argsort(-np.nan_to_num(losses, nan=-np.inf), kind="stable") if not math.isnan(losses[i])]
    worst = order[:WORST]
    images = _images(dataset, [result.predictions[i][0] for i in worst]) if dataset is not None else {}
    tiles, rows = [], []
    for i in worst:
        path, target, pred, prob = result.predictions[i]
        rows.append((path, names[target], names[pred], f"{prob:.3f}", f"{float(result.probs[i, target]):.3f}",
                     f"{losses[i]:.4f}"))
        if path in images:
            tiles.append((images[path][0].numpy(), f"true {names[target]}\npred {names[pred]} ({prob:.2f})"))
    _end_worst_section(page, tiles, rows, ("path", "true", "predicted", "p(predicted)", "p(true)", "loss"), bar,
                       "Highest cross-entropy first: the true class, the predicted class and its probability. The "
                       "images as the model saw them (resized).")


def _end_worst_section(page: _Page, tiles: list, rows: list, header: Sequence[str], bar, caption: str) -> None:
    """The worst-loss gallery (4 a row), its table, and the section's end: one layout for either task."""
    if tiles:
        columns = 4
        page.figure("worst", gallery_figure([tiles[r:r + columns] for r in range(0, len(tiles), columns)], columns),
                    caption)
    page.add(_table(rows, header=header, attrs=' id="worst-table"'))
    bar.update()
    page.add("</section>")


def _map_note(feature_size: Sequence[int], input_size: Sequence[int], what: str) -> str:
    """What a map of this resolution can say: which part of the image, or nothing at all when it is 1x1."""
    (h, w), (ih, iw) = feature_size, input_size
    if h * w == 1:
        return (f"The last feature map is 1x1 for {ih}x{iw} inputs, so these maps have no detail: red where the "
                f"{what} has positive evidence, blue where it has none. A larger --img-size gives a finer map.")
    return (f"The last feature map is {h}x{w} for {ih}x{iw} inputs: each of its cells covers about "
            f"{ih // h}x{iw // w} pixels, so the map says which part of the image, not which pixels.")


def _start_cam_section(page: _Page, model: GrayEfficientNet | None, dataset: Dataset | None, bar) -> bool:
    """Open the maps' section; False (and the section closed with a note) when there is nothing to draw them from."""
    page.add('<section id="cam"><h2>Class-activation maps</h2>')
    if model is None or dataset is None:
        page.add('<p class="note">No model or images at hand: no maps.</p></section>')
        bar.update()
        return False
    return True


def _cam_section(page: _Page, result: EvalResult, names: Sequence[str], model: GrayEfficientNet | None,
                 dataset: Dataset | None, bar) -> None:
    if not _start_cam_section(page, model, dataset, bar):
        return
    preds = result.predictions
    correct = sorted((i for i, p in enumerate(preds) if p[1] >= 0 and p[1] == p[2]), key=lambda i: -preds[i][3])
    chosen, seen = [], set()
    for i in correct:  # the most confident right answer of each class, classes in turn
        if preds[i][1] not in seen:
            seen.add(preds[i][1])
            chosen.append(i)
        if len(chosen) == CAMS:
            break
    losses = result.losses.numpy()
    wrong = sorted((i for i, p in enumerate(preds) if p[1] >= 0 and p[1] != p[2]), key=lambda i: -losses[i])[:CAMS]
    images = _images(dataset, [preds[i][0] for i in chosen + wrong])
    rows, titles, note = [], [], ""
    device = next(model.parameters()).device
    for title, picked in (("right", chosen), ("wrong", wrong)):
        picked = [i for i in picked if preds[i][0] in images]
        if not picked:
            continue
        batch = torch.stack([images[preds[i][0]] for i in picked]).to(device)
        cam = grad_cam(model, batch)
        row = []
        for i, img, m in zip(picked, batch.cpu(), cam.maps.cpu()):
            _, target, pred, prob = preds[i]
            row += [(img[0].numpy(), f"true {names[target]}"),
                    (overlay(img[0].numpy(), m.numpy()), f"map of {names[pred]} ({prob:.2f})")]
        rows.append(row)
        titles.append(title)
        note = _map_note(cam.raw.shape[-2:], batch.shape[-2:], "class")
    if rows:
        page.figure("cam", gallery_figure(rows, 2 * CAMS, titles),
                    "Grad-CAM of the predicted class (red: most evidence), computed through the model's own gray "
                    "stem. Top: right predictions, the most confident of different classes; bottom: wrong ones, "
                    "highest loss first.")
        page.add(f'<p class="note">{_e(note)}</p>')
    else:
        page.add('<p class="note">No images to map.</p>')
    bar.update()
    page.add("</section>")


# -- multi-label: a sigmoid per finding, labels 1, 0 or unknown (NaN), a threshold per finding ---------------
MAX_PANELS = 40  # findings drawn one small panel each (confusion, ROC); with more, the tables only


def threshold_confusion(result: EvalResult) -> np.ndarray:
    """Multi-label: each finding's known labels counted by label (rows: 0, 1) and by prediction at the finding's
    threshold (columns: absent, present), as ``EvalResult.present`` calls it (not at 0.5 like ``confusion``).

    Shape:
        - output: (K, 2, 2) int64
    """
    targets, present = result.targets.numpy(), result.present().numpy()
    out = np.zeros((targets.shape[1], 2, 2), dtype=np.int64)
    for k in range(targets.shape[1]):
        known = ~np.isnan(targets[:, k])
        label, called = targets[known, k] > 0.5, present[known, k]
        for t in (0, 1):
            for p in (0, 1):
                out[k, t, p] = int(np.sum((label == t) & (called == p)))
    return out


def _panels(count: int, width: float, height: float, columns: int = 5):
    """A figure of ``count`` small axes, ``columns`` to a row; the spare ones hidden."""
    columns = min(count, columns)
    rows = math.ceil(count / columns)
    fig = _figure(width * columns, height * rows)
    axes = np.asarray(fig.subplots(rows, columns, squeeze=False)).ravel()
    for ax in axes[count:]:
        ax.set_axis_off()
    return fig, axes[:count]


def finding_confusion_figure(confusion: np.ndarray, names: Sequence[str], thresholds: Sequence[float]):
    """A 2x2 confusion matrix per finding: (K, 2, 2) counts, rows the label (0, 1), columns the prediction."""
    fig, axes = _panels(len(names), 2.6, 2.6)
    for ax, name, counts, threshold in zip(axes, names, confusion, thresholds):
        rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)  # each label's row sums to 1
        ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
        for t in range(2):
            for p in range(2):
                n = int(counts[t, p])
                ax.text(p, t, f"{n}\n{rates[t, p]:.0%}" if n else "0", ha="center", va="center", fontsize=9,
                        color="white" if rates[t, p] > 0.5 else "black" if n else "0.6")
        ax.set_xticks([0, 1], ["absent", "present"], fontsize=8)
        ax.set_yticks([0, 1], ["0", "1"], fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("label", fontsize=8)
        ax.set_title(f"{name[:18]} (p >= {threshold:.3f})", fontsize=9)
    return fig


def finding_roc_figure(curves: Sequence[RocCurve], points: dict[str, tuple[float, float]] | None = None):
    """One small ROC panel per finding, its AUC in the title; ``points``: name -> (FPR, TPR) at the threshold."""
    fig, axes = _panels(len(curves), 2.7, 2.8)
    for ax, c in zip(axes, curves):
        ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
        ax.plot(c.fpr, c.tpr, lw=1.5, color="C0")
        if points and c.name in points:
            ax.plot(*points[c.name], "o", ms=6, color="C3", label="at the threshold")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{c.name[:18]}: AUC {c.auc:.3f}", fontsize=9)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=7)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.grid(alpha=0.3)
    return fig


def _short(text: str, width: int = 26) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _multi_arrays(result: EvalResult) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scores (N, K), targets (N, K) with NaN, known (N, K) and present (N, K) at the thresholds, as numpy."""
    targets = result.targets.numpy()
    return result.scores.numpy(), targets, ~np.isnan(targets), result.present().numpy()


def _settings_counts_multi(page: _Page, result: EvalResult, names: Sequence[str]) -> None:
    _, targets, known, _ = _multi_arrays(result)
    positive = (known & (np.nan_to_num(targets) > 0.5)).sum(0)
    rows = [["positive", *positive.tolist()], ["negative", *(known.sum(0) - positive).tolist()],
            ["unknown", *(~known).sum(0).tolist()]]
    page.add(f"<p>Multi-label: {len(names)} findings, a sigmoid each; {len(result.paths)} images evaluated, their "
             "labels per finding:</p>")
    page.add(_table(rows, header=("label", *names), attrs=' id="label-counts"'))


def _evaluation_section_multi(page: _Page, result: EvalResult, names: Sequence[str], what: str, bar) -> None:
    m = result.findings
    k = len(names)
    undefined = [n for j, n in enumerate(names) if m.why_undefined(j) is not None]
    page.add(f'<section id="evaluation"><h2>Evaluation: {_e(what)}</h2>')
    page.add(f"<p>Macro ROC AUC <b>{number_text(result.auc, 4)}</b>, macro average precision "
             f"{number_text(result.ap, 4)} "
             f"over {k - len(undefined)} of {k} findings"
             + (f" ({_e(', '.join(undefined))}: without both labels among the known ones, left out)" if undefined
                else "")
             + f"; {len(result.paths)} images, {int(result.confusion.sum())} known labels, loss {result.loss:.4f} "
             f"(binary cross-entropy per known label), accuracy per label at probability 0.5 "
             f"{number_text(result.acc, 4)}"
             + (f"; {result.skipped} unreadable skipped" if result.skipped else "") + ".</p>")
    rows = []
    for j, name in enumerate(names):
        why = m.why_undefined(j)
        rows.append((name, number_text(m.auc[j], 4) if why is None else f"n/a ({why})", number_text(m.ap[j], 4),
                     f"{result.thresholds[j]:.3f}", number_text(m.prevalence[j]), int(m.labelled[j])))
    page.add(_table(rows, header=("finding", "ROC AUC", "average precision", "threshold", "prevalence",
                                  "labels known"), attrs=' id="findings"'))
    page.add('<p class="note">Over each finding\'s known labels; the threshold is the probability at or above which '
             "the finding is called present (below: the confusion counts and the predicted findings).</p>")
    page.add("</section>")
    page.add('<section id="confusion"><h2>Confusion at each finding\'s threshold</h2>')
    confusion = threshold_confusion(result)
    if 0 < k <= MAX_PANELS:
        page.figure("confusion", finding_confusion_figure(confusion, names, result.thresholds),
                    "One 2x2 matrix per finding over its known labels: rows the label (0, 1), columns the prediction "
                    "at the finding's threshold. Each cell: the count, and the fraction of its row.")
    elif k:
        page.add(f'<p class="note">{k} findings: no figure (at most {MAX_PANELS}); the counts are below.</p>')
    fmt = lambda a, b: number_text(a / b) if b else "n/a"  # noqa: E731
    rows = [(n, f"{t:.3f}", *(int(v) for v in c.ravel()), fmt(c[1, 1], c[1].sum()), fmt(c[0, 0], c[0].sum()))
            for n, t, c in zip(names, result.thresholds, confusion)]
    page.add("<details><summary>counts as a table</summary>"
             + _table(rows, header=("finding", "threshold", "true negative", "false positive", "false negative",
                                    "true positive", "sensitivity", "specificity"), attrs=' id="confusion-counts"')
             + "</details>")
    bar.update()
    page.add("</section>")
    page.add('<section id="roc"><h2>ROC curves per finding</h2>')
    scores, targets, known, _ = _multi_arrays(result)
    curves, notes = roc_curves(scores, np.nan_to_num(targets) > 0.5, known, names)
    if curves and len(curves) <= MAX_PANELS:
        at = {n: (c[0, 1] / max(c[0].sum(), 1), c[1, 1] / max(c[1].sum(), 1)) for n, c in zip(names, confusion)}
        page.figure("roc", finding_roc_figure(curves, at),
                    "Receiver operating characteristic of each finding from its sigmoid probability, over its known "
                    "labels; the dot is the finding's threshold.")
    elif curves:
        page.add(f'<p class="note">{len(curves)} curves: no figure (at most {MAX_PANELS}); their AUC is below.</p>')
    if curves:
        page.add(_table([(c.name, f"{c.auc:.4f}", c.positives, c.negatives) for c in curves],
                        header=("finding", "AUC", "positives", "negatives"), attrs=' id="auc"'))
    for note in notes:
        page.add(f'<p class="note">{_e(note)}</p>')
    bar.update()
    page.add("</section>")


def _worst_section_multi(page: _Page, result: EvalResult, names: Sequence[str], dataset: Dataset | None,
                         bar) -> None:
    page.add(f'<section id="worst"><h2>The {WORST} images with the highest loss</h2>')
    losses = result.losses.numpy()
    scores, targets, known, present = _multi_arrays(result)
    order = [i for i in np.argsort(-np.nan_to_num(losses, nan=-np.inf), kind="stable") if not math.isnan(losses[i])]
    worst = order[:WORST]
    images = _images(dataset, [result.paths[i] for i in worst]) if dataset is not None else {}
    tiles, rows = [], []
    for i in worst:
        path = result.paths[i]
        labels = ", ".join(f"{n} {int(targets[i, k] > 0.5) if known[i, k] else '?'}" for k, n in enumerate(names))
        found = [n for k, n in enumerate(names) if present[i, k]]
        rows.append((path, labels, ", ".join(found) or "none",
                     ", ".join(f"{n} {scores[i, k]:.3f}" for k, n in enumerate(names)), f"{losses[i]:.4f}"))
        if path in images:
            true = [n for k, n in enumerate(names) if known[i, k] and targets[i, k] > 0.5]
            unknown = int((~known[i]).sum())
            tiles.append((images[path][0].numpy(),
                          _short("true " + ("|".join(true) or "none") + (f" +{unknown}?" if unknown else "")) + "\n"
                          + _short("pred " + ("|".join(found) or "none"))))
    _end_worst_section(page, tiles, rows, ("path", "labels (? unknown)", "predicted findings", "probabilities", "loss"),
                       bar, "Highest binary cross-entropy first (the mean over the image's known labels): the findings "
                       "labelled present (+n?: n unknown) and those predicted present at their thresholds. The images "
                       "as the model saw them (resized).")


def _cam_section_multi(page: _Page, result: EvalResult, names: Sequence[str], model: GrayEfficientNet | None,
                       dataset: Dataset | None, bar) -> None:
    if not _start_cam_section(page, model, dataset, bar):
        return
    scores, targets, known, _ = _multi_arrays(result)
    top = scores.argmax(1) if len(scores) else np.zeros(0, dtype=np.int64)  # each image's most probable finding
    rows_of = {}
    for title, label in (("labelled 1", 1), ("labelled 0", 0)):
        candidates = sorted((i for i in range(len(top)) if known[i, top[i]] and int(targets[i, top[i]] > 0.5) == label),
                            key=lambda i: -scores[i, top[i]])
        chosen, seen = [], set()
        for i in candidates:  # the most probable of each finding first, findings in turn; then the next most probable
            if top[i] not in seen:
                seen.add(top[i])
                chosen.append(i)
        chosen += [i for i in candidates if i not in chosen]
        rows_of[title] = chosen[:CAMS]
    images = _images(dataset, [result.paths[i] for picked in rows_of.values() for i in picked])
    rows, titles, note = [], [], ""
    device = next(model.parameters()).device
    for title, picked in rows_of.items():
        picked = [i for i in picked if result.paths[i] in images]
        if not picked:
            continue
        batch = torch.stack([images[result.paths[i]] for i in picked]).to(device)
        cam = grad_cam(model, batch, torch.as_tensor(top[picked], device=device))
        row = []
        for i, img, m in zip(picked, batch.cpu(), cam.maps.cpu()):
            name = names[top[i]]
            row += [(img[0].numpy(), _short(f"{name}: label {int(targets[i, top[i]] > 0.5)}")),
                    (overlay(img[0].numpy(), m.numpy()), _short(f"map of {name} ({scores[i, top[i]]:.2f})"))]
        rows.append(row)
        titles.append(title)
        note = _map_note(cam.raw.shape[-2:], batch.shape[-2:], "finding")
    if rows:
        page.figure("cam", gallery_figure(rows, 2 * CAMS, titles),
                    "Grad-CAM of each image's most probable finding (red: most evidence), computed through the "
                    "model's own gray stem. Top: images whose label for that finding is 1, the most probable first, "
                    "different findings first; bottom: images whose label for it is 0 (evidence for a finding that "
                    "is absent), the most probable first.")
        page.add(f'<p class="note">{_e(note)}</p>')
    else:
        page.add('<p class="note">No images whose most probable finding has a known label: no maps.</p>')
    bar.update()
    page.add("</section>")


def write_report(
    path: str | os.PathLike,
    *,
    result: EvalResult,
    class_names: Sequence[str],
    model: GrayEfficientNet | None = None,
    dataset: Dataset | None = None,
    run_dir: str | os.PathLike | None = None,
    data_note: str | None = None,
    what: str = "the best checkpoint on the validation split",
    progress: bool = True,
) -> Path:
    """Write the report page ``path`` and its figures in the folder beside it named like it (``report/``).

    Args:
        path: the page, e.g. ``RUN/report.html``.
        result: ``evaluate(..., keep_predictions=True)`` of the images the report is about. A multi-label one
            (``task="multi"``) gets sections of its own: the labels per finding, a table of ROC AUC, average
            precision, threshold and prevalence per finding, a 2x2 confusion and an ROC curve per finding at its
            threshold (``result.thresholds``), the images of highest binary cross-entropy with their labels and
            predicted findings, and maps of each image's most probable finding.
        class_names: the model's classes (or findings), in the order of its outputs.
        model: for the class-activation maps (unwrapped); none without it.
        dataset: the images ``result`` was computed on (``GrayImageFolder`` or ``PackedDataset``), for the
            galleries; none without it.
        run_dir: the training run (``config.json``, ``metrics.csv``): settings, device and curves.
        data_note: a line about the data (train.py's ``data:`` line).
        what: what was evaluated, for the heading.
    """
    multi = result.task == "multi"
    if result.losses is None or (result.scores is None or result.thresholds is None if multi else result.probs is None):
        raise InputError("write_report needs an EvalResult of evaluate(..., keep_predictions=True)")
    path = Path(path)
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    run_dir = Path(run_dir) if run_dir is not None else None
    config = None
    if run_dir is not None and (run_dir / "config.json").is_file():
        config = json.loads((run_dir / "config.json").read_text())
        config = config if isinstance(config, dict) else None
    start = time.perf_counter()
    page = _Page(folder, folder.name)
    bar = tqdm(total=5, desc="report", unit="figure", leave=False, disable=None if progress else True)
    _settings_section(page, config, data_note, result, class_names)
    _curves_section(page, run_dir, config, bar, result.task)
    if multi:
        _evaluation_section_multi(page, result, class_names, what, bar)
        _worst_section_multi(page, result, class_names, dataset, bar)
        _cam_section_multi(page, result, class_names, model, dataset, bar)
    else:
        _evaluation_section(page, result, class_names, what, bar)
        _worst_section(page, result, class_names, dataset, bar)
        _cam_section(page, result, class_names, model, dataset, bar)
    bar.close()
    title = f"gray_effnet report: {run_dir.name if run_dir is not None else path.stem}"
    nav = "".join(f'<a href="#{s}">{t}</a>' for s, t in (
        ("settings", "settings"), ("device", "device"), ("curves", "curves"), ("evaluation", "evaluation"),
        ("confusion", "confusion"), ("roc", "ROC"), ("worst", "highest loss"), ("cam", "activation maps")))
    regenerate = f"python -m gray_effnet report {run_dir}" if run_dir is not None and config else ""
    text = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1><nav>{nav}</nav>" + "\n".join(page.parts)
            + f'<footer><p class="note">Written by gray_effnet {gray_effnet.__version__} on '
            f"{time.strftime('%Y-%m-%d %H:%M')} in {time.perf_counter() - start:.1f}s"
            + (f"; write it again with <code>{_e(regenerate)}</code>" if regenerate else "")
            + ".</p></footer></body></html>\n")
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def report_line(write: Callable[[], Path]) -> str:
    """Run ``write`` if the report's packages are there; the line to print: its path and time, or how to get it."""
    missing = report_unavailable()
    if missing:
        return missing
    start = time.perf_counter()
    path = write()
    return f"report: {path} ({time.perf_counter() - start:.1f}s)"


def report_after_training(output: Path, loader, dataset: Dataset, *, device: torch.device, class_names: Sequence[str],
                          result: EvalResult | None = None, autocast: Callable = nullcontext,
                          data_note: str | None = None, progress: bool = True) -> str | None:
    """train.py's report of ``best.safetensors`` on the validation split, written by the first process to
    ``OUTPUT/report.html``.

    Args:
        result: the best epoch's validation with its predictions (``keep_predictions``), when this run made it:
            every process holds it, gathered, and nothing is evaluated again. Else (a run resumed after its best
            epoch) every process evaluates ``best.safetensors`` on its share of ``loader``.

    Returns:
        The line to print (on the first process), or None on the others.
    """
    primary = not dist.is_initialized() or dist.get_rank() == 0
    missing = report_unavailable()
    if missing:
        return missing if primary else None
    start = time.perf_counter()
    if dist.is_initialized():
        dist.barrier()  # the first process wrote best.safetensors
    best = output / "best.safetensors"
    there = [best.is_file()]  # rank 0's answer for every rank: the others must not skip the collectives it enters
    if dist.is_initialized():
        dist.broadcast_object_list(there, src=0)
    if not there[0]:  # a resumed run whose best epoch was written elsewhere
        return f"report: not written: {best} does not exist" if primary else None
    if result is not None and not primary:
        return None
    model = load_model(best).to(device)  # for the class-activation maps (a twentieth of a second)
    if result is None:
        result = evaluate(model, loader, device=device, num_classes=len(class_names), task=model.task,
                          autocast=autocast, keep_predictions=True, progress=progress and sys.stderr.isatty(),
                          desc="report: evaluate best")
    use_checkpoint_thresholds(result, model, log=lambda line: None)
    if not primary:
        return None
    path = write_report(output / "report.html", result=result, class_names=class_names, model=model, dataset=dataset,
                        run_dir=output, data_note=data_note, progress=progress)
    return f"report: {path} ({time.perf_counter() - start:.1f}s)"


# -- from the run folder alone ---------------------------------------------------------------------------
def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.json"
    if not path.is_file():
        raise DataError(f"{run_dir} is not a training run folder: no config.json (train.py writes one)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read it as JSON ({e})") from None
    args = config.get("args") if isinstance(config, dict) else None
    if not isinstance(args, dict):
        raise DataError(f"{path}: no 'args' object; not a config.json of train.py")
    val_split, seed = args.get("val_split", 0.2), args.get("seed", 0)
    if not (isinstance(val_split, (int, float)) and 0 < val_split < 1) or not isinstance(seed, int):
        raise DataError(f"{path}: val_split {val_split!r} and seed {seed!r} must be a fraction and an integer")
    return config


def _run_table(args: dict, resolved: dict, labels: str | os.PathLike | None) -> TableOptions | None:
    """The label table the run was trained on (its --labels flags in config.json), read from ``labels`` when given,
    else where train.py found it; None for a run without one."""
    if args.get("labels") is None:
        if labels is not None:
            raise InputError("--labels: this run was not trained on a label table (its config.json has no --labels)")
        return None
    try:
        options = table_options(argparse.Namespace(**args))
    except (AttributeError, InputError) as e:
        raise DataError(f"config.json: the run's label table flags cannot be read again ({e})") from None
    if labels is not None:
        where = Path(labels)
        if not where.is_file():
            raise DataError(f"--labels {where}: no such file")
    else:
        found = [p for p in (resolved.get("labels"), args["labels"]) if p and Path(p).is_file()]
        if not found:
            raise DataError(f"the run's label table {resolved.get('labels') or args['labels']} is not there; name "
                            "where it is now with --labels FILE.csv")
        where = Path(found[0])
    return dataclasses.replace(options, labels=str(where))


def report_run(run_dir: str | os.PathLike, *, data: str | None = None, labels: str | os.PathLike | None = None,
               device: str | None = None, batch_size: int = 64, workers: int = 0, progress: bool = True) -> Path:
    """Write ``RUN_DIR/report.html`` again from the run folder: ``best.safetensors`` on the validation split.

    The split is made again as train.py made it, from ``config.json`` (data folder, val_split, seed, and a label
    table's flags: columns, groups, split column); the image size and intensity mapping are the checkpoint's.

    Args:
        run_dir: a train.py output folder.
        data: the data folder or pack, where it has moved since training.
        labels: the run's label table (``--labels``), where it has moved since training.
    """
    missing = _missing_packages()
    if missing:
        raise InputError(f"the report needs {missing}: {REPORT_HINT}")
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    args, resolved = config["args"], config.get("resolved") or {}
    table = _run_table(args, resolved, labels)
    if data is not None:
        root = data
    elif resolved.get("data") and Path(resolved["data"]).exists():
        root = resolved["data"]
    elif args.get("data") is None:
        root = prepare_digits()  # the demo, whose cache may have been cleared since
    else:
        raise DataError(f"the run's data {resolved.get('data') or args['data']} is not there; "
                        "name where it is now with --data DIR")
    if not Path(root).exists():
        raise DataError(f"--data {root}: no such folder")
    source = open_source(root, val_split=args.get("val_split", 0.2), seed=args.get("seed", 0), table=table)
    ev = evaluate_checkpoint(run_dir / "best.safetensors", source, split="val", batch_size=batch_size,
                             workers=workers, device=resolve_device(device), channels_last="off",
                             progress=progress and sys.stderr.isatty(), log=lambda line: None)
    return write_report(run_dir / "report.html", result=ev.result, class_names=ev.class_names, model=ev.model,
                        dataset=ev.dataset, run_dir=run_dir, data_note=ev.data_note, progress=progress)
