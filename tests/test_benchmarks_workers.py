"""benchmarks/workers.py without training: its reading of train.py's loader line, and its rows."""

import pytest
import torch

from benchmarks import workers
from gray_effnet import speed


@pytest.mark.parametrize("read, step, want", [(0.00025, 0.00262, 0), (0.01495, 0.00197, speed.DEFAULT_WORKERS)])
def test_reads_the_line_choose_workers_writes(monkeypatch, read, step, want):
    """The benchmark parses the very line train.py logs, whichever way auto went."""
    monkeypatch.setattr(speed, "data_seconds", lambda dataset: read)
    monkeypatch.setattr(speed, "step_seconds", lambda *a, **k: step)
    n, line = speed.choose_workers("auto", torch.device("cpu"), dataset=[], model=None, input_shape=(1, 1, 8, 8),
                                   channels_last=False)
    log = f"threads: 2 intra-op\nchannels_last: on (asked for)\n{line}\ncompile: off\n"
    assert workers.parse_auto(log) == (want, round(read * 1e3, 2), round(step * 1e3, 2)) and n == want


def test_a_log_without_the_line():
    with pytest.raises(ValueError, match="no 'loader: ... \\(auto"):
        workers.parse_auto("loader: 2 workers (asked for)\n")


@pytest.mark.parametrize("img_s_0, chosen, ok", [(120.0, 0, True), (120.0, 2, False), (101.0, 2, True),
                                                 (90.0, 2, True), (90.0, 0, False)])
def test_auto_ok_is_the_faster_choice_within_the_tolerance(img_s_0, chosen, ok):
    runs = {"0": [img_s_0, img_s_0], "2": [100.0, 100.0], "auto": [99.0, 99.0]}
    row = workers.summarize("64x64 8-bit PNG", 64, runs, [(chosen, 0.5, 2.0), (chosen, 0.7, 2.0)])
    assert row["auto_ok"] is ok
    assert row["read_ms"] == pytest.approx(0.6) and row["read_over_step"] == pytest.approx(0.3)
    assert row["in_process_speedup"] == pytest.approx(img_s_0 / 100.0)
    assert row["auto"] == ("in process" if chosen == 0 else "2 workers")


@pytest.mark.parametrize("spec", ["256x8", "256x12x64", "axbxc", "4x8x64"])
def test_bad_sets_refused(spec):
    with pytest.raises(SystemExit, match="--sets"):
        workers.parse_set(spec)
