"""Speed settings chosen for the machine: CPU threads that do not fight, and the memory format.

Two things decide much of a CPU run's speed and neither has one right value everywhere:

* **Threads.** PyTorch's CPU kernels run on OpenMP threads (libgomp in the pip wheels). Between parallel
  regions an idle thread spins for a while, waiting for the next one, before it sleeps. Alone on its cores
  that is what makes small kernels fast; with another job on the same cores the spinning threads take the
  time slices their partners need at every barrier, and a step can take tens of times longer. The run starts
  with its share of the cores (``plan_threads``), and ``ThreadGovernor`` drops it to 1 thread, where nothing
  spins against anything, as soon as the CPU time it gets shows that the cores are shared.
* **Memory format.** ``channels_last`` (NHWC) can double a CPU training step where oneDNN has fast NHWC
  kernels (AVX-512 Xeons) and do nothing elsewhere; on CUDA it is what tensor cores want. ``auto`` measures it:
  a few steps of a copy of the model in each format (``choose_channels_last``).
* **Loader workers.** On the CPU, a loader worker that decodes while the step runs takes a core from one of the
  step's OpenMP threads, and the others wait for it at the next barrier. Where reading an image costs less than
  the training step spends on it, reading in the training process, between steps, is faster (``choose_workers``
  measures both).
* **Compiling.** ``torch.compile`` made Lite0's CPU training step 1.2-2x faster in NCHW, after about a minute of
  compiling (seconds with Inductor's cache, on a repeat run), and no faster in NHWC, where the eager step was
  already faster than the compiled NCHW one. ``auto`` compiles an NCHW run that is long enough to repay the
  minute (``choose_compile``), from the break-even ``benchmarks/torch_compile.py`` measured.

The numbers behind these choices are in ``benchmarks/results/`` (``threads``, ``adapters``), each with the
CPU it ran on. A lower ``GOMP_SPINCOUNT`` (set before torch loads) was measured too: 3,000 kept two runs on
2 cores within about 2x of a lone one, but on the 32x32 digits of ``benchmarks/peer_timm.py`` a lone epoch ran
at 253-266 images/s against 280-292 with libgomp's default, a cost the governor does not have.
"""

import copy
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .cli import CHANNELS_LAST_MODES, COMPILE_MODES, plural
from .errors import InputError
from .files import atomic_write, default_cache_dir
from .runinfo import device_name

__all__ = ["COMPILE_BREAK_EVEN", "DEFAULT_WORKERS", "PROBE_CACHE_ENTRIES", "ThreadGovernor", "ThreadPlan",
           "available_cores", "choose_channels_last", "choose_compile", "choose_workers", "compile_threshold",
           "data_seconds", "plan_threads", "probe_cache", "step_seconds"]

# benchmarks/results/compile-cpu.md (tf_efficientnet_lite0, batch 64, NCHW, 2 threads of an AMD EPYC, torch 2.14): by
# the input's pixels, the training steps after which compiling with an empty Inductor cache had paid for itself. In
# NHWC (compile-cpu-nhwc.md) the compiled step was 0.96x and 0.97x the eager one at 32x32 and 64x64: it never pays.
COMPILE_BREAK_EVEN = ((32 * 32, 340), (64 * 64, 916), (224 * 224, 23))
COMPILE_MARGIN = 1.5  # one machine, one model, one batch size: auto asks for half as many steps again
# --workers auto: the loader workers a training process gets where it does not read in the process itself.
DEFAULT_WORKERS = 2
# --workers auto on the CPU reads in the training process while an image's reading costs at most this many times
# the training step's time per image, both as choose_workers measures them. benchmarks/results/workers-cpu.md (2
# cores of an AMD EPYC, Lite0 at 32x32, batch 32): at 0.2, 0.34 and 0.79 times the step, reading in the process
# trained 1.16x, 1.18x and 1.13x as fast as 2 workers; at 2.8 and 6.4 times, 2 workers were 1.68x and 1.61x as fast.
WORKERS_BREAK_EVEN = 1.0



