"""Speed and memory of each gray stem adapter against the stock 3-channel timm model, in one run.

Candidates, timed interleaved round by round (see ``_common``):

* ``stock``: ``timm.create_model(model, num_classes=...)`` holding the same weights, fed a (B, 3, H, W)
  float tensor that was repeated and normalised beforehand, as a torchvision pipeline delivers it.
* one per adapter: ``GrayEfficientNet`` fed the (B, 1, H, W) float tensor in [0, 1], already on the device
  (the uint8 transfer is ``pipeline.py``'s job); normalisation happens inside the model.

Modes:

* ``infer``: ``model.eval()`` forward under ``torch.no_grad()``, as ``gray_effnet.engine.evaluate`` runs it.
* ``train``: ``model.train()``; forward, cross-entropy, backward, ``SGD`` step (momentum 0.9), gradients
  set to ``None``. Every candidate has its own copy of the weights and its own optimizer.
* ``stem``: the stem alone under ``torch.no_grad()``: the stock conv on the normalised 3-channel tensor,
  against ``model.stem(x)`` on the gray tensor (normalisation included). ``fold`` caches its offset map
  here, since no gradient is tracked.

``ratio_to_stock`` is the median over rounds of (candidate samples/s) / (stock samples/s) within a round;
above 1 is faster than stock. ``peak_mem_mb`` is ``state_mb`` (weights, buffers, optimizer state) plus
``work_mem_mb``, the peak above that during a timed block (activations, gradients, workspace; see
``_common.PeakMemory`` for the CPU caveat). ``stem_macs`` is per image, from the weight shape and the output
size; for ``fold`` it counts the 1-channel conv on the image, and ``stem_offset_macs`` the batch-independent
offset conv, run once per batch where it is not cached (training, or under ``--compile``).

Example:
    python benchmarks/adapters.py --batch-size 8 --img-size 128 128 --repeats 3 --iters 3
    python benchmarks/adapters.py --model tf_efficientnet_b0 --batch-size 64 --amp bf16 --memory-formats nhwc
"""

import argparse
import copy
import math
import warnings
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F
from _common import (
    Candidate,
    HelpFormatter,
    PeakMemory,
    Spread,
    default_output,
    environment,
    interleave,
    report,
    resolve_device,
    synchronize,
    warm_up,
)
from torch import Tensor, nn

from gray_effnet import GrayEfficientNet, list_adapters
from gray_effnet.adapters import FoldStem
from gray_effnet.engine import AMP_DTYPES, amp_setup

