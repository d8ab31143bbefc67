"""Command-line tools: ``python -m gray_effnet {explain,export,predict} --help``."""

import argparse
import sys

import torch

from .adapters import list_adapters
from .errors import GrayEffnetError


def _explain(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    from .explain import equivalence, format_report, trace
    from .model import GrayEfficientNet

    h, w = args.img_size
    model = GrayEfficientNet(
        args.model, adapter=args.adapter, pretrained=args.pretrained, weights=args.weights
    ).eval()
    if args.weights:
        weights_note = f"from {args.weights}"
    elif args.pretrained:
        weights_note = "pretrained ImageNet"
    else:
        weights_note = "random init (pass --pretrained for ImageNet weights); the shapes are the same"
    if args.image:
        from .data import read_gray

        img = read_gray(args.image)
        source = args.image
    else:
        g = torch.Generator().manual_seed(0)
        img = torch.randint(0, 256, (1, 32, 32), dtype=torch.uint8, generator=g)
        source = "a seeded random 32x32 image"
    x = F.interpolate(img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8) if img.dtype == torch.uint8 else x
    print(format_report(model, trace(model, x), equivalence(model, x), weights_note))
    print(f"input: {source}, resized to {h}x{w}")


def _export(args: argparse.Namespace) -> None:
    from .export import export

    result = export(args.weights, args.format, args.output, img_size=args.img_size, check=not args.no_check)
    print(result)


def _predict(args: argparse.Namespace) -> None:
    from .predict import predict

    predict(args)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gray_effnet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="trace the channels of a 1-channel image through a 3-channel network")
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--adapter", default="broadcast", choices=list_adapters())
    p.add_argument("--img-size", nargs=2, type=int, default=(128, 128), metavar=("H", "W"))
    p.add_argument("--pretrained", action="store_true", help="load ImageNet weights (bundled for lite0/1/2)")
    p.add_argument("--weights", default=None, help="a local weights file instead")
    p.add_argument("--image", default=None, help="an image file to trace (default: a seeded random image)")
    p.set_defaults(func=_explain)

    p = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript with a folded 1-channel stem")
    p.add_argument("--weights", required=True, help="a checkpoint of this project (best.safetensors)")
    p.add_argument("--format", required=True, choices=("onnx", "torchscript"))
    p.add_argument("--output", required=True)
    p.add_argument("--img-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="example input size (default: the checkpoint's)")
    p.add_argument("--no-check", action="store_true", help="skip the comparison with the PyTorch model")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="classify a folder of images with a checkpoint, write a CSV")
    p.add_argument("--weights", required=True)
    p.add_argument("--data", required=True, help="a folder of images, with or without class subfolders")
    p.add_argument("--output", default=None, help="CSV path (default: predictions.csv beside the weights)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--intensity", nargs="+", default=None, metavar="MAPPING",
                   help="how pixels map to [0, 1] (see train.py --help); default: the checkpoint's")
    p.set_defaults(func=_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        args.func(args)
    except GrayEffnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