def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, further capped by a cgroup v2 CPU quota (containers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


@dataclass(frozen=True)
class ThreadPlan:
    """The intra-op threads of one training process, and why."""

    threads: int
    cores: int
    local_processes: int
    workers: int
    chosen_by: str  # "auto" or "--threads"

    def describe(self) -> str:
        share = f"{self.cores} cores / {self.local_processes} process{'es' if self.local_processes > 1 else ''}"
        workers = f"{self.workers} loader worker{'s' if self.workers != 1 else ''} at 1 thread each"
        return f"threads: {self.threads} intra-op ({self.chosen_by}: {share}; {workers})"


def plan_threads(*, workers: int, local_processes: int = 1, requested: int | None = None,
                 cores: int | None = None) -> ThreadPlan:
    """This process' share of the cores: ``cores // local_processes``, at least 1 (or ``requested``).

    The loader workers are not subtracted: each runs torch at 1 thread (the DataLoader sets that), and they
    sleep whenever the prefetch queue is full, which is most of the time once decoding keeps up; a packed
    dataset has none. Subtracting them on a 2-core machine would halve the model's threads for good.

    Args:
        workers: loader worker processes of this process.
        local_processes: training processes on this machine (``LOCAL_WORLD_SIZE`` under torchrun).
        requested: a thread count the user asked for (``--threads``); checked, and used as it is.
        cores: the cores to share (default: ``available_cores()``).
    """
    cores = cores or available_cores()
    if requested is not None:
        if requested < 1:
            raise InputError(f"--threads must be at least 1; got {requested}")
        return ThreadPlan(requested, cores, local_processes, workers, "--threads")
    return ThreadPlan(max(1, cores // max(1, local_processes)), cores, local_processes, workers, "auto")


class ThreadGovernor:
    """Drop to 1 intra-op thread, once, when this process turns out to share its cores with other work.

    Alone on its cores, a process running ``threads`` OpenMP threads gets about ``threads`` seconds of CPU time
    per second (idle threads spin, and spinning counts). When another job runs on the same cores, the OS shares
    them out and the spinning threads wait on each other at every barrier: steps slow down many-fold while the
    process gets only about one core's time. ``step()``, called after each training step, measures the CPU time
    per wall second (leaving out the wait for data) over windows of at least ``window_s``; below
    ``min_share * threads`` it sets 1 thread for the rest of the run, where one thread cannot spin against
    another, and logs why.

    Args:
        threads: the intra-op threads the run started with; with fewer than 2 there is nothing to do.
        min_share: the fraction of ``threads`` cores below which the cores count as shared.
        window_s: the shortest measuring window, in seconds.
        log: where the one line saying so goes.
    """

    def __init__(self, threads: int, *, min_share: float = 0.6, window_s: float = 1.0,
                 log: Callable[[str], None] = print) -> None:
        self.threads, self.min_share, self.window_s, self.log = threads, min_share, window_s, log
        self.dropped = False
        self._start: tuple[float, float, float, float] | None = None  # (wall, CPU, waited, its CPU) seconds

    def step(self, waited: float = 0.0, waited_cpu: float = 0.0) -> None:
        """``waited``: the seconds this epoch has so far spent waiting for the loader (it restarts each epoch), and
        ``waited_cpu`` the CPU seconds of the process meanwhile. That time is left out: a process that waits for
        its workers is idle, not short of cores, and one that reads its own batches runs 1 thread, not its
        ``threads``."""
        if self.dropped or self.threads < 2:
            return
        now, cpu = time.perf_counter(), time.process_time()
        # The first step (allocations, oneDNN's kernel choice) is not measured, nor a window across epochs.
        if self._start is None or waited < self._start[2]:
            self._start = (now, cpu, waited, waited_cpu)
            return
        wall = now - self._start[0] - (waited - self._start[2])
        if wall < self.window_s:
            return
        share = (cpu - self._start[1] - (waited_cpu - self._start[3])) / wall
        self._start = (now, cpu, waited, waited_cpu)
        if share < self.min_share * self.threads:
            torch.set_num_threads(1)
            self.dropped = True
            self.log(f"threads: this process got {share:.2f} cores' time of its {self.threads} threads over "
                     f"{wall:.1f}s: another job shares these cores, so 1 thread from now on (--threads N sets it)")


def _time_steps(model: nn.Module, x: torch.Tensor, *, train: bool, autocast: Callable, steps: int,
                device: torch.device) -> float:
    """Seconds per step (median of ``steps`` after one untimed step) of forward (+ backward) on ``x``."""

    def step() -> None:
        with (nullcontext() if train else torch.no_grad()), autocast():
            out = model(x)
        if train:
            out.float().square().mean().backward()
            model.zero_grad(set_to_none=True)

    times = []
    for i in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _probe_steps(model: nn.Module, device: torch.device, input_shape: tuple[int, ...], formats: tuple[bool, ...], *,
                 train: bool, autocast: Callable, steps: int) -> tuple[list[float], int]:
    """Seconds a step of a copy of ``model`` takes in each of ``formats`` (True: NHWC, in that order on one copy),
    on a random batch of ``input_shape`` capped at 16 images, and that batch's size. The model, its statistics and
    the run's random generator (the probe's batch and dropout) are left as they were."""
    b, *rest = input_shape
    seconds = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.rand(min(b, 16), *rest, device=device)
        probe = copy.deepcopy(model).train(train)
        for nhwc in formats:
            if nhwc:
                probe.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            seconds.append(_time_steps(probe, x, train=train, autocast=autocast, steps=steps, device=device))
    return seconds, x.shape[0]


PROBE_CACHE_ENTRIES = 256  # the cache file keeps the newest decisions only


def probe_cache(kind: str) -> Path:
    """Where the CPU probes of one kind are remembered, in the user's cache folder: ``channels_last.json``
    (``--channels-last auto``'s decisions) and ``step_time.json`` (``--workers auto``'s training step timings)."""
    return default_cache_dir() / f"{kind}.json"


def _probe_key(model: nn.Module, device: torch.device, input_shape: tuple[int, ...], train: bool,
               autocast: Callable) -> str:
    """What a probe's answer depends on: CPU model and threads, torch, the model, the input, train/infer, AMP."""
    params = list(model.parameters())
    what = (f"{type(model).__name__}:{getattr(model, 'model_name', '')}:{getattr(model, 'adapter', '')}:"
            f"{sum(p.numel() for p in params)}:{params[0].dtype if params else ''}")
    amp = getattr(autocast, "keywords", {}).get("dtype", "none")
    return (f"{device_name(device)} | torch {torch.__version__} | {what} | {tuple(input_shape)} | "
            f"{'train' if train else 'infer'} | amp {amp}")


def _is_decision(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], bool) and isinstance(v[1], str)


def _is_seconds(v) -> bool:
    return (isinstance(v, list) and len(v) == 1 and isinstance(v[0], float) and math.isfinite(v[0])
            and v[0] > 0)


def _read_cache(path: Path, valid: Callable[[object], bool] = _is_decision) -> dict:
    """The cached entries that ``valid`` accepts; an unreadable or malformed file (it is only a cache) counts as
    empty."""
    try:
        if path.stat().st_size > 1 << 20:
            return {}
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(k, str) and valid(v)}


def _write_cache(path: Path, key: str, value: tuple | list, valid: Callable[[object], bool] = _is_decision) -> None:
    entries = _read_cache(path, valid)
    entries.pop(key, None)
    entries[key] = list(value)
    try:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(dict(list(entries.items())[-PROBE_CACHE_ENTRIES:]), indent=1))
    except OSError:
        pass  # a read-only cache folder costs a probe next time, nothing more


