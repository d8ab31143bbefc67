"""Hostile inputs through the real commands: each is a named skip with the run going on, or one clean refusal.

A refusal is exit code 2 with exactly one ``error:`` line and no traceback. Every test that runs a command checks
that the files it was given are byte-identical afterwards (``snapshot``). Cases that hung or multiplied images
before (FIFOs, symlink loops) run in a subprocess with a timeout, so that a regression fails instead of hanging.
"""

import csv
import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import train
from gray_effnet import DataError, GrayEfficientNet, WeightsError, save_weights
from gray_effnet.__main__ import main
from gray_effnet.checkpoint import validate_metadata
from gray_effnet.evaluation import csv_safe
from gray_effnet.folders import SkippedFileWarning, find_images, load_folder
from gray_effnet.images import UnreadableImageWarning, read_gray, scan_images
from gray_effnet.limits import DEFAULT_MAX_PIXELS, nesting_depth

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--img-size", "32", "32", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--threads", "1",
         "--channels-last", "off", "--no-progress", "--no-pretrained"]
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


# -- helpers ------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links not followed, FIFOs not opened) -> its content hash, link target or kind."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                out[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[path] = "-> " + os.readlink(path)
            else:
                out[path] = stat.filemode(st.st_mode)
    return out


def images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (12, 10)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(folder / f"{i:02d}.png")


def run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command of this project in a fresh interpreter; a run past ``timeout`` fails the test, it never hangs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    try:
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args[:3])} ... did not finish in {timeout}s")


