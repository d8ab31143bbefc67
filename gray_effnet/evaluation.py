"""The one evaluation path: a checkpoint on a data source, then the tables and CSVs a person reads.

``train.py --evaluate`` (the validation split) and ``python -m gray_effnet predict`` (every image) both call
``evaluate_checkpoint`` and ``report_predictions``; they differ only in the split and the CSV's default name.

A single-label checkpoint gets accuracy, per-class precision and recall and a confusion matrix (and ROC AUC,
sensitivity and specificity for 2 classes); its CSV names the predicted class. A multi-label checkpoint gets a
table of ROC AUC and average precision per finding; its CSV has a probability per finding (``p_<finding>``), the
known labels (``y_<finding>``) and the findings at or above the checkpoint's thresholds (``findings``).
"""

import csv
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .checkpoint import load_model
from .data import make_loader
from .engine import EvalResult, amp_setup, evaluate
from .errors import InputError
from .files import atomic_write
from .metrics import DEFAULT_THRESHOLD
from .model import GrayEfficientNet
from .sources import DataSource
from .speed import DEFAULT_WORKERS, choose_channels_last, plan_threads, probe_cache

__all__ = ["Evaluation", "csv_safe", "evaluate_checkpoint", "format_eval", "format_findings", "number_text",
           "report_predictions", "use_checkpoint_thresholds", "write_predictions"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(cell: object) -> object:
    """A text cell that a spreadsheet would run as a formula, with a ``'`` in front (OWASP's CSV injection advice).

    Class names are folder names and paths are the user's; ``=HYPERLINK(...)`` or ``@SUM(...)`` as a folder name must
    reach a spreadsheet as text. Numbers pass unchanged.

    Example:
        >>> csv_safe("=1+1"), csv_safe("cat"), csv_safe(-1)
        ("'=1+1", 'cat', -1)
    """
    if isinstance(cell, str) and cell.startswith(_FORMULA_START):
        return "'" + cell
    return cell



def number_text(v: float, digits: int = 3) -> str:
    """``v`` with ``digits`` decimals, or ``n/a`` for NaN (an undefined metric)."""
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def format_eval(result: EvalResult, class_names: Sequence[str]) -> str:
    """Accuracy, per-class precision and recall, and the confusion matrix (rows: true, columns: predicted).

    Two classes add ROC AUC, average precision, sensitivity and specificity (class 1 positive); more add the
    macro ROC AUC of each class against the rest. A multi-label result gets ``format_findings`` instead.
    """
    if result.task == "multi":
        return format_findings(result, class_names)
    precision, recall = result.per_class()
    counts = result.confusion.sum(1)
    width = max(8, *(len(c) for c in class_names))
    lines = [
        f"accuracy {result.acc:.4f} on {int(result.confusion.sum())} images (loss {result.loss:.4f})"
        + (f", {result.skipped} unreadable skipped" if result.skipped else ""),
        "",
        f"{'class':<{width}} {'precision':>9} {'recall':>7} {'images':>7}",
    ]
    for i, name in enumerate(class_names):
        p, r = precision[i].item(), recall[i].item()
        lines.append(
            f"{name:<{width}} {'n/a' if math.isnan(p) else f'{p:.3f}':>9} "
            f"{'n/a' if math.isnan(r) else f'{r:.3f}':>7} {int(counts[i]):>7}"
        )
    if len(class_names) == 2:  # sensitivity and specificity at the predicted class, as the confusion matrix counts
        lines += ["", f"ROC AUC {number_text(result.auc)}, average precision {number_text(result.ap)}, sensitivity "
                      f"{number_text(recall[1].item())}, specificity {number_text(recall[0].item())} (positive class: "
                      f"{class_names[1]!r})"]
    elif len(class_names) > 2:
        lines += ["", f"macro ROC AUC, each class against the rest: {number_text(result.auc)}"]
    cell = max(5, len(str(int(result.confusion.max()))) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    lines.append(" " * width + "".join(f"{name[:cell - 1]:>{cell}}" for name in class_names))
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}}" + "".join(f"{int(v):>{cell}}" for v in result.confusion[i]))
    return "\n".join(lines)


