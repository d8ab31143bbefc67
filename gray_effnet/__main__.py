"""Command-line tools: ``python -m gray_effnet {cam,explain,export,pack,predict,report} --help``."""

import argparse
import sys
from pathlib import Path

# Only the subcommand that runs imports torch and timm (seconds), so that --help answers at once.
from .cli import (
    HelpFormatter,
    add_data_options,
    add_speed_options,
    exit_without_teardown,
    resolve_device,
    run_cli,
    table_options,
)


def _cam(args: argparse.Namespace) -> None:
    from .cam import write_cams

    written = write_cams(args.weights, args.images, args.output, target=args.target, device=args.device,
                         batch_size=args.batch_size, progress=not args.no_progress)
    print(f"{len(written)} class-activation map(s) in {args.output}")


def _report(args: argparse.Namespace) -> None:
    import time

    from .run_report import report_run

    start = time.perf_counter()
    path = report_run(args.run_dir, data=args.data, labels=args.labels, device=args.device,
                      batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress)
    print(f"report: {path} ({time.perf_counter() - start:.1f}s)")


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
    from .limits import set_max_pixels
    from .pack import write_pack

    set_max_pixels(args.max_pixels)
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
            threads=args.threads, strict=args.strict_data, max_pixels=args.max_pixels, report=args.report,
            table=table_options(args),             progress=not args.no_progress)


def get_args_parser() -> argparse.ArgumentParser:
    prog = "gray-effnet" if Path(sys.argv[0]).name == "gray-effnet" else "python -m gray_effnet"
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cam", formatter_class=HelpFormatter,
                       help="draw class-activation maps (Grad-CAM) of images over them, one PNG each")
    p.add_argument("--weights", required=True, help="a checkpoint of this project (best.safetensors)")
    p.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files, or folders of them")
    p.add_argument("--output", required=True, help="folder for the PNGs (<image name>_cam.png)")
    p.add_argument("--target", default=None, metavar="CLASS",
                   help="the class to map, by name or index (default: each image's predicted class)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward and backward pass")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cam)

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
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="with labelled data, write <csv stem>_report.html beside the CSV")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    p = sub.add_parser("report", formatter_class=HelpFormatter,
                       help="write RUN_DIR/report.html again from the run folder: its best checkpoint on its "
                       "validation split")
    p.add_argument("run_dir", help="a train.py output folder (config.json, metrics.csv, best.safetensors)")
    p.add_argument("--data", default=None, help="the data folder or pack, if it moved since training")
    p.add_argument("--labels", default=None, metavar="FILE.csv",
                   help="the run's label table, if it moved since training (its other flags are config.json's)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--workers", type=int, default=0, help="data loader processes")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    return run_cli(args.func, args)


if __name__ == "__main__":
    exit_without_teardown(main())
