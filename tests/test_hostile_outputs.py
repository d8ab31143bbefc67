"""Hostile inputs and outputs through the real commands: a clean refusal or a success, and nothing of the user's lost.

Each case runs a real entry point (``python -m gray_effnet``'s ``main(argv)``, ``train.cli(argv)``, or a subprocess
where a second process is the point) on a crafted folder, then checks: exit 0, or exit 2 with exactly one
``error:`` line and no traceback; every file outside the output folder byte-identical (``tree_digest``); the
user's files inside an output folder kept.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from gray_effnet import DataError, GrayEfficientNet, InputError, save_weights
from gray_effnet.__main__ import main as gray_main
from gray_effnet.files import LOCK_NAME, cleanup_temporaries, output_lock
from gray_effnet.pack import WRITTEN, open_pack, write_pack

from .helpers import tree_digest

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--img-size", "32", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--channels-last", "off",
        "--threads", "1", "--no-pretrained", "--epochs", "1"]


def write_source(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for k, cls in enumerate(("a", "b")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(k * 100, k * 100 + 100, (36, 40), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def pack_cmd(src: Path, out: Path, *extra: str) -> list[str]:
    return ["pack", "--data", str(src), "--img-size", "32", "32", "--output", str(out), "--no-progress",
            "--workers", "1", *extra]


def assert_refused(code: int, err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}; stderr: {err[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-1500:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A source folder, a uint8 and a float16 pack of it, and a checkpoint of its two classes."""
    tmp = tmp_path_factory.mktemp("hostile")
    src = write_source(tmp / "src")
    write_pack(src, tmp / "pack8", (32, 32), progress=False, workers=1)
    write_pack(src, tmp / "pack16", (32, 32), dtype="float16", progress=False, workers=1)
    model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, class_names=["a", "b"], img_size=(32, 32))
    weights = save_weights(model, tmp / "w" / "best.safetensors")
    return {"src": src, "pack8": tmp / "pack8", "pack16": tmp / "pack16", "weights": weights}


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)  # a command that wrote to the working folder would show in the digest
    return tmp_path