MODES = ("infer", "train", "stem")
TABLE_COLUMNS = ["memory_format", "adapter", "mode", "samples_per_sec", "ms_per_step", "ratio_to_stock", "ratio_iqr",
                 "peak_mem_mb", "params", "stem_macs", "stem_offset_macs"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name")
    parser.add_argument("--adapters", nargs="+", default=list_adapters(), choices=list_adapters(),
                        help="adapters to time against stock")
    parser.add_argument("--img-size", nargs=2, type=int, default=[224, 224], metavar=("H", "W"), help="input size")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per step")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype")
    parser.add_argument("--memory-formats", nargs="+", choices=("nchw", "nhwc"), default=["nchw", "nhwc"],
                        help="memory formats to time, each in the same run (nhwc: channels_last models and inputs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each candidate (warm-up absorbs it)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="what to time")
    parser.add_argument("--repeats", type=int, default=7, help="rounds; each times every candidate once")
    parser.add_argument("--iters", type=int, default=10, help="steps per timed block (infer, train)")
    parser.add_argument("--stem-iters", type=int, default=100, help="steps per timed block (stem)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per candidate and mode")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads; default: torch's choice")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the random batch")
    parser.add_argument("--csv", default=None,
                        help="default: benchmarks/results/adapters-<model>-<device>-<amp>-<HxW>[-<flags>].csv")
    parser.add_argument("--md", default=None, help="default: the CSV path with .md")
    return parser


def tensor_mb(tensors) -> float:
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def state_mb(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> float:
    """Memory of the weights and buffers (and the optimizer's state) of one candidate."""
    mb = tensor_mb(list(model.parameters()) + list(model.buffers()))
    if optimizer is not None:
        mb += tensor_mb(t for s in optimizer.state.values() for t in s.values() if isinstance(t, Tensor))
    return mb


def conv_macs(weight: Tensor, out_hw: tuple[int, int]) -> int:
    """Multiply-accumulates of one image through a conv: O * (I / groups) * kh * kw * H' * W'."""
    return math.prod(weight.shape) * out_hw[0] * out_hw[1]


def dynamo_frames() -> int:
    """Frames torch.compile has compiled so far in this process: a change during timing means warm-up was short."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["total"])


def build_models(args: argparse.Namespace) -> tuple[dict[str, nn.Module], GrayEfficientNet]:
    """``stock`` and one ``GrayEfficientNet`` per adapter, all holding the same (random) weights."""
    torch.manual_seed(args.seed)
    base = GrayEfficientNet(args.model, adapter="repeat", num_classes=args.num_classes)
    stock = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    stock.load_state_dict(base.timm_state_dict())  # "repeat" keeps timm's 3-channel stem weight
    models: dict[str, nn.Module] = {"stock": stock}
    for name in args.adapters:
        models[name] = copy.deepcopy(base).set_adapter(name)
    return models, base


def check_outputs(models: dict[str, nn.Module], x_gray: Tensor, x_rgb: Tensor) -> dict[str, float]:
    """Max |logit - stock logit| in eval mode, float32: a guard that the candidates compute the same net."""
    out = {}
    with torch.no_grad():
        ref = models["stock"].eval()(x_rgb[:2]).float()
        for name, model in models.items():
            got = model.eval()(x_gray[:2] if name != "stock" else x_rgb[:2]).float()
            out[name] = (got - ref).abs().max().item()
    return out


def make_step(mode: str, model: Callable, x: Tensor, y: Tensor, autocast: Callable,
              optimizer: torch.optim.Optimizer | None, scaler: torch.amp.GradScaler | None) -> Callable[[], object]:
    """One step of ``mode`` on ``model`` (possibly compiled) with fixed inputs."""
    if mode == "train":
        def train_step() -> None:
            with autocast():
                loss = F.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            # Freed after the step, so that gradients count in work_mem_mb rather than in state_mb.
            optimizer.zero_grad(set_to_none=True)

        return train_step

    def no_grad_step() -> Tensor:
        with torch.no_grad(), autocast():
            return model(x)

    return no_grad_step


def main(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as in timm's benchmark.py and train.py
    if args.compile:
        # Every candidate and mode is a new guard set on the same code objects (GrayEfficientNet.forward,
        # StemAdapter.forward); past the default limit of 8, dynamo silently falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    autocast, _ = amp_setup(device, args.amp)
    dtype = str(AMP_DTYPES[args.amp] or torch.float32).removeprefix("torch.")
    h, w = args.img_size
    bsz = args.batch_size
    models, base = build_models(args)
    gen = torch.Generator().manual_seed(args.seed)
    x_gray0 = torch.rand(bsz, 1, h, w, generator=gen).to(device)
    mean = torch.tensor(base.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(base.std, device=device).view(1, 3, 1, 1)
    y = torch.randint(0, args.num_classes, (bsz,), generator=gen).to(device)
    rows: list[dict] = []
    for memory_format in args.memory_formats:
        rows += time_format(args, models, base, memory_format, x_gray0, mean, std, y, device, autocast, dtype)
    return rows


def time_format(args, models, base, memory_format, x_gray0, mean, std, y, device, autocast, dtype) -> list[dict]:
    """Every mode and candidate in one memory format (models and inputs converted to it)."""
    h, w = args.img_size
    bsz = args.batch_size
    fmt_mem = torch.channels_last if memory_format == "nhwc" else torch.contiguous_format
    # What a torchvision Grayscale(3) + Normalize pipeline hands the stock model: (B,1,H,W) -> (B,3,H,W).
    x_rgb = ((x_gray0.expand(-1, 3, -1, -1) - mean) / std).contiguous(memory_format=fmt_mem)
    x_gray = x_gray0.clone(memory_format=fmt_mem)

    # Setup order as in train.py: to(device) -> channels_last -> optimizer -> compile.
    for model in models.values():
        model.to(device, memory_format=fmt_mem)
    maxdiff = check_outputs(models, x_gray, x_rgb)

    stem_name = base.stem_name
    stems: dict[str, nn.Module] = {
        name: (m.get_submodule(stem_name) if name == "stock" else m.stem) for name, m in models.items()
    }
    with torch.no_grad():
        out_hw = tuple(stems["stock"](x_rgb[:1]).shape[-2:])
    compile_ = torch.compile if args.compile else (lambda m: m)

    env = environment(device, dtype, model=args.model, batch_size=bsz, img_size=f"{h}x{w}", amp=args.amp,
                      memory_format=memory_format, compile=args.compile, optimizer="SGD(momentum=0.9)",
                      cudnn_benchmark=torch.backends.cudnn.benchmark if device.type == "cuda" else "n/a")
    rows: list[dict] = []
    for mode in args.modes:
        candidates, states = [], {}
        for name, model in models.items():
            optimizer = scaler = None
            if mode == "train":
                model.train()
                optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
                scaler = amp_setup(device, args.amp)[1]
            else:
                model.eval()
            if mode == "stem":
                target, inp = compile_(stems[name]), (x_rgb if name == "stock" else x_gray)
            else:
                target, inp = compile_(model), (x_rgb if name == "stock" else x_gray)
            candidates.append(Candidate(name, make_step(mode, target, inp, y, autocast, optimizer, scaler), bsz))
            states[name] = (model if mode != "stem" else stems[name], optimizer)
        iters = args.stem_iters if mode == "stem" else args.iters
        warm_up(candidates, args.warmup if not args.compile else max(args.warmup, 3), device, desc=f"{mode} warm-up")
        synchronize(device)
        compiled_before = dynamo_frames()
        interleave(candidates, args.repeats, iters, device, desc=f"{mode} rounds")
        late_compiles = dynamo_frames() - compiled_before
        if late_compiles:
            warnings.warn(f"{mode}: torch.compile compiled {late_compiles} frame(s) during the timed rounds; "
                          "raise --warmup", stacklevel=1)

        stock = candidates[0]
        for cand in candidates:
            module, optimizer = states[cand.name]
            ratios = Spread.of(cand.ratios_to(stock))
            steps = cand.step_spread
            stem_conv = stems[cand.name] if cand.name == "stock" else stems[cand.name].conv
            # fold trains the O x 3 x k x k weight but convolves the image with an O x 1 x k x k one.
            is_fold = isinstance(stems[cand.name], FoldStem)
            stem_macs = conv_macs(stem_conv.weight[:, :1] if is_fold else stem_conv.weight, out_hw)
            offset_cached = mode != "train" and not args.compile
            st_mb = state_mb(module, optimizer)
            work = cand.peak_mem_mb
            rows.append({
                "model": args.model,
                "adapter": cand.name,
                "mode": mode,
                "batch_size": bsz,
                "img_size": f"{h}x{w}",
                "samples_per_sec": cand.samples_per_sec,
                "ms_per_step": steps.median * 1e3,
                "ms_min": steps.min * 1e3,
                "ms_max": steps.max * 1e3,
                "ratio_to_stock": ratios.median,
                "ratio_q1": ratios.q1,
                "ratio_q3": ratios.q3,
                "ratio_min": ratios.min,
                "ratio_max": ratios.max,
                "ratio_iqr": f"{ratios.q1:.3f}-{ratios.q3:.3f}",
                "peak_mem_mb": st_mb + work if work is not None else None,
                "state_mb": st_mb,
                "work_mem_mb": work,
                "params": sum(p.numel() for p in models[cand.name].parameters()),
                "stem_params": sum(p.numel() for p in stem_conv.parameters()),
                "stem_macs": stem_macs,
                "stem_offset_macs": conv_macs(stem_conv.weight[:, :1], out_hw) if is_fold and not offset_cached else 0,
                "logit_max_abs_diff": maxdiff[cand.name],
                "rounds": args.repeats,
                "iters": iters,
                "late_compiles": late_compiles,
                **env,
                "mem_kind": PeakMemory(device).kind,
            })
    return rows


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    rows = main(args)
    device = rows[0]["device"]
    formats = "-" + "-".join(args.memory_formats) if args.memory_formats != ["nchw", "nhwc"] else ""
    tags = formats + ("-compile" if args.compile else "")
    size = "x".join(map(str, args.img_size))
    csv_path = args.csv or default_output(f"adapters-{args.model}-{device}-{args.amp}-{size}{tags}", ".csv")
    md_path = args.md or str(csv_path).removesuffix(".csv") + ".md"
    notes = [
        "ratio_to_stock: median over rounds of candidate/stock samples/s in the same round (>1 = faster); "
        "ratio_iqr: its quartiles. peak_mem_mb = state (weights, buffers, optimizer) + peak working memory.",
    ]
    header = (f"{args.model}  {rows[0]['img_size']}  batch {args.batch_size}  {rows[0]['device_name']}  "
              f"{rows[0]['dtype']}  torch {rows[0]['torch']}  timm {rows[0]['timm']}")
    report(rows, TABLE_COLUMNS, csv_path, f"Stem adapters vs stock timm: {args.model}", notes, md_path, header)
