"""Threads and memory format chosen for the machine (gray_effnet.speed)."""

import copy
import json

import pytest
import torch

from gray_effnet import speed
from gray_effnet.errors import InputError
from gray_effnet.speed import available_cores, choose_channels_last, choose_workers, plan_threads

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

    def test_waiting_for_data_is_not_shared_cores(self, monkeypatch):
        """A run that waits for its loader workers is idle, not short of cores: the wait leaves the window. Here
        2 s of wall with 1.9 s of it waiting and 0.2 s of CPU is 0.1 s of stepping on 2 cores' time."""
        threads = []
        monkeypatch.setattr(speed.torch, "set_num_threads", threads.append)
        advance = self.clock(monkeypatch, [(0.0, 0.0), (2.0, 0.2), (4.0, 0.4)])
        governor = speed.ThreadGovernor(2, log=lambda line: None)
        for waited in (0.0, 1.9, 3.8):
            advance()
            governor.step(waited)
        assert threads == [] and not governor.dropped

    @pytest.mark.parametrize("steps_cpu, drops", [(2.2, True), (3.9, False)], ids=["shared", "alone"])
    def test_reading_in_the_process_is_left_out_too(self, monkeypatch, steps_cpu, drops):
        """A process that reads its own batches: 3 s of wall, 1 s of it reading with 1.6 s of CPU (the reader and a
        spinning thread), 2 s of steps. Shared (2.2 s of CPU in the steps: 1.1 cores of 2) it drops; counting the
        reading's CPU against the steps' wall (1.9) or all of it against all the wall (1.27) it would not. Alone
        (3.9 s: 1.95 cores) it keeps its threads."""
        threads = []
        monkeypatch.setattr(speed.torch, "set_num_threads", threads.append)
        advance = self.clock(monkeypatch, [(0.0, 0.0), (3.0, steps_cpu + 1.6)])
        governor = speed.ThreadGovernor(2, log=lambda line: None)
        for waited, cpu in ((0.0, 0.0), (1.0, 1.6)):
            advance()
            governor.step(waited, cpu)
        assert governor.dropped is drops and threads == ([1] if drops else [])

    def test_a_new_epoch_starts_a_new_window(self, monkeypatch):
        """The wait restarts at 0 each epoch: a window across the boundary (validation, the checkpoint) is not
        measured."""
        threads = []
        monkeypatch.setattr(speed.torch, "set_num_threads", threads.append)
        advance = self.clock(monkeypatch, [(0.0, 0.0), (3.0, 0.5), (6.0, 1.0)])
        governor = speed.ThreadGovernor(2, log=lambda line: None)
        for waited in (2.0, 0.0, 0.0):  # the second call is the first step of the next epoch
            advance()
            governor.step(waited)
        assert governor.dropped and threads == [1]  # the last window alone: 3 s of wall, 0.5 s of CPU

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


class TestChooseWorkers:
    """--workers N|auto: on the CPU, reading in the training process where an image reads faster than a step."""

    def choose(self, requested="auto", device="cpu", **kw):
        dataset = kw.pop("dataset", [torch.zeros(1, 8, 8)] * 4)
        return choose_workers(requested, torch.device(device), dataset=dataset, model=kw.pop("model", None),
                              input_shape=(4, 1, 32, 32), channels_last=False, **kw)

    @pytest.mark.parametrize("n, line", [(3, "loader: 3 workers (asked for)"),
                                         (0, "loader: in this process (asked for)")])
    def test_a_number_is_taken_as_it_is(self, monkeypatch, n, line):
        monkeypatch.setattr(speed, "data_seconds", lambda *a, **k: pytest.fail("nothing is measured"))
        assert self.choose(n) == (n, line)

    def test_the_sources_reason(self):
        assert self.choose(0, why="a pack") == (0, "loader: in this process (a pack)")

    def test_off_the_cpu_without_measuring(self, monkeypatch):
        monkeypatch.setattr(speed, "data_seconds", lambda *a, **k: pytest.fail("nothing is measured"))
        n, why = self.choose(device="cuda")
        assert n == speed.DEFAULT_WORKERS and why.startswith("loader: 2 workers (auto: on cuda")

    @pytest.mark.parametrize("read, step, want", [(0.001, 0.002, 0), (0.002, 0.002, 0), (0.003, 0.002, 2)])
    def test_cpu_compares_reading_with_the_step(self, monkeypatch, read, step, want):
        monkeypatch.setattr(speed, "data_seconds", lambda dataset: read)
        monkeypatch.setattr(speed, "step_seconds", lambda *a, **k: step)
        n, why = self.choose()
        assert n == want
        assert f"reading an image took {read * 1e3:.2f} ms here, a training step {step * 1e3:.2f} ms an image" in why
        assert why.startswith("loader: in this process (auto: " if want == 0 else "loader: 2 workers (auto: ")

    def test_measures_for_real(self):
        """The real measurements on a tiny model and dataset: break_even decides between them."""
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
        model(torch.zeros(1, 1, 32, 32))
        assert self.choose(model=model, break_even=1e9)[0] == 0
        assert self.choose(model=model, break_even=0.0, dataset=SlowDataset())[0] == 2


