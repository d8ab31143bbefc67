"""The run report: one self-contained HTML page a person opens after training, ``RUN/report.html``.

It holds the run's settings and data, the machine it ran on, loss and accuracy per epoch with the best epoch
marked, and the best checkpoint on the validation split: per-class precision and recall, the confusion matrix,
ROC curves, the 16 images with the highest loss, and class-activation maps of right and wrong predictions.
The figures are embedded as base64 PNG and also written beside the page (``RUN/report/*.png``); the page has
no script and loads nothing, so it opens offline and can be mailed.

Written by train.py after the last epoch, by ``train.py --evaluate`` (``eval_report.html``) and by
``python -m gray_effnet predict`` on labelled images (``<predictions>_report.html``); written again from the
run folder alone by ``python -m gray_effnet report RUN_DIR``, which evaluates ``best.safetensors`` on the
validation split that config.json describes. Needs the optional extra: ``pip install "gray_effnet[report]"``.
"""

import base64
import csv
import html
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
from .checkpoint import METRIC_COLUMNS, load_model
from .cli import resolve_device
from .engine import EvalResult, evaluate
from .errors import DataError, InputError
from .evaluation import evaluate_checkpoint
from .files import atomic_write
from .folders import prepare_digits
from .model import GrayEfficientNet
from .sources import open_source

__all__ = ["REPORT_HINT", "RocCurve", "read_metrics", "report_after_training", "report_line", "report_run",
           "report_unavailable", "roc_curves", "single_label_roc", "write_report"]

REPORT_HINT = 'pip install "gray_effnet[report]"'
WORST = 16  # images in the highest-loss gallery
CAMS = 4  # right and wrong predictions, each, in the class-activation gallery
DPI = 100


def _missing_packages() -> str | None:
    """The report's optional packages (the ``report`` extra) that are not installed, or None.

    They are imported when a report is drawn, not when this module is, so that training runs without them.
    """
    missing = []
    for module, name in (("matplotlib", "matplotlib"), ("sklearn", "scikit-learn")):
        try:
            __import__(module)
        except ImportError:
            missing.append(name)
    return " and ".join(missing) or None


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
    from sklearn.metrics import roc_auc_score, roc_curve  # the optional [report] extra

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
        curves.append(RocCurve(name, fpr, tpr, float(roc_auc_score(t, s)), pos, neg))
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
                rows.append({k: float(row[k]) for k in METRIC_COLUMNS})
            except (KeyError, TypeError, ValueError):
                notes.append(f"{path.name} line {i}: not a row of numbers in the columns {METRIC_COLUMNS}; skipped")
    return rows, notes


def best_epoch(history: Sequence[dict[str, float]]) -> int | None:
    """The position of the first row with the highest val_acc: the epoch train.py saved as best."""
    accs = [r["val_acc"] for r in history]
    finite = [a for a in accs if not math.isnan(a)]
    return accs.index(max(finite)) if finite else None


# -- figures: matplotlib's object interface, the Agg canvas, no pyplot state ------------------------------
def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure  # the optional [report] extra

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def curves_figure(history: Sequence[dict[str, float]], label_smoothing: float | None = None):
    fig = _figure(10, 3.6)
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [int(r["epoch"]) for r in history]
    best = best_epoch(history)
    smoothing = f", label smoothing {label_smoothing}" if label_smoothing else ""
    for ax, key, title in ((loss_ax, "loss", "loss"), (acc_ax, "acc", "accuracy")):
        train_label = f"train{smoothing}" if key == "loss" else "train"
        ax.plot(epochs, [r[f"train_{key}"] for r in history], "o-", ms=3, label=train_label)
        ax.plot(epochs, [r[f"val_{key}"] for r in history], "o-", ms=3, label="validation")
        if best is not None:
            ax.axvline(epochs[best], color="0.5", ls="--", lw=1)
            ax.plot([epochs[best]], [history[best][f"val_{key}"]], "*", ms=14, color="C3",
                    label=f"best epoch ({epochs[best]})")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(epochs) < 12:
            ax.set_xticks(epochs)
    acc_ax.set_ylim(-0.02, 1.02)
    loss_ax.legend(fontsize=8)
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
    """Tiles in rows: (image, caption), the image (H, W) gray in [0, 1] or (H, W, 3) uint8."""
    width, height = 2.1 * columns + (0.3 if row_titles else 0), 2.5 * len(rows)
    fig = _figure(width, height, layout=None)  # a fixed grid: constrained layout would cost a second per gallery
    axes = np.asarray(fig.subplots(len(rows), columns, squeeze=False))
    # Each row: 0.45 inch for a two-line caption, then the image.
    fig.subplots_adjust(left=0.3 / width if row_titles else 0.01, right=0.99, bottom=0.05 / height,
                        top=1 - 0.45 / height, wspace=0.08, hspace=0.45 / 2.0)
    for r, row in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            ax.set_axis_off()
            if c < len(row):
                img, caption = row[c]
                ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(caption, fontsize=8)
        if row_titles:
            axes[r, 0].text(-0.08, 0.5, row_titles[r], transform=axes[r, 0].transAxes, rotation=90,
                            va="center", ha="right", fontsize=10, fontweight="bold")
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
    if args:
        page.add(_table([(k, args[k]) for k in SETTINGS if k in args and args[k] is not None]))
    if resolved.get("command"):
        page.add(f"<p>Command: <code>{_e(resolved['command'])}</code></p>")
    if data_note:
        page.add(f"<p>Data: {_e(data_note.removeprefix('data: '))}</p>")
    elif resolved.get("data"):
        page.add(f"<p>Data: {_e(resolved['data'])}</p>")
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


