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
A CSV label table with several findings per image, split by patient (a sigmoid per finding, best by macro AUC):
    python train.py --data /path/to/images --labels labels.csv --label-column Findings --label-sep '|' \
        --group-column "Patient ID" --pos-weight auto
CT in Hounsfield units (DICOM), with three learnable intensity windows as the stem's channels:
    python train.py --data /path/to/dicom --intensity range -1024 3071 --adapter wso --windows 40:80 80:200 600:2800
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from timm.utils.distributed import init_distributed_device_so
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import gray_effnet
from gray_effnet import GrayEfficientNet, GrayEffnetError, InputError, WeightsError, list_adapters
from gray_effnet.adapters import adapter_options
from gray_effnet.cache import RAM_CACHE_HELP, attach_caches, parse_budget
from gray_effnet.checkpoint import (
    META_KEY,
    SELECT_BY,
    EpochRow,
    best_epoch,
    load_state,
    resolve_resume,
    save_checkpoint,
    set_rng_state,
    write_metrics,
)
from gray_effnet.cli import (
    HelpFormatter,
    add_data_options,
    add_speed_options,
    command_line,
    exit_without_teardown,
    plural,
    resolve_device,
    run_cli,
    table_options,
)
from gray_effnet.data import make_loader, set_loader_epoch
from gray_effnet.engine import amp_setup, evaluate, make_optimizer_and_schedule, process_peak_mem_mb, train_one_epoch
from gray_effnet.evaluation import evaluate_checkpoint, report_predictions
from gray_effnet.files import atomic_write, check_output_folder, cleanup_temporaries, output_lock
from gray_effnet.folders import prepare_digits
from gray_effnet.intensity import WINDOWS_HELP, parse_intensity_args
from gray_effnet.limits import input_size_limit, pixel_limit, set_max_pixels
from gray_effnet.model import min_input_size
from gray_effnet.run_report import report_after_training, report_line, write_report
from gray_effnet.runinfo import device_name, git_commit, versions
from gray_effnet.sources import Augmentation, DataSource, open_source
from gray_effnet.speed import (
    ThreadGovernor,
    choose_channels_last,
    choose_compile,
    choose_workers,
    plan_threads,
    probe_cache,
)
from gray_effnet.tasks import make_criterion, pos_weight_from_prevalence
from gray_effnet.tblog import EpochLog, require_tensorboard

IMPORTED = time.perf_counter()  # the "training" line says how long the run took from here to its first epoch


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
    add_data_options(g, data_help="ImageFolder tree (or one with train/ and val/), a pack (python -m gray_effnet "
                     "pack), or with --labels the folder of the table's images; default: the digits demo",
                     img_size_help="input size, H != W is fine (default: 64 64; with --evaluate, the checkpoint's)",
                     workers_help="data loader processes per training process; auto: on the CPU none (read in "
                     "the process) where an image reads faster than a training step spends on it, else 2",
                     workers_default="auto")
    g.add_argument("--val-split", type=float, default=0.2, help="validation fraction when DIR has no train/val")
    g.add_argument("--ram-cache", type=parse_budget, default=None, metavar="GIB|auto|off", help=RAM_CACHE_HELP)
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--windows", nargs="+", default=None, metavar="C:W", help=WINDOWS_HELP)
    g.add_argument("--crop-scale", type=float, default=0.8, help="smallest area of the random crop (1 = no crop)")
    g.add_argument("--hflip", type=float, default=0.0, help="horizontal flip probability")
    g.add_argument("--rotate", type=float, default=0.0, help="random rotation range in degrees")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=6)
    g.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (for the global batch)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-epochs", type=float, default=0.5, help="linear warmup, then cosine decay")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="single-label data only")
    g.add_argument("--pos-weight", default="none", choices=("none", "auto"),
                   help="multi-label data: weigh each finding's positive labels by (1-p)/p, p its training "
                   "prevalence (clipped to [0.01, 100])")
    g.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this")
    g = p.add_argument_group("speed")
    add_speed_options(g)
    g.add_argument("--compile", nargs="?", const="on", default="auto", choices=gray_effnet.cli.COMPILE_MODES,
                   help="torch.compile the training step; auto: on the CPU when the run is long enough to repay it")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (DDP on CUDA)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output", default=None, help="output folder (default: runs/<model>-<adapter>)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue from PATH, or with no PATH from OUTPUT/last.state.pt if it exists")
    g.add_argument("--select-by", default=None, choices=tuple(SELECT_BY),
                   help="the validation metric that picks best.safetensors (default: auc for multi-label data, acc "
                   "otherwise); auc: macro over findings, of class 1 for 2 classes, one against the rest for more")
    g.add_argument("--evaluate", action="store_true", help="only evaluate --weights on the validation split")
    g.add_argument("--log-every", type=int, default=20, help="steps between loss checks and progress updates")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (logs stay)")
    g.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUTPUT/report.html after the last epoch (with --evaluate: eval_report.html)")
    g.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="per-epoch metrics and class-activation maps for TensorBoard (DIR default: OUTPUT/tensorboard)")
    return p


