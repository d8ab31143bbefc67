"""Results a person reads: evaluation tables, confusion matrices and prediction CSVs."""

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from .engine import EvalResult
from .files import atomic_write

__all__ = ["csv_safe", "format_eval", "write_predictions"]

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


def format_eval(result: EvalResult, class_names: Sequence[str]) -> str:
    """Accuracy, per-class precision and recall, and the confusion matrix (rows: true, columns: predicted)."""
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
    cell = max(5, len(str(int(result.confusion.max()))) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
    lines.append(" " * width + "".join(f"{name[:cell - 1]:>{cell}}" for name in class_names))
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}}" + "".join(f"{int(v):>{cell}}" for v in result.confusion[i]))
    return "\n".join(lines)


def write_predictions(path: str | Path, result: EvalResult, class_names: Sequence[str] | None) -> Path:
    """One row per image: path, true label (when known), predicted label, its probability, correct.

    Text cells go through ``csv_safe``: a class or file name that starts like a formula is written as text."""
    path = Path(path)
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
