"""compare.py sweeps side by side, with one generated paragraph: what to pick for an ImageNet-statistics EfficientNet.

Each sweep folder (``compare.py --output``) is summarised as ``compare.py --report-only`` does: its own paired
differences to ``repeat``, with Holm's correction over its own adapter comparisons (the family is one sweep). This
writes, into ``--output``: ``results.md`` (a table per sweep, its budget stops, and the paragraph), ``summary.csv``
(every sweep's summary, a ``sweep`` column first) and ``combined.json`` (the sweeps' settings, counts and the
paragraph, which ``tools/readme.py`` renders into docs/adapters.md and README.md).

The paragraph speaks to a user of an EfficientNet pretrained with ImageNet's per-channel statistics, where ``sum``
(timm's ``in_chans=1``) no longer starts where ``repeat`` does. Its evidence is the ``--stats imagenet-synthetic``
sweeps (Lite0 re-expressed for ImageNet's statistics: a labelled stand-in); the ``--stats model`` sweeps of the
same data, where all channels share one statistic, are set beside them. Every claim in it comes from the intervals
and the Holm-adjusted tests; none is written by hand.

    python benchmarks/compare_report.py benchmarks/results/curve-digits-model \\
        benchmarks/results/curve-digits-imagenet-synthetic benchmarks/results/curve-textures-imagenet-synthetic \\
        --output benchmarks/results/adapter_choice
"""

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__:  # imported as benchmarks.compare_report (the tests)
    from . import compare
    from ._common import HelpFormatter, command_line
else:  # run as python benchmarks/compare_report.py
    import compare
    from _common import HelpFormatter, command_line

ROOT = compare.ROOT
IMAGENET = "imagenet-synthetic"


@dataclass
class Sweep:
    """One sweep folder, read and summarised."""

    folder: Path
    settings: dict
    rows: list[dict]
    summary: list[dict]

    @property
    def label(self) -> str:
        return f"{compare.data_name(self.settings)}, {self.settings['stats']} statistics"

    @property
    def seeds(self) -> int:
        return len({r["seed"] for r in self.rows})

    def cells(self, arm: str) -> list[dict]:
        return [r for r in self.summary if r["arm"] == arm and "diff" in r]


def load_sweep(folder: Path, metric: str) -> Sweep:
    if not (folder / "sweep.json").is_file():
        raise SystemExit(f"error: {folder} has no sweep.json (not a compare.py sweep folder)")
    rows = compare.read_rows(folder / "results.csv")
    if not rows:
        raise SystemExit(f"error: {folder} has no finished runs")
    return Sweep(folder, json.loads((folder / "sweep.json").read_text()), rows, compare.summarise(rows, metric))


def shown(folder: Path) -> str:
    """A folder as the report shows it: relative to the repository when inside it (no machine's absolute path)."""
    try:
        return folder.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return folder.name


# -- the paragraph ---------------------------------------------------------------------------------------------
def _cells(rs: Sequence[dict]) -> str:
    return ", ".join(f"{r['per_class']} ({compare._pts(r['diff'])} points, Holm p {compare._p(r['p_holm'])})"
                     for r in rs)


def findings(sweep: Sweep, alpha: float) -> tuple[list[str], dict[str, list[dict]], dict[str, list[dict]]]:
    """Per adapter: a phrase, and the cells where it was detectably above and below ``repeat``."""
    phrases, above, below = [], {}, {}
    for arm in dict.fromkeys(r["arm"] for r in sweep.summary):
        if arm in (compare.REFERENCE, compare.SCRATCH):
            continue
        cells = [r for r in sweep.cells(arm) if not math.isnan(r.get("p_holm", math.nan))]
        if not cells:
            continue
        up = [r for r in cells if compare.detected(r, alpha) and r["diff"] > 0]
        down = [r for r in cells if compare.detected(r, alpha) and r["diff"] < 0]
        above[arm], below[arm] = up, down
        parts = ([f"above `repeat` at {_cells(up)}"] if up else []) + \
            ([f"below {'it' if up else '`repeat`'} at {_cells(down)}"] if down else [])
        phrases.append(f"`{arm}`: " + (" and ".join(parts) if parts else "no detectable difference at any size"))
    return phrases, above, below


def half_width(sweeps: Sequence[Sweep]) -> float:
    halves = [100 * (r["diff_high"] - r["diff_low"]) / 2 for s in sweeps for r in s.summary
              if "diff" in r and r["arm"] != compare.SCRATCH and not math.isnan(r.get("diff_low", math.nan))]
    return statistics.median(halves) if halves else math.nan