def log(*a) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


def check_args(args) -> None:
    """Refuse impossible arguments before any work: no data scan, no model, no output folder."""
    checks = [
        (args.epochs >= 1, f"--epochs must be at least 1; got {args.epochs}"),
        (args.batch_size >= 1, f"--batch-size must be at least 1; got {args.batch_size}"),
        (args.workers == "auto" or args.workers >= 0, f"--workers must be 0 or more, or auto; got {args.workers}"),
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
        (args.max_pixels is None or args.max_pixels >= 1, f"--max-pixels must be at least 1; got {args.max_pixels}"),
        (not args.evaluate or args.weights, "--evaluate needs --weights PATH (a checkpoint of this project)"),
        (not args.evaluate or int(os.environ.get("WORLD_SIZE", 1)) == 1,  # each rank would write the same files
         "--evaluate runs in one process: start it with python, not torchrun"),
    ]
    if failed := next((message for ok, message in checks if not ok), None):
        raise InputError(failed)
    if args.output is not None:
        check_output_folder(args.output)  # a file there is refused now, not found out after the first epoch
    limit = max(pixel_limit(args.max_pixels), input_size_limit())  # the checkpoint's img_size is held to it
    if args.img_size is not None and args.img_size[0] * args.img_size[1] > limit:
        raise InputError(f"--img-size {args.img_size[0]} {args.img_size[1]} is more than the pixel limit {limit} "
                         "(--max-pixels)")
    if not args.evaluate:
        smallest = min_input_size(args.model)  # also checks the model name, suggesting close ones
        if args.img_size is not None and min(args.img_size) < smallest:
            raise InputError(f"--img-size {args.img_size[0]} {args.img_size[1]} is smaller than {args.model}'s "
                             f"total stride; use at least {smallest} {smallest}")
    table_options(args)  # refuses inconsistent table flags
    device = resolve_device(args.device)
    if args.sync_bn and not device.startswith("cuda"):  # torch's SyncBatchNorm raises on CPU modules
        raise InputError(f"--sync-bn needs CUDA devices; this run is on {device}")
    if args.tensorboard is not None:
        require_tensorboard()


def resolve_data(args, primary: bool) -> DataSource:
    """The data source (writing the demo digits once), checked and split before anything trains."""
    if args.data is None and primary:
        prepare_digits()  # the demo: written once, by rank 0, while the other ranks wait at the barrier
    if args.data is None and dist.is_initialized():
        dist.barrier()
    return open_source(args.data, val_split=args.val_split, seed=args.seed, strict=args.strict_data,
                       table=table_options(args))


def run_evaluate(args, device: torch.device) -> None:
    """--evaluate: the validation split through the one evaluation path that predict uses too."""
    source = resolve_data(args, primary=True)
    ev = evaluate_checkpoint(args.weights, source, split="val", batch_size=args.batch_size, workers=args.workers,
                             device=device, img_size=args.img_size, intensity=parse_intensity_args(args.intensity),
                             amp=args.amp, channels_last=args.channels_last, threads=args.threads,
                             progress=not args.no_progress, log=log)
    out = Path(args.output) if args.output else Path(args.weights).parent
    report_predictions(ev.result, ev.class_names, out / "eval_predictions.csv", labelled=True, log=log)
    if args.report:
        log(report_line(lambda: write_report(out / "eval_report.html", result=ev.result, class_names=ev.class_names,
                                             model=ev.model, dataset=ev.dataset, run_dir=Path(args.weights).parent,
                                             data_note=ev.data_note, what=f"{args.weights} on the validation split",
                                             progress=not args.no_progress)))


