"""Command-line tools: ``python -m gray_effnet {explain,export,pack,predict} --help``."""

import argparse
import sys
from pathlib import Path

# Only the subcommand that runs imports torch and timm (seconds), so that --help answers at once.
from .cli import HelpFormatter, add_data_options, add_speed_options, resolve_device, run_cli, table_options


def _explain(args: argparse.Namespace) -> None:
    from .explain import explain

    print(explain(args.model, args.adapter, img_size=args.img_size, pretrained=args.pretrained,
                  weights=args.weights, image=args.image, seed=args.seed))


def _export(args: argparse.Namespace) -> None:
    from .export import export

    result = export(args.weights, args.format, args.output, img_size=args.img_size, check=not args.no_check)
    print(result)


def _pack(args: argparse.Namespace) -> None:
    import shlex
    import warnings

    from .images import UnreadableImageWarning
    from .intensity import parse_intensity_args
    from .pack import write_pack

    table = table_options(args)
    with warnings.catch_warnings():  # the bad files are listed once below, with their reasons
        warnings.simplefilter("ignore", UnreadableImageWarning)
        pack = write_pack(args.data, args.output, args.img_size, val_split=args.val_split, seed=args.seed,
                          intensity=parse_intensity_args(args.intensity), dtype=args.dtype, strict=args.strict_data,
                          workers=args.workers, progress=not args.no_progress,
                          command=shlex.join(["python", "-m", "gray_effnet", *sys.argv[1:]]), table=table)
    h, w = pack.img_size
    kind = "findings" if pack.task == "multi" else "classes"
    print(f"packed {len(pack.train) + len(pack.val)} images of {len(pack.classes)} {kind} "
          f"({', '.join(pack.classes)}) from {pack.source} into {pack.root}: {h}x{w} {pack.dtype}, "
          f"{len(pack.train)} train / {len(pack.val)} val, {pack.nbytes / 2**20:.1f} MB, {pack.meta['seconds']:.1f}s")
    print(f"skipped {len(pack.scan.bad)} unreadable file(s)" + "".join(f"\n  {p}: {why}" for p, why in pack.scan.bad))


def _predict(args: argparse.Namespace) -> None:
    from .intensity import parse_intensity_args
    from .predict import predict

    predict(args.weights, args.data, output=args.output, batch_size=args.batch_size, workers=args.workers,
            device=resolve_device(args.device), channels_last=args.channels_last,
            intensity=parse_intensity_args(args.intensity), img_size=args.img_size, amp=args.amp,
            threads=args.threads, strict=args.strict_data, progress=not args.no_progress, table=table_options(args))


def get_args_parser() -> argparse.ArgumentParser:
    prog = "gray-effnet" if Path(sys.argv[0]).name == "gray-effnet" else "python -m gray_effnet"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", formatter_class=HelpFormatter,
                       help="trace the channels of a 1-channel image through a 3-channel network")
    p.add_argument("--model", default="tf_efficientnet_lite0", help="a timm model name")
    p.add_argument("--adapter", default="broadcast",
                   help="a registered stem adapter (repeat, broadcast, sum, fold, ...; an unknown name lists them)")
    p.add_argument("--img-size", nargs=2, type=int, default=(128, 128), metavar=("H", "W"), help="input size")
    p.add_argument("--pretrained", action="store_true", help="load ImageNet weights (bundled for lite0/1/2)")
    p.add_argument("--weights", default=None, help="a local weights file instead")
    p.add_argument("--image", default=None, help="an image file to trace (default: a seeded random image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the random image")
    p.set_defaults(func=_explain)

    p = sub.add_parser("export", formatter_class=HelpFormatter,
                       help="export a checkpoint to ONNX or TorchScript with a folded 1-channel stem")
    p.add_argument("--weights", required=True, help="a checkpoint of this project (best.safetensors)")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--output", required=True)
    p.add_argument("--img-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="example input size (default: the checkpoint's)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the PyTorch model")
    p.set_defaults(func=_export)

    p = sub.add_parser("pack", formatter_class=HelpFormatter,
                       help="decode and resize an image folder once into a memory-mapped pack that train.py reads")
    add_data_options(p, data_help="ImageFolder tree (or one with train/ and val/), or with --labels the folder of "
                     "the table's images", data_required=True,
                     img_size_help="size to store, the size train.py will train at", img_size_required=True,
                     intensity_default=["full"], workers_help="decoding threads (default: the CPU count)",
                     workers_default=None)
    p.add_argument("--output", required=True, help="the pack folder (an older pack there is replaced when done)")
    p.add_argument("--val-split", type=float, default=0.2, help="validation fraction when DIR has no train/val")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument("--dtype", default="auto", choices=("auto", "uint8", "uint16", "float16"),
                   help="stored dtype; auto: uint8 for 8-bit data, else uint16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_pack)

    p = sub.add_parser("predict", formatter_class=HelpFormatter,
                       help="classify a folder of images with a checkpoint, write a CSV")
    p.add_argument("--weights", required=True)
    add_data_options(p, data_required=True,
                     data_help="a folder of images, with or without class subfolders, a pack (all its images), or "
                     "with --labels the folder of the table's images",
                     img_size_help="input size (default: the checkpoint's)")
    p.add_argument("--output", default=None, help="CSV path (default: predictions_<folder>.csv beside the weights)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    add_speed_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_cli(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