def format_findings(result: EvalResult, finding_names: Sequence[str]) -> str:
    """A multi-label result: macro means, then per finding ROC AUC, average precision, threshold, prevalence and
    how many labels are known. A finding with one class among its known labels has no ROC AUC ("n/a (one
    class)"), and is left out of the means."""
    m = result.findings
    undefined = sum(m.why_undefined(k) is not None for k in range(len(finding_names)))
    width = max(8, *(len(c) for c in finding_names))
    lines = [
        f"macro ROC AUC {number_text(result.auc)}, macro average precision {number_text(result.ap)} over "
        f"{len(finding_names) - undefined} of {len(finding_names)} findings"
        + (f" ({undefined} without both classes among the known labels, left out)" if undefined else "")
        + f"; {len(result.paths)} images, {int(result.confusion.sum())} known labels, loss {result.loss:.4f}, "
        f"accuracy per label at 0.5 {number_text(result.acc, 4)}"
        + (f", {result.skipped} unreadable skipped" if result.skipped else ""),
        "",
        f"{'finding':<{width}} {'ROC AUC':>17} {'AP':>6} {'threshold':>9} {'prevalence':>10} {'labelled':>8}",
    ]
    for k, name in enumerate(finding_names):
        why = m.why_undefined(k)
        lines.append(f"{name:<{width}} {number_text(m.auc[k]) if why is None else f'n/a ({why})':>17} "
                     f"{number_text(m.ap[k]):>6} {result.thresholds[k]:>9.3f} {number_text(m.prevalence[k]):>10} "
                     f"{int(m.labelled[k]):>8}")
    return "\n".join(lines)


def write_predictions(path: str | Path, result: EvalResult, class_names: Sequence[str] | None) -> Path:
    """One row per image: path, true label (when known), predicted label, its probability, correct.

    Multi-label: path, the probability of each finding (``p_<finding>``), its known label (``y_<finding>``: 1, 0,
    or empty when unknown), and the findings at or above their thresholds, joined by '|' (``findings``).

    Text cells go through ``csv_safe``: a class or file name that starts like a formula is written as text.
    """
    path = Path(path)
    if result.task == "multi":
        return _write_findings(path, result, class_names or [str(k) for k in range(result.scores.shape[1])])
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "target", "prediction", "probability", "correct"])
            for file, target, pred, prob in result.predictions:
                name = class_names[pred] if class_names else pred
                if target < 0:  # an unlabelled folder
                    row = [file, "", name, f"{prob:.6f}", ""]
                else:
                    true = class_names[target] if class_names else target
                    row = [file, true, name, f"{prob:.6f}", int(target == pred)]
                writer.writerow([csv_safe(cell) for cell in row])
    return path


@dataclass
class Evaluation:
    """What ``evaluate_checkpoint`` did: the result, the class names it counts in, the model and the images."""

    result: EvalResult
    class_names: list[str]
    model: GrayEfficientNet
    dataset: Dataset
    data_note: str  # the data: line


def _write_findings(path: Path, result: EvalResult, names: Sequence[str]) -> Path:
    with atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", *(f"p_{n}" for n in names), *(f"y_{n}" for n in names), "findings"])
            rows = zip(result.paths, result.scores.tolist(), result.targets.tolist(), result.present().tolist())
            for file, scores, targets, present in rows:
                labels = ["" if math.isnan(t) else int(t > 0.5) for t in targets]
                found = "|".join(n for n, hit in zip(names, present) if hit)
                writer.writerow([csv_safe(file), *(f"{p:.6f}" for p in scores), *labels, csv_safe(found)])
    return path


