"""Train and eval steps: one AMP code path, device-side metrics, DDP-aware reductions, for either task."""

import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import Tensor, nn
from tqdm import tqdm

from .errors import InputError, NonFiniteLossError
from .metrics import FindingMetrics, finding_metrics
from .tasks import check_task, count_correct, masked_bce

__all__ = ["EvalResult", "amp_setup", "evaluate", "make_optimizer_and_schedule", "process_peak_mem_mb",
           "train_one_epoch"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_setup(device: torch.device, amp: str) -> tuple[Callable, torch.amp.GradScaler]:
    """``(autocast, scaler)`` as in nanoGPT: a context factory, and a scaler enabled only for fp16.

    bf16 has float32's exponent range, so its gradients need no scaling; fp16 does.
    """
    if amp not in AMP_DTYPES:
        raise InputError(f"amp must be one of {', '.join(AMP_DTYPES)}; got {amp!r}")
    dtype = AMP_DTYPES[amp]
    autocast = nullcontext if dtype is None else partial(torch.autocast, device_type=device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    return autocast, scaler


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _all_gather(obj):
    """Every rank's ``obj``, in rank order (one element when not distributed)."""
    if not _distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def process_peak_mem_mb(device: torch.device) -> float:
    """Peak memory since the process started: CUDA's max allocated, or the CPU's max resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # Windows
        return float("nan")


def _to_device(images: Tensor, targets: Tensor, device: torch.device, channels_last: bool,
               augment: Callable[[Tensor], Tensor] | None = None):
    # uint8 batches cross the bus at 1 byte per pixel; pinned memory makes the copy asynchronous.
    images = images.to(device, non_blocking=True)
    if augment is not None:  # batch augmentation on the device (a pack's BatchAugment), in NCHW
        images = augment(images)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(device, non_blocking=True)


def _waited(loader: Iterable, clock: list[float]) -> Iterator:
    """Yield ``loader``'s batches, adding to ``clock[0]`` the seconds spent waiting for each, and to ``clock[1]`` the
    CPU seconds this process spent meanwhile (reading, when the loader has no workers)."""
    batches = iter(loader)
    while True:
        start, cpu = time.perf_counter(), time.process_time()
        try:
            batch = next(batches)
        except StopIteration:
            return
        clock[0] += time.perf_counter() - start
        clock[1] += time.process_time() - cpu
        yield batch


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler,
    criterion: nn.Module,
    device: torch.device,
    epoch: int,
    autocast: Callable = nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    clip_grad: float | None = None,
    channels_last: bool = False,
    log_every: int = 20,
    progress: bool = True,
    augment: Callable[[Tensor], Tensor] | None = None,
    on_step: Callable[[float, float], None] | None = None,
) -> dict[str, float]:
    """Train for one epoch; returns loss, accuracy, images/s, seconds (of which waiting for data), skipped files.

    Single-label: the loss and accuracy are means over the images. Multi-label (float targets, NaN where unknown,
    ``gray_effnet.tasks``): means over the known entries, the accuracy at probability 0.5; NaN when none was known.

    ``augment``, when given, transforms each batch once it is on the device (``gray_effnet.augment.BatchAugment``).
    ``on_step`` is called after every optimizer step with the epoch's seconds of waiting for data so far, and the
    CPU seconds of the process while it waited (``gray_effnet.speed.ThreadGovernor.step``).

    ``.item()`` waits for the device, so losses are checked for NaN/inf only every ``log_every`` steps
    and at the end; the error names the first bad step of that window. Raises ``NonFiniteLossError``.
    """
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    steps_per_epoch = len(loader)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = torch.zeros((), device=device, dtype=torch.long)  # what the loss and accuracy average over
    images_seen = torch.zeros((), device=device, dtype=torch.long)
    window: list[Tensor] = []
    skipped = 0
    start = time.perf_counter()
    data_wait = [0.0, 0.0]  # where the time goes: a loader that cannot keep up shows here, not in the steps
    bar = tqdm(_waited(loader, data_wait), total=steps_per_epoch, desc=f"epoch {epoch} train", leave=False,
               disable=not progress, dynamic_ncols=True)

    def check(step: int) -> None:
        losses = torch.stack(window).float()
        bad = (~torch.isfinite(losses)).nonzero().flatten().cpu()
        # Every rank must learn of a bad loss on any rank, or the others would wait in the next all-reduce.
        if _all_reduce(torch.tensor(len(bad), device=device)).item():
            where = f"step {step - len(window) + 2 + int(bad[0])}" if len(bad) else "a step on another rank"
            raise NonFiniteLossError(
                f"the loss became non-finite at epoch {epoch}, {where} (of {steps_per_epoch}); training "
                "stopped. The data can cause it (extreme or non-finite pixel values: --strict-data decodes and "
                "checks every file first), or the optimisation diverged: lower --lr, use --amp bf16 rather than "
                "fp16, or set --clip-grad. The last good checkpoint is kept."
            )
        losses = losses.cpu()
        bar.set_postfix(loss=f"{losses[-1].item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        window.clear()

    for step, batch in enumerate(bar):
        skipped += batch.skipped
        if batch.targets.numel() == 0:
            continue
        images, targets = _to_device(batch.images, batch.targets, device, channels_last, augment)
        with autocast():
            logits = model(images)
            loss = criterion(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step_update(num_updates=epoch * steps_per_epoch + step + 1)
        right, n = count_correct(logits.detach(), targets)  # images, or known multi-label entries
        window.append(loss.detach())
        loss_sum += loss.detach().double() * n
        correct += right
        seen += n
        images_seen += len(targets)
        if (step + 1) % log_every == 0:
            check(step)
        if on_step is not None:
            on_step(*data_wait)
    if window:
        check(steps_per_epoch - 1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = _all_reduce(torch.stack([loss_sum, correct.double(), seen.double(), images_seen.double()])).tolist()
    counted, images = totals[2], totals[3]
    return {
        "train_loss": totals[0] / counted if counted else math.nan,
        "train_acc": totals[1] / counted if counted else math.nan,
        "img_per_s": images / seconds if seconds > 0 else float("nan"),
        "seconds": seconds,
        "data_wait_s": data_wait[0],
        "train_skipped": int(_all_reduce(torch.tensor(skipped, device=device)).item()),
    }


@dataclass
class EvalResult:
    """Validation metrics of either task (``gray_effnet.tasks``).

    Single-label: ``confusion[t, p]`` counts images of class ``t`` predicted as ``p``; ``predictions`` holds
    (path, target, predicted class, its probability) when asked for; ``auc`` and ``ap`` are those of class 1
    for 2 classes, the macro means one class against the rest for more.

    Multi-label: ``confusion[k, t, p]`` counts the known entries of finding ``k`` by label and by prediction at
    probability 0.5, and ``acc`` is the fraction of them right; every image's ``scores`` (sigmoid probabilities)
    and ``targets`` (NaN where unknown) are kept, with their ``paths``; ``findings`` holds each finding's ranking
    metrics, ``auc`` and ``ap`` their macro means over the findings where defined; ``thresholds`` are those that
    call a finding present: chosen here by Youden's J, or the checkpoint's (``evaluate_checkpoint``).
    """

    loss: float
    acc: float
    confusion: Tensor
    skipped: int = 0
    predictions: list[tuple[str, int, int, float]] = field(default_factory=list)  # path, target, pred, prob
    task: str = "single"
    auc: float = math.nan
    ap: float = math.nan
    findings: FindingMetrics | None = None
    paths: list[str] = field(default_factory=list)
    scores: Tensor | None = None  # (N, K)
    targets: Tensor | None = None  # (N, K)
    thresholds: list[float] | None = None
    # With keep_predictions, single-label: row i belongs to predictions[i]: (N, K) softmax probabilities, and (N,)
    # the cross-entropy of each image (NaN where unlabelled), whose mean over the labelled images is ``loss``.
    # Multi-label: no ``probs`` (``scores`` are the probabilities), and row i of ``losses`` belongs to paths[i]: the
    # binary cross-entropy of the image, its mean over the image's known labels (NaN where none is known).
    probs: Tensor | None = None
    losses: Tensor | None = None

    def per_class(self) -> tuple[Tensor, Tensor]:
        """Single-label: precision and recall of each class (NaN where undefined)."""
        c = self.confusion.double()
        tp = c.diag()
        return tp / c.sum(0), tp / c.sum(1)

    @property
    def count(self) -> int:
        """How many images were predicted: the rows of ``predictions`` (single-label) or of ``scores`` (multi)."""
        return len(self.paths) if self.task == "multi" else len(self.predictions)

    def present(self) -> Tensor:
        """Multi-label: (N, K), whether each image's probability of each finding is at or above its threshold."""
        return self.scores.double() >= torch.tensor(self.thresholds, dtype=torch.float64)


def _ranking(task: str, scores: Tensor, targets: Tensor, num_classes: int) -> FindingMetrics:
    """Ranking metrics of the scores: per finding, of class 1 (2 classes) or one class against the rest."""
    if task == "multi":
        return finding_metrics(targets.numpy(), scores.numpy())
    if num_classes == 2:  # the positive class is class 1
        return finding_metrics((targets == 1).numpy()[:, None], scores[:, 1:].numpy())
    return finding_metrics(torch.nn.functional.one_hot(targets, num_classes).numpy(), scores.numpy())


@torch.inference_mode()  # no autograd bookkeeping at all, not only no gradients
def evaluate(
    model: nn.Module,
    loader: Iterable,
    *,
    device: torch.device,
    num_classes: int,
    task: str = "single",
    autocast: Callable = nullcontext,
    channels_last: bool = False,
    keep_predictions: bool = False,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    """Evaluate on every image of ``loader`` once (summed, or gathered, over DDP ranks).

    Single-label: targets below 0 mark unlabelled images: they are predicted but count in no metric. The loss is
    the plain cross-entropy (no label smoothing) wherever it is reported: after each epoch, by ``--evaluate``, by
    ``predict``.

    Multi-label (``task="multi"``): targets (B, K) of 1, 0 or NaN; an unlabelled image (a target of -1) has every
    finding unknown. The loss is the binary cross-entropy per known entry, without positive weights.

    The probabilities of every labelled image are kept for the ranking metrics (``EvalResult``); under DDP they
    are gathered from every rank before these are computed, so that each rank reports the same numbers.
    """
    model.eval()
    multi = check_task(task) == "multi"
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * (4 if multi else num_classes), device=device, dtype=torch.long)
    skipped = 0
    # The loop never waits for the device: no `.item()`, `if tensor`, `.tolist()`, boolean index or bincount (whose
    # output size is read back), so that the next batch is queued while this one runs. Everything per image stays on
    # the device until the loop ends, and is copied then; the labelled rows are picked out there.
    paths, scores, kept_targets = [], [], []  # every image's: its path, probabilities and target
    preds, losses = [], []  # with keep_predictions (preds: single-label only)
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        skipped += batch.skipped
        if batch.targets.numel() == 0:
            continue
        images, targets = _to_device(batch.images, batch.targets, device, channels_last)
        with autocast():
            logits = model(images)
        logits = logits.float()
        paths += batch.paths
        if multi:
            if not targets.is_floating_point():  # unlabelled images (-1): every finding unknown
                targets = torch.full_like(logits, math.nan)
            known = ~torch.isnan(targets)
            loss_sum += masked_bce(logits, targets)[0].double()
            finding = torch.arange(num_classes, device=device).expand_as(targets)
            cell = finding * 4 + (targets > 0.5).long() * 2 + (logits >= 0).long()  # (k, label, prediction)
            confusion.index_add_(0, cell.flatten(), known.flatten().long())  # an unknown entry adds 0
            scores.append(logits.sigmoid())
            kept_targets.append(targets)
            if keep_predictions:  # each image's mean over its known entries; NaN where none is known
                entries = F.binary_cross_entropy_with_logits(logits, torch.where(known, targets, 0.0),
                                                             reduction="none")
                losses.append(torch.where(known, entries, 0.0).sum(1) / known.sum(1))
            continue
        pred = logits.argmax(-1)
        labelled = targets >= 0
        target = targets.clamp(min=0)  # an unlabelled image stands in as class 0 below, and then counts for nothing
        image_loss = F.cross_entropy(logits, target, reduction="none")
        loss_sum += torch.where(labelled, image_loss, 0.0).sum(dtype=torch.float64)
        confusion.index_add_(0, target * num_classes + pred, labelled.long())
        scores.append(logits.softmax(-1))
        kept_targets.append(targets)
        if keep_predictions:
            preds.append(pred)
            losses.append(image_loss.masked_fill(~labelled, math.nan))
    _all_reduce(loss_sum)
    _all_reduce(confusion)
    skipped = int(_all_reduce(torch.tensor(skipped, device=device)).item())
    scores = torch.cat(scores).cpu() if scores else torch.empty(0, num_classes)
    empty = torch.empty(0, num_classes) if multi else torch.empty(0, dtype=torch.long)
    targets = torch.cat(kept_targets).cpu() if kept_targets else empty
    losses = torch.cat(losses).cpu() if losses else torch.zeros(0)
    predictions, probs = [], torch.zeros(0, num_classes)
    if not multi:  # every image into predictions when kept; the labelled ones into the ranking metrics
        if keep_predictions:
            probs = scores
            pred = torch.cat(preds).cpu() if preds else torch.empty(0, dtype=torch.long)
            prob = probs.gather(1, pred[:, None])[:, 0]
            predictions = list(zip(paths, targets.tolist(), pred.tolist(), prob.tolist()))
        labelled = targets >= 0
        scores, targets, paths = scores[labelled], targets[labelled], []
    parts = _all_gather((paths, scores, targets, predictions, probs, losses))  # a ranking is not a sum over ranks
    paths = [p for part in parts for p in part[0]]
    scores, targets = torch.cat([part[1] for part in parts]), torch.cat([part[2] for part in parts])
    if _distributed():  # in path order, whichever rank evaluated which image
        losses = torch.cat([part[5] for part in parts])  # per image: kept with keep_predictions only
        if multi:
            order = sorted(range(len(paths)), key=paths.__getitem__)
            paths, scores, targets = [paths[i] for i in order], scores[order], targets[order]
        else:
            predictions = [p for part in parts for p in part[3]]
            order = sorted(range(len(predictions)), key=predictions.__getitem__)
            predictions = [predictions[i] for i in order]
            probs = torch.cat([part[4] for part in parts])[order]
        losses = losses[order] if len(losses) else losses
    ranking = _ranking(task, scores, targets, num_classes)
    confusion = confusion.view(num_classes, 2, 2).cpu() if multi else confusion.view(num_classes, num_classes).cpu()
    total = int(confusion.sum())
    right = confusion.diagonal(dim1=-2, dim2=-1).sum().item()
    return EvalResult(
        loss=loss_sum.item() / total if total else math.nan,
        acc=right / total if total else math.nan,
        confusion=confusion,
        skipped=skipped,
        predictions=predictions,
        probs=probs if keep_predictions and not multi else None,
        losses=losses if keep_predictions else None,
        task=task,
        auc=ranking.macro_auc,
        ap=ranking.macro_ap,
        **({"findings": ranking, "paths": paths, "scores": scores, "targets": targets,
            "thresholds": ranking.threshold.tolist()} if multi else {}),
    )


FUSED_DEVICES = {"cpu", "cuda"}  # where make_optimizer_and_schedule asks for torch's fused AdamW


def make_optimizer_and_schedule(
    model: nn.Module | Iterable,
    *,
    lr: float,
    batch_size: int,
    world_size: int,
    weight_decay: float,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: float,
    decay: bool = True,
    fused: bool | None = None,
) -> tuple[torch.optim.Optimizer, Scheduler, float]:
    """The one training recipe: timm's AdamW, a linear warmup then cosine decay per step, the LR scaled to the batch.

    ``lr`` is for a global batch of 64 and scales linearly with ``batch_size * world_size`` (Goyal et al. 2017,
    arXiv:1706.02677). timm's ``create_optimizer_v2`` leaves 1-D parameters
    (norms, biases) out of weight decay. The schedule counts optimizer steps (``t_in_epochs=False``, so call
    ``scheduler.step_update(num_updates)``, as ``train_one_epoch`` does): it rises from 1% of the peak over the
    warmup and decays to 1% of it at the end.

    Args:
        model: the module to optimise, or its parameter groups as ``create_optimizer_v2`` takes them (then the
            groups' own ``weight_decay`` applies, and a group's ``lr_scale`` multiplies its scheduled LR).
        lr: peak learning rate for a global batch of 64.
        batch_size: images per step on each process.
        world_size: processes (DDP ranks) that step together.
        weight_decay: AdamW's decoupled weight decay, for the parameters of 2 dimensions and more.
        epochs: the length of the schedule.
        steps_per_epoch: optimizer steps in an epoch.
        warmup_epochs: the linear warmup, in epochs (fractions count to the step).
        decay: False holds the peak after the warmup instead, for runs that end when the validation loss stops
            improving rather than at a planned length (``benchmarks/compare.py``): where such a run stops then
            does not depend on how long it could have been.
        fused: torch's fused AdamW (one kernel over every parameter, the same update) rather than its foreach
            ops; default: where torch has it for the parameters' device (the CPU and CUDA).
            ``benchmarks/optimizer.py`` measures the training step with each.

    Returns:
        ``(optimizer, scheduler, lr)``, ``lr`` the scaled peak learning rate.
    """
    lr = lr * batch_size * world_size / 64  # lr is for a global batch of 64; scale linearly
    if not isinstance(model, nn.Module):  # groups' parameters as lists: read here and again by the optimizer
        model = [{**g, "params": list(g["params"])} if isinstance(g, dict) else g for g in model]
    params = model.parameters() if isinstance(model, nn.Module) else [
        p for group in model for p in (group["params"] if isinstance(group, dict) else [group])]
    if fused is None:
        fused = {p.device.type for p in params} <= FUSED_DEVICES
    optimizer = create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=weight_decay,
                                    **({"fused": True} if fused else {}))
    warmup_t = int(warmup_epochs * steps_per_epoch)
    if not decay:  # timm's step schedule with a decay rate of 1: the warmup, then the peak
        return optimizer, StepLRScheduler(optimizer, decay_t=1, decay_rate=1.0, warmup_t=warmup_t,
                                          warmup_lr_init=lr * 0.01, t_in_epochs=False), lr
    scheduler = CosineLRScheduler(optimizer, t_initial=epochs * steps_per_epoch, lr_min=lr * 0.01,
                                  warmup_t=warmup_t, warmup_lr_init=lr * 0.01, t_in_epochs=False)
    return optimizer, scheduler, lr
