"""Do intensity windows help? ``repeat`` against ``window`` and ``wso`` on a SYNTHETIC CT-like set, in HU.

The data are made up, not patients: head-like phantoms written as CT DICOM files (int16, RescaleIntercept
-1024), each with air at -1000 HU, a skull at 800-1400 HU, brain at about 35 HU with a faint texture and
Gaussian noise, and one round lesion. The lesion is the class: ``bleed`` (acute blood, 60-70 HU) or
``fluid`` (CSF-like, 5-15 HU). The whole signal is a few tens of HU, which the full CT range -1024..3071
squeezes into under 1% of [0, 1]; a brain window (40/80) stretches it over a third of the range. It is a
case built for windows to matter, so a gain here says only that the adapters work as intended.

Every adapter is trained by ``train.py`` (same seed, data, split, epochs, schedule) with
``--intensity range -1024 3071``; ``window`` and ``wso`` get the CT brain, subdural and bone windows.

    python benchmarks/windows.py                         # ~3 minutes on 2 CPU cores
    python benchmarks/windows.py --per-class 200 --epochs 10 --img-size 96 96
"""

import argparse
import csv
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
from _child import child
from _common import command_line, environment, format_table, resolve_device, write_csv, write_markdown
from pydicom.data import get_testdata_file

from gray_effnet import load_model
from gray_effnet.folders import default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
WINDOWS = ["40:80", "80:200", "600:2800"]  # CT brain, subdural, bone (center:width, HU)
CLASSES = {"bleed": (60.0, 70.0), "fluid": (5.0, 15.0)}  # the lesion's HU range per class
COLUMNS = ["adapter", "best_val_acc", "final_val_acc", "final_val_loss", "final_train_loss", "sec_per_epoch",
           "windows_after", "status"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters", nargs="+", default=["repeat", "window", "wso"])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--per-class", type=int, default=90, help="training images per class (validation: half)")
    p.add_argument("--size", type=int, default=64, help="phantom size in pixels")
    p.add_argument("--img-size", nargs=2, type=int, default=(64, 64), metavar=("H", "W"))
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="where to write the phantoms (default: the gray_effnet cache)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "windows"))
    return p


def phantom(rng: np.random.Generator, lesion_hu: tuple[float, float], size: int) -> np.ndarray:
    """One (size, size) head-like slice in HU."""
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    cy, cx = size / 2 + rng.uniform(-2, 2, 2)
    ry, rx = size * rng.uniform(0.40, 0.45), size * rng.uniform(0.34, 0.40)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    hu = np.full((size, size), -1000.0)
    hu[r <= 1] = rng.uniform(800, 1400)  # skull
    inner = r <= 1 - rng.uniform(0.08, 0.14)
    texture = 4 * np.sin(xx / rng.uniform(2, 4) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(2, 4))
    hu[inner] = 35 + texture[inner]  # brain, grey/white-like ripple of +-4 HU
    # The lesion: a disc well inside the brain.
    rad = rng.uniform(3, 6) * size / 64
    ang, dist = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.5)
    ly, lx = cy + dist * (ry * 0.8) * np.sin(ang), cx + dist * (rx * 0.8) * np.cos(ang)
    hu[(yy - ly) ** 2 + (xx - lx) ** 2 <= rad**2] = rng.uniform(*lesion_hu)
    hu += rng.normal(0, 8, hu.shape)  # quantum noise
    return np.clip(np.round(hu), -1024, 3071)


def write_dataset(root: Path, per_class: int, size: int, seed: int) -> Path:
    """train/ and val/ ImageFolder trees of CT DICOM files (the CT_small.dcm header, new pixels)."""
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == f"{per_class} {size} {seed}\n":
        return root
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for name, lesion in CLASSES.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                ds = template.copy()
                stored = (phantom(rng, lesion, size) + 1024).astype(np.int16)  # RescaleIntercept -1024, slope 1
                ds.Rows, ds.Columns = stored.shape
                ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
                ds.PixelData = stored.tobytes()
                ds.ImageComments = "SYNTHETIC phantom of benchmarks/windows.py, not patient data"
                ds.save_as(folder / f"IM{i:04d}")  # no extension, as PACS exports write them
    (root / "README.txt").write_text("SYNTHETIC CT-like phantoms written by benchmarks/windows.py; not patient data.\n")
    marker.write_text(f"{per_class} {size} {seed}\n")
    return root


def train(args, adapter: str, data: Path, out: Path) -> int:
    cmd = [sys.executable, str(ROOT / "train.py"), "--adapter", adapter, "--model", args.model, "--data", str(data),
           "--intensity", "range", "-1024", "3071", "--epochs", str(args.epochs),
           "--img-size", *map(str, args.img_size), "--batch-size", str(args.batch_size), "--workers", "0",
           "--seed", str(args.seed), "--output", str(out), "--no-progress", "--device", "cpu"]
    if adapter in ("window", "wso"):
        cmd += ["--windows", *WINDOWS]
    with child(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(f"[{adapter}] {line}", end="", flush=True)
        return proc.wait()


def cpu_model() -> str:
    """``lscpu``'s model name (the CPU the numbers were measured on)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def main(args) -> None:
    output = Path(args.output)
    data = write_dataset(Path(args.data or default_cache_dir() / "ct-phantoms"), args.per_class, args.size, args.seed)
    rows = []
    for adapter in args.adapters:
        out = output / adapter
        code = train(args, adapter, data, out)
        with open(out / "metrics.csv") as f:
            epochs = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        row = {"adapter": adapter, "status": "ok" if code == 0 else f"failed (exit {code})",
               "best_val_acc": max(e["val_acc"] for e in epochs), "final_val_acc": epochs[-1]["val_acc"],
               "final_val_loss": epochs[-1]["val_loss"], "final_train_loss": epochs[-1]["train_loss"],
               "sec_per_epoch": sum(e["seconds"] for e in epochs) / len(epochs), "windows_after": ""}
        stem = load_model(out / "last.safetensors").stem
        if hasattr(stem, "window_table"):
            row["windows_after"] = " ".join(f"{c:.0f}:{w:.0f}" for c, w in stem.window_table())
        row.update(environment(resolve_device("cpu"), "float32", model=args.model, cpu_model=cpu_model(),
                               img_size="x".join(map(str, args.img_size)), batch_size=args.batch_size,
                               epochs=args.epochs, seed=args.seed, train_per_class=args.per_class,
                               data="SYNTHETIC CT-like phantoms (benchmarks/windows.py)"))
        rows.append(row)
        write_csv(rows, output / "results.csv")
    notes = [
        "SYNTHETIC data: head-like phantoms in HU made by this script (lesion 60-70 HU 'bleed' against 5-15 HU "
        "'fluid' in 35 HU brain, noise sd 8 HU), not patient data. One seed, one run per adapter; validation "
        f"has {args.per_class // 2} images per class, so one image is {100 / args.per_class:.1f} points of accuracy.",
        f"Input windows for window and wso: {' '.join(WINDOWS)} (center:width, HU); windows_after: the windows "
        "at the end of training (learned for wso).",
    ]
    write_markdown(rows, COLUMNS, output / "results.md", "Intensity windows on a SYNTHETIC CT-like set", notes)
    print("\n" + format_table(rows, COLUMNS))
    print(f"\nresults: {output / 'results.md'}\ncommand: {command_line()}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