def evaluate_checkpoint(
    weights: str | Path,
    source: DataSource,
    *,
    split: str,
    batch_size: int = 64,
    workers: int | str = DEFAULT_WORKERS,
    device: torch.device | str = "cpu",
    img_size: Sequence[int] | None = None,
    intensity: str | None = None,
    amp: str = "none",
    channels_last: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Evaluation:
    """Predict every image of ``split`` of ``source`` with the checkpoint ``weights``.

    The images are read as the model was trained: at its ``img_size`` and with its intensity mapping, unless
    others are named (a pack has its own and refuses others). Labels are counted in the checkpoint's classes.
    A multi-label result's ``thresholds`` are the checkpoint's (chosen on validation data in training), or 0.5
    where it has none, whatever these images' own best thresholds would be.

    Args:
        weights: a checkpoint of this project.
        source: the data (``gray_effnet.sources.open_source``).
        split: ``val`` (``train.py --evaluate``) or ``all`` (``predict``).
        batch_size: images per batch.
        workers: loader processes (a pack uses none); ``auto`` (train.py's default) is ``DEFAULT_WORKERS`` here.
        device: where to run.
        img_size: (H, W) instead of the checkpoint's.
        intensity: a mapping instead of the checkpoint's.
        amp: ``none``, ``bf16`` or ``fp16`` autocast.
        channels_last: ``auto``, ``on`` or ``off`` (``gray_effnet.speed.choose_channels_last``).
        threads: CPU threads (default: this process' share of the cores).
        progress: show a progress bar.
        log: where the data line and the memory-format choice go.
    """
    device = torch.device(device)
    model = load_model(weights).to(device).eval()
    source.check_model(model)
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    size, intensity = source.settings(img_size or model.img_size or model.model.pretrained_cfg["input_size"][1:],
                                      intensity or model.intensity)
    if min(size) < model.min_size:
        raise InputError(f"--img-size {size[0]} {size[1]} is smaller than the model's total stride {model.min_size}")
    dataset = source.dataset(split, size, intensity, class_names=names)
    workers = source.loader_workers(DEFAULT_WORKERS if workers == "auto" else workers)[0]
    loader = make_loader(dataset, batch_size, train=False, workers=workers, pin_memory=device.type == "cuda")
    note = source.describe(dataset.wide)
    log(f"{note}; evaluating the {len(dataset)} images of the {split} split, {size[0]}x{size[1]}, intensity "
        f"{intensity}")
    torch.set_num_threads(plan_threads(workers=workers, requested=threads).threads)
    autocast, _ = amp_setup(device, amp)
    use_nhwc, why = choose_channels_last(channels_last, model, device, (batch_size, 1, *size), train=False,
                                         autocast=autocast, cache=probe_cache("channels_last"))
    log(why)
    if use_nhwc:
        model.to(memory_format=torch.channels_last)
    result = evaluate(model, loader, device=device, num_classes=model.num_classes, task=model.task,
                      autocast=autocast, channels_last=use_nhwc, keep_predictions=True, progress=progress,
                      desc=f"evaluate {split}")
    use_checkpoint_thresholds(result, model, log)
    return Evaluation(result, names, model, dataset, note)


def use_checkpoint_thresholds(result: EvalResult, model: GrayEfficientNet, log: Callable[[str], None]) -> None:
    """Multi-label: call findings present at the checkpoint's thresholds (chosen on validation data in training), not
    at those ``evaluate`` would choose on these images; 0.5 where the checkpoint has none."""
    if model.task != "multi":
        return
    if model.thresholds is None:
        log(f"the checkpoint has no thresholds: a finding is called present at probability {DEFAULT_THRESHOLD}")
    result.thresholds = list(model.thresholds or [DEFAULT_THRESHOLD] * model.num_classes)


def report_predictions(result: EvalResult, class_names: Sequence[str], csv_path: str | Path, *, labelled: bool,
                       log: Callable[[str], None] = print) -> Path:
    """Print the metrics (labelled data) or the predicted counts (unlabelled), and write the predictions CSV."""
    if labelled:
        log(format_eval(result, class_names))
    elif result.task == "multi":
        hits = result.present().sum(0).tolist()
        log(f"{len(result.paths)} images; findings called present: "
            + ", ".join(f"{name}: {n}" for name, n in sorted(zip(class_names, hits), key=lambda t: -t[1])))
    else:
        counts = Counter(class_names[pred] for _, _, pred, _ in result.predictions)
        log(f"{len(result.predictions)} images predicted as: "
            + ", ".join(f"{name}: {n}" for name, n in counts.most_common()))
    csv_path = Path(csv_path)
    replaced = csv_path.exists()
    log(f"predictions: {write_predictions(csv_path, result, class_names)}{' (replaced)' if replaced else ''}")
    return csv_path