def _curves_section(page: _Page, run_dir: Path | None, config: dict | None, bar) -> None:
    page.add('<section id="curves"><h2>Loss and accuracy per epoch</h2>')
    path = run_dir / "metrics.csv" if run_dir is not None else None
    history, notes = read_metrics(path) if path is not None and path.is_file() else ([], [])
    if history:
        best = best_epoch(history)
        smoothing = ((config or {}).get("args") or {}).get("label_smoothing")
        page.figure("curves", curves_figure(history, smoothing),
                    "Training and validation loss and accuracy; the star marks the best epoch "
                    "(highest validation accuracy), whose weights are best.safetensors. The validation loss is the "
                    "cross-entropy without label smoothing.")
        if best is not None:
            r = history[best]
            page.add(f"<p>Best epoch {int(r['epoch'])} of {len(history)}: validation accuracy {r['val_acc']:.4f}, "
                     f"loss {r['val_loss']:.4f}.</p>")
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
    if tiles:
        columns = 4
        page.figure("worst", gallery_figure([tiles[r:r + columns] for r in range(0, len(tiles), columns)], columns),
                    "Highest cross-entropy first: the true class, the predicted class and its probability. The "
                    "images as the model saw them (resized).")
    page.add(_table(rows, header=("path", "true", "predicted", "p(predicted)", "p(true)", "loss"),
                    attrs=' id="worst-table"'))
    bar.update()
    page.add("</section>")


def _cam_section(page: _Page, result: EvalResult, names: Sequence[str], model: GrayEfficientNet | None,
                 dataset: Dataset | None, bar) -> None:
    page.add('<section id="cam"><h2>Class-activation maps</h2>')
    if model is None or dataset is None:
        page.add('<p class="note">No model or images at hand: no maps.</p></section>')
        bar.update()
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
        (h, w), (ih, iw) = cam.raw.shape[-2:], batch.shape[-2:]
        note = (f"The last feature map is {h}x{w} for {ih}x{iw} inputs: each of its cells covers about "
                f"{ih // h}x{iw // w} pixels, so the map says which part of the image, not which pixels.")
        if h * w == 1:
            note = (f"The last feature map is 1x1 for {ih}x{iw} inputs, so these maps have no detail: red where the "
                    "class has positive evidence, blue where it has none. A larger --img-size gives a finer map.")
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
        result: ``evaluate(..., keep_predictions=True)`` of the images the report is about.
        class_names: the model's classes, in the order of its outputs.
        model: for the class-activation maps (unwrapped); none without it.
        dataset: the images ``result`` was computed on (``GrayImageFolder`` or ``PackedDataset``), for the
            galleries; none without it.
        run_dir: the training run (``config.json``, ``metrics.csv``): settings, device and curves.
        data_note: a line about the data (train.py's ``data:`` line).
        what: what was evaluated, for the heading.
    """
    if result.probs is None or result.losses is None:
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
    _curves_section(page, run_dir, config, bar)
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


def report_after_training(output: Path, loader, dataset: Dataset, *, device: torch.device, num_classes: int,
                          class_names: Sequence[str], autocast: Callable = nullcontext, data_note: str | None = None,
                          progress: bool = True) -> str | None:
    """train.py's report: every process evaluates ``best.safetensors`` on its share of the validation loader
    (the predictions are gathered), and the first one writes ``OUTPUT/report.html``.

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
    if not best.is_file():  # a resumed run whose best epoch was written elsewhere
        return f"report: not written: {best} does not exist" if primary else None
    model = load_model(best).to(device)
    result = evaluate(model, loader, device=device, num_classes=num_classes, autocast=autocast,
                      keep_predictions=True, progress=progress and sys.stderr.isatty(), desc="report: evaluate best")
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


def report_run(run_dir: str | os.PathLike, *, data: str | None = None, device: str | None = None,
               batch_size: int = 64, workers: int = 0, progress: bool = True) -> Path:
    """Write ``RUN_DIR/report.html`` again from the run folder: ``best.safetensors`` on the validation split.

    The split is made again as train.py made it, from ``config.json`` (data folder, val_split, seed); the
    image size and intensity mapping are the checkpoint's.

    Args:
        run_dir: a train.py output folder.
        data: the data folder or pack, where it has moved since training.
    """
    missing = _missing_packages()
    if missing:
        raise InputError(f"the report needs {missing}: {REPORT_HINT}")
    run_dir = Path(run_dir)
    config = _read_config(run_dir)
    args, resolved = config["args"], config.get("resolved") or {}
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
    source = open_source(root, val_split=args.get("val_split", 0.2), seed=args.get("seed", 0))
    ev = evaluate_checkpoint(run_dir / "best.safetensors", source, split="val", batch_size=batch_size,
                             workers=workers, device=resolve_device(device), channels_last="off",
                             progress=progress and sys.stderr.isatty(), log=lambda line: None)
    return write_report(run_dir / "report.html", result=ev.result, class_names=ev.class_names, model=ev.model,
                        dataset=ev.dataset, run_dir=run_dir, data_note=ev.data_note, progress=progress)
