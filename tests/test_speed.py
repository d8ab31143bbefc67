"""Threads and memory format chosen for the machine (gray_effnet.speed)."""

import copy
import json

import pytest
import torch

from gray_effnet import speed
from gray_effnet.errors import InputError
from gray_effnet.speed import available_cores, choose_channels_last, plan_threads

from .helpers import make_model


class TestThreadGovernor:
    def clock(self, monkeypatch, wall_and_cpu):
        ticks = iter(wall_and_cpu)
        now = {}

        def advance():
            now["wall"], now["cpu"] = next(ticks)

        monkeypatch.setattr(speed.time, "perf_counter", lambda: now["wall"])
        monkeypatch.setattr(speed.time, "process_time", lambda: now["cpu"])
        return advance

    def test_drops_to_one_thread_when_the_cores_are_shared(self, monkeypatch):
        lines, threads = [], []
        monkeypatch.setattr(speed.torch, "set_num_threads", threads.append)
        # (wall, cpu) after each step: the first is not measured, then 2 s of wall give 1 s of CPU on 2 threads.
        advance = self.clock(monkeypatch, [(0.0, 0.0), (1.0, 1.9), (3.0, 2.9), (4.0, 3.9)])
        governor = speed.ThreadGovernor(2, log=lines.append)
        for _ in range(3):
            advance()
            governor.step()
        assert threads == [1] and governor.dropped
        assert lines == ["threads: this process got 0.50 cores' time of its 2 threads over 2.0s: another job shares "
                         "these cores, so 1 thread from now on (--threads N sets it)"]

    def test_alone_keeps_its_threads(self, monkeypatch):
        threads = []
        monkeypatch.setattr(speed.torch, "set_num_threads", threads.append)
        advance = self.clock(monkeypatch, [(0.0, 0.0), (0.5, 1.0), (1.5, 2.9), (3.0, 5.8)])
        governor = speed.ThreadGovernor(2, log=lambda line: None)
        for _ in range(4):
            advance()
            governor.step()
        assert threads == [] and not governor.dropped

    @pytest.mark.parametrize("cores, drops", [(1.1, True), (1.9, False)])
    def test_min_share_is_a_fraction_of_the_threads(self, monkeypatch, cores, drops):
        """2 threads, min_share 0.6: below 1.2 cores' time the cores are shared, above it they are not."""
        threads = []
        monkeypatch.setattr(speed.torch, "set_num_threads", threads.append)
        advance = self.clock(monkeypatch, [(0.0, 0.0), (2.0, 2 * cores)])
        governor = speed.ThreadGovernor(2, min_share=0.6, log=lambda line: None)
        for _ in range(2):
            advance()
            governor.step()
        assert governor.dropped is drops and threads == ([1] if drops else [])

    def test_one_thread_is_left_alone(self, monkeypatch):
        monkeypatch.setattr(speed.time, "perf_counter", lambda: pytest.fail("a 1-thread run measures nothing"))
        speed.ThreadGovernor(1).step()


class TestPlanThreads:
    def test_share_of_the_cores(self):
        assert plan_threads(workers=2, cores=8).threads == 8
        assert plan_threads(workers=2, local_processes=4, cores=8).threads == 2
        assert plan_threads(workers=0, local_processes=4, cores=2).threads == 1  # never 0

    def test_requested_is_used_as_is(self):
        plan = plan_threads(workers=2, requested=3, cores=2)
        assert plan.threads == 3 and plan.chosen_by == "--threads"

    def test_requested_below_one_refused(self):
        with pytest.raises(InputError, match="--threads must be at least 1; got 0"):
            plan_threads(workers=0, requested=0)

    def test_describe_says_what_and_why(self):
        line = plan_threads(workers=1, local_processes=2, cores=4).describe()
        assert line == "threads: 2 intra-op (auto: 4 cores / 2 processes; 1 loader worker at 1 thread each)"

    def test_available_cores(self):
        assert 1 <= available_cores() <= (torch.get_num_threads() + 1024)


class TestChooseChannelsLast:
    @pytest.mark.parametrize("mode, want", [("on", True), ("off", False)])
    def test_asked_for(self, mode, want):
        on, why = choose_channels_last(mode, None, torch.device("cpu"), (2, 1, 32, 32), train=True)
        assert on is want and why == f"channels_last: {mode} (asked for)"

    def test_unknown_mode(self):
        with pytest.raises(InputError, match="one of auto, on, off; got 'yes'"):
            choose_channels_last("yes", None, torch.device("cpu"), (2, 1, 32, 32), train=True)

    def test_cuda_is_on_without_a_probe(self):
        """The CUDA rule needs no device: nothing is timed (the model is not even looked at)."""
        on, why = choose_channels_last("auto", None, torch.device("cuda"), (2, 1, 32, 32), train=True)
        assert on and "CUDA" in why

    @pytest.mark.parametrize("train", [True, False])
    def test_cpu_probe_leaves_the_model_and_generator_alone(self, train):
        model = make_model("tf_efficientnet_lite0", "fold").train(train)
        before = copy.deepcopy(model.state_dict())
        torch.manual_seed(7)
        rng = torch.get_rng_state()
        on, why = choose_channels_last("auto", model, torch.device("cpu"), (32, 1, 32, 32), train=train)
        assert isinstance(on, bool)
        assert why.startswith(f"channels_last: {'on' if on else 'off'} (auto: a 16-image ")
        assert ("training" if train else "inference") in why and " ms in NHWC" in why
        assert torch.equal(torch.get_rng_state(), rng)
        assert model.training is train and all(p.grad is None for p in model.parameters())
        for key, value in model.state_dict().items():  # BatchNorm's running statistics included
            assert torch.equal(value, before[key]), key
        assert all(p.is_contiguous() for p in model.parameters())  # the model keeps its format

    def test_probe_decides_by_the_clock(self, monkeypatch):
        """NHWC is taken only when it is at least min_gain times faster."""
        model = make_model("tf_efficientnet_lite0", "repeat")
        for nchw, nhwc, want in [(2.0, 1.0, True), (1.0, 1.0, False), (1.04, 1.0, False)]:
            times = iter([nchw, nhwc])
            monkeypatch.setattr(speed, "_time_steps", lambda *a, _t=times, **k: next(_t))
            assert choose_channels_last("auto", model, torch.device("cpu"), (2, 1, 32, 32), train=True)[0] is want


