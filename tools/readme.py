"""Write the measured numbers of README.md and docs/*.md from the committed results, so that none is copied by hand.

Every measured number stands between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->`` markers, in
README.md or in a page of docs/, and this script renders each region from ``benchmarks/results/``: the numbers,
the command that measured them, the commit and the CPU or GPU it ran on. Links in a region are written relative
to the page it stands in, and no region may carry an absolute path (a path of the machine that measured it).

    python tools/readme.py           # rewrite the regions, and the output block of the explain command
    python tools/readme.py --check   # exit 1 when a page differs from what the results give

``tests/test_readme.py`` runs the check, so a hand-edited number or a result committed without
regenerating the pages fails the tests. The explain block is the command's output on this machine; its
float-rounding digits differ between CPUs, so ``--check`` leaves it to the test, which compares it with a
tolerance.
"""

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The command of the peer benchmark names timm's train.py where it lay on the measuring machine.
TIMM_TRAIN_PY = "PATH/TO/timm/train.py"


def pages() -> list[Path]:
    """README.md, then docs/*.md by name: every page that may hold a generated region."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _rows(name: str) -> list[dict[str, str]]:
    with open(RESULTS / name, newline="") as f:
        return list(csv.DictReader(f))


def _command(md_name: str) -> str:
    """The command a results Markdown file records in its first code block."""
    text = (RESULTS / md_name).read_text()
    return re.search(r"```\n(.*?)\n```", text, flags=re.S).group(1).strip()


def _machine(rows: list[dict[str, str]]) -> str:
    names = sorted({r["device_name"] for r in rows})
    commits = sorted({r["commit"] for r in rows})
    return f"{', '.join(names)}, commit {', '.join(commits)}"


def demo() -> str:
    """The demo command's run: time per epoch, total, best validation accuracy."""
    config = json.loads((RESULTS / "demo" / "config.json").read_text())
    rows = _rows("demo/metrics.csv")
    seconds = [float(r["seconds"]) for r in rows]
    best = max(rows, key=lambda r: float(r["val_acc"]))
    return (
        f"Measured with `{config['resolved']['command']}` on {config['resolved']['device_name']} "
        f"(commit {config['resolved']['commit']}): {len(rows)} epochs of {min(seconds):.1f}-{max(seconds):.1f} s "
        f"of training each, best validation accuracy **{float(best['val_acc']):.4f}** (epoch {best['epoch']}). "
        f"Its `metrics.csv` and `config.json` are in [benchmarks/results/demo/](benchmarks/results/demo/)."
    )


