"""Fine-tune an ImageNet EfficientNet on grayscale images, with an explicit gray stem adapter.

With no arguments it trains the offline demo: scikit-learn's digits, written once as PNG class folders,
on the bundled ImageNet weights of tf_efficientnet_lite0. No network and no data of yours are needed.

Single process (CPU, or one GPU):
    python train.py --adapter broadcast
    python train.py --data /path/to/folders --img-size 84 112 --epochs 20 --amp bf16
Several GPUs on one machine (or nodes: see torchrun --help), one process each:
    torchrun --standalone --nproc_per_node=4 train.py --data /path/to/folders
Resume after an interruption (the same command, plus --resume):
    python train.py --data /path/to/folders --output runs/xray --resume
Evaluate a checkpoint on the validation split (accuracy, per-class precision/recall, confusion matrix):
    python train.py --evaluate --weights runs/xray/best.safetensors --data /path/to/folders
Decode and resize the images once into a pack, then train on it (augmentation runs on the device):
    python -m gray_effnet pack --data /path/to/folders --img-size 84 112 --output /path/to/pack
    python train.py --data /path/to/pack
CT in Hounsfield units (DICOM), with three learnable intensity windows as the stem's channels:
    python train.py --data /path/to/dicom --intensity range -1024 3071 --adapter wso --windows 40:80 80:200 600:2800
"""

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gray_effnet
from gray_effnet import DataError, GrayEfficientNet, GrayEffnetError, InputError, WeightsError, list_adapters
from gray_effnet.checkpoint import (
    EpochRow,
    cleanup_temporaries,
    load_model,
    load_state,
    resolve_resume,
    save_checkpoint,
    set_rng_state,
    write_metrics,
)
from gray_effnet.cli import HelpFormatter
from gray_effnet.data import (
    INTENSITY_HELP,
    GrayImageFolder,
    build_transforms,
    load_folder,
    make_loader,
    prepare_digits,
    set_loader_epoch,
)
from gray_effnet.engine import amp_setup, evaluate, process_peak_mem_mb, train_one_epoch
from gray_effnet.intensity import WINDOWS_HELP, parse_intensity, parse_intensity_args, parse_windows
from gray_effnet.model import min_input_size
from gray_effnet.pack import BatchAugment, Pack, PackedDataset, is_pack, open_pack
from gray_effnet.report import format_eval, write_predictions
from gray_effnet.run_report import report_after_training, report_line, write_report
from gray_effnet.runinfo import device_name, git_commit
from gray_effnet.tblog import EpochLog, require_tensorboard
from gray_effnet.tuning import CHANNELS_LAST_MODES, ThreadGovernor, choose_channels_last, plan_threads
from gray_effnet.weights import atomic_write


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("model and weights")
    g.add_argument("--model", default="tf_efficientnet_lite0", help="any timm EfficientNet (or CNN with a Conv2d stem)")
    g.add_argument("--adapter", default="broadcast", choices=list_adapters(),
                   help="how the gray image meets the stem (README: 'Which adapter to pick')")
    g.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                   help="start from ImageNet weights (bundled offline for tf_efficientnet_lite0/1/2)")
    g.add_argument("--weights", default=None, help="a local weights file (.safetensors/.pth); overrides --pretrained")
    g.add_argument("--drop-rate", type=float, default=0.2, help="dropout before the classifier")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="ImageFolder tree (or one with train/ and val/), or a pack (python -m gray_effnet pack); "
                   "default: the digits demo")
    g.add_argument("--val-split", type=float, default=0.2, help="validation fraction when DIR has no train/val")
    g.add_argument("--img-size", nargs=2, type=int, default=None, metavar=("H", "W"),
                   help="input size, H != W is fine (default: 64 64; with --evaluate, the checkpoint's)")
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--workers", type=int, default=2, help="data loader processes per training process")
    g.add_argument("--intensity", nargs="+", default=None, metavar="MAPPING", help=INTENSITY_HELP)
    g.add_argument("--windows", nargs="+", default=None, metavar="C:W", help=WINDOWS_HELP)
    g.add_argument("--strict-data", action="store_true", help="decode every file first; refuse to start if any is bad")
    g.add_argument("--crop-scale", type=float, default=0.8, help="smallest area of the random crop (1 = no crop)")
    g.add_argument("--hflip", type=float, default=0.0, help="horizontal flip probability")
    g.add_argument("--rotate", type=float, default=0.0, help="random rotation range in degrees")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=6)
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (for the global batch)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warmup, then cosine decay")
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    g = p.add_argument_group("speed")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype")
    g.add_argument("--channels-last", default="auto", choices=CHANNELS_LAST_MODES,
                   help="NHWC memory format; auto: on with CUDA, on the CPU where a short probe finds it faster")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads of each process (default: its share of the cores; the first lines say)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (DDP on CUDA)")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", default=None, help="output folder (default: runs/<model>-<adapter>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from PATH, or with no PATH from OUTPUT/last.state.pt if it exists")
    g.add_argument("--evaluate", action="store_true", help="only evaluate --weights on the validation split")
    g.add_argument("--log-every", type=int, default=20, help="steps between loss checks and progress updates")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    g.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUTPUT/report.html after the last epoch (with --evaluate: eval_report.html)")
    g.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="log each epoch's metrics and class-activation maps for TensorBoard (DIR default: "
                   "OUTPUT/tensorboard)")
    return p


