"""Shared parts of the benchmark scripts: the environment record, interleaved timing, peak memory, tables.

The rules come from timm's ``benchmark.py`` and nanoGPT's ``bench.py``: warm up first, call
``torch.cuda.synchronize()`` before every timestamp on CUDA, and compare candidates *inside one run*,
interleaved round by round, so that a machine that slows down or speeds up halfway (another job, thermal
throttling, a shared CPU) moves every candidate alike. Each round times every candidate once, in an order
rotated from round to round; a ratio is taken per round and its median is reported, with the spread.
"""

import csv
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from tqdm import tqdm

import gray_effnet
from gray_effnet import runinfo
from gray_effnet.cli import HelpFormatter  # noqa: F401 - the benchmarks' parsers use it from here
from gray_effnet.runinfo import NA, device_name

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- the environment --------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """``name``, or CUDA when it is available and the CPU otherwise."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: CUDA is not available on this machine")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timestamp taken next includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def git_commit() -> str:
    """The short commit of this checkout, with ``+dirty`` when it has uncommitted changes."""
    return runinfo.git_commit(Path(__file__))


def command_line() -> str:
    """The command that ran this script, quoted so that it can be pasted back into a shell."""
    return shlex.join(["python", *sys.argv])


def environment(device: torch.device, dtype: str, **extra: Any) -> dict[str, Any]:
    """The columns every result row carries: where, with what and at which precision it ran.

    Args:
        device: the device the benchmark ran on.
        dtype: the compute dtype (``float32``, or the autocast dtype under ``--amp``).
        **extra: more columns to add (model, batch size, ...).
    """
    env = {
        "device": device.type,
        "device_name": device_name(device),
        "dtype": dtype,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "gray_effnet": gray_effnet.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or NA,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else NA,
        "threads": torch.get_num_threads(),
        "commit": git_commit(),
    }
    env.update(extra)
    return env


# -- statistics -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spread:
    """Five-number summary of a sample (quartiles by the inclusive method)."""

    min: float
    q1: float
    median: float
    q3: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        v = sorted(float(x) for x in values)
        if not v:
            return cls(*(math.nan,) * 5)
        if len(v) == 1:
            return cls(*(v[0],) * 5)
        q1, q2, q3 = statistics.quantiles(v, n=4, method="inclusive")
        return cls(v[0], q1, q2, q3, v[-1])


# -- timing ------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of a block of work, above what was allocated when it started (MiB).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; exact for tensors made
    by PyTorch's caching allocator. CPU (Linux): the resident set's high-water mark (``VmHWM``, reset by
    writing 5 to ``/proc/self/clear_refs``) minus the resident set before the block. That is a lower
    bound: memory that the C allocator kept from earlier steps is already resident and not counted.
    Elsewhere the CPU figure is ``None``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm_delta"
        self._before: float | None = None
        self.peak_mb: float | None = None

    @staticmethod
    def _status_kb(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return float(line.split()[1])
        except OSError:
            pass
        return None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
        except OSError:
            self._before = None
            return self
        rss = self._status_kb("VmRSS")
        self._before = rss / 1024 if rss is not None else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._before is None:
            return
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._before
            return
        hwm = self._status_kb("VmHWM")
        self.peak_mb = max(hwm / 1024 - self._before, 0.0) if hwm is not None else None


def time_block(step: Callable[[], object], iters: int, device: torch.device) -> float:
    """Seconds that ``iters`` calls of ``step`` take, synchronising before both timestamps."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class Candidate:
    """One thing to time: ``step()`` processes ``samples`` samples (a batch, or an epoch of a loader)."""

    name: str
    step: Callable[[], object]
    samples: int
    seconds: list[float] = field(default_factory=list)  # per step, one entry per round
    peak_mb: list[float] = field(default_factory=list)  # per round, where measurable

    @property
    def step_spread(self) -> Spread:
        return Spread.of(self.seconds)

    @property
    def samples_per_sec(self) -> float:
        return self.samples / self.step_spread.median

    @property
    def peak_mem_mb(self) -> float | None:
        return max(self.peak_mb) if self.peak_mb else None

    def ratios_to(self, baseline: "Candidate") -> list[float]:
        """Per-round throughput ratios ``self / baseline`` (above 1: faster than the baseline)."""
        return [(b / baseline.samples) / (s / self.samples) for s, b in zip(self.seconds, baseline.seconds)]