class TestPackOutput:
    """``pack --output DIR`` replaces only a pack of ours, and removes only its files."""

    @pytest.mark.parametrize("meta", ["{}", "[]", "not json", json.dumps({"format_version": 1, "rows": []})])
    def test_unsigned_pack_json_with_user_files_refused(self, made, work, capsys, meta):
        out = work / "mine"
        (out / "sub").mkdir(parents=True)
        (out / "pack.json").write_text(meta)
        (out / "images.npy").write_bytes(b"the user's own array")
        (out / "notes.txt").write_text("keep me")
        (out / "sub" / "x.png").write_bytes(b"png")
        before = tree_digest(work)
        code = gray_main(pack_cmd(made["src"], out))
        assert_refused(code, capsys.readouterr().err, str(out), "is not a pack", "no gray_effnet signature")
        assert tree_digest(work) == before

    def test_signed_pack_holding_user_files_refused(self, made, work, capsys):
        out = work / "p"
        shutil.copytree(made["pack8"], out)
        (out / "notes.txt").write_text("keep me")
        (out / "runs").mkdir()
        before = tree_digest(work)
        code = gray_main(pack_cmd(made["src"], out))
        assert_refused(code, capsys.readouterr().err, "holds files that are not part of its pack (notes.txt, runs)")
        assert tree_digest(work) == before

    @pytest.mark.parametrize("where", ["inside", "equal"])
    def test_source_inside_the_old_pack_refused(self, made, work, capsys, where):
        out = work / "p"
        shutil.copytree(made["pack8"], out)
        src = out / "data" if where == "inside" else out
        shutil.copytree(made["src"], src, dirs_exist_ok=True)
        before = tree_digest(work)
        code = gray_main(pack_cmd(src, out))
        assert_refused(code, capsys.readouterr().err, "is inside", "which packing would replace")
        assert tree_digest(work) == before

    def test_output_inside_the_source_refused(self, made, work, capsys):
        src = work / "src"
        shutil.copytree(made["src"], src)
        before = tree_digest(work)
        assert_refused(gray_main(pack_cmd(src, src / "p")), capsys.readouterr().err, "must not be inside its source")
        assert tree_digest(work) == before

    def test_output_that_is_a_file_or_a_link_refused(self, made, work, capsys):
        (work / "file").write_text("keep me")
        (work / "link").symlink_to(made["pack8"], target_is_directory=True)
        before, outside = tree_digest(work), tree_digest(made["pack8"])
        assert_refused(gray_main(pack_cmd(made["src"], work / "file")), capsys.readouterr().err, "is not a folder")
        assert_refused(gray_main(pack_cmd(made["src"], work / "link")), capsys.readouterr().err, "symbolic link")
        assert tree_digest(work) == before and tree_digest(made["pack8"]) == outside

    def test_replacing_our_pack_removes_only_its_files(self, made, work, capsys):
        out = work / "p"
        shutil.copytree(made["pack8"], out)
        (work / "neighbour").mkdir()
        (work / "neighbour" / "images.npy").write_bytes(b"not ours")
        before = tree_digest(work, skip=out)
        assert gray_main(pack_cmd(made["src"], out, "--dtype", "uint16")) == 0
        assert tree_digest(work, skip=out) == before
        assert sorted(os.listdir(out)) == sorted(WRITTEN)  # no lock file, no leftovers beside it
        assert sorted(os.listdir(work)) == ["neighbour", "p"]
        assert open_pack(out).dtype == "uint16"

    def test_leftover_holding_a_user_file_is_kept(self, made, work, capsys):
        """A dead packer's partial folder loses the files a pack holds; a file someone else put there stays."""
        leftover = work / f"p.partial-{dead_pid()}"
        shutil.copytree(made["pack8"], leftover)
        (leftover / "mine.txt").write_text("keep me")
        with pytest.warns(RuntimeWarning, match="kept .*: it holds files that packing did not write \\(mine.txt\\)"):
            assert gray_main(pack_cmd(made["src"], work / "p")) == 0
        assert sorted(os.listdir(leftover)) == ["mine.txt"]


def _npy_header(path: Path, shape: tuple[int, ...], descr: str = "<i8", data: bytes = b"\0" * 64) -> None:
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
        f.write(data)


def _edit_meta(pack: Path, **fields) -> None:
    meta = json.loads((pack / "pack.json").read_text())
    for key, value in fields.items():
        meta[key] = value(meta) if callable(value) else value
    (pack / "pack.json").write_text(json.dumps(meta))


def _save_labels(pack: Path, change) -> None:
    labels = np.load(pack / "labels.npy")
    change(labels)
    np.save(pack / "labels.npy", labels)


def _nan_row(pack: Path) -> None:
    images = np.load(pack / "images.npy", mmap_mode="r+")
    images[3, 0, 5, 7] = np.nan
    images.flush()