def assert_refused(code: int, err: str, *needles: str) -> None:
    """Exit 2, exactly one ``error:`` line, no traceback, and the line says each of ``needles``."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def png_bomb(path: Path, side: int = 12000) -> Path:
    """A valid 1-bit PNG of side x side zero pixels, compressed to about 17 KB; decoded it would take side**2 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compress, row = zlib.compressobj(9), bytes(1 + (side + 7) // 8)
    idat = b"".join([compress.compress(row) for _ in range(side)] + [compress.flush()])
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def deflated_dicom(path: Path, rows: int, cols: int, pixel_bytes: int | None = None) -> Path:
    """A Deflated Explicit VR Little Endian DICOM of zero pixels, written in pieces (never held whole in memory).

    ``pixel_bytes`` writes that much pixel data instead of rows x cols x 2 bytes: a file that lies in its header."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    left = rows * cols * 2 if pixel_bytes is None else pixel_bytes
    compress = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compress.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, left))]
    zeros = bytes(2**20)
    while left:
        parts.append(compress.compress(zeros[:min(left, len(zeros))]))
        left -= min(left, len(zeros))
    parts.append(compress.flush())
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    write_file_meta_info(head, meta, enforce_standard=True)
    path.write_bytes(bytes(128) + b"DICM" + head.getvalue() + b"".join(parts))
    return path


def ct_small(dst: Path, **changes) -> Path:
    """pydicom's CT_small.dcm (128x128, RescaleSlope 1), with header elements replaced."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    src = get_testdata_file("CT_small.dcm", download=False)
    if src is None:
        pytest.skip("CT_small.dcm is not in this pydicom wheel")
    ds = pydicom.dcmread(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns that NaN is no valid DS: that is the point
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(dst)
    return dst


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Weights of a random two-class model (classes a and b), 32x32."""
    folder = tmp_path_factory.mktemp("weights")
    model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, class_names=["a", "b"], img_size=(32, 32))
    return save_weights(model, folder / "best.safetensors")


def with_metadata(src: Path, dst: Path, text: str) -> Path:
    """A copy of the checkpoint ``src`` whose metadata is ``text``."""
    save_file(load_file(src), dst, metadata={"gray_effnet": text})
    return dst


def metadata(src: Path) -> dict:
    with safe_open(src, "pt") as f:
        return json.loads(f.metadata()["gray_effnet"])


@pytest.fixture(autouse=True)
def pil_limit(monkeypatch):
    """The commands set Pillow's process-wide limit (--max-pixels): put it back after each test. (pytest restores
    the warning filters that ``set_max_pixels`` adds.)"""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


def predict(checkpoint: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["predict", "--weights", str(checkpoint), "--data", str(data), "--output", str(out), "--workers", "0",
                 "--channels-last", "off", *extra])


# -- A: the folder scan -------------------------------------------------------------------------------------
@needs_fifo
class TestFifo:
    """A FIFO is never opened (reading one waits for a writer forever): it is skipped and named."""

    def test_train_goes_on(self, tmp_path):
        data = tmp_path / "in" / "data"
        images(data / "a", 6)
        images(data / "b", 6, seed=1)
        os.mkfifo(data / "a" / "IM0001")  # no extension: the scan used to open it for the DICOM magic
        os.mkfifo(data / "a" / "x.png")
        before = snapshot(tmp_path / "in")
        done = run([str(ROOT / "train.py"), "--data", str(data), "--output", str(tmp_path / "out"), *TRAIN],
                   cwd=tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        line = next(line for line in done.stdout.splitlines() if line.startswith("data:"))
        assert "2 skipped (2 not a regular file) by the folder scan" in line
        assert "10 train / 2 val images" in line
        for name in ("IM0001", "x.png"):
            assert f"skipping {data / 'a' / name}: not a regular file (FIFO)" in done.stderr
        assert snapshot(tmp_path / "in") == before

    def test_predict_flat_folder(self, tmp_path, checkpoint):
        data = tmp_path / "in" / "flat"
        images(data, 3)
        os.mkfifo(data / "IM0001")
        before = snapshot(tmp_path / "in")
        out = tmp_path / "out.csv"
        done = run(["-m", "gray_effnet", "predict", "--weights", str(checkpoint), "--data", str(data), "--output",
                    str(out), "--workers", "0", "--channels-last", "off"], cwd=tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert "1 skipped (1 not a regular file) by the folder scan" in done.stdout
        assert f"skipping {data / 'IM0001'}: not a regular file (FIFO)" in done.stderr
        with open(out) as f:
            assert len(list(csv.DictReader(f))) == 3
        assert snapshot(tmp_path / "in") == before

    def test_read_gray_refuses(self, tmp_path):
        os.mkfifo(tmp_path / "x.png")
        done = run(["-c", "from gray_effnet.images import read_gray; read_gray('x.png')"], cwd=tmp_path, timeout=120)
        assert "DataError: not a regular file (FIFO)" in done.stderr


class TestSymlinkLoops:
    """A symlinked folder is followed once; a link back up is a named loop, and the walk always ends."""

    def _count(self, data: Path, tmp_path: Path) -> dict:
        code = ("import json, sys; from gray_effnet.folders import find_images; f = find_images(sys.argv[1]); "
                "print(json.dumps({'n': len(f.samples), 'skipped': f.skipped}))")
        done = run(["-c", code, str(data)], cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def test_loop_keeps_twelve(self, tmp_path):
        data = tmp_path / "data"
        images(data / "a", 12)
        images(data / "b", 12, seed=1)
        (data / "a" / "loop").symlink_to(".")
        found = self._count(data, tmp_path)
        assert found["n"] == 24
        assert found["skipped"] == [[str(data / "a" / "loop"), f"symlink loop: leads back to {data / 'a'}"]]

    def test_two_loops_finish(self, tmp_path):
        data = tmp_path / "data"
        images(data / "a", 12)
        images(data / "b", 12, seed=1)
        (data / "a" / "deep").mkdir()
        (data / "a" / "loop1").symlink_to(".")
        (data / "a" / "deep" / "loop2").symlink_to("..")
        (data / "b" / "up").symlink_to("..")  # to the data folder itself
        found = self._count(data, tmp_path)
        assert found["n"] == 24
        assert sorted(p for p, _ in found["skipped"]) == [str(data / "a" / "deep" / "loop2"),
                                                          str(data / "a" / "loop1"), str(data / "b" / "up")]
        assert all(why.startswith("symlink loop") for _, why in found["skipped"])

    def test_pack_counts_each_file_once_and_stays_fresh(self, tmp_path):
        data = tmp_path / "in" / "data"
        images(data / "a", 12)
        images(data / "b", 12, seed=1)
        (data / "a" / "loop").symlink_to(".")
        (data / "b" / "again").symlink_to("../a")  # another class's folder: its files are a's already
        os.link(data / "a" / "00.png", data / "b" / "hard.png")  # one file, two names
        (data / "b" / "gone.png").symlink_to("nowhere.png")
        (data / "b" / "self").symlink_to("self")
        before = snapshot(tmp_path / "in")
        pack = tmp_path / "pack"
        # The pack command, then its staleness check (which lists the folder again), in one interpreter.
        code = ("import sys; from gray_effnet.__main__ import main; from gray_effnet.pack import open_pack; "
                "code = main(sys.argv[1:]); print(open_pack(sys.argv[5]).note); sys.exit(code)")
        done = run(["-c", code, "pack", "--data", str(data), "--output", str(pack), "--img-size", "32", "32",
                    "--workers", "1", "--no-progress"], cwd=tmp_path)
        assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
        assert "packed 24 images" in done.stdout and "unchanged since packing" in done.stdout
        for name, why in (("a/loop", f"symlink loop: leads back to {data / 'a'}"),
                          ("b/again", f"already seen as {data / 'a'}"),
                          ("b/hard.png", f"already seen as {data / 'a' / '00.png'}"),
                          ("b/gone.png", "broken symlink"), ("b/self", "symlink loop: the link never reaches a file")):
            assert f"skipping {data / name}: {why}" in done.stderr
        assert snapshot(tmp_path / "in") == before


class TestUnreadableFolder:
    """A subfolder that cannot be listed is named ("permission denied"), not silently left out."""

    @pytest.fixture(params=["chmod", "scandir"])
    def data(self, request, tmp_path, monkeypatch) -> Path:
        data = tmp_path / "in" / "data"
        images(data / "a", 6)
        images(data / "a" / "locked", 3, seed=2)
        images(data / "b", 6, seed=1)
        locked = data / "a" / "locked"
        if request.param == "chmod":
            if os.geteuid() == 0:
                pytest.skip("root reads a folder whatever its mode; the scandir case covers it")
            locked.chmod(0)
            request.addfinalizer(lambda: locked.chmod(0o755))
        else:
            scandir = os.scandir

            def refuse(path="."):
                if os.fspath(path) == str(locked):
                    raise PermissionError(13, "Permission denied", os.fspath(path))
                return scandir(path)

            monkeypatch.setattr(os, "scandir", refuse)
        return data

    def test_train_names_it(self, data, tmp_path, capsys):
        before = snapshot(data)
        with pytest.warns(SkippedFileWarning, match="locked: permission denied"):
            assert train.cli(["--data", str(data), "--output", str(tmp_path / "out"), *TRAIN]) == 0
        line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data:"))
        assert "1 skipped (1 permission denied) by the folder scan" in line
        n_train, n_val = map(int, re.search(r"(\d+) train / (\d+) val images", line).groups())
        assert n_train + n_val == 12
        assert snapshot(data) == before

    def test_find_images(self, data):
        found = find_images(data)
        assert len(found.samples) == 12
        assert found.skipped == [(str(data / "a" / "locked"), "permission denied: the folder cannot be listed")]


class TestScanReport:
    def test_load_folder_carries_it(self, tmp_path):
        images(tmp_path / "a", 3)
        images(tmp_path / "b", 3)
        os.link(tmp_path / "a" / "00.png", tmp_path / "b" / "twin.png")
        with pytest.warns(SkippedFileWarning, match="twin.png: already seen as"):
            folder = load_folder(tmp_path, val_split=0.34)
        assert folder.skipped == [(str(tmp_path / "b" / "twin.png"), f"already seen as {tmp_path / 'a' / '00.png'}")]
        assert len(folder.train) + len(folder.val) == 6


# -- B: one pixel limit, checked from the header ------------------------------------------------------------
class TestPixelLimit:
    def test_png_bomb_skipped_in_training(self, tmp_path, capsys, monkeypatch):
        data = tmp_path / "in" / "data"
        images(data / "a", 6)
        images(data / "b", 6, seed=1)
        bomb = png_bomb(data / "a" / "bomb.png")
        assert bomb.stat().st_size < 30_000
        decoded, load = [], ImageFile.ImageFile.load

        def spy(img):
            decoded.append(img.size)
            return load(img)

        monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
        before = snapshot(tmp_path / "in")
        with pytest.warns(UnreadableImageWarning,
                          match=rf"bomb\.png \(DataError: 144000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS}"):
            assert train.cli(["--data", str(data), "--output", str(tmp_path / "out"), *TRAIN]) == 0
        assert "1 unreadable skipped" in capsys.readouterr().out
        assert (12000, 12000) not in decoded and decoded  # the others were decoded; the bomb never
        assert snapshot(tmp_path / "in") == before

    def test_memory_stays_bounded(self, tmp_path):
        """Peak RSS in a fresh process: refusing a 144-megapixel PNG and a 100-megapixel deflated DICOM costs
        almost nothing (decoding them would take 144 MB and 200 MB)."""
        png_bomb(tmp_path / "bomb.png")
        deflated_dicom(tmp_path / "bomb.dcm", 10000, 10000)
        code = ("import resource, sys\n"
                "from gray_effnet.images import read_gray, scan_images\n"
                "import pydicom, PIL.PngImagePlugin\n"
                "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
                "for name in ('bomb.png', 'bomb.dcm'):\n"
                "    try:\n"
                "        read_gray(name)\n"
                "    except Exception as e:\n"
                "        print(type(e).__name__, e)\n"
                "print(scan_images(['bomb.png', 'bomb.dcm'], verify=True).bad)\n"
                "print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)\n")
        done = run(["-c", code], cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"DataError 144000000 (12000x12000) pixels exceeds the limit of {DEFAULT_MAX_PIXELS}" in done.stdout
        assert f"DataError 100000000 (10000x10000) pixels exceeds the limit of {DEFAULT_MAX_PIXELS}" in done.stdout
        grew = int(done.stdout.split("grew_kb")[1])
        assert grew < 40_000, done.stdout  # KiB on Linux

    def test_deflated_dicom_is_never_inflated(self, tmp_path, monkeypatch):
        import gray_effnet.dicom as dicom_mod

        bomb = deflated_dicom(tmp_path / "IM0001", 8000, 8000)  # no extension: found by its magic

        def full_read(*a, **k):
            raise AssertionError("pydicom read the whole deflated data set")

        monkeypatch.setattr(dicom_mod.pydicom, "dcmread", full_read)
        with pytest.raises(DataError, match=r"64000000 \(8000x8000\) pixels exceeds the limit of 10000000"):
            read_gray(bomb, max_pixels=10**7)
        assert scan_images([str(bomb)], max_pixels=10**7).bad[0][1].startswith("DataError: 64000000 (8000x8000)")

    def test_deflated_dicom_that_lies_about_its_size(self, tmp_path):
        liar = deflated_dicom(tmp_path / "liar.dcm", 64, 48, pixel_bytes=40 * 2**20)
        with pytest.raises(DataError, match="inflates to more than"):
            read_gray(liar)

    def test_deflated_dicom_within_the_limit_reads(self, tmp_path):
        assert read_gray(deflated_dicom(tmp_path / "ok.dcm", 64, 48)).shape == (1, 64, 48)

    def test_max_pixels_option(self, tmp_path, checkpoint, capsys):
        data = tmp_path / "in" / "flat"
        images(data, 2)  # 12x10 = 120 pixels
        (data / "ct.dcm").write_bytes(ct_small(tmp_path / "ct.dcm").read_bytes())  # 128x128
        before = snapshot(tmp_path / "in")
        out = tmp_path / "p.csv"
        with pytest.warns(UnreadableImageWarning) as caught:
            assert predict(checkpoint, data, out, "--max-pixels", "1000") == 0
        assert any("16384 (128x128) pixels exceeds the limit of 1000 (--max-pixels)" in str(w.message) for w in caught)
        assert "2 images predicted" in capsys.readouterr().out
        with pytest.warns(UnreadableImageWarning):
            assert predict(checkpoint, data, tmp_path / "q.csv", "--max-pixels", "100") == 2
        assert_refused(2, capsys.readouterr().err, "none of the 3 image file(s)", "exceeds the limit of 100")
        assert not (tmp_path / "q.csv").exists()
        assert predict(checkpoint, data, out, "--max-pixels", "0") == 2
        assert_refused(2, capsys.readouterr().err, "--max-pixels must be a positive integer")
        assert snapshot(tmp_path / "in") == before

    def test_checkpoint_img_size(self, tmp_path, checkpoint, capsys):
        meta = metadata(checkpoint)
        meta["img_size"] = [16384, 16384]
        bad = with_metadata(checkpoint, tmp_path / "big.safetensors", json.dumps(meta))
        images(tmp_path / "flat", 1)
        assert predict(bad, tmp_path / "flat", tmp_path / "p.csv") == 2
        assert_refused(2, capsys.readouterr().err, "'img_size'", "pixel limit")

    def test_train_img_size(self, tmp_path, capsys):
        assert train.cli(["--img-size", "16384", "16384", "--data", str(tmp_path)]) == 2
        assert_refused(2, capsys.readouterr().err, "more than the pixel limit")


# -- C: non-finite input --------------------------------------------------------------------------------
def float_tiffs(folder: Path, n: int, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.random((12, 10), dtype=np.float32)).save(folder / f"{i:02d}.tif")  # mode F


class TestNonFinite:
    @pytest.fixture
    def data(self, tmp_path) -> Path:
        data = tmp_path / "in" / "data"
        float_tiffs(data / "a", 6)
        float_tiffs(data / "b", 6, seed=1)
        for name, value in (("nan.tif", np.nan), ("inf.tif", np.inf)):
            a = np.zeros((12, 10), np.float32)
            a[3, 4] = value
            Image.fromarray(a).save(data / "a" / name)
        return data

    def test_read_gray(self, data):
        with pytest.raises(DataError, match="float image with 1 NaN or infinite pixel value"):
            read_gray(data / "a" / "nan.tif")

    def test_training_skips_them(self, data, tmp_path):
        before = snapshot(tmp_path / "in")
        with pytest.warns(UnreadableImageWarning) as caught:  # a batch larger than the split: no file is dropped
            assert train.cli(["--data", str(data), "--output", str(tmp_path / "out"), *TRAIN, "--batch-size",
                              "16"]) == 0
        named = {Path(str(w.message).split()[3]).name for w in caught if "NaN or infinite" in str(w.message)}
        assert named == {"nan.tif", "inf.tif"}
        assert snapshot(tmp_path / "in") == before

    def test_strict_data_refuses(self, data, tmp_path, capsys):
        assert train.cli(["--data", str(data), "--output", str(tmp_path / "out"), "--strict-data", *TRAIN]) == 2
        err = capsys.readouterr().err
        assert_refused(2, err, "--strict-data: 2 unreadable file(s)")
        assert "nan.tif: DataError: float image with 1 NaN" in err and "inf.tif: DataError" in err
        assert not (tmp_path / "out").exists()


class TestDicomModalityLut:
    @pytest.mark.parametrize("change, reason", [
        ({"RescaleSlope": "0"}, "RescaleSlope is 0"),
        ({"RescaleSlope": "NaN"}, "RescaleSlope is nan"),
        ({"RescaleIntercept": "-inf"}, "RescaleIntercept is -inf"),
    ])
    def test_skipped_with_reason(self, tmp_path, checkpoint, capsys, change, reason):
        data = tmp_path / "in" / "flat"
        data.mkdir(parents=True)
        ct_small(data / "good.dcm")
        ct_small(data / "bad.dcm", **change)
        before = snapshot(tmp_path / "in")
        with pytest.warns(UnreadableImageWarning, match=rf"bad\.dcm \(DataError: DICOM {reason}"):
            assert predict(checkpoint, data, tmp_path / "p.csv") == 0
        assert "1 images predicted" in capsys.readouterr().out
        assert snapshot(tmp_path / "in") == before


class TestNonFiniteLossMessage:
    def test_names_the_data(self):
        source = (ROOT / "gray_effnet" / "engine.py").read_text()
        message = source[source.index("the loss became non-finite"):source.index("The last good checkpoint")]
        assert "data" in message and "--lr" in message


# -- D: text that a terminal or a spreadsheet would act on --------------------------------------------------
class TestControlCharacters:
    def test_class_folder_refused(self, tmp_path, capsys):
        data = tmp_path / "data"
        images(data / "ok", 2)
        images(data / "red\x1b[31m", 2)
        before = snapshot(tmp_path)
        assert train.cli(["--data", str(data), "--output", str(tmp_path / "out"), *TRAIN]) == 2
        err = capsys.readouterr().err
        assert_refused(2, err, repr("red\x1b[31m"), "control characters")
        assert "\x1b" not in err
        assert snapshot(tmp_path) == before

    def test_predict_refuses_too(self, tmp_path, checkpoint, capsys):
        images(tmp_path / "data" / "a\u202e", 1)  # a right-to-left override: Cf
        assert predict(checkpoint, tmp_path / "data", tmp_path / "p.csv") == 2
        assert_refused(2, capsys.readouterr().err, repr("a\u202e"), "control characters")

    def test_checkpoint_class_names(self, tmp_path, checkpoint, capsys):
        meta = metadata(checkpoint)
        meta["class_names"] = ["a", "b\x1b]0;pwned\x07"]
        bad = with_metadata(checkpoint, tmp_path / "esc.safetensors", json.dumps(meta))
        images(tmp_path / "flat", 1)
        assert predict(bad, tmp_path / "flat", tmp_path / "p.csv") == 2
        err = capsys.readouterr().err
        assert_refused(2, err, "'class_names'", "control characters")
        assert "\x1b" not in err


class TestFormulaCells:
    @pytest.mark.parametrize("cell, written", [
        ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"), ("+1", "'+1"), ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"), ("cat", "cat"), ("a=b", "a=b"), (-1, -1),
    ])
    def test_csv_safe(self, cell, written):
        assert csv_safe(cell) == written

    def test_predictions_csv(self, tmp_path, capsys):
        names = ["=1+1", "@SUM(A1)"]
        model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, class_names=names, img_size=(32, 32))
        weights = save_weights(model, tmp_path / "in" / "best.safetensors")
        for i, name in enumerate(names):
            images(tmp_path / "in" / "data" / name, 2, seed=i)
        before = snapshot(tmp_path / "in")
        out = tmp_path / "p.csv"
        assert predict(weights, tmp_path / "in" / "data", out) == 0
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4
        assert {r["target"] for r in rows} == {"'=1+1", "'@SUM(A1)"}
        assert {r["prediction"] for r in rows} <= {"'=1+1", "'@SUM(A1)"}
        assert all(not r[k].startswith(("=", "+", "-", "@")) for r in rows for k in r)
        assert snapshot(tmp_path / "in") == before


class TestDeepMetadata:
    @staticmethod
    def nested(depth: int):
        value = 1.0
        for _ in range(depth):
            value = [value]
        return value

    @pytest.mark.parametrize("depth", [33, 600, 100_000])
    def test_adapter_kwargs(self, tmp_path, checkpoint, capsys, depth):
        meta = metadata(checkpoint)
        meta["adapter_kwargs"] = {"windows": "NESTED"}
        # json.dumps itself recurses: write the nesting as text
        text = json.dumps(meta).replace('"NESTED"', "[" * depth + "1.0" + "]" * depth)
        bad = with_metadata(checkpoint, tmp_path / "deep.safetensors", text)
        images(tmp_path / "flat", 1)
        assert predict(bad, tmp_path / "flat", tmp_path / "p.csv") == 2
        assert_refused(2, capsys.readouterr().err, "nested")

    def test_validate_metadata_directly(self, checkpoint):
        meta = metadata(checkpoint)
        meta["mean"] = self.nested(10_000)
        with pytest.raises(WeightsError, match="nested more than 32 levels"):
            validate_metadata(meta, load_file(checkpoint), "x")

    def test_nesting_depth_is_iterative(self):
        assert nesting_depth(self.nested(10**5)) == 33  # counted up to its stop, without recursion
        assert nesting_depth({"a": [1, [2]], "b": 3}) == 3
        assert nesting_depth(5) == 0


# -- E: a prediction with nothing predicted is an error -------------------------------------------------------
class TestPredictAllFail:
    def test_all_unreadable_at_the_scan(self, tmp_path, checkpoint, capsys):
        data = tmp_path / "in" / "flat"
        data.mkdir(parents=True)
        for i in range(3):
            (data / f"{i}.png").write_bytes(b"not a png")
        before = snapshot(tmp_path / "in")
        with pytest.warns(UnreadableImageWarning):
            assert predict(checkpoint, data, tmp_path / "p.csv") == 2
        assert_refused(2, capsys.readouterr().err, "none of the 3 image file(s)", "can be read")
        assert not (tmp_path / "p.csv").exists()
        assert snapshot(tmp_path / "in") == before

    def test_all_fail_to_decode(self, tmp_path, checkpoint, capsys):
        """Headers that pass the scan, pixel data cut short: every file fails in the loader."""
        data = tmp_path / "in" / "flat"
        images(data, 3, size=(64, 64))
        for path in data.iterdir():
            path.write_bytes(path.read_bytes()[:300])
        with pytest.warns(UnreadableImageWarning):
            assert predict(checkpoint, data, tmp_path / "p.csv") == 2
        assert_refused(2, capsys.readouterr().err, "none of the 3 image file(s)", "could be decoded")
        assert not (tmp_path / "p.csv").exists()

    def test_empty_folder(self, tmp_path, checkpoint, capsys):
        (tmp_path / "flat").mkdir()
        (tmp_path / "flat" / "notes.txt").write_text("x")
        assert predict(checkpoint, tmp_path / "flat", tmp_path / "p.csv") == 2
        assert_refused(2, capsys.readouterr().err, "no images in")