def warm_up(candidates: Sequence[Candidate], iters: int, device: torch.device, desc: str = "warm-up") -> None:
    """Run each candidate ``iters`` times untimed: lazy init, cuDNN autotuning, ``torch.compile``, caches."""
    with tqdm(total=len(candidates) * iters, desc=desc, leave=False, dynamic_ncols=True) as bar:
        for cand in candidates:
            for _ in range(iters):
                cand.step()
                bar.update()
            synchronize(device)


def interleave(candidates: Sequence[Candidate], rounds: int, iters: int, device: torch.device,
               desc: str = "rounds", memory: bool = True) -> None:
    """Time every candidate once per round, ``iters`` steps a block, in an order rotated each round.

    Appends each round's seconds per step (and peak memory) to the candidates. Rotating the order keeps
    any one candidate from always running first, right after another's cache-warming or last.
    """
    n = len(candidates)
    with tqdm(total=rounds * n, desc=desc, leave=False, dynamic_ncols=True) as bar:
        for r in range(rounds):
            for cand in (candidates[(r + i) % n] for i in range(n)):
                mem = PeakMemory(device) if memory else None
                if mem is not None:
                    with mem:
                        seconds = time_block(cand.step, iters, device)
                    if mem.peak_mb is not None:
                        cand.peak_mb.append(mem.peak_mb)
                else:
                    seconds = time_block(cand.step, iters, device)
                cand.seconds.append(seconds / iters)
                bar.update()


# -- tables -----------------------------------------------------------------------------------------
def fmt(value: Any) -> str:
    """A table cell: floats to 4 significant digits (integers as they are), ``None`` and NaN as n/a."""
    if value is None:
        return NA
    if isinstance(value, float):
        if math.isnan(value):
            return NA
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns`` for the terminal; numbers right-aligned."""
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def write_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write every column of ``rows`` (the union of their keys, in first-seen order) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval=NA)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (NA if v is None else v) for k, v in row.items()})
    return path


def write_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], path: str | os.PathLike, title: str,
                   notes: Sequence[str] = ()) -> Path:
    """Write a Markdown report: the title, the command, the columns shared by all rows, then the table.

    Columns whose value is the same in every row (device, versions, dtype, ...) are listed once above the
    table rather than repeated in it, unless they are among ``columns``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    shared = [k for k in keys if k not in columns and len({fmt(row.get(k)) for row in rows}) == 1]
    lines = [f"# {title}", "", "```", command_line(), "```", ""]
    lines += [f"- **{k}**: {fmt(rows[0].get(k))}" for k in shared]
    lines += [""] + [f"{note}" for note in notes] + ([""] if notes else [])
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---:" if isinstance(rows[0].get(c), (int, float)) else "---" for c in columns) + "|")
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def report(rows: Sequence[dict[str, Any]], columns: Sequence[str], csv_path: str | os.PathLike, title: str,
           notes: Sequence[str] = (), md_path: str | os.PathLike | None = None, header: str = "") -> None:
    """Write ``rows`` as CSV and Markdown (``md_path``: default, the CSV path with ``.md``), print the table."""
    csv_path = Path(csv_path)
    md_path = Path(md_path) if md_path else csv_path.with_suffix(".md")
    write_csv(rows, csv_path)
    write_markdown(rows, columns, md_path, title, notes)
    print(f"\n{header}" if header else "")
    print(format_table(rows, columns))
    print(f"\nwrote {csv_path} and {md_path}")


def default_output(stem: str, suffix: str) -> Path:
    """``benchmarks/results/<stem><suffix>``, whatever the working directory."""
    return RESULTS_DIR / f"{stem}{suffix}"
