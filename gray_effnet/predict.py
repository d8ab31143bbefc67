"""Classify images with a checkpoint: ``python -m gray_effnet predict --weights W --data DIR``.

``DIR`` may hold class subfolders named like the checkpoint's classes (then accuracy, per-class precision
and recall and a confusion matrix are printed too) or just images (then only predictions are written). It may
also be a pack (``python -m gray_effnet pack``): then every image in it, train and val split alike, is
predicted at the pack's size, with its labels. A multi-label checkpoint writes each finding's probability and
the findings at or above its thresholds instead of one class. The work is ``gray_effnet.evaluation``'s, as for
``train.py --evaluate``.
"""

from collections.abc import Sequence
from pathlib import Path

from .evaluation import evaluate_checkpoint, report_predictions
from .sources import open_source

__all__ = ["default_output", "predict"]


def predict(weights: str | Path, data: str | Path, *, output: str | Path | None = None, batch_size: int = 64,
            workers: int = 2, device: str = "cpu", channels_last: str = "auto", intensity: str | None = None,
            img_size: Sequence[int] | None = None, amp: str = "none", threads: int | None = None,
            strict: bool = False, progress: bool = True) -> Path:
    """Predict every image of ``data`` and write the CSV; return its path (see the module docstring).

    Args:
        weights: a checkpoint of this project.
        data: a folder (class subfolders or flat) or a pack.
        output: the CSV (default: ``predictions_<folder>.csv`` beside the weights).
        batch_size: images per batch.
        workers: loader processes.
        device: where to run.
        channels_last: ``auto``, ``on`` or ``off``.
        intensity: a mapping instead of the checkpoint's.
        img_size: (H, W) instead of the checkpoint's.
        amp: autocast dtype.
        threads: CPU threads.
        strict: refuse when any file is unreadable.
        progress: show a progress bar.
    """
    source = open_source(data, labelled=False, strict=strict)
    result, names = evaluate_checkpoint(weights, source, split="all", batch_size=batch_size, workers=workers,
                                        device=device, img_size=img_size, intensity=intensity, amp=amp,
                                        channels_last=channels_last, threads=threads, progress=progress)
    out = Path(output) if output else default_output(Path(weights), Path(data))
    return report_predictions(result, names, out, labelled=source.labelled)


def default_output(weights: Path, data: Path) -> Path:
    """``predictions_<data folder>.csv`` beside the weights: one file per folder, none shared with --evaluate."""
    name = data.resolve().name or "root"
    return weights.parent / f"predictions_{name}.csv"