def speed() -> str:
    """Each adapter's speed against the stock model, NCHW and NHWC, per image size, from benchmarks/adapters.py."""
    files = sorted((p.name for p in RESULTS.glob("adapters-*.csv")), key=lambda n: (n.split("-")[1], _pixels(n)))
    tables = []
    for name in files:
        rows = _rows(name)
        cols = list(dict.fromkeys((r["memory_format"], r["mode"]) for r in rows))
        adapters = [a for a in dict.fromkeys(r["adapter"] for r in rows) if a != "stock"]
        ratio = {(r["adapter"], r["memory_format"], r["mode"]): float(r["ratio_to_stock"]) for r in rows}
        stock = {(r["memory_format"], r["mode"]): float(r["samples_per_sec"]) for r in rows if r["adapter"] == "stock"}
        first = rows[0]
        nhwc_gain = ", ".join(f"{m} {stock[('nhwc', m)] / stock[('nchw', m)]:.2f}x" for f, m in cols
                              if f == "nhwc" and ("nchw", m) in stock)
        lines = [
            f"`{first['model']}`, batch {first['batch_size']} at {first['img_size']}, {first['dtype']}: "
            f"{_machine(rows)}; `{_command(name[:-4] + '.md')}`"
            + (f". Stock model in NHWC against NCHW: {nhwc_gain}." if nhwc_gain else ""),
            "",
            "| adapter | " + " | ".join(f"{m} {f.upper()}" for f, m in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
        lines += [f"| {a} | " + " | ".join(f"{ratio[(a, f, m)]:.2f}" for f, m in cols) + " |" for a in adapters]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _pixels(name: str) -> int:
    size = re.search(r"-(\d+)x(\d+)", name)
    return int(size.group(1)) * int(size.group(2)) if size else 0


def threads() -> str:
    """A training run alone and two on the same cores, per thread policy, from benchmarks/threads.py."""
    rows = _rows("threads.csv")
    first = rows[0]
    lines = [
        f"`train.py` on the {first['data']}, {first['img_size']}, batch {first['batch_size']}, {first['workers']} "
        f"loader workers, {first['cores']} cores ({_machine(rows)}; `{_command('threads.md')}`; median of "
        f"{first['rounds']} rounds), seconds of the second epoch:",
        "",
        "| policy | alone (s) | two at once (s) | shared / alone | alone / fastest alone |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['policy']} (`{r['env']}`) | {float(r['alone_s']):.1f} | {float(r['shared_s']):.1f} | "
              f"**{float(r['shared_over_alone']):.2f}x** | {float(r['alone_vs_fastest']):.2f}x |" for r in rows]
    return "\n".join(lines)


def workers() -> str:
    """Loader workers against reading in the training process, by an image's cost to read (benchmarks/workers.py)."""
    rows = _rows("workers-cpu.csv")
    first = rows[0]
    lines = [
        f"`train.py` on synthetic X-ray-like PNG folders, trained at {first['img_size']}, batch {first['batch_size']} "
        f"({_machine(rows)}; `{_portable(_command('workers-cpu.md'))}`; median of {first['rounds']} rounds), "
        "training images per second of the epochs after the first:",
        "",
        "| folder | reading an image (ms) | a step per image (ms) | reading / step | 0 workers | 2 workers | "
        "0 over 2 | auto chose | right |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    lines += [f"| {r['images']} {r['source']}s | {float(r['read_ms']):.2f} | {float(r['step_ms']):.2f} | "
              f"{float(r['read_over_step']):.2f} | {float(r['img_s_0']):.0f} | {float(r['img_s_2']):.0f} | "
              f"**{float(r['in_process_speedup']):.2f}x** | {r['auto']} | {'yes' if r['auto_ok'] == 'True' else 'NO'} |"
              for r in rows]
    return "\n".join(lines)


def peer() -> str:
    """Our train.py against timm's train.py on the same data and weights, from benchmarks/peer_timm.py."""
    rows = _rows("peer_timm/runs.csv")
    first = rows[0]
    configs = list(dict.fromkeys(r["config"] for r in rows))
    report = (RESULTS / "peer_timm" / "results.md").read_text()
    data = re.search(r"^Data: (\d+ generated \d+x\d+ 8-bit gray digits)", report, flags=re.M).group(1)
    goals = {c: float(g) for c, g in re.findall(r"^- `(\w+)`: .*goal <= ([\d.]+)x$", report, flags=re.M)}
    command = re.sub(r"(--timm-train-py[ =])\S+", rf"\g<1>{TIMM_TRAIN_PY}", _portable(_command("peer_timm/results.md")))
    lines = [
        f"{data} (split 80/20), {first['epochs']} epochs, batch {first['batch_size']}, input {first['img_size']}, "
        f"the same Lite0 ImageNet weights, each run a fresh process timed from start to exit, alternating over "
        f"{max(int(r['round']) for r in rows)} rounds ({_machine(rows)}; `{command}`; "
        "[runs and logs](benchmarks/results/peer_timm/results.md)):",
        "",
        "| config | timm (s) | ours (s) | ours / timm, paired | goal | timm best acc | ours best acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        by = {tool: [r for r in rows if r["config"] == config and r["tool"] == tool] for tool in ("timm", "ours")}
        secs = {tool: statistics.median(float(r["seconds"]) for r in rs) for tool, rs in by.items()}
        accs = {tool: statistics.median(float(r["best_acc"]) for r in rs) for tool, rs in by.items()}
        goal = goals[config]
        # Paired, as peer_timm.py's own verdict: ours / timm within each round, the median over rounds.
        seconds = {(r["round"], r["tool"]): float(r["seconds"]) for rs in by.values() for r in rs}
        ratio = statistics.median(seconds[(n, "ours")] / seconds[(n, "timm")]
                                  for n in sorted({n for n, _ in seconds}))
        lines.append(f"| {config} | {secs['timm']:.0f} | {secs['ours']:.0f} | **{ratio:.2f}x** | "
                     f"<= {goal:g}x {'(met)' if ratio <= goal else '(NOT met)'} | {accs['timm']:.3f} | "
                     f"{accs['ours']:.3f} |")
    if gap := re.search(r"^Ours from the pack against ours from the files.*$", report, flags=re.M):
        lines += ["", gap.group(0)]
    return "\n".join(lines)


def pack() -> str:
    """Training from files against a pack, and the packed loader against the model, from benchmarks/pack.py."""
    tables = []
    for name in sorted(p.name for p in RESULTS.glob("pack-*.csv")):
        rows = {r["candidate"]: r for r in _rows(name)}
        first = next(iter(rows.values()))
        epoch, loader, model = rows["pack_epoch"], rows["pack_loader"], rows["model_train"]
        tables.append(
            f"{first['n_images']} synthetic {first['source']}s ({first['train_images']} for training, packed as "
            f"{first['pack_dtype']} in {float(first['pack_seconds']):.1f} s) trained at "
            f"{first['img_size']} on {first['device']} ({_machine(list(rows.values()))}; "
            f"`{_command(name[:-4] + '.md')}`): an epoch from the pack is **{float(epoch['ratio']):.1f}x** faster "
            f"than from the files (goal {float(epoch['goal']):.0f}x: {'met' if epoch['met'] == 'yes' else 'NOT met'}"
            f"), and the packed loader with its augmentation delivers {float(loader['images_per_sec']):.0f} images/s, "
            f"**{float(loader['ratio']):.1f}x** the model's {float(model['images_per_sec']):.0f} training images/s "
            f"(goal {float(loader['goal']):.0f}x: {'met' if loader['met'] == 'yes' else 'NOT met'}).")
    return "\n\n".join(tables)


def pipeline() -> str:
    """torchvision's Grayscale(3) input pipeline against uint8 1-channel loading."""
    rows = {r["pipeline"]: r for r in _rows("pipeline-cpu.csv")}
    tv, ours = rows["torchvision"], rows["gray_effnet"]
    return (
        f"{ours['num_images']} gray {ours['src_images'].split()[0]} PNGs resized to {ours['img_size']}, batch "
        f"{ours['batch_size']}, {ours['workers']} workers ({_machine(list(rows.values()))}; "
        f"`{_command('pipeline-cpu.md')}`): uint8 1-channel loading at **{float(ours['speed_ratio']):.2f}x** the "
        f"images/s of torchvision's `Grayscale(3) -> ToTensor -> Normalize` ({float(ours['images_per_sec']):.0f} vs "
        f"{float(tv['images_per_sec']):.0f}), with **{float(ours['bytes_ratio']):.0f}x fewer bytes** per image to "
        f"the device ({int(ours['bytes_per_image']):,} vs {int(tv['bytes_per_image']):,})."
    )


def fidelity() -> str:
    """sum and fold against repeat on real gray photos with the Lite0 ImageNet weights."""
    rows = _rows("fidelity.csv")
    by = {(r["statistics"].split()[0].lower(), r["adapter"]): r for r in rows}
    lite, imnet = by[("lite0", "sum")], by[("imagenet", "sum")]
    fold = max(float(by[(s, "fold")]["logits_max_abs"]) for s in ("lite0", "imagenet"))
    fold_stem = max(float(by[(s, "fold")]["stem_max_abs"]) for s in ("lite0", "imagenet"))
    n = int(imnet["images"])
    return (
        f"Measured on {n} real gray photos with the Lite0 ImageNet stem filters ({_machine(rows)}; "
        f"`{_command('fidelity.md')}`, [fidelity.md](benchmarks/results/fidelity.md)): with Lite0's own "
        f"statistics `sum` matches `repeat` to {float(lite['logits_max_abs']):.1g} in the logits; with ImageNet "
        f"statistics the stem output differs by up to {float(imnet['stem_max_abs']):.2g}, the logits by up to "
        f"{float(imnet['logits_max_abs']):.2g} ({float(imnet['logits_rel']):.0%} of their scale), and the top-1 "
        f"class agrees on {round(float(imnet['top1_agree']) * n)} of {n} photos. `fold` stays within "
        f"{max(fold, fold_stem):.1g} in both cases."
    )


COMBINED = RESULTS / "adapter_choice" / "combined.json"  # benchmarks/compare_report.py's output


def compare() -> str:
    """The adapter comparison: the sweeps side by side and the generated verdict (benchmarks/compare_report.py), or,
    before any combined report is committed, the single fixed-budget sweep in learning_curve/."""
    if COMBINED.is_file():
        combined = json.loads(COMBINED.read_text())
        lines = [
            f"`{combined['command']}` sets {len(combined['sweeps'])} sweeps of `benchmarks/compare.py` side by side "
            f"([results.md](benchmarks/results/adapter_choice/results.md)). Each cell: mean {combined['metric']} over "
            "the seeds and, in brackets, the paired difference to `repeat` in accuracy points with its 95% interval; "
            "**bold** where it survives Holm's correction over the sweep's adapter comparisons.",
        ]
        for sweep in combined["sweeps"]:
            # A sweep folder inside the repository is linked; one outside it is named only (compare_report.shown).
            link = f" ([report]({sweep['folder']}/results.md))" if sweep["folder"].startswith("benchmarks/") else ""
            lines += ["", f"**{sweep['label']}**{link}. {sweep['header']}", "", *sweep["table"]]
        return "\n".join([*lines, "", combined["paragraph"]])
    folder = RESULTS / "learning_curve"
    summary = _rows("learning_curve/summary.csv")
    runs = _rows("learning_curve/results.csv")
    settings = json.loads((folder / "sweep.json").read_text())
    sizes = list(dict.fromkeys(r["per_class"] for r in summary))
    cell = {(r["arm"], r["per_class"]): r for r in summary}
    seeds = len({r["seed"] for r in runs})

    def show(r: dict[str, str]) -> str:
        text = f"{float(r['mean']):.3f}"
        if r.get("diff") not in (None, ""):
            d, lo, hi = (100 * float(r[k]) for k in ("diff", "diff_low", "diff_high"))
            text += f" ({d:+.1f} [{lo:+.1f}, {hi:+.1f}])"
        return text

    lines = [
        f"`{settings['command']}`: {len(runs)} runs on {', '.join(sorted({r['device'] for r in runs}))}, commit "
        f"{', '.join(sorted({r['commit'] for r in runs}))}; `{settings['model']}` at "
        f"{settings['img_size'][0]}x{settings['img_size'][1]}, {seeds} seeds per cell. Each cell: mean "
        f"{summary[0]['metric']} over the seeds, and in brackets the paired difference to `repeat` in accuracy "
        "points with its 95% interval ([results.md](benchmarks/results/learning_curve/results.md)).",
        "",
        "| arm | " + " | ".join(f"{s} / class" if s != "all" else "all" for s in sizes) + " |",
        "|---|" + "---:|" * len(sizes),
    ]
    for arm in dict.fromkeys(r["arm"] for r in summary):
        lines.append(f"| {arm} | " + " | ".join(show(cell[(arm, s)]) if (arm, s) in cell else "" for s in sizes) + " |")
    report = (folder / "results.md").read_text()
    verdict = report[report.index("Paired by seed"):report.index("![learning curve]")].strip()
    return "\n".join([*lines, "", verdict])


def pick() -> str:
    """The comparison's verdict in one paragraph, for the README: compare_report.py's, or the single sweep's."""
    if COMBINED.is_file():
        return json.loads(COMBINED.read_text())["paragraph"]
    report = (RESULTS / "learning_curve" / "results.md").read_text()
    verdict = re.search(r"^\*\*What to pick\.\*\*.*$", report, flags=re.M).group(0)
    return (f"{verdict} (The [learning-curve comparison](docs/adapters.md#which-adapter-to-pick) of the demo digits, "
            "Lite0's own statistics, a fixed step budget per run.)")


def windows() -> str:
    """The window adapters on the SYNTHETIC CT-like set of benchmarks/windows.py."""
    rows = _rows("windows/results.csv")
    first = rows[0]
    lines = [
        f"Measured on SYNTHETIC CT-like phantoms (head-like slices in HU, made by "
        f"[`benchmarks/windows.py`](benchmarks/windows.py), not patient data) with "
        f"`{_command('windows/results.md')}` ({_machine(rows)}; `{first['model']}`, {first['img_size']}, "
        f"{first['epochs']} epochs, seed {first['seed']}, {first['train_per_class']} training images per class; "
        "[results](benchmarks/results/windows/results.md)):",
        "",
        "| adapter | best val acc | windows at the end (HU) |",
        "|---|---:|---|",
    ]
    lines += [f"| `{r['adapter']}` | {float(r['best_val_acc']):.3f} | {r['windows_after']} |" for r in rows]
    return "\n".join(lines)


def _gpu(name: str) -> str | None:
    """``name`` in the newest GPU check's folder (``gpu-<date>/``, at any depth), relative to the results, or None."""
    found = sorted(RESULTS.glob(f"gpu-*/**/{name}"))
    return found[-1].relative_to(RESULTS).as_posix() if found else None


def _portable(command: str) -> str:
    """A recorded command without the output paths of the machine it ran on."""
    return re.sub(r" --(csv|md|output|out|work) \S+", "", command)


def _loop_table(name: str) -> list[str]:
    rows = _rows(name)
    bare = rows[0]
    md = name.removesuffix(".csv") + ".md"
    lines = [
        f"{bare['model']} ({bare['adapter']}), {bare['img_size']}, batch {bare['batch_size']}, "
        f"{bare['memory_format']}, amp {bare['amp']}, {bare['threads']} threads, "
        f"{'--workers auto' if bare['workers'] == 'auto' else bare['workers'] + ' loader workers'} for the files, "
        f"{bare['n_images']} {bare['source']}s, {bare['epochs']} epochs ({_machine(rows)}; "
        f"`{_portable(_command(md))}`; [table](benchmarks/results/{md})):",
        "",
        "| run | img/s | of the bare step | goal | data path alone (ms an image) | first step after the imports (s) | "
        "outside the steps, an epoch (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| bare step | {float(bare['img_per_s']):.0f} | 1 | | {float(bare['loader_ms']):.2f} (the step's own) | | |",
    ]
    for r in rows[1:]:
        goal = f">= {r['goal']} ({'met' if r['met'] == 'yes' else 'NOT met'})" if r["goal"] != "n/a" else ""
        decoding = f" (decoding {float(r['decode_ms']):.2f})" if r.get("decode_ms") not in (None, "", "n/a") else ""
        lines.append(f"| {r['candidate']} | {float(r['img_per_s']):.0f} | **{float(r['efficiency']):.2f}** | {goal} | "
                     f"{float(r['loader_ms']):.2f}{decoding} | {float(r['ready_s']):.1f} | "
                     f"{float(r['outside_s']):.2f} |")
    return lines


def loop() -> str:
    """train.py's epochs against the bare training step, from files and from a pack, from benchmarks/loop.py: the
    CPU's, and the newest GPU check's."""
    lines = _loop_table("loop-cpu.csv")
    cuda = _gpu("loop-cuda.csv")
    if cuda:
        notes = cuda.split("/")[0] + "/README.md"
        lines += ["", f"On CUDA ([notes](benchmarks/results/{notes})):", ""] + _loop_table(cuda)
    return "\n".join(lines)


def torch_compile() -> str:
    """What torch.compile costs and gains in training, from benchmarks/torch_compile.py."""
    rows = _rows("compile-cpu.csv") + (_rows("compile-cpu-nhwc.csv") if (RESULTS / "compile-cpu-nhwc.csv").is_file()
                                       else [])
    first = rows[0]
    lines = [
        f"{first['model']} ({first['adapter']}) training steps (forward, backward, AdamW), batch "
        f"{first['batch_size']}, {first['threads']} threads ({_machine(rows)}; `{_command('compile-cpu.md')}`"
        + (f" and `{_command('compile-cpu-nhwc.md')}`" if len({r['memory_format'] for r in rows}) > 1 else "")
        + "; [table](benchmarks/results/compile-cpu.md)):",
        "",
        "| size | memory format | eager step (s) | compiled step (s) | speedup | compiling (s) | "
        "again, cache warm (s) | pays after (steps) | warm cache: after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    cuda = _gpu("compile-cuda.csv")
    for r in rows + (_rows(cuda) if cuda else []):
        where = "" if r["device"] == "cpu" else f", {r['device_name']}, {r['amp']}"
        lines.append(f"| {r['img_size']} | {r['memory_format'].upper()}{where} | {float(r['eager_step_s']):.3f} | "
                     f"{float(r['compiled_step_s']):.3f} | **{float(r['speedup']):.2f}x** | "
                     f"{float(r['compile_s']):.0f} | {float(r['warm_compile_s']):.0f} | {r['break_even_steps']} | "
                     f"{r['warm_break_even_steps']} |")
    if cuda:
        r, md = _rows(cuda)[0], cuda.removesuffix(".csv") + ".md"
        lines += ["", f"The CUDA row: batch {r['batch_size']}, {r['device_name']}, torch {r['torch']} "
                      f"(`{_portable(_command(md))}`; [table](benchmarks/results/{md})); `--compile auto` stays "
                      "off on CUDA."]
    return "\n".join(lines)


def optimizer() -> str:
    """Fused against foreach AdamW in the training step, from benchmarks/optimizer.py: the CPU's and the GPU's."""
    rows = _rows("optimizer-cpu.csv")
    cuda = _gpu("optimizer-cuda.csv")
    first = rows[0]
    lines = [
        f"{first['model']} ({first['adapter']}) training steps, batch {first['batch_size']}, "
        f"{first['memory_format']}, {first['threads']} threads ({_machine(rows)}; "
        f"`{_portable(_command('optimizer-cpu.md'))}`; [table](benchmarks/results/optimizer-cpu.md)):",
        "",
        "| size | device | foreach step (s) | fused step (s) | speedup (range over rounds) | weights after 1 step |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows + (_rows(cuda) if cuda else []):
        lines.append(f"| {r['img_size']} | {r['device_name']}, {r['amp']} | {float(r['foreach_step_s']):.4f} | "
                     f"{float(r['fused_step_s']):.4f} | **{float(r['speedup']):.2f}x** "
                     f"({float(r['speedup_min']):.2f}-{float(r['speedup_max']):.2f}) | "
                     f"{float(r['max_weight_diff']):.0e} apart |")
    return "\n".join(lines)


def pack_accuracy() -> str:
    """The pack's accuracy against the files', paired by seed, from benchmarks/pack_accuracy.py."""
    rows = _rows("pack_accuracy/runs.csv")
    report = (RESULTS / "pack_accuracy" / "results.md").read_text()
    verdict = re.search(r"^Pack - files, .*$", report, flags=re.M).group(0)
    first = rows[0]
    text = (f"`train.py` from the files and from their pack, on {first['data']} at {first['img_size']}, batch "
            f"{first['batch_size']}, {first['epochs']} epochs, seeds 0-{len(rows) - 1} ({_machine(rows)}; "
            f"`{_portable(_command('pack_accuracy/results.md'))}`; "
            f"[runs](benchmarks/results/pack_accuracy/results.md)): "
            f"{verdict}")
    for larger in sorted((RESULTS / "pack_accuracy").glob("pack*/results.md")):  # packed larger than trained
        name = f"pack_accuracy/{larger.parent.name}"
        rows = _rows(f"{name}/runs.csv")
        said = re.search(r"^Pack - files, .*$", larger.read_text(), flags=re.M).group(0)
        text += (f"\n\nPacked at {rows[0]['pack_size']} and trained at {rows[0]['img_size']} "
                 f"(`{_portable(_command(name + '/results.md'))}`, {_machine(rows)}; "
                 f"[runs](benchmarks/results/{name}/results.md)): {said}")
    return text


REGIONS: dict[str, Callable[[], str]] = {
    "demo": demo, "speed": speed, "pipeline": pipeline, "fidelity": fidelity, "compare": compare, "pick": pick,
    "windows": windows, "threads": threads, "peer": peer, "pack": pack, "loop": loop, "compile": torch_compile,
    "optimizer": optimizer, "workers": workers,
    "pack_accuracy": pack_accuracy,
}


# An absolute path: a slash that starts a path of two parts or more, not inside a word, a relative path or a URL.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/[\w.-]+/[\w.-]+")


def relink(text: str, page: Path) -> str:
    """``text``'s Markdown links to files of this repository, given from its root, made relative to ``page``."""

    def fix(match: re.Match) -> str:
        target = match.group(1)
        if re.match(r"[a-z]+:|#", target):  # a URL or an anchor on the same page
            return match.group(0)
        path, _, anchor = target.partition("#")
        rel = Path(os.path.relpath(ROOT / path, page.parent)).as_posix() + ("/" if path.endswith("/") else "")
        return f"]({rel}{'#' + anchor if anchor else ''})"

    return re.sub(r"\]\(([^)\s]+)\)", fix, text)


def render(text: str, page: Path = ROOT / "README.md") -> str:
    """``text`` with every generated region rewritten from the results; unknown region names are an error."""

    def fill(match: re.Match) -> str:
        name = match.group(1)
        if name not in REGIONS:
            raise KeyError(f"{page.name} has a generated region {name!r} that tools/readme.py does not know")
        body = relink(REGIONS[name](), page)
        if found := ABSOLUTE_PATH.search(body):
            raise ValueError(f"generated region {name!r} would carry the absolute path {found.group(0)!r}")
        return f"<!-- generated:{name} -->\n{body}\n<!-- /generated:{name} -->"

    return re.sub(r"<!-- generated:(\w+) -->\n(?:.*?\n)?<!-- /generated:\1 -->", fill, text, flags=re.S)


def explain_block(text: str) -> str:
    """``text`` with the output block after its ``python -m gray_effnet explain`` command rerun (if it has one)."""
    found = re.search(r"```bash\n(python -m gray_effnet explain [^\n]*)\n```", text)
    if not found:
        return text
    command = found.group(1)
    out = subprocess.run([sys.executable, *command.split()[1:]], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout
    return re.sub(r"```\n(Why a 3-channel .*?)```", lambda m: f"```\n{out}```", text, count=1, flags=re.S)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 if a page is out of date")
    args = p.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = render(text, page)
        if args.check:
            if new != text:
                stale.append(page.relative_to(ROOT).as_posix())
            continue
        new = explain_block(new)
        if new != text:
            page.write_text(new)
        print(f"{page.relative_to(ROOT)}: {len(re.findall(r'<!-- generated:', new))} regions")
    if stale:
        print(f"measured numbers in {', '.join(stale)} differ from benchmarks/results/: run python tools/readme.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