def choose_channels_last(mode: str, model: nn.Module, device: torch.device, input_shape: tuple[int, ...], *,
                         train: bool, autocast: Callable = nullcontext, steps: int = 2,
                         min_gain: float = 1.05, cache: Path | None = None,
                         step_cache: Path | None = None) -> tuple[bool, str]:
    """Resolve ``--channels-last auto|on|off`` to a bool, with a line saying why.

    ``auto`` on CUDA is on (cuDNN's NHWC kernels are what tensor cores run, as timm recommends). On the CPU it
    times ``steps`` forward (and, with ``train``, backward) passes of a copy of ``model`` in each format on a
    random batch of ``input_shape`` (the batch capped at 16) and takes NHWC when it is at least ``min_gain``
    times faster. The copy keeps the model's batch statistics and gradients untouched. Under
    ``torch.distributed`` rank 0 decides for every rank, so that they agree.

    Args:
        mode: ``auto``, ``on`` or ``off``.
        model: the model as it will run (on ``device``, not yet compiled or wrapped).
        device: where it runs.
        input_shape: (B, 1, H, W) of a batch.
        train: probe training steps (forward and backward) rather than inference.
        autocast: the run's autocast context factory.
        steps: timed steps per format, after one untimed.
        min_gain: the speed-up NHWC must show to be chosen.
        cache: a JSON file of earlier decisions (``probe_cache("channels_last")``): ``auto`` on the CPU probes only when
            it holds none for this CPU, torch version, model, input shape, train/infer and AMP, and records the
            probe's answer there. ``None``: always probe.
        step_cache: ``step_seconds``' cache (``probe_cache("step_time")``): a training probe records its two steps'
            timings there too, so that ``--workers auto`` does not time the same steps again.
    """
    if mode not in CHANNELS_LAST_MODES:
        raise InputError(f"channels_last must be one of {', '.join(CHANNELS_LAST_MODES)}; got {mode!r}")
    if mode != "auto":
        return mode == "on", f"channels_last: {mode} (asked for)"
    if device.type == "cuda":
        return True, "channels_last: on (auto: CUDA, where NHWC is what cuDNN's tensor-core kernels use)"
    decision = [None]
    key = _probe_key(model, device, input_shape, train, autocast) if cache is not None else ""
    cached = _read_cache(cache).get(key) if cache is not None else None
    if cached is not None:
        decision[0] = (cached[0], f"{cached[1]}; cached in {cache}, delete it to probe again")
    elif not dist.is_initialized() or dist.get_rank() == 0:
        (nchw, nhwc), n = _probe_steps(model, device, input_shape, (False, True), train=train, autocast=autocast,
                                       steps=steps)
        on = nchw >= min_gain * nhwc
        what = "training" if train else "inference"
        decision[0] = (on, f"channels_last: {'on' if on else 'off'} (auto: a {n}-image {what} step took "
                           f"{nhwc * 1e3:.0f} ms in NHWC, {nchw * 1e3:.0f} ms in NCHW; NHWC is taken from "
                           f"{min_gain:.2f}x faster)")
        if cache is not None:
            _write_cache(cache, key, decision[0])
        if train and step_cache is not None:
            for nhwc_format, seconds in ((False, nchw), (True, nhwc)):
                _write_cache(step_cache, _step_key(model, device, input_shape, autocast, nhwc_format),
                             [seconds / n], _is_seconds)
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def _step_key(model: nn.Module, device: torch.device, input_shape: tuple[int, ...], autocast: Callable,
              channels_last: bool) -> str:
    return _probe_key(model, device, input_shape, True, autocast) + f" | {'nhwc' if channels_last else 'nchw'}"