class SlowDataset:
    """4 samples that each take 10 ms to read."""

    def __len__(self):
        return 4

    def __getitem__(self, key):
        import time
        time.sleep(0.01)
        return torch.zeros(1, 8, 8), 0, "x"


class TestDataSeconds:
    def test_per_image_within_the_budget(self):
        seconds = speed.data_seconds(SlowDataset())
        assert 0.009 < seconds < 0.1

    def test_budget_stops_early(self):
        keys = []

        class Counting(SlowDataset):
            def __len__(self):
                return 1000

            def __getitem__(self, key):
                keys.append(key)
                return super().__getitem__(key)

        speed.data_seconds(Counting(), samples=32, budget_s=0.03)
        assert 1 <= len(keys) < 32
        assert keys[:2] == [0, 31]  # evenly spaced over the dataset

    def test_seeded_datasets_get_index_and_seed_and_the_generator_is_kept(self):
        keys = []

        class Seeded(SlowDataset):
            takes_sample_seeds = True

            def __getitem__(self, key):
                keys.append(key)
                torch.rand(3)  # what a transform draws
                return torch.zeros(1, 8, 8), 0, "x"

        torch.manual_seed(3)
        state = torch.get_rng_state()
        speed.data_seconds(Seeded())
        assert all(isinstance(k, tuple) and len(k) == 2 for k in keys) and len(keys) == 4
        assert torch.equal(torch.get_rng_state(), state)

    def test_empty(self):
        assert speed.data_seconds([]) == 0.0


class TestStepSeconds:
    def test_cached_per_format_and_leaves_the_model_alone(self, tmp_path):
        model = make_model("tf_efficientnet_lite0", "fold")
        before = copy.deepcopy(model.state_dict())
        cache = tmp_path / "step_time.json"
        first = speed.step_seconds(model, torch.device("cpu"), (4, 1, 32, 32), channels_last=False, cache=cache)
        assert first > 0
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
        assert all(p.grad is None for p in model.parameters())
        (entry,) = json.loads(cache.read_text()).values()
        assert entry == [first]
        again = speed.step_seconds(model, torch.device("cpu"), (4, 1, 32, 32), channels_last=False, cache=cache)
        assert again == first  # read back, not timed again
        speed.step_seconds(model, torch.device("cpu"), (4, 1, 32, 32), channels_last=True, cache=cache)
        assert len(json.loads(cache.read_text())) == 2  # NHWC is timed on its own

    def test_the_channels_last_probe_times_the_steps_once(self, tmp_path, monkeypatch):
        """A training probe of channels_last records both formats' steps; step_seconds then times nothing."""
        model = make_model("tf_efficientnet_lite0", "fold")
        times = iter([0.4, 0.2])  # NCHW, then NHWC: seconds of a 4-image step
        monkeypatch.setattr(speed, "_time_steps", lambda *a, **k: next(times))
        cache = tmp_path / "step_time.json"
        on, _ = choose_channels_last("auto", model, torch.device("cpu"), (4, 1, 32, 32), train=True,
                                     step_cache=cache)
        assert on
        monkeypatch.setattr(speed, "_time_steps", lambda *a, **k: pytest.fail("timed again"))
        for nhwc, want in ((False, 0.1), (True, 0.05)):
            assert speed.step_seconds(model, torch.device("cpu"), (4, 1, 32, 32), channels_last=nhwc,
                                      cache=cache) == pytest.approx(want)

    def test_a_malformed_entry_is_timed_again(self, tmp_path):
        cache = tmp_path / "step_time.json"
        model = make_model("tf_efficientnet_lite0", "fold")
        speed.step_seconds(model, torch.device("cpu"), (2, 1, 32, 32), channels_last=False, cache=cache)
        (key,) = json.loads(cache.read_text())
        for bad in (["fast"], [-1.0], [float("nan")], "x"):
            cache.write_text(json.dumps({key: bad}))  # NaN is written as JSON's NaN
            assert speed.step_seconds(model, torch.device("cpu"), (2, 1, 32, 32), channels_last=False,
                                      cache=cache) > 0