def lock_output(output: Path, primary: bool, held: contextlib.ExitStack) -> None:
    """One run per output folder: rank 0 holds ``output_lock`` until the run ends. Under DDP every rank learns
    whether it got it, so that all of them stop together instead of waiting for rank 0."""
    refusal = [None]
    if primary:
        try:
            held.enter_context(output_lock(output, "train.py"))
        except GrayEffnetError as e:
            refusal[0] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(refusal, src=0)
    if refusal[0] is not None:
        raise InputError(refusal[0])


def main(args) -> None:
    with contextlib.ExitStack() as held:  # the output lock, released however the run ends
        run_training(args, held)


def run_training(args, held: contextlib.ExitStack) -> None:
    check_args(args)
    set_max_pixels(args.max_pixels)  # one limit for every decoder, here and in the loader workers
    # -- devices and processes --------------------------------------------------------------------------
    # torchrun's environment decides the process group: gloo on the CPU, nccl on CUDA
    d = init_distributed_device_so(device=resolve_device(args.device))
    device, rank, world = torch.device(d["device"]), d["global_rank"], d["world_size"]
    primary = rank == 0
    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    if args.evaluate:
        return run_evaluate(args, device)
    autocast, scaler = amp_setup(device, args.amp)
    intensity, adapter_kwargs = adapter_options(args.adapter, args.intensity, args.windows)
    output = Path(args.output or f"runs/{args.model}-{args.adapter}")
    lock_output(output, primary, held)  # before any work; its temporaries are cleaned only holding it

    # -- everything that can refuse the run, before anything is written: resume state, data, model -------------
    state_path = resolve_resume(args.resume, output) if args.resume else None
    if args.resume == "auto" and state_path is None:
        log(f"--resume: nothing to resume in {output}, starting fresh")
    source = resolve_data(args, primary)
    (h, w), intensity = source.settings(args.img_size, parse_intensity_args(args.intensity))
    if min(h, w) < min_input_size(args.model):
        raise InputError(f"{h}x{w} images are smaller than {args.model}'s total stride")
    task = source.task
    select_by = args.select_by or ("auc" if task == "multi" else "acc")
    pos_weight = None
    if args.pos_weight == "auto":
        if task != "multi":
            raise InputError(f"--pos-weight auto is for multi-label data; {source.root} has one class per image")
        pos_weight = pos_weight_from_prevalence(source.pos_fraction())
    state = None if state_path is None else load_state(state_path, {
        "model_name": args.model, "adapter": args.adapter, "num_classes": len(source.classes), "intensity": intensity,
        "task": task, "select_by": select_by})
    augmentation = Augmentation(crop_scale=args.crop_scale, hflip=args.hflip, rotate=args.rotate)
    train_ds = source.dataset("train", (h, w), intensity, augment=augmentation)
    val_ds = source.dataset("val", (h, w), intensity)
    batch_augment = source.batch_augment((h, w), augmentation, seed=args.seed + 1_000_003 * rank)  # ranks differ
    log(source.describe(train_ds.wide))
    threads = plan_threads(workers=0, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                           requested=args.threads)  # its workers are filled in once the loader is chosen
    torch.set_num_threads(threads.threads)
    # On the CPU, fewer threads once the cores turn out to be shared (benchmarks/threads.py measures why).
    governor = ThreadGovernor(threads.threads if device.type == "cpu" and args.threads is None else 1, log=log)

    # -- model: to(device), channels_last, optimizer (holds the device's parameters), compile, DDP (wraps what runs)
    model = GrayEfficientNet(args.model, adapter=args.adapter, num_classes=len(source.classes),
                             pretrained=args.pretrained and not args.weights, weights=args.weights,
                             class_names=source.classes, img_size=(h, w), drop_rate=args.drop_rate,
                             intensity=intensity, adapter_kwargs=adapter_kwargs, task=task)
    if args.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    channels_last, why = choose_channels_last(args.channels_last, model, device, (args.batch_size, 1, h, w),
                                              train=True, autocast=autocast, cache=probe_cache("channels_last"),
                                              step_cache=probe_cache("step_time"))
    if channels_last:
        model.to(memory_format=torch.channels_last)
    requested, why_workers = source.loader_workers(args.workers)  # on the CPU: read here or beside, from the costs
    workers, why_workers = choose_workers(requested, device, why=why_workers, dataset=train_ds, model=model,
                                          input_shape=(args.batch_size, 1, h, w), channels_last=channels_last,
                                          autocast=autocast, cache=probe_cache("step_time"))
    loader_kw = {"workers": workers, "pin_memory": device.type == "cuda", "seed": args.seed, "world_size": world,
                 "rank": rank}
    train_loader = make_loader(train_ds, args.batch_size, train=True, **loader_kw)
    val_loader = make_loader(val_ds, args.batch_size, train=False, **loader_kw)
    done = state["epoch"] + 1 if state is not None else 0  # the epochs a resumed run has behind it
    why_cache = attach_caches([train_loader, val_loader], args.ram_cache, epochs=args.epochs - done,  # before
                              processes=int(os.environ.get("LOCAL_WORLD_SIZE", 1)))  # the workers start
    log(dataclasses.replace(threads, workers=workers).describe())
    unwrapped = model  # saved and evaluated (eagerly): no DDP collectives, no '_orig_mod.' prefixes, no 2nd graph
    steps_per_epoch = len(train_loader)
    optimizer, scheduler, lr = make_optimizer_and_schedule(  # --lr is for a global batch of 64, scaled linearly
        model, lr=args.lr, batch_size=args.batch_size, world_size=world, weight_decay=args.weight_decay,
        epochs=args.epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=args.warmup_epochs)
    compiled, why_compile = choose_compile(args.compile, device, steps_per_epoch * (args.epochs - done), (h, w),
                                           channels_last=channels_last)
    log(f"{why}\n{why_workers}\n{why_cache}\n{why_compile}")
    model = torch.compile(model) if compiled else model
    if world > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = make_criterion(task, label_smoothing=args.label_smoothing, pos_weight=pos_weight).to(device)
    if pos_weight is not None:
        log("positive weight per finding: "
            + ", ".join(f"{c} {v:.3g}" for c, v in zip(source.classes, pos_weight.tolist())))

    # -- resume ---------------------------------------------------------------------------------------------
    start_epoch, history, best_result = 0, [], None  # best_result: the best epoch's validation, if this run made it
    if state is not None:
        try:
            unwrapped.load_timm_state_dict(state["model"], source=str(state_path))
            unwrapped.thresholds = state[META_KEY].get("thresholds")  # those chosen on the last epoch's validation
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            if primary:
                set_rng_state(state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:  # torch's own checks of the state dicts
            raise WeightsError(f"cannot resume from {state_path}: {type(e).__name__}: {e}") from None
        if not primary:  # only rank 0's generators are saved; the others get fresh, distinct seeds
            torch.manual_seed(args.seed + rank + 1000 * (state["epoch"] + 1))
        start_epoch, history = state["epoch"] + 1, state["history"]
        scheduler.step_update(start_epoch * steps_per_epoch)
        best = history[best_epoch(history, select_by)]
        log(f"resumed from {state_path} after epoch {state['epoch']} (best {SELECT_BY[select_by][0]} "
            f"{best[SELECT_BY[select_by][0]]:.4f}, epoch {best['epoch']})")

    # -- outputs: written only now that the run has started ----------------------------------------------------
    if primary:
        output.mkdir(parents=True, exist_ok=True)
        stale = cleanup_temporaries(output)
        if stale:
            log(f"removed temporary files of an interrupted write: {', '.join(stale)}")
        if state is not None:
            write_metrics(output / "metrics.csv", history)  # drop rows of an epoch that did not finish
        config = {"args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                  "resolved": {"data": str(source.root), "output": str(output), "lr": lr, "world_size": world,
                               "classes": source.classes, "task": task, "select_by": select_by,
                               "pos_weight": None if pos_weight is None else pos_weight.tolist(),
                               "device": str(device), "threads": threads.threads, "channels_last": channels_last,
                               "device_name": device_name(device),
                               "command": command_line(get_args_parser(), args, ["python", "train.py"]),
                               "commit": git_commit(Path(__file__)),
                               **({"labels": str(Path(args.labels).resolve())} if args.labels else {})},
                  "versions": {"gray_effnet": gray_effnet.__version__, **versions()}}
        with atomic_write(output / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2))
        split_csv = source.write_split(output / "split.csv")  # sources with groups (label tables) say which went where
        if split_csv is not None:
            log(f"split: {split_csv}")
    board = EpochLog(args.tensorboard or output / "tensorboard", val_ds, task=task) \
        if primary and args.tensorboard is not None else None

    # -- train ----------------------------------------------------------------------------------------------
    log(f"training {args.model} with the {args.adapter!r} stem on {device} x{world}: "
        f"{plural(args.epochs, 'epoch')}, {plural(steps_per_epoch, 'step')} each, batch {args.batch_size}x{world}, "
        f"{h}x{w}, amp {args.amp}; val loss is "
        + ("binary cross-entropy per known label, without --pos-weight" if task == "multi"
           else "cross-entropy without label smoothing")
        + f"; best.safetensors by val {select_by}; ready {time.perf_counter() - IMPORTED:.1f}s after the imports")
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
        val_start = time.perf_counter()
        result = evaluate(unwrapped, val_loader, device=device, num_classes=len(source.classes), task=task,
                          autocast=autocast, channels_last=channels_last, progress=progress, desc=f"epoch {epoch} val",
                          keep_predictions=args.report)  # the report of the best epoch needs no evaluation of its own
        unwrapped.thresholds = result.thresholds  # multi-label: Youden's J on this epoch's validation; else None
        row = EpochRow(epoch=epoch, lr=optimizer.param_groups[0]["lr"], **stats,  # lr: where the epoch ended
                       val_loss=result.loss, val_acc=result.acc, val_seconds=time.perf_counter() - val_start,
                       process_peak_mem_mb=process_peak_mem_mb(device), val_skipped=result.skipped,
                       val_auc=result.auc, val_ap=result.ap)
        history.append(dataclasses.asdict(row))
        is_best = best_epoch(history, select_by) == len(history) - 1
        best_result = result if is_best else best_result
        save_start = time.perf_counter()
        if primary:
            save_checkpoint(output, unwrapped, optimizer=optimizer, scaler=scaler, history=history,
                            select_by=select_by, is_best=is_best, args=vars(args))
        # Where the time went: the steps, the loader they waited for, and what runs between epochs.
        auc = "" if math.isnan(row.val_auc) else f" auc {row.val_auc:.4f}"
        log(f"epoch {epoch}: train loss {row.train_loss:.4f} acc {row.train_acc:.4f} | "
            f"val loss {row.val_loss:.4f} acc {row.val_acc:.4f}{auc}{' (best)' if is_best else ''} | "
            f"{row.img_per_s:.0f} img/s, {row.seconds:.1f}s (waiting for data {row.data_wait_s:.1f}s), "
            f"val {row.val_seconds:.1f}s, save {time.perf_counter() - save_start:.1f}s")
        if board is not None:
            board.epoch(epoch, dataclasses.asdict(row), unwrapped)
    if board is not None:
        board.close()

    # -- summary ----------------------------------------------------------------------------------------------
    skipped = sum(r["train_skipped"] + r["val_skipped"] for r in history)
    best = history[best_epoch(history, select_by)] if history else None
    best_text = f"{best[SELECT_BY[select_by][0]]:.4f} (epoch {best['epoch']})" if best else "- (no epoch)"
    log(f"\ndone in {time.perf_counter() - run_start:.0f}s: best val {select_by} {best_text}\n"
        f"  outputs in {output}/: best.safetensors, last.safetensors, last.state.pt, metrics.csv, config.json\n"
        f"  {source.scan.converted} images converted from colour to gray; {len(source.scan.bad)} unreadable at the "
        f"start and {skipped} unreadable while training were skipped\n"
        f"  evaluate: python train.py --evaluate --weights {output}/best.safetensors"
        + (f" --data {shlex.quote(args.data)}" if args.data else "")
        + (f" {shlex.join(table.flags())}" if (table := table_options(args)) else ""))
    if args.report:
        log(report_after_training(output, val_loader, val_ds, result=best_result, device=device,
                                  class_names=source.classes, autocast=autocast, progress=progress,
                                  data_note=source.describe(train_ds.wide)))


def cli(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run; this project's errors become one ``error:`` line and exit code 2."""
    return run_cli(main, get_args_parser().parse_args(argv),
                   interrupted="interrupted: finished epochs are saved; continue with the same command plus --resume",
                   finally_=lambda: dist.is_initialized() and dist.destroy_process_group())


if __name__ == "__main__":
    exit_without_teardown(cli())