def step_seconds(model: nn.Module, device: torch.device, input_shape: tuple[int, ...], *, channels_last: bool,
                 autocast: Callable = nullcontext, steps: int = 2, cache: Path | None = None) -> float:
    """Seconds per image of a training step (forward and backward) of a copy of ``model``, in the run's format.

    Timed as ``choose_channels_last`` times its probe (``_probe_steps``: ``steps`` steps after one untimed, on a
    random batch of ``input_shape`` capped at 16 images; the model, its statistics and the random generator are left
    as they were).
    ``cache``: a JSON file of earlier timings (``probe_cache("step_time")``, where a training probe of
    ``choose_channels_last`` leaves its own), keyed as the channels_last probes are and by the memory format;
    ``None``: always time.
    """
    key = _step_key(model, device, input_shape, autocast, channels_last)
    cached = _read_cache(cache, _is_seconds).get(key) if cache is not None else None
    if cached is not None:
        return cached[0]
    (seconds,), n = _probe_steps(model, device, input_shape, (channels_last,), train=True, autocast=autocast,
                                 steps=steps)
    seconds /= n
    if cache is not None:
        _write_cache(cache, key, [seconds], _is_seconds)
    return seconds


def data_seconds(dataset, *, samples: int = 32, budget_s: float = 0.5) -> float:
    """Seconds per image of reading ``dataset``'s samples in this process, as a training epoch reads them.

    Up to ``samples`` of them, evenly spaced, stopping once ``budget_s`` has passed (after at least one): a folder
    of large scans is timed on a few. Datasets seeded per sample (``takes_sample_seeds``) get (index, seed) keys;
    the random generator is left as it was, and the warnings of unreadable files (the run reports those) are not
    shown twice.
    """
    n = len(dataset)
    if n == 0:
        return 0.0
    indices = sorted({i * n // min(n, samples) for i in range(min(n, samples))})
    seeded = getattr(dataset, "takes_sample_seeds", False)
    count, start = 0, time.perf_counter()
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in indices:
            dataset[(i, i) if seeded else i]
            count += 1
            if time.perf_counter() - start >= budget_s:
                break
    return (time.perf_counter() - start) / count


def choose_workers(requested: int | str, device: torch.device, *, dataset, model: nn.Module,
                   input_shape: tuple[int, ...], channels_last: bool, autocast: Callable = nullcontext,
                   cache: Path | None = None, why: str | None = None, default: int = DEFAULT_WORKERS,
                   break_even: float | None = None) -> tuple[int, str]:
    """Resolve ``--workers N|auto`` to a number of loader worker processes, with a line saying why.

    ``auto`` off the CPU is ``default`` workers: the training process only queues the device's work, and the
    workers read beside it. On the CPU the workers and the step's threads share the cores, so ``auto`` compares
    the seconds an image of ``dataset`` takes to read here (``data_seconds``) with the seconds a training step of
    ``model`` spends per image (``step_seconds``, at ``input_shape`` in the run's memory format, ``cache`` as
    there): up to ``break_even`` times the step, the training process reads its own batches between steps (0
    workers); beyond it, ``default`` workers read beside the steps (``break_even`` default:
    ``WORKERS_BREAK_EVEN``). Under ``torch.distributed`` rank 0 measures and decides for every rank. Nothing is
    measured unless ``auto`` on the CPU asks for it. A number is taken as it is, with ``why`` (the data source's
    reason) or as asked for.
    """
    if requested != "auto":
        n = int(requested)
        return n, f"loader: {plural(n, 'worker') if n else 'in this process'} ({why or 'asked for'})"
    if device.type != "cpu":
        return default, (f"loader: {plural(default, 'worker')} (auto: on {device.type} the training process only "
                         "queues the device's work, and the workers read beside it)")
    decision = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        break_even = WORKERS_BREAK_EVEN if break_even is None else break_even
        read = data_seconds(dataset)
        step = step_seconds(model, device, input_shape, channels_last=channels_last, autocast=autocast, cache=cache)
        measured = f"reading an image took {read * 1e3:.2f} ms here, a training step {step * 1e3:.2f} ms an image"
        if read <= break_even * step:
            decision[0] = (0, f"loader: in this process (auto: {measured}; loader workers would take cores from "
                              "the step's threads)")
        else:
            decision[0] = (default, f"loader: {plural(default, 'worker')} (auto: {measured}; workers read beside "
                                    "the steps, and a pack (docs/packs.md) would not read at all)")
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def compile_threshold(height: int, width: int) -> int:
    """The training steps from which ``--compile auto`` compiles at (height, width) on the CPU: the larger measured
    break-even of the measured sizes on either side (the nearest one beyond them), times ``COMPILE_MARGIN``."""
    pixels = height * width
    below = [steps for p, steps in COMPILE_BREAK_EVEN if p <= pixels]
    above = [steps for p, steps in COMPILE_BREAK_EVEN if p >= pixels]
    near = below[-1:] + above[:1]
    return math.ceil(COMPILE_MARGIN * max(near))


def choose_compile(mode: str, device: torch.device, steps: int, img_size: tuple[int, int], *,
                   channels_last: bool = False) -> tuple[bool, str]:
    """Resolve ``--compile auto|on|off`` to a bool, with a line saying why.

    ``auto`` compiles on the CPU when the run is in NCHW (``channels_last`` False), its ``steps`` training steps
    reach ``compile_threshold`` and a C++ compiler is on the PATH (Inductor builds its CPU kernels with one). Not
    in NHWC, where compiling measured no faster than the eager step, and not on CUDA, where it measured no faster
    either (an H200, 224x224, batch 64, NHWC, bf16: 0.99x after 42 s of compiling; ``--compile on`` tries it).
    Only the training step is compiled: evaluation runs the same module eagerly, so no second graph (and no
    recompiling for a last, smaller batch) is paid for.
    """
    if mode not in COMPILE_MODES:
        raise InputError(f"compile must be one of {', '.join(COMPILE_MODES)}; got {mode!r}")
    if mode != "auto":
        return mode == "on", f"compile: {mode} (asked for)"
    if device.type != "cpu":
        return False, (f"compile: off (auto: on CUDA the compiled step measured no faster than the eager one; "
                       f"--compile on tries it on {device.type})")
    if channels_last:
        return False, "compile: off (auto: in NHWC the compiled CPU step measured no faster than the eager one)"
    if not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return False, "compile: off (auto: no C++ compiler on the PATH, which torch.compile needs on the CPU)"
    h, w = img_size
    need = compile_threshold(h, w)
    if steps < need:
        return False, (f"compile: off (auto: {steps} training steps; at {h}x{w} compiling pays for its first minute "
                       f"after about {need}; --compile on compiles anyway)")
    return True, (f"compile: on (auto: {steps} training steps, beyond the {need} after which compiling pays at "
                  f"{h}x{w}; the first step waits for it: about a minute, seconds on a repeat run)")
