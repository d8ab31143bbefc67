"""Why a 1-channel stem is not 3x faster: the bare stem convolutions, and the cost of writing their output.

Times ``F.conv2d`` from 3 and from 1 input channel into the stem's output channels, and a plain fill of
a tensor of the output's size, interleaved round by round (see ``_common``).

    python benchmarks/stem_conv.py --batch-size 32 --img-size 224 224
"""

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    Candidate,
    Spread,
    default_output,
    environment,
    interleave,
    report,
    resolve_device,
    warm_up,
)

COLUMNS = ["candidate", "ms_per_step", "ratio_to_conv3", "macs_per_image"]


def main(args: argparse.Namespace) -> None:
    device = resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    h, w = args.img_size
    out_hw = ((h + 1) // 2, (w + 1) // 2)  # 3x3, stride 2, padding 1
    x3 = torch.rand(args.batch_size, 3, h, w, generator=g).to(device)
    x1 = x3[:, :1].contiguous()
    w3 = torch.randn(args.out_channels, 3, 3, 3, generator=g).to(device)
    w1 = w3.sum(1, keepdim=True)
    out_shape = (args.batch_size, args.out_channels, *out_hw)
    steps = {
        "conv 3->O": (lambda: F.conv2d(x3, w3, None, 2, 1), 27),
        "conv 1->O": (lambda: F.conv2d(x1, w1, None, 2, 1), 9),
        "write output only": (lambda: torch.empty(out_shape, device=device).fill_(1.0), 0),
    }
    candidates = [Candidate(name, step, args.batch_size) for name, (step, _) in steps.items()]
    with torch.no_grad():
        warm_up(candidates, args.warmup, device)
        interleave(candidates, args.repeats, args.iters, device)
    base = candidates[0]
    rows = []
    for cand in candidates:
        rows.append({
            "candidate": cand.name,
            "ms_per_step": cand.step_spread.median * 1e3,
            "ratio_to_conv3": Spread.of(cand.ratios_to(base)).median,
            "macs_per_image": steps[cand.name][1] * args.out_channels * out_hw[0] * out_hw[1],
            **environment(device, "float32", batch_size=args.batch_size, img_size=f"{h}x{w}",
                          out_channels=args.out_channels),
        })
    csv_path = Path(args.csv or default_output(f"stem_conv-{device.type}", ".csv"))
    notes = ["ratio_to_conv3: median over rounds of conv-3 time / candidate time in the same round (>1 = faster)."]
    report(rows, COLUMNS, csv_path, "Stem convolutions: 3 against 1 input channel", notes)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", nargs=2, type=int, default=(224, 224), metavar=("H", "W"))
    p.add_argument("--out-channels", type=int, default=32, help="the stem's width (32 for B0 and Lite0)")
    p.add_argument("--device", default=None)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--csv", default=None)
    main(p.parse_args())