class TestChannelsLastCache:
    """--channels-last auto re-probes only on a miss: the decision is cached per CPU, torch, model, shape, mode."""

    def test_miss_probes_and_records_hit_does_not_probe(self, tmp_path, monkeypatch):
        model = make_model("tf_efficientnet_lite0", "repeat")
        cache = tmp_path / "cl.json"
        times = iter([2.0, 1.0])
        monkeypatch.setattr(speed, "_time_steps", lambda *a, **k: next(times))
        on, why = choose_channels_last("auto", model, torch.device("cpu"), (8, 1, 32, 32), train=True, cache=cache)
        assert on and "cached" not in why and cache.is_file()
        monkeypatch.setattr(speed, "_time_steps", lambda *a, **k: pytest.fail("a cached decision is not probed"))
        again, why_again = choose_channels_last("auto", model, torch.device("cpu"), (8, 1, 32, 32), train=True,
                                                cache=cache)
        assert again is on and why_again.startswith(why) and f"cached in {cache}" in why_again

    def test_key_holds_shape_and_mode(self, tmp_path, monkeypatch):
        model = make_model("tf_efficientnet_lite0", "repeat")
        cache = tmp_path / "cl.json"
        calls = []
        monkeypatch.setattr(speed, "_time_steps", lambda *a, **k: calls.append(1) or 1.0)
        for shape, train in [((8, 1, 32, 32), True), ((8, 1, 32, 32), False), ((8, 1, 64, 32), True)]:
            choose_channels_last("auto", model, torch.device("cpu"), shape, train=train, cache=cache)
        assert len(calls) == 6  # three misses, two formats each
        assert len(json.loads(cache.read_text())) == 3

    @pytest.mark.parametrize("content", ["not json", "[1, 2]", '{"k": "v"}', ""])
    def test_a_broken_cache_is_a_miss(self, tmp_path, monkeypatch, content):
        model = make_model("tf_efficientnet_lite0", "repeat")
        cache = tmp_path / "cl.json"
        cache.write_text(content)
        times = iter([1.0, 2.0])
        monkeypatch.setattr(speed, "_time_steps", lambda *a, **k: next(times))
        on, _ = choose_channels_last("auto", model, torch.device("cpu"), (8, 1, 32, 32), train=True, cache=cache)
        assert on is False and len(json.loads(cache.read_text())) == 1  # probed, and the cache rewritten whole


class TestChooseCompile:
    cpu = torch.device("cpu")

    def test_modes_asked_for(self):
        assert speed.choose_compile("on", self.cpu, 1, (32, 32)) == (True, "compile: on (asked for)")
        assert speed.choose_compile("off", self.cpu, 10**6, (32, 32)) == (False, "compile: off (asked for)")
        with pytest.raises(InputError, match="compile must be one of auto, on, off; got 'yes'"):
            speed.choose_compile("yes", self.cpu, 1, (32, 32))

    def test_threshold_from_the_measured_break_even(self, monkeypatch):
        monkeypatch.setattr(speed, "COMPILE_BREAK_EVEN", ((100, 40), (400, 200), (1600, 10)))
        monkeypatch.setattr(speed, "COMPILE_MARGIN", 1.5)
        assert speed.compile_threshold(5, 5) == 60  # below the smallest size: its break-even, 40 x 1.5
        assert speed.compile_threshold(10, 10) == 60  # exactly a measured size
        assert speed.compile_threshold(10, 20) == 300  # between 100 and 400 pixels: the larger, 200 x 1.5
        assert speed.compile_threshold(20, 40) == 300  # between 400 and 1600: the larger again
        assert speed.compile_threshold(100, 100) == 15  # beyond the largest: its own, 10 x 1.5

    def test_auto_compiles_a_long_cpu_run_only(self, monkeypatch):
        monkeypatch.setattr(speed.shutil, "which", lambda name: f"/usr/bin/{name}")
        need = speed.compile_threshold(32, 32)
        on, why = speed.choose_compile("auto", self.cpu, need, (32, 32))
        assert on and why.startswith(f"compile: on (auto: {need} training steps, beyond the {need} ")
        on, why = speed.choose_compile("auto", self.cpu, need - 1, (32, 32))
        assert not on and why.startswith(f"compile: off (auto: {need - 1} training steps; at 32x32 compiling pays")
        on, why = speed.choose_compile("auto", torch.device("cuda"), 10**6, (32, 32))
        assert not on and "on CUDA the compiled step measured no faster" in why
        on, why = speed.choose_compile("auto", self.cpu, 10**6, (32, 32), channels_last=True)
        assert not on and why.startswith("compile: off (auto: in NHWC the compiled CPU step measured no faster")

    def test_auto_needs_a_compiler(self, monkeypatch):
        monkeypatch.setattr(speed.shutil, "which", lambda name: None)
        on, why = speed.choose_compile("auto", self.cpu, 10**6, (224, 224))
        assert not on and why == ("compile: off (auto: no C++ compiler on the PATH, which torch.compile needs on "
                                  "the CPU)")