def log(*a) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word if n == 1 else words or word + 's'}"


def check_args(args) -> None:
    """Refuse impossible arguments before any work: no data scan, no model, no output folder."""
    checks = [
        (args.epochs >= 1, f"--epochs must be at least 1; got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1; got {args.batch_size}"),
        (args.workers >= 0, f"--workers must be 0 or more; got {args.workers}"),
        (args.lr > 0, f"--lr must be positive; got {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be 0 or more; got {args.weight_decay}"),
        (args.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more; got {args.warmup_epochs}"),
        (0 < args.val_split < 1, f"--val-split must be between 0 and 1; got {args.val_split}"),
        (0 < args.crop_scale <= 1, f"--crop-scale must be in (0, 1]; got {args.crop_scale}"),
        (0 <= args.hflip <= 1, f"--hflip is a probability in [0, 1]; got {args.hflip}"),
        (0 <= args.rotate <= 180, f"--rotate must be in [0, 180] degrees; got {args.rotate}"),
        (0 <= args.label_smoothing < 1, f"--label-smoothing must be in [0, 1); got {args.label_smoothing}"),
        (args.clip_grad is None or args.clip_grad > 0, f"--clip-grad must be positive; got {args.clip_grad}"),
        (args.log_every >= 1, f"--log-every must be at least 1; got {args.log_every}"),
        (args.threads is None or args.threads >= 1, f"--threads must be at least 1; got {args.threads}"),
        (not args.evaluate or args.weights, "--evaluate needs --weights PATH (a checkpoint of this project)"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)
    if not args.evaluate:
        smallest = min_input_size(args.model)  # also checks the model name, suggesting close ones
        if args.img_size is not None and min(args.img_size) < smallest:
            raise InputError(f"--img-size {args.img_size[0]} {args.img_size[1]} is smaller than {args.model}'s "
                             f"total stride; use at least {smallest} {smallest}")
    if args.sync_bn and not str(args.device).startswith("cuda"):  # torch's SyncBatchNorm raises on CPU modules
        raise InputError(f"--sync-bn needs CUDA devices; this run is on {args.device}")
    if args.tensorboard is not None:
        require_tensorboard()


def resolve_data(args, primary: bool):
    """The data folder (writing the demo digits once), checked and split before anything trains."""
    root = args.data
    if is_pack(root):  # decoded once by `python -m gray_effnet pack`; open_pack refuses a stale one
        return root, open_pack(root)
    if root is None:
        if primary:
            root = prepare_digits()
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for rank 0 to write the PNGs
        root = prepare_digits()
    return root, load_folder(root, val_split=args.val_split, seed=args.seed, strict=args.strict_data)


def data_line(args, root, folder, wide: bool) -> str:
    packed = isinstance(folder, Pack)
    val_split = folder.meta["val_split"] if packed else args.val_split
    split = " (given split)" if folder.presplit else f" (seeded stratified split, {val_split:.0%} val)"
    classes = plural(len(folder.classes), "class", "classes")
    what = f"pack of {folder.source}, {folder.dtype}, {folder.note}; " if packed else ""
    return (f"data: {root}: {what}{classes}, {len(folder.train)} train / {len(folder.val)} val images{split}; "
            f"{folder.scan.converted} converted from colour, {len(folder.scan.bad)} unreadable skipped, "
            f"{len(folder.ignored)} non-image files ignored; {'float32' if wide else 'uint8'} batches")


def adapter_options(args) -> tuple[str, dict]:
    """The intensity mapping and the adapter's options; windows are in physical units, so they need a range."""
    intensity = parse_intensity_args(args.intensity) or parse_intensity("full")
    windowed = "windows" in gray_effnet.ADAPTERS[args.adapter].option_names
    if args.windows and not windowed:
        raise InputError(f"--windows is for --adapter window or wso; this run uses {args.adapter!r}")
    if not windowed:
        return str(intensity), {}
    if intensity.kind != "range" or not args.windows:
        raise InputError(
            f"--adapter {args.adapter} needs windows in physical units and the range they are read in, e.g. for CT: "
            "--intensity range -1024 3071 --windows 40:80 80:200 600:2800"
            + (f" (the intensity mapping is {str(intensity)!r})" if intensity.kind != "range" else ""))
    windows = parse_windows(args.windows)
    if len(windows) != 3:  # before the data scan, which can take a while on a large DICOM folder
        raise InputError(
            f"--adapter {args.adapter} needs 3 windows, one per stem channel; got {len(windows)}")
    return str(intensity), {"windows": windows, "range": [intensity.low, intensity.high]}


def pack_settings(args, pack: Pack, intensity) -> tuple[tuple[int, int], str]:
    """A pack fixes the image size and the intensity mapping: refuse others rather than train on a mismatch."""
    if args.img_size and tuple(args.img_size) != pack.img_size:
        raise InputError(f"--img-size {args.img_size[0]} {args.img_size[1]}: the pack {pack.root} holds "
                         f"{pack.img_size[0]}x{pack.img_size[1]} images; leave out --img-size, or pack again at "
                         "that size (python -m gray_effnet pack --img-size H W)")
    named = None if intensity is None else str(parse_intensity(intensity))
    if named is not None and named != pack.intensity:
        raise InputError(f"intensity mapping {named!r}, but the pack {pack.root} was read with {pack.intensity!r}; "
                         f"pack again with --intensity {named}")
    return pack.img_size, pack.intensity


def build_datasets(args, folder, size: tuple[int, int], intensity: str, rank: int = 0):
    """Train and val datasets, the batch augmentation on the device (packs only), and loader workers.

    A pack's loader reads a whole batch with one index into a memory map: worker processes would only add
    their start-up, so it reads in the training process."""
    if isinstance(folder, Pack):
        augment = BatchAugment(size, crop_scale=args.crop_scale, hflip=args.hflip, rotate=args.rotate,
                               seed=args.seed + 1_000_003 * rank)  # ranks augment differently
        return PackedDataset(folder, "train"), PackedDataset(folder, "val"), augment, 0
    augment = build_transforms(size, train=True, crop_scale=args.crop_scale, hflip=args.hflip, rotate=args.rotate)
    train_ds = GrayImageFolder(folder.train, augment, wide=folder.scan.wide, intensity=intensity)
    val_ds = GrayImageFolder(folder.val, build_transforms(size, train=False), wide=folder.scan.wide,
                             intensity=intensity)
    return train_ds, val_ds, None, args.workers


def run_evaluate(args, device: torch.device, autocast) -> None:
    model = load_model(args.weights).to(device)
    root, folder = resolve_data(args, primary=True)
    if model.class_names and model.class_names != folder.classes:
        raise DataError(f"the checkpoint's classes {model.class_names} differ from {root}'s {folder.classes}")
    img_size = args.img_size or model.img_size or (64, 64)
    intensity = parse_intensity_args(args.intensity) or model.intensity  # the checkpoint's, unless named
    if isinstance(folder, Pack):
        img_size, intensity = pack_settings(args, folder, intensity)
    if min(img_size) < model.min_size:
        raise InputError(f"--img-size {img_size[0]} {img_size[1]} is smaller than the model's total stride "
                         f"{model.min_size}")
    _, ds, _, workers = build_datasets(args, folder, img_size, str(intensity))
    loader = make_loader(ds, args.batch_size, train=False, workers=workers, pin_memory=device.type == "cuda")
    log(data_line(args, root, folder, ds.wide) + f"; evaluating the {len(folder.val)} validation images")
    torch.set_num_threads(plan_threads(workers=workers, requested=args.threads).threads)
    channels_last, why = choose_channels_last(args.channels_last, model, device, (args.batch_size, 1, *img_size),
                                              train=False, autocast=autocast)
    log(why)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    result = evaluate(model, loader, device=device, num_classes=model.num_classes, autocast=autocast,
                      channels_last=channels_last, keep_predictions=True, progress=not args.no_progress)
    print(format_eval(result, folder.classes))
    out = Path(args.output) if args.output else Path(args.weights).parent
    path = out / "eval_predictions.csv"
    replaced = path.exists()
    print(f"predictions: {write_predictions(path, result, folder.classes)}{' (replaced)' if replaced else ''}")
    if args.report:
        print(report_line(lambda: write_report(out / "eval_report.html", result=result, class_names=folder.classes,
                                               model=model, dataset=ds, run_dir=Path(args.weights).parent,
                                               data_note=data_line(args, root, folder, ds.wide),
                                               what=f"{args.weights} on the validation split",
                                               progress=not args.no_progress)))


def main(args) -> None:
    check_args(args)
    # -- devices and processes --------------------------------------------------------------------------
    d = init_distributed_device_so(device=args.device)  # reads torchrun's env; gloo on CPU, nccl on CUDA
    device, rank, world = torch.device(d["device"]), d["global_rank"], d["world_size"]
    primary = rank == 0
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    autocast, scaler = amp_setup(device, args.amp)
    if args.evaluate:
        return run_evaluate(args, device, autocast)
    intensity, adapter_kwargs = adapter_options(args)
    output = Path(args.output or f"runs/{args.model}-{args.adapter}")

    # -- everything that can refuse the run, before anything is written: resume state, data, model -------------
    state_path = resolve_resume(args.resume, output) if args.resume else None
    if args.resume == "auto" and state_path is None:
        log(f"--resume: nothing to resume in {output}, starting fresh")
    root, folder = resolve_data(args, primary)
    h, w = args.img_size or (64, 64)
    if isinstance(folder, Pack):
        (h, w), intensity = pack_settings(args, folder, parse_intensity_args(args.intensity))
        if min(h, w) < min_input_size(args.model):
            raise InputError(f"the pack's {h}x{w} images are smaller than {args.model}'s total stride")
    state = None
    if state_path is not None:
        state = load_state(state_path, {"model_name": args.model, "adapter": args.adapter,
                                        "num_classes": len(folder.classes), "intensity": intensity})
    train_ds, val_ds, batch_augment, workers = build_datasets(args, folder, (h, w), intensity, rank)
    loader_kw = {"workers": workers, "pin_memory": device.type == "cuda", "seed": args.seed,
                 "world_size": world, "rank": rank}
    train_loader = make_loader(train_ds, args.batch_size, train=True, **loader_kw)
    val_loader = make_loader(val_ds, args.batch_size, train=False, **loader_kw)
    log(data_line(args, root, folder, train_ds.wide))
    threads = plan_threads(workers=workers, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                           requested=args.threads)
    torch.set_num_threads(threads.threads)
    log(threads.describe())
    # On the CPU, fewer threads once the cores turn out to be shared (benchmarks/threads.py measures why).
    governor = ThreadGovernor(threads.threads if device.type == "cpu" and args.threads is None else 1, log=log)

    # -- model. Order: to(device) -> channels_last -> optimizer -> compile -> DDP, because the optimizer
    # must hold the parameters that live on the device, and DDP must wrap the module that will run. ---------
    model = GrayEfficientNet(args.model, adapter=args.adapter, num_classes=len(folder.classes),
                             pretrained=args.pretrained and not args.weights, weights=args.weights,
                             class_names=folder.classes, img_size=(h, w), drop_rate=args.drop_rate,
                             intensity=intensity, adapter_kwargs=adapter_kwargs)
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    channels_last, why = choose_channels_last(args.channels_last, model, device, (args.batch_size, 1, h, w),
                                              train=True, autocast=autocast)
    log(why)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    unwrapped = model  # saved and evaluated: no DDP collectives, no '_orig_mod.' prefixes
    lr = args.lr * args.batch_size * world / 64  # --lr is for a global batch of 64; scale linearly
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=args.weight_decay)
    steps_per_epoch = len(train_loader)
    scheduler = CosineLRScheduler(optimizer, t_initial=args.epochs * steps_per_epoch, lr_min=lr * 0.01,
                                  warmup_t=int(args.warmup_epochs * steps_per_epoch), warmup_lr_init=lr * 0.01,
                                  t_in_epochs=False)
    if args.compile:
        model = torch.compile(model)
    eval_model = model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    # -- resume ---------------------------------------------------------------------------------------------
    start_epoch, history, best_acc = 0, [], -1.0
    if state is not None:
        try:
            unwrapped.load_timm_state_dict(state["model"], source=str(state_path))
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if primary:
                set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # torch's own checks of the state dicts
            raise WeightsError(f"cannot resume from {state_path}: {type(e).__name__}: {e}") from None
        if not primary:  # only rank 0's generators are saved; the others get fresh, distinct seeds
            torch.manual_seed(args.seed + rank + 1000 * (state["epoch"] + 1))
        start_epoch, history, best_acc = state["epoch"] + 1, state["history"], state["best_val_acc"]
        scheduler.step_update(start_epoch * steps_per_epoch)
        log(f"resumed from {state_path} after epoch {state['epoch']} (best val_acc {best_acc:.4f})")

    # -- outputs: written only now that the run has started ----------------------------------------------------
    if primary:
        output.mkdir(parents=True, exist_ok=True)
        stale = cleanup_temporaries(output)
        if stale:
            log(f"removed temporary files of an interrupted write: {', '.join(stale)}")
        if state is not None:
            write_metrics(output / "metrics.csv", history)  # drop rows of an epoch that did not finish
        config = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                  "resolved": {"data": str(root), "output": str(output), "lr": lr, "world_size": world,
                               "classes": folder.classes, "device": str(device), "threads": threads.threads,
                               "channels_last": channels_last,
                               "device_name": device_name(device), "command": command_line(args),
                               "commit": git_commit(Path(__file__))},
                  "versions": {"gray_effnet": gray_effnet.__version__, "torch": torch.__version__,
                               "timm": timm.__version__, "python": platform.python_version()}}
        with atomic_write(output / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
    board = None
    if primary and args.tensorboard is not None:
        board = EpochLog(args.tensorboard or output / "tensorboard", val_ds)

    # -- train ----------------------------------------------------------------------------------------------
    log(f"training {args.model} with the {args.adapter!r} stem on {device} x{world}: "
        f"{plural(args.epochs, 'epoch')}, {plural(steps_per_epoch, 'step')} each, batch {args.batch_size}x{world}, "
        f"{h}x{w}, amp {args.amp}; val loss is cross-entropy without label smoothing")
    run_start = time.perf_counter()
    progress = primary and not args.no_progress
    for epoch in range(start_epoch, args.epochs):
        set_loader_epoch(train_loader, epoch, args.seed)
        if batch_augment is not None:
            batch_augment.set_epoch(epoch)  # its crops depend on (seed, epoch, step) only: resumable
        stats = train_one_epoch(model, train_loader, optimizer=optimizer, scheduler=scheduler, criterion=criterion,
                                device=device, epoch=epoch, autocast=autocast, scaler=scaler,
                                clip_grad=args.clip_grad, channels_last=channels_last,
                                log_every=args.log_every, progress=progress, augment=batch_augment,
                                on_step=governor.step)
        result = evaluate(eval_model, val_loader, device=device, num_classes=len(folder.classes), autocast=autocast,
                          channels_last=channels_last, progress=progress, desc=f"epoch {epoch} val")
        row = EpochRow(epoch=epoch, lr=optimizer.param_groups[0]["lr"], **stats,  # lr: where the epoch ended
                       val_loss=result.loss, val_acc=result.acc,
                       process_peak_mem_mb=process_peak_mem_mb(device), val_skipped=result.skipped)
        history.append(dataclasses.asdict(row))
        is_best = result.acc > best_acc
        best_acc = max(best_acc, result.acc)
        if primary:
            save_checkpoint(output, unwrapped, optimizer=optimizer, scaler=scaler, history=history,
                            best_val_acc=best_acc, is_best=is_best, args=vars(args))
        log(f"epoch {epoch}: train loss {row.train_loss:.4f} acc {row.train_acc:.4f} | "
            f"val loss {row.val_loss:.4f} acc {row.val_acc:.4f}{' (best)' if is_best else ''} | "
            f"{row.img_per_s:.0f} img/s, {row.seconds:.1f}s")
        if board is not None:
            board.epoch(epoch, dataclasses.asdict(row), unwrapped)
    if board is not None:
        board.close()

    # -- summary ----------------------------------------------------------------------------------------------
    skipped = sum(r["train_skipped"] + r["val_skipped"] for r in history)
    log(f"\ndone in {time.perf_counter() - run_start:.0f}s: best val acc {best_acc:.4f} "
        f"(epoch {max(history, key=lambda r: r['val_acc'])['epoch'] if history else '-'})\n"
        f"  outputs in {output}/: best.safetensors, last.safetensors, last.state.pt, metrics.csv, config.json\n"
        f"  {folder.scan.converted} images converted from colour to gray; {len(folder.scan.bad)} unreadable at the "
        f"start and {skipped} unreadable while training were skipped\n"
        f"  evaluate: python train.py --evaluate --weights {output}/best.safetensors"
        + (f" --data {args.data}" if args.data else ""))
    if args.report:
        log(report_after_training(output, val_loader, val_ds, device=device, num_classes=len(folder.classes),
                                  class_names=folder.classes, autocast=autocast, progress=progress,
                                  data_note=data_line(args, root, folder, train_ds.wide)))


def command_line(args) -> str:
    """The command as it could be typed again: every argument, defaults resolved."""
    parts = ["python", "train.py"]
    for action in get_args_parser()._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        flag = action.option_strings[0]
        if value is True or value is False:
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            parts += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return shlex.join(parts)


def cli(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run, and turn this project's errors into one ``error:`` line and exit code 2."""
    args = get_args_parser().parse_args(argv)
    try:
        main(args)
    except GrayEffnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished epochs are saved; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