# case -> (the pack it starts from, what is done to it, what the error says)
HOSTILE_PACKS = {
    "not-json": ("pack8", lambda p: (p / "pack.json").write_text("{oops"), "it is not JSON"),
    "a-list": ("pack8", lambda p: (p / "pack.json").write_text("[1, 2]"), "must be a JSON object"),
    "no-rows": ("pack8", lambda p: _drop(p, "rows"), "'rows' is missing"),
    "no-task": ("pack8", lambda p: _drop(p, "task"),
                "'task' is missing; packs written before gray_effnet read label tables have none: pack it again"),
    "val-row-out-of-range": ("pack8", lambda p: _edit_meta(p, val=[0, 10**6]), "'val' must be row indices in [0, 8)"),
    "negative-row": ("pack8", lambda p: _edit_meta(p, train=[-1]), "'train' must be row indices in [0, 8)"),
    "val-equals-train": ("pack8", lambda p: _edit_meta(p, val=lambda m: m["train"]), "'val' must be rows disjoint"),
    "classes-shorter-than-labels": ("pack8", lambda p: _edit_meta(p, classes=["a"]), "labels in [0, 1)"),
    "label-minus-one-in-json": ("pack8", lambda p: _edit_meta(p, rows=lambda m: [[m["rows"][0][0], -1],
                                                                                   *m["rows"][1:]]), "'rows'"),
    "label-minus-one-in-array": ("pack8", lambda p: _save_labels(p, lambda a: a.__setitem__(0, -1)),
                                 "holds labels from -1 to 1"),
    "label-out-of-range-in-array": ("pack8", lambda p: _save_labels(p, lambda a: a.__setitem__(0, 7)),
                                    "labels in [0, 2)"),
    "labels-differ-from-rows": ("pack8", lambda p: _save_labels(p, lambda a: a.__setitem__(slice(None), 1 - a)),
                                "differs from the labels of the rows"),
    "dtype-float64-in-json": ("pack8", lambda p: _edit_meta(p, dtype="float64"), "'dtype' must be one of"),
    "images-float64": ("pack8", lambda p: np.save(p / "images.npy", np.zeros((8, 1, 32, 32))),
                       "images.npy holds 'float64'"),
    "images-truncated": ("pack8", lambda p: os.truncate(p / "images.npy", 500), "bytes; its header and pack.json"),
    "images-not-npy": ("pack8", lambda p: (p / "images.npy").write_bytes(b"MZ" * 100), "not an array file"),
    "images-a-fifo": ("pack8", lambda p: (p / "images.npy").unlink() or os.mkfifo(p / "images.npy"),
                      "not a regular file"),
    "nan-in-float16": ("pack16", _nan_row, "row 3 ("),
    "labels-header-2-to-the-40": ("pack8", lambda p: _npy_header(p / "labels.npy", (2**40,)),
                                  "labels.npy holds 'int64' (1099511627776,)"),
    "images-header-2-to-the-40": ("pack8", lambda p: _npy_header(p / "images.npy", (2**40, 1, 32, 32), "|u1"),
                                  "(1099511627776, 1, 32, 32)"),
    "labels-object-array": ("pack8", lambda p: _npy_header(p / "labels.npy", (8,), "|O"), "labels.npy holds 'object'"),
    "source-relative": ("pack8", lambda p: _edit_meta(p, source="src"), "'source' must be an absolute path"),
    "img-size-bomb": ("pack8", lambda p: _edit_meta(p, img_size=[2**40, 2**40]), "'img_size' must be [H, W]"),
}


def _drop(pack: Path, key: str) -> None:
    meta = json.loads((pack / "pack.json").read_text())
    del meta[key]
    (pack / "pack.json").write_text(json.dumps(meta))


class TestHostilePack:
    """A crafted pack: ``train.py --data PACK`` says what is wrong in one line and writes nothing."""

    @pytest.mark.parametrize("case", HOSTILE_PACKS)
    def test_train_refuses(self, made, work, capsys, case):
        start, spoil, message = HOSTILE_PACKS[case]
        pack = work / "pack"
        shutil.copytree(made[start], pack)
        spoil(pack)
        before = tree_digest(work)
        code = train.cli(["--data", str(pack), "--output", str(work / "run"), *FAST])
        assert_refused(code, capsys.readouterr().err, str(pack), message)
        assert tree_digest(work) == before and not (work / "run").exists()

    def test_huge_header_allocates_nothing(self, made, work):
        pack = work / "pack"
        shutil.copytree(made["pack8"], pack)
        _npy_header(pack / "labels.npy", (2**40,))
        tracemalloc.start()
        try:
            with pytest.raises(DataError, match=r"labels.npy holds 'int64' \(1099511627776,\)"):
                open_pack(pack)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 32 * 2**20, f"opening the pack allocated {peak / 2**20:.0f} MiB"

    def test_predict_refuses(self, made, work, capsys):
        pack = work / "pack"
        shutil.copytree(made["pack16"], pack)
        _nan_row(pack)
        before = tree_digest(work)
        code = gray_main(["predict", "--weights", str(made["weights"]), "--data", str(pack), "--output",
                          str(work / "p.csv"), "--workers", "0", "--channels-last", "off"])
        assert_refused(code, capsys.readouterr().err, "NaN or infinite")
        assert tree_digest(work) == before

    def test_float16_pack_reads(self, made):
        pack = open_pack(made["pack16"])
        assert pack.dtype == "float16" and np.isfinite(np.load(made["pack16"] / "images.npy")).all()


