"""Classify a folder of images with a checkpoint: ``python -m gray_effnet predict --weights W --data DIR``.

``DIR`` may hold class subfolders named like the checkpoint's classes (then accuracy, per-class precision
and recall and a confusion matrix are printed too) or just images (then only predictions are written). It may
also be a pack (``python -m gray_effnet pack``): then every image in it, train and val split alike, is
predicted at the pack's size, with its labels.
"""

import argparse
from collections import Counter
from pathlib import Path

import torch

from .checkpoint import load_model
from .data import GrayImageFolder, build_transforms, drop_unreadable, find_images, is_image_file, make_loader
from .engine import evaluate
from .errors import DataError
from .intensity import parse_intensity, parse_intensity_args
from .pack import PackedDataset, is_pack, open_pack
from .report import format_eval, write_predictions
from .run_report import report_line, write_report
from .tuning import choose_channels_last

__all__ = ["labelled_samples", "predict"]


def labelled_samples(root: Path, class_names: list[str]) -> list[tuple[str, int]] | None:
    """(path, class index in the checkpoint) for a folder of class subfolders; None for a flat folder."""
    if not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return None
    found = find_images(root, min_classes=1)
    unknown = sorted(set(found.classes) - set(class_names))
    if unknown:
        raise DataError(f"subfolders of {root} that are not classes of the checkpoint: {unknown}; "
                        f"its classes are {class_names}")
    return [(path, class_names.index(found.classes[label])) for path, label in found.samples]


def predict(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(args.weights).to(device).eval()
    root = Path(args.data)
    if is_pack(root):
        return _predict_pack(args, model, root, device)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    samples = labelled_samples(root, names)
    labelled = samples is not None
    if not labelled:
        samples = [(str(p), -1) for p in sorted(root.iterdir()) if p.is_file() and is_image_file(p)]
    if not samples:
        raise DataError(f"no images in {root}")
    samples, scan = drop_unreadable(samples)
    size = model.img_size or tuple(model.model.pretrained_cfg["input_size"][1:])
    # The mapping the model was trained with, unless the user names another.
    intensity = parse_intensity_args(args.intensity) or model.intensity
    dataset = GrayImageFolder(samples, build_transforms(size, train=False), wide=scan.wide, intensity=intensity)
    loader = make_loader(dataset, args.batch_size, train=False, workers=args.workers,
                         pin_memory=device.type == "cuda")
    result = _evaluate(args, model, loader, device, size)
    _report(args, result, names, root, labelled, model=model, dataset=dataset)


def _predict_pack(args: argparse.Namespace, model, root: Path, device: torch.device) -> None:
    """Every readable image of a pack, read as it was packed (its size and intensity mapping)."""
    pack = open_pack(root)
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    unknown = sorted(set(pack.classes) - set(names))
    if unknown:
        raise DataError(f"classes of the pack {root} that are not classes of the checkpoint: {unknown}; "
                        f"its classes are {names}")
    wanted = str(parse_intensity(parse_intensity_args(args.intensity) or model.intensity))  # the checkpoint's
    if wanted != pack.intensity:
        raise DataError(f"the pack {root} was read with intensity {pack.intensity!r}, this prediction needs "
                        f"{wanted!r} (the checkpoint's, or --intensity): pack again with --intensity {wanted}")
    dataset = PackedDataset(pack, "all", label_map=[names.index(c) for c in pack.classes])
    loader = make_loader(dataset, args.batch_size, train=False, workers=0, pin_memory=device.type == "cuda")
    result = _evaluate(args, model, loader, device, pack.img_size)
    print(f"pack of {pack.source}, {pack.img_size[0]}x{pack.img_size[1]}: {pack.note}")
    _report(args, result, names, root, labelled=True, model=model, dataset=dataset)


def _evaluate(args: argparse.Namespace, model, loader, device: torch.device, size: tuple[int, int]):
    """Predict every batch of ``loader``, in the memory format that ``--channels-last`` resolves to."""
    channels_last, why = choose_channels_last(args.channels_last, model, device, (args.batch_size, 1, *size),
                                              train=False)
    print(why)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return evaluate(model, loader, device=device, num_classes=model.num_classes, channels_last=channels_last,
                    keep_predictions=True, desc="predict")


def _report(args: argparse.Namespace, result, names: list[str], root: Path, labelled: bool, *, model,
            dataset) -> None:
    if labelled:
        print(format_eval(result, names))
    else:
        counts = Counter(names[pred] for _, _, pred, _ in result.predictions)
        print(f"{len(result.predictions)} images predicted as: "
              + ", ".join(f"{name}: {n}" for name, n in counts.most_common()))
    out = Path(args.output) if args.output else default_output(Path(args.weights), root)
    replaced = out.exists()
    print(f"predictions: {write_predictions(out, result, names)}{' (replaced)' if replaced else ''}")
    if labelled:  # beside the CSV: predictions_<folder>_report.html
        print(report_line(lambda: write_report(out.with_name(f"{out.stem}_report.html"), result=result,
                                               class_names=names, model=model, dataset=dataset,
                                               run_dir=Path(args.weights).parent, what=f"{args.weights} on {root}",
                                               progress=not getattr(args, "no_progress", False))))


def default_output(weights: Path, data: Path) -> Path:
    """``predictions_<data folder>.csv`` beside the weights: one file per folder, none shared with --evaluate."""
    name = data.resolve().name or "root"
    return weights.parent / f"predictions_{name}.csv"