def pick_paragraph(sweeps: Sequence[Sweep], statistics_note: str, alpha: float = compare.ALPHA) -> str:
    """What a user of an EfficientNet with ImageNet statistics should pick, and how sure the sweeps make us."""
    who = "**For an EfficientNet pretrained with ImageNet's per-channel statistics**"
    which = f"Which models those are: {statistics_note}."
    imnet = [s for s in sweeps if s.settings["stats"] == IMAGENET]
    if not imnet:
        return (f"{who}: these sweeps say nothing, since none used ImageNet statistics "
                f"(`compare.py --stats imagenet-synthetic`). {which}")
    gained: dict[str, list[str]] = {}
    lost: dict[str, list[str]] = {}
    evidence = []
    for s in imnet:
        phrases, above, below = findings(s, alpha)
        name = compare.data_name(s.settings)
        evidence.append(f"on the {name}, " + "; ".join(phrases) if phrases else f"on the {name}, no adapter arm")
        for arm, cells in above.items():
            if cells:
                gained.setdefault(arm, []).append(f"{', '.join(r['per_class'] for r in cells)} per class on the {name}")
        for arm, cells in below.items():
            if cells:
                lost.setdefault(arm, []).append(f"{', '.join(r['per_class'] for r in cells)} per class on the {name}")
    beside = []
    for s in sweeps:
        if s.settings["stats"] != "model" or not any(compare.data_name(t.settings) == compare.data_name(s.settings)
                                                     for t in imnet):
            continue
        phrases, _, _ = findings(s, alpha)
        if phrases:
            beside.append(f"on the {compare.data_name(s.settings)}: " + "; ".join(phrases))
    worth = {arm: where for arm, where in gained.items() if arm not in lost}
    if worth:
        verdict = ("start from `broadcast` (the default: exactly the pretrained RGB network, trained as `repeat` is) "
                   "and try " + "; ".join(f"`{arm}` at {' and '.join(where)}" for arm, where in worth.items())
                   + ", where it beat `repeat` detectably")
    else:
        verdict = ("pick `broadcast` (the default: exactly the pretrained RGB network, trained as `repeat` is), or "
                   "`fold` for a 1-channel stem with the same function: no adapter beat `repeat` detectably")
    mixed = {arm: where for arm, where in gained.items() if arm in lost}
    if mixed:
        verdict += "; " + "; ".join(f"`{arm}` was above `repeat` at {' and '.join(gained[arm])} but below it at "
                                    f"{' and '.join(lost[arm])}" for arm in mixed)
    avoid = {arm: where for arm, where in lost.items() if arm not in gained}
    if avoid:
        verdict += "; avoid " + "; ".join(f"`{arm}`, below `repeat` at {' and '.join(where)}"
                                          for arm, where in avoid.items())
    runs = sum(len(s.rows) for s in imnet)
    stops = [r.get("stop") for s in imnet for r in s.rows]
    budget = (f"{stops.count('budget')} of {runs} runs stopped on their step budget rather than a plateau"
              if None not in stops and "" not in stops else "these runs trained a fixed number of steps, not to a "
              "plateau, so they partly measure that budget")
    sure = (f"How sure: each sweep's claims are Holm-corrected over its own adapter comparisons (a family-wise error "
            f"of at most {alpha:.0%} per sweep, {len(imnet)} sweep(s) here); with "
            f"{'/'.join(str(s.seeds) for s in imnet)} seeds, differences smaller than about "
            f"{half_width(imnet):.1f} accuracy points (the median half-width of the {1 - alpha:.0%} intervals) would "
            f"mostly go undetected; {budget}. The ImageNet statistics are SYNTHETIC: Lite0's stem re-expressed for "
            f"them, a stand-in for those networks, not one of them, at {imnet[0].settings['img_size'][0]}x"
            f"{imnet[0].settings['img_size'][1]} pixels.")
    text = f"{who}: {verdict}. The evidence: {'; '.join(evidence)}."
    if beside:
        text += (" With Lite0's own statistics (the same on every channel, where `sum` starts exactly at `repeat`), "
                 + "; ".join(beside) + ".")
    return f"{text} {sure} {which}"


def timm_statistics() -> tuple[str, dict]:
    """Which of timm's pretrained EfficientNets use ImageNet's per-channel statistics, from their pretrained_cfg."""
    import timm
    from timm.models import get_pretrained_cfg

    imagenet, equal = [], []
    for name in timm.list_pretrained("*efficientnet*"):
        cfg = get_pretrained_cfg(name)
        (equal if len(set(cfg.mean)) == 1 else imagenet).append(name)
    def some(names: Sequence[str], among: list[str]) -> str:
        found = [f"`{n}`" for n in names if n in among]
        return f" (e.g. {', '.join(found)})" if found else ""

    with_imagenet = some(("tf_efficientnet_b0.in1k", "efficientnet_b3.ra2_in1k", "tf_efficientnetv2_b0.in1k"), imagenet)
    with_one = some(("tf_efficientnet_lite0.in1k", "tf_efficientnetv2_s.in1k"), equal)
    note = (f"in timm {timm.__version__}, {len(imagenet)} of its {len(imagenet) + len(equal)} pretrained EfficientNet "
            f"weights{with_imagenet}; the others{with_one} use one statistic on every channel, as Lite0 does, and "
            "there `sum` starts where `repeat` does (check your model's `pretrained_cfg['mean']`)")
    return note, {"timm": timm.__version__, "imagenet": sorted(imagenet), "equal": sorted(equal)}