class TestOneRunPerOutput:
    """``output_lock``: a second run on a folder in use is refused, naming the holder; the lock ends with the run."""

    def _holder(self) -> tuple[str, ...]:
        return "is in use by the test (pid", f"{os.getpid()} on {socket.gethostname()}, since "

    def test_second_train_refused_in_process(self, made, work, capsys):
        out = work / "run"
        with output_lock(out, "the test"):
            before = tree_digest(work)
            code = train.cli(["--data", str(made["src"]), "--output", str(out), *FAST])
            assert_refused(code, capsys.readouterr().err, str(out), *self._holder())
            assert tree_digest(work) == before
        assert not (out / LOCK_NAME).exists()

    @pytest.mark.slow
    def test_second_train_refused_in_another_process(self, made, work):
        out = work / "run"
        with output_lock(out, "the test"):
            res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", str(made["src"]), "--output",
                                  str(out), *FAST], cwd=work, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert_refused(res.returncode, res.stderr, *self._holder())
        assert os.listdir(work) == []  # the folder made for the lock is gone with it

    def test_pack_and_export_refused(self, made, work, capsys):
        out = work / "p"
        shutil.copytree(made["pack8"], out)
        with output_lock(out, "the test"):
            before = tree_digest(work)
            assert_refused(gray_main(pack_cmd(made["src"], out)), capsys.readouterr().err, *self._holder())
            assert tree_digest(work) == before
        with output_lock(work / "exported", "the test"):
            code = gray_main(["export", "--weights", str(made["weights"]), "--format", "torchscript", "--output",
                              str(work / "exported" / "m.pt"), "--no-check"])
            assert_refused(code, capsys.readouterr().err, *self._holder())
            assert os.listdir(work / "exported") == [LOCK_NAME]
        assert not (work / "exported").exists()  # made for the lock, removed with it
        assert sorted(os.listdir(work)) == ["p"]

    def test_stale_lock_file_does_not_block(self, made, work, capsys):
        out = work / "p"
        out.mkdir()
        (out / LOCK_NAME).write_text(json.dumps({"what": "pack", "pid": dead_pid(), "host": "x", "since": "then"}))
        assert gray_main(pack_cmd(made["src"], out)) == 0
        assert sorted(os.listdir(out)) == sorted(WRITTEN)

    def test_forged_lock_file_never_written_through(self, work):
        """A lock file that is a link to a user's file: refused, the file untouched."""
        target = work / "precious.txt"
        target.write_text("keep me")
        (work / "out").mkdir()
        (work / "out" / LOCK_NAME).symlink_to(target)
        before = tree_digest(work)
        with pytest.raises(InputError, match="cannot be opened as a lock file"):
            with output_lock(work / "out", "the test"):
                pass
        assert tree_digest(work) == before

    def test_holder_text_is_bounded_and_printable(self, work):
        out = work / "out"
        with output_lock(out, "x" * 500 + "\x1b[2J"):
            with pytest.raises(InputError) as info:
                with output_lock(out, "the test"):
                    pass
        message = str(info.value)
        assert "\x1b" not in message and len(message) < 500

    def test_cleanup_keeps_live_and_foreign_temporaries(self, work):
        live = subprocess.Popen(["sleep", "60"])
        try:
            names = {"dead": f".last.safetensors.{dead_pid()}-abc_1234.gray_effnet.tmp",
                     "live": f".last.safetensors.{live.pid}-abc_1234.gray_effnet.tmp",
                     "user": ".notes.tmp", "old-style": ".last.safetensors.abc12345.tmp", "plain": "x.gray_effnet.tmp"}
            for name in names.values():
                (work / name).write_text("x")
            with output_lock(work, "the test"):
                assert cleanup_temporaries(work) == [names["dead"]]
            assert sorted(os.listdir(work)) == sorted(n for k, n in names.items() if k != "dead")
        finally:
            live.kill()
            live.wait()

    def test_train_keeps_user_files_in_its_output(self, made, work, capsys):
        """A real run into a folder holding the user's files and a live process's temporary: all of them stay."""
        out = work / "run"
        out.mkdir()
        live = subprocess.Popen(["sleep", "120"])
        try:
            user = {"notes.txt": "keep", ".notes.tmp": "keep", ".best.safetensors.abcd1234.tmp": "keep",
                    f".metrics.csv.{live.pid}-abc_1234.gray_effnet.tmp": "a live predict's"}
            for name, text in user.items():
                (out / name).write_text(text)
            dead = out / f".config.json.{dead_pid()}-abc_1234.gray_effnet.tmp"
            dead.write_text("a killed run's")
            outside = tree_digest(work, skip=out)
            assert train.cli(["--data", str(made["src"]), "--output", str(out), *FAST]) == 0
            assert "removed temporary files of an interrupted write: " + dead.name in capsys.readouterr().out
            assert all((out / name).read_text() == text for name, text in user.items())
            assert not dead.exists() and not (out / LOCK_NAME).exists() and (out / "best.safetensors").is_file()
            assert tree_digest(work, skip=out) == outside
        finally:
            live.kill()
            live.wait()


