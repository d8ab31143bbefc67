"""Classify images with a checkpoint: ``python -m gray_effnet predict --weights W --data DIR``.

``DIR`` may hold class subfolders named like the checkpoint's classes (then accuracy, per-class precision
and recall and a confusion matrix are printed too) or just images (then only predictions are written). It may
also be a pack (``python -m gray_effnet pack``): then every image in it, train and val split alike, is
predicted at the pack's size, with its labels. With ``--labels FILE.csv`` the images and their labels are the
table's (every good row, test rows included). A multi-label checkpoint writes each finding's probability and
the findings at or above its thresholds instead of one class. The work is ``gray_effnet.evaluation``'s, as for
``train.py --evaluate``.
"""

from collections.abc import Sequence
from pathlib import Path

from .errors import DataError
from .evaluation import evaluate_checkpoint, report_predictions
from .files import check_output_file
from .limits import set_max_pixels
from .run_report import report_line, write_report
from .sources import open_source
from .tables import TableOptions

__all__ = ["default_output", "predict"]


def predict(weights: str | Path, data: str | Path, *, output: str | Path | None = None, batch_size: int = 64,
            workers: int = 2, device: str = "cpu", channels_last: str = "auto", intensity: str | None = None,
            img_size: Sequence[int] | None = None, amp: str = "none", threads: int | None = None,
            strict: bool = False, max_pixels: int | None = None, report: bool = True, progress: bool = True,
            table: TableOptions | None = None) -> Path:
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
        max_pixels: the most pixels a file may decode to (``gray_effnet.limits``; default: Pillow's limit).
        report: write ``<csv stem>_report.html`` beside the CSV for labelled data (``gray_effnet.run_report``).
        progress: show a progress bar.
        table: read the images and their labels from this label table, paths relative to ``data``.
    """
    out = Path(output) if output else default_output(Path(weights), Path(data))
    check_output_file(out)  # before any work: a folder there is refused now, not after predicting
    set_max_pixels(max_pixels)  # before the checkpoint: its img_size is held to the same limit
    source = open_source(data, labelled=False, strict=strict, table=table)
    ev = evaluate_checkpoint(weights, source, split="all", batch_size=batch_size, workers=workers, device=device,
                             img_size=img_size, intensity=intensity, amp=amp, channels_last=channels_last,
                             threads=threads, progress=progress)
    if not ev.result.count:  # every file passed the header scan and failed to decode: no CSV to write
        raise DataError(f"none of the {len(source.samples('all'))} image file(s) in {data} could be decoded (named "
                        "in the warnings above); no predictions written")
    report_predictions(ev.result, ev.class_names, out, labelled=source.labelled)
    if source.labelled and report:  # beside the CSV: predictions_<folder>_report.html
        print(report_line(lambda: write_report(out.with_name(f"{out.stem}_report.html"), result=ev.result,
                                               class_names=ev.class_names, model=ev.model, dataset=ev.dataset,
                                               run_dir=Path(weights).parent, data_note=ev.data_note,
                                               what=f"{weights} on {data}", progress=progress)))
    return out


def default_output(weights: Path, data: Path) -> Path:
    """``predictions_<data folder>.csv`` beside the weights: one file per folder, none shared with --evaluate."""
    name = data.resolve().name or "root"
    return weights.parent / f"predictions_{name}.csv"