# -- the report ------------------------------------------------------------------------------------------------
def cell_text(r: dict, alpha: float = compare.ALPHA) -> str:
    """``mean (diff [low, high])`` in accuracy points; bold where the difference survives Holm's correction."""
    text = f"{r['mean']:.3f}"
    if "diff" in r and not math.isnan(r.get("diff_low", math.nan)):
        diff = f"{compare._pts(r['diff'])} [{compare._pts(r['diff_low'])}, {compare._pts(r['diff_high'])}]"
        text += f" (**{diff}**)" if compare.detected(r, alpha) else f" ({diff})"
    return text


def sweep_table(sweep: Sweep) -> list[str]:
    sizes = list(dict.fromkeys(r["per_class"] for r in sweep.summary))
    cell = {(r["arm"], r["per_class"]): r for r in sweep.summary}
    lines = ["| arm | " + " | ".join(f"{s} / class" if s != "all" else "all" for s in sizes)
             + " | budget stops |", "|---|" + "---:|" * len(sizes) + "---:|"]
    for arm in dict.fromkeys(r["arm"] for r in sweep.summary):
        cells = [cell.get((arm, s)) for s in sizes]
        known = [c for c in cells if c and c.get("budget_stops") is not None]
        stops = f"{sum(c['budget_stops'] for c in known)} / {sum(c['n'] for c in known)}" if known else "n/a"
        lines.append(f"| {arm} | " + " | ".join(cell_text(c) if c else "" for c in cells) + f" | {stops} |")
    return lines


def sweep_header(sweep: Sweep) -> str:
    rows = sweep.rows
    return (f"`{sweep.settings.get('command', '(not recorded)')}`: {len(rows)} runs, {sweep.seeds} seeds, on "
            f"{', '.join(sorted({r.get('device', '?') for r in rows}))}, commit "
            f"{', '.join(sorted({r.get('commit', '?') for r in rows}))}; `{sweep.settings['model']}` at "
            f"{sweep.settings['img_size'][0]}x{sweep.settings['img_size'][1]}, data: "
            f"{compare.data_line(sweep.settings)}; training {compare.training_line(sweep.settings)}.")


def combine(folders: Sequence[Path], output: Path, metric: str = compare.METRICS[0]) -> dict:
    """Summarise each sweep, write the combined report into ``output``; returns what ``combined.json`` holds."""
    sweeps = [load_sweep(Path(f), metric) for f in folders]
    note, names = timm_statistics()
    paragraph = pick_paragraph(sweeps, note)
    output.mkdir(parents=True, exist_ok=True)
    lines = ["# Which adapter? The sweeps side by side", "", "```", command_line(), "```", "",
             f"Each cell: mean {metric} over the seeds and, in brackets, the paired difference to `repeat` in accuracy "
             "points with its 95% interval; **bold** where it survives Holm's correction over the sweep's adapter "
             "comparisons (a family-wise error of 5% per sweep). `budget stops`: the runs that reached their step "
             "budget before a plateau.", "", paragraph, ""]
    combined = {"command": command_line(), "metric": metric, "paragraph": paragraph, "timm_statistics": names,
                "sweeps": []}
    table_rows = []
    for s in sweeps:
        lines += [f"## {s.label}", "", sweep_header(s), "", *sweep_table(s), "",
                  f"[Its report]({os.path.relpath(s.folder.resolve() / 'results.md', output.resolve())}), with "
                  "each adapter's findings, p-values and the learning curve.", ""]
        stops = [r.get("stop") for r in s.rows]
        combined["sweeps"].append({
            "label": s.label, "folder": shown(s.folder), "data": compare.data_name(s.settings),
            "stats": s.settings["stats"], "model": s.settings["model"], "img_size": s.settings["img_size"],
            "command": s.settings.get("command"), "runs": len(s.rows), "seeds": s.seeds,
            "devices": sorted({r.get("device", "?") for r in s.rows}),
            "commits": sorted({r.get("commit", "?") for r in s.rows}),
            "budget_stops": stops.count("budget") if None not in stops and "" not in stops else None,
            "header": sweep_header(s), "table": sweep_table(s)})
        table_rows += [{"sweep": s.label, **r} for r in s.summary]
    (output / "results.md").write_text("\n".join(lines))
    compare.write_csv(table_rows, output / "summary.csv")
    (output / "combined.json").write_text(json.dumps(combined, indent=1) + "\n")
    return combined


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("sweeps", nargs="+", help="compare.py sweep folders (each with sweep.json and results.csv)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "adapter_choice"))
    p.add_argument("--metric", default=compare.METRICS[0], choices=compare.METRICS)
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    combined = combine([Path(f) for f in args.sweeps], Path(args.output), args.metric)
    print(combined["paragraph"])
    print(f"\nresults: {Path(args.output) / 'results.md'}")
    return combined


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