class TestOutputPaths:
    """Output paths are checked before any work: nothing is read, built or predicted first."""

    @pytest.fixture
    def no_work(self, monkeypatch):
        def fail(*a, **k):
            raise AssertionError("work started before the output path was checked")

        for target in ("gray_effnet.predict.open_source", "gray_effnet.evaluation.load_model",
                       "gray_effnet.export.load_model",
                       "train.resolve_data"):
            monkeypatch.setattr(target, fail)

    def test_predict_into_a_folder_refused(self, made, work, capsys, no_work):
        (work / "out").mkdir()
        (work / "out" / "keep.csv").write_text("keep")
        before = tree_digest(work)
        code = gray_main(["predict", "--weights", str(made["weights"]), "--data", str(made["src"]), "--output",
                          str(work / "out")])
        assert_refused(code, capsys.readouterr().err, f"--output {work / 'out'} is a folder")
        assert tree_digest(work) == before

    def test_export_into_a_folder_refused(self, made, work, capsys, no_work):
        (work / "out").mkdir()
        code = gray_main(["export", "--weights", str(made["weights"]), "--format", "torchscript", "--output",
                          str(work / "out")])
        assert_refused(code, capsys.readouterr().err, "is a folder")
        assert os.listdir(work) == ["out"] and os.listdir(work / "out") == []

    @pytest.mark.parametrize("evaluate", [False, True])
    def test_train_output_that_is_a_file_refused(self, made, work, capsys, no_work, evaluate):
        (work / "out.txt").write_text("keep me")
        before = tree_digest(work)
        mode = ["--evaluate", "--weights", str(made["weights"])] if evaluate else []
        for output, needle in ((work / "out.txt", "exists and is not a folder"),
                               (work / "out.txt" / "run", "out.txt is a file, so no folder can be made there")):
            code = train.cli([*mode, "--data", str(made["src"]), "--output", str(output), *FAST])
            assert_refused(code, capsys.readouterr().err, needle)
        assert tree_digest(work) == before
