"""Classify a folder of images with a checkpoint: ``python -m gray_effnet predict --weights W --data DIR``.

``DIR`` may hold class subfolders named like the checkpoint's classes (then accuracy, per-class precision
and recall and a confusion matrix are printed too) or just images (then only predictions are written).
"""

import argparse
import os
from collections import Counter
from pathlib import Path

import torch

from .checkpoint import load_model
from .data import IMG_EXTENSIONS, GrayImageFolder, build_transforms, find_images, make_loader, scan_images
from .engine import evaluate
from .errors import DataError
from .report import format_eval, write_predictions

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
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    names = model.class_names or [str(i) for i in range(model.num_classes)]
    samples = labelled_samples(root, names)
    labelled = samples is not None
    if not labelled:
        samples = [(os.path.join(root, f), -1) for f in sorted(os.listdir(root))
                   if Path(f).suffix.lower() in IMG_EXTENSIONS and not f.startswith(".")]
    if not samples:
        raise DataError(f"no images in {root}")
    scan = scan_images([p for p, _ in samples])
    for path, why in scan.bad:
        print(f"skipping unreadable image {path} ({why})")
    bad = {p for p, _ in scan.bad}
    samples = [s for s in samples if s[0] not in bad]
    size = model.img_size or tuple(model.model.pretrained_cfg["input_size"][1:])
    dataset = GrayImageFolder(samples, build_transforms(size, train=False), wide=scan.wide, intensity=args.intensity)
    loader = make_loader(dataset, args.batch_size, train=False, workers=args.workers,
                         pin_memory=device.type == "cuda")
    result = evaluate(model, loader, device=device, num_classes=model.num_classes, keep_predictions=True,
                      desc="predict")
    if labelled:
        print(format_eval(result, names))
    else:
        counts = Counter(names[pred] for _, _, pred, _ in result.predictions)
        print(f"{len(result.predictions)} images predicted as: "
              + ", ".join(f"{name}: {n}" for name, n in counts.most_common()))
    out = Path(args.output) if args.output else default_output(Path(args.weights), root)
    replaced = out.exists()
    print(f"predictions: {write_predictions(out, result, names)}{' (replaced)' if replaced else ''}")


def default_output(weights: Path, data: Path) -> Path:
    """``predictions_<data folder>.csv`` beside the weights: one file per folder, none shared with --evaluate."""
    name = data.resolve().name or "root"
    return weights.parent / f"predictions_{name}.csv"
