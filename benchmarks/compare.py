"""Train every adapter on one data set, same seed, data, epochs and schedule, and compare them.

Each adapter is trained by ``train.py`` in its own process (so peak memory is its own), with ``--resume``,
so an interrupted comparison picks up where it stopped. Before training, the zero-shot fidelity of each
adapter is measured on the validation images with the ImageNet head: max |logits - repeat's logits|.

Writes, into ``--output``: ``results.md`` (the table to choose an adapter by), ``results.csv``,
``epochs.csv`` (every epoch of every adapter), ``val_acc.png`` (validation accuracy per epoch) and one
training folder per adapter.

    python benchmarks/compare.py                       # the demo digits, tf_efficientnet_lite0, pretrained
    python benchmarks/compare.py --data DIR --epochs 20 --img-size 224 224 --model efficientnet_b0
"""

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, environment, format_table, resolve_device, write_csv, write_markdown  # noqa: E402

from gray_effnet import ADAPTERS, GrayEfficientNet, list_adapters  # noqa: E402
from gray_effnet.data import GrayImageFolder, build_transforms, collate, load_folder, prepare_digits  # noqa: E402
from gray_effnet.explain import equivalence  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ["adapter", "best_val_acc", "final_val_acc", "final_val_loss", "final_train_loss", "sec_per_epoch",
           "img_per_s", "peak_mem_mb", "zero_shot_max_abs_logits", "zero_shot_rel", "zero_shot_top1_agree"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="ImageFolder tree; default: the demo digits")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    # The window adapters need CT data in HU and their windows: benchmarks/windows.py compares them.
    p.add_argument("--adapters", nargs="+", default=[a for a in list_adapters() if ADAPTERS[a].foldable],
                   choices=list_adapters())
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--img-size", nargs=2, type=int, default=(64, 64), metavar=("H", "W"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"))
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fidelity-images", type=int, default=128, help="validation images for the zero-shot check")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "compare"))
    return p


def zero_shot(args, root: Path) -> dict[str, dict]:
    """Max |logits - repeat's| with the ImageNet head on validation images, for each adapter."""
    folder = load_folder(root, seed=args.seed)
    ds = GrayImageFolder(folder.val[: args.fidelity_images], build_transforms(args.img_size, train=False),
                         wide=folder.scan.wide)
    x = collate([ds[i] for i in range(len(ds))]).images
    model = GrayEfficientNet(args.model, adapter="repeat", pretrained=args.pretrained).eval()
    return {row["adapter"]: row for row in equivalence(model, x, args.adapters)}


def train(args, adapter: str, root: Path, out: Path) -> int:
    """Run train.py for one adapter, echoing its log; returns its exit code."""
    cmd = [sys.executable, str(ROOT / "train.py"), "--adapter", adapter, "--model", args.model, "--data", str(root),
           "--epochs", str(args.epochs), "--img-size", *map(str, args.img_size), "--batch-size", str(args.batch_size),
           "--workers", str(args.workers), "--seed", str(args.seed), "--amp", args.amp, "--device", args.device,
           "--output", str(out), "--resume", "--no-progress",
           "--pretrained" if args.pretrained else "--no-pretrained"]
    cmd += ["--channels-last"] * args.channels_last + ["--compile"] * args.compile
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        print(f"[{adapter}] {line}", end="", flush=True)
    return proc.wait()


def read_epochs(out: Path) -> list[dict]:
    path = out / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def summarise(adapter: str, epochs: list[dict], fidelity: dict, code: int) -> dict:
    row = {"adapter": adapter, "status": "ok" if code == 0 and epochs else f"failed (exit {code})"}
    if epochs:
        last = epochs[-1]
        row.update({
            "epochs_done": len(epochs),
            "best_val_acc": max(e["val_acc"] for e in epochs),
            "final_val_acc": last["val_acc"],
            "final_val_loss": last["val_loss"],
            "final_train_loss": last["train_loss"],
            "sec_per_epoch": sum(e["seconds"] for e in epochs) / len(epochs),
            "img_per_s": sum(e["img_per_s"] for e in epochs) / len(epochs),
            "peak_mem_mb": max(e["process_peak_mem_mb"] for e in epochs),
        })
    if fidelity:
        row.update({
            "zero_shot_max_abs_logits": fidelity["logits_max_abs"],
            "zero_shot_rel": fidelity["logits_rel"],
            "zero_shot_top1_agree": fidelity["top1_agree"],
        })
    return row


def plot(histories: dict[str, list[dict]], path: Path, title: str) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'gray_effnet[bench]')"
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for adapter, epochs in histories.items():
        xs = [int(e["epoch"]) + 1 for e in epochs]
        ax_acc.plot(xs, [e["val_acc"] for e in epochs], marker="o", label=adapter)
        ax_loss.plot(xs, [e["train_loss"] for e in epochs], marker="o", label=adapter)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="training loss")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


def main(args) -> None:
    args.device = str(resolve_device(args.device))
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    root = Path(args.data) if args.data else prepare_digits()
    print(f"zero-shot fidelity of each adapter on up to {args.fidelity_images} validation images of {root}")
    with torch.no_grad():
        fidelity = zero_shot(args, root)
    rows, histories = [], {}
    for adapter in args.adapters:
        out = output / adapter
        code = train(args, adapter, root, out)
        histories[adapter] = read_epochs(out)
        rows.append(summarise(adapter, histories[adapter], fidelity.get(adapter, {}), code))
        rows[-1].update(environment(torch.device(args.device), "float32" if args.amp == "none" else args.amp,
                                    model=args.model, img_size="x".join(map(str, args.img_size)),
                                    batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                                    pretrained=args.pretrained, data=str(root)))
        # Written after every adapter, so that nothing is lost if a later one fails or is interrupted.
        write_csv(rows, output / "results.csv")
        write_csv([{"adapter": a, **e} for a, es in histories.items() for e in es], output / "epochs.csv")
    note = plot(histories, output / "val_acc.png", f"{args.model}, {root.name}, {args.epochs} epochs, seed {args.seed}")
    columns = COLUMNS + ["status"]
    notes = [
        "Same seed, data, split, epochs and schedule for every adapter; one run each, so differences of a few "
        "validation images are within seed noise.",
        "zero_shot_*: the ImageNet head at initialisation, max |logits - repeat's logits| over the validation "
        "images (absolute, and relative to max |repeat logits|), and the share of images whose top-1 agrees.",
        "![validation accuracy per epoch](val_acc.png)" if (output / "val_acc.png").is_file() else note,
    ]
    write_markdown(rows, columns, output / "results.md", f"Adapter comparison: {args.model} on {root.name}", notes)
    print("\n" + format_table(rows, columns))
    print(f"\n{note}\nresults: {output / 'results.md'}\ncommand: {command_line()}")
    if any(r["status"] != "ok" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
