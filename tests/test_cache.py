"""The RAM cache of decoded images: its layout and budget, the dataset that uses it, and train.py's --ram-cache."""

import argparse
import io
import json
import re
import shlex
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch
from PIL import Image

import gray_effnet.cache as cache_module
import gray_effnet.data as data_module
import train
from gray_effnet.augment import build_transforms
from gray_effnet.cache import ALIGN, ImageCache, attach_caches, parse_budget
from gray_effnet.data import GrayImageFolder, make_loader, set_loader_epoch
from gray_effnet.images import scan_images

from .test_train import FAST, assert_same_run, digits, run  # noqa: F401 - digits is a fixture


def _pngs(folder, shapes, bits: int = 8) -> list[str]:
    """A PNG per (H, W), of seeded noise; 16-bit ones as mode I;16."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(shapes):
        a = rng.integers(0, 2 ** bits, size=(h, w), dtype=np.uint16 if bits == 16 else np.uint8)
        path = folder / f"{i}.png"
        Image.fromarray(a).save(path)
        paths.append(str(path))
    return paths


def _dataset(paths, *, wide=False, transform="train", pixels="scan") -> GrayImageFolder:
    if pixels == "scan":
        scan = scan_images(paths)
        pixels = [scan.pixels[p] for p in paths]
    t = build_transforms((16, 16), train=True) if transform == "train" else None
    return GrayImageFolder([(p, i % 2) for i, p in enumerate(paths)], t, wide=wide, pixels=pixels)


def _attach(datasets, gib, *, workers: int = 0, **kw) -> str:
    """attach_caches on a training loader for each dataset (with ``workers``: none start until one is iterated)."""
    return attach_caches([make_loader(d, 4, train=True, workers=workers) for d in datasets], gib, **kw)


class TestImageCache:
    def test_room_in_order_for_each_that_still_fits(self):
        cache = ImageCache([100, 64, 200, 10], budget=ALIGN * 4)  # 128 + 64 fit; 200 (256) would not; 10 (64) does
        assert cache.slots == 3 and cache.reserved == 256
        assert cache.offsets == [0, 128, 192, 192] and cache.nbytes == [100, 64, 0, 10]
        assert not cache.put(2, torch.zeros(1, 10, 20, dtype=torch.uint8))
        assert cache.put(3, torch.zeros(1, 2, 5, dtype=torch.uint8))

    def test_slots_are_aligned_for_float32(self):
        cache = ImageCache([3, 4 * 5, 4 * 7], budget=1 << 20)
        assert all(o % ALIGN == 0 for o in cache.offsets)
        img = torch.rand(1, 1, 7)
        assert cache.put(2, img)
        torch.testing.assert_close(cache.get(2), img, rtol=0, atol=0)

    def test_a_sample_of_unknown_size_is_never_kept_the_next_ones_are(self):
        cache = ImageCache([4, 0, 4], budget=1 << 20)
        assert cache.slots == 2 and cache.offsets == [0, ALIGN, ALIGN]
        assert not cache.put(1, torch.zeros(1, 0, 0, dtype=torch.uint8))
        assert cache.put(2, torch.zeros(1, 2, 2, dtype=torch.uint8)) and cache.get(1) is None

    @pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
    def test_round_trip_keeps_shape_dtype_and_values(self, dtype):
        img = (torch.rand(1, 5, 3) * 255).to(dtype)
        cache = ImageCache([15 * img.element_size()], budget=1 << 20)
        assert cache.get(0) is None and cache.kept() == 0
        assert cache.put(0, img) and cache.kept() == 1
        got = cache.get(0)
        assert got.dtype == dtype and got.shape == (1, 5, 3)
        torch.testing.assert_close(got, img, rtol=0, atol=0)

    def test_get_is_a_copy(self):
        """A transform that works in place must not change what the next epoch reads."""
        cache = ImageCache([4], budget=1 << 20)
        cache.put(0, torch.full((1, 2, 2), 7, dtype=torch.uint8))
        cache.get(0).zero_()
        assert cache.get(0).sum().item() == 28

    def test_what_is_not_kept(self):
        cache = ImageCache([4, 4], budget=ALIGN)  # one slot
        assert not cache.put(1, torch.zeros(1, 2, 2, dtype=torch.uint8))  # no room
        assert not cache.put(0, torch.zeros(1, 3, 2, dtype=torch.uint8))  # another size than the header said
        assert not cache.put(0, torch.zeros(1, 1, 2, dtype=torch.int16))  # 4 bytes, of a dtype it does not keep
        assert not cache.put(0, torch.zeros(2, 1, 2, dtype=torch.uint8))  # not one channel
        assert cache.kept() == 0
        assert cache.put(0, torch.zeros(1, 2, 2, dtype=torch.uint8))
        assert not cache.put(0, torch.ones(1, 2, 2, dtype=torch.uint8))  # a slot is written once
        assert cache.get(0).sum().item() == 0 and cache.get(1) is None and cache.get(5) is None
        assert cache.get(-1) is None and not cache.put(-1, torch.zeros(1, 2, 2, dtype=torch.uint8))

    def test_shared(self):
        cache = ImageCache([4, 4], budget=1 << 20, shared=True)
        assert cache.arena.is_shared() and cache.filled.is_shared() and cache.shapes.is_shared()
        assert cache.reserved == 2 * ALIGN
        cache.put(0, torch.arange(4, dtype=torch.uint8).view(1, 2, 2))
        assert cache.get(0).flatten().tolist() == [0, 1, 2, 3] and cache.get(1) is None


class TestParseBudget:
    @pytest.mark.parametrize("text, value", [("auto", None), ("AUTO", None), ("off", 0.0), ("0", 0.0),
                                             ("1.5", 1.5), (" 2 ", 2.0)])
    def test_values(self, text, value):
        assert parse_budget(text) == value

    @pytest.mark.parametrize("text", ["-1", "lots", "nan", "inf", ""])
    def test_bad_values(self, text):
        with pytest.raises(argparse.ArgumentTypeError, match="auto, off or a number of GiB"):
            parse_budget(text)

    def test_train_py_usage_error(self, capsys):
        with pytest.raises(SystemExit) as e:
            train.get_args_parser().parse_args(["--ram-cache", "lots"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--ram-cache" in err and "must be auto, off or a number of GiB" in err


class TestAttachCaches:
    def test_the_budget_goes_to_the_first_dataset_first(self, tmp_path):
        train = _dataset(_pngs(tmp_path / "a", [(8, 8)] * 4))
        val = _dataset(_pngs(tmp_path / "b", [(8, 8)] * 4))
        line = _attach([train, val], 6 * ALIGN / 2**30)
        assert (train.cache.slots, val.cache.slots) == (4, 2)
        assert "4 of 4, 2 of 4 images" in line and "--ram-cache" in line

    def test_auto_is_a_share_of_the_available_memory_over_the_processes(self, tmp_path, monkeypatch):
        ds = _dataset(_pngs(tmp_path, [(8, 8)] * 4))
        monkeypatch.setattr(cache_module, "available_memory", lambda: 2 * ALIGN * 4 * 2)  # 2 slots: a quarter, 2 procs
        line = _attach([ds], None, processes=2)
        assert ds.cache.slots == 2 and "auto: 25%" in line and "over 2 processes" in line

    def test_unknown_available_memory_is_off(self, tmp_path, monkeypatch):
        ds = _dataset(_pngs(tmp_path, [(8, 8)]))
        monkeypatch.setattr(cache_module, "available_memory", lambda: None)
        assert "off (auto: the available memory is unknown" in _attach([ds], None)
        assert ds.cache is None

    def test_off(self, tmp_path):
        ds = _dataset(_pngs(tmp_path, [(8, 8)]))
        assert _attach([ds], 0.0).startswith("ram cache: off (asked for)") and ds.cache is None

    def test_one_epoch_keeps_nothing(self, tmp_path):
        ds = _dataset(_pngs(tmp_path, [(8, 8)]))
        assert _attach([ds], None, epochs=1) == "ram cache: not needed (one epoch left: each image is read once)"
        assert ds.cache is None

    def test_nothing_to_keep(self, tmp_path):
        assert _attach([list(range(4))], None) == "ram cache: not needed (no image is decoded from a file)"
        ds = _dataset(_pngs(tmp_path, [(8, 8)]), pixels=None)
        assert _attach([ds], None) == "ram cache: none (no image sizes known)"

    def test_workers_share_it_within_half_of_dev_shm(self, tmp_path, monkeypatch):
        ds = _dataset(_pngs(tmp_path, [(8, 8)] * 4))
        monkeypatch.setattr(cache_module, "_shared_memory_room", lambda: 8 * ALIGN)
        line = _attach([ds], 1.0, workers=2)
        assert ds.cache.arena.is_shared() and ds.cache.slots == 4 and "half of /dev/shm" in line
        line = _attach([ds], 1.0, workers=2, processes=2)  # each training process: half of that half
        assert ds.cache.slots == 2 and line.endswith("half of /dev/shm's free 0.00 GiB, over 2 processes)")

    def test_shared_memory_refused_is_off_for_every_dataset(self, tmp_path, monkeypatch):
        train, val = _dataset(_pngs(tmp_path / "a", [(8, 8)])), _dataset(_pngs(tmp_path / "b", [(8, 8)]))
        real, calls = torch.UntypedStorage._new_shared, []

        def refused_the_second_time(n):
            calls.append(n)
            if len(calls) > 1:
                raise RuntimeError("unable to allocate shared memory(shm)")
            return real(n)

        monkeypatch.setattr(torch.UntypedStorage, "_new_shared", refused_the_second_time)
        line = _attach([train, val], 1.0, workers=2)
        assert line == ("ram cache: off (shared memory for 2 workers could not be had: unable to allocate shared "
                        "memory(shm))")
        assert train.cache is None and val.cache is None and len(calls) == 2

    def test_an_evaluation_loader_keeps_its_ranks_share(self, tmp_path):
        """Under torchrun each rank evaluates every world_size-th image: it keeps those alone."""
        val = _dataset(_pngs(tmp_path, [(8, 8)] * 5))
        line = attach_caches([make_loader(val, 4, train=False, workers=0, world_size=2, rank=1)], 1.0)
        assert [n > 0 for n in val.cache.nbytes] == [False, True, False, True, False]
        assert val.cache.reserved == 2 * ALIGN and "2 of 2 images" in line

    def test_the_whole_line(self, tmp_path):
        a = _dataset(_pngs(tmp_path / "a", [(8, 8)] * 3))
        b = _dataset(_pngs(tmp_path / "b", [(8, 8)] * 2))
        assert _attach([a, b], 1.0) == ("ram cache: 3 of 3, 2 of 2 images kept after their first read, "
                                               "0.0 MiB at most (--ram-cache 1 GiB)")


class TestAvailableMemory:
    def _files(self, tmp_path, monkeypatch, meminfo_kb: int, limit: str | None, usage: int | None):
        (tmp_path / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kb} kB\n")
        paths = {"/proc/meminfo": tmp_path / "meminfo"}
        if limit is not None:
            (tmp_path / "max").write_text(limit + "\n")
            (tmp_path / "current").write_text(f"{usage}\n")
            paths |= {"/sys/fs/cgroup/memory.max": tmp_path / "max",
                      "/sys/fs/cgroup/memory.current": tmp_path / "current"}
        real_open = open

        def fake_open(path, *a, **k):
            if str(path) in paths:
                return real_open(paths[str(path)], *a, **k)
            if str(path).startswith(("/proc/meminfo", "/sys/fs/cgroup")):
                raise FileNotFoundError(path)
            return real_open(path, *a, **k)

        monkeypatch.setattr("builtins.open", fake_open)

    def test_the_hosts_available_memory(self, tmp_path, monkeypatch):
        self._files(tmp_path, monkeypatch, 4096, None, None)
        assert cache_module.available_memory() == 4096 * 1024

    def test_a_containers_limit_bounds_it(self, tmp_path, monkeypatch):
        self._files(tmp_path, monkeypatch, 4096, str(3000 * 1024), 1000 * 1024)
        assert cache_module.available_memory() == 2000 * 1024

    def test_no_limit(self, tmp_path, monkeypatch):
        self._files(tmp_path, monkeypatch, 4096, "max", 1000 * 1024)
        assert cache_module.available_memory() == 4096 * 1024


class TestScanPixels:
    def test_png_pixels_from_the_header(self, tmp_path):
        paths = _pngs(tmp_path, [(5, 7), (3, 2)])
        (tmp_path / "bad.png").write_bytes(b"not a png")
        scan = scan_images([*paths, str(tmp_path / "bad.png")])
        assert scan.pixels == {paths[0]: 35, paths[1]: 6}

    def test_dicom_pixels_from_the_header(self):
        pydicom = pytest.importorskip("pydicom")
        path = pydicom.data.get_testdata_file("CT_small.dcm")
        ds = pydicom.dcmread(path)
        assert scan_images([path]).pixels == {path: ds.Rows * ds.Columns}


class TestCachedDataset:
    @pytest.mark.parametrize("bits, wide", [(8, False), (16, True)])
    def test_later_epochs_read_memory_and_give_the_same_images(self, tmp_path, monkeypatch, bits, wide):
        paths = _pngs(tmp_path, [(20, 24), (24, 20), (30, 30)], bits=bits)
        plain, cached = _dataset(paths, wide=wide), _dataset(paths, wide=wide)
        _attach([cached], 1.0)
        first = [cached[(i, 100 + i)] for i in range(3)]
        assert cached.cache.kept() == 3
        assert cached.cache.get(0).dtype == (torch.float32 if wide else torch.uint8)

        def no_file(*a, **k):
            raise AssertionError("a kept image was read from its file")

        monkeypatch.setattr(data_module, "read_gray", no_file)
        for i in range(3):
            again = cached[(i, 100 + i)]
            torch.testing.assert_close(again[0], first[i][0], rtol=0, atol=0)
            assert again[1:] == first[i][1:]
        monkeypatch.undo()
        for i in range(3):  # and what an uncached dataset gives
            torch.testing.assert_close(plain[(i, 100 + i)][0], first[i][0], rtol=0, atol=0)

    def test_a_file_that_changed_since_the_scan_is_read_each_time(self, tmp_path):
        paths = _pngs(tmp_path, [(8, 8), (8, 8)])
        ds = _dataset(paths, transform=None)
        _attach([ds], 1.0)
        _pngs(tmp_path, [(9, 9)])  # 0.png is now 9x9
        assert ds[0][0].shape == (1, 9, 9) and ds[1][0].shape == (1, 8, 8)
        assert ds.cache.get(0) is None and ds.cache.kept() == 1

    def test_unreadable_is_still_skipped(self, tmp_path):
        paths = _pngs(tmp_path, [(8, 8)])
        ds = _dataset(paths, transform=None)
        _attach([ds], 1.0)
        open(paths[0], "wb").close()
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            assert ds[0] is None
        assert ds.cache.kept() == 0

    def test_pixel_counts_must_match_the_samples(self, tmp_path):
        with pytest.raises(ValueError, match="2 pixel counts for 1 samples"):
            GrayImageFolder([("a.png", 0)], pixels=[1, 2])

    def test_loader_workers_fill_one_cache_and_batches_are_unchanged(self, tmp_path):
        """Two worker processes fill the shared arena in the first epoch; the second epoch's batches equal an
        uncached loader's."""
        paths = _pngs(tmp_path, [(12 + i % 3, 12) for i in range(12)])
        plain, cached = _dataset(paths), _dataset(paths)
        loaders = [make_loader(d, 4, train=True, workers=2, seed=3) for d in (plain, cached)]
        attach_caches(loaders[1:], 1.0)
        for epoch in range(2):
            batches = []
            for loader in loaders:
                set_loader_epoch(loader, epoch, seed=3)
                batches.append([b.images for b in loader])
            for a, b in zip(*batches, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            if epoch == 0:
                assert cached.cache.kept() == 12  # seen here, in the main process: the workers wrote shared memory


class TestTrainPy:
    def test_cached_run_equals_uncached(self, digits, tmp_path):  # noqa: F811 - digits is the fixture
        out = io.StringIO()
        with redirect_stdout(out):
            run("--data", digits, "--epochs", "2", "--output", tmp_path / "cached", *FAST)
        # every train and every val image has room (the digits are 8x8)
        assert re.search(r"^ram cache: (\d+) of \1, (\d+) of \2 images kept after their first read", out.getvalue(),
                         re.MULTILINE)
        run("--data", digits, "--epochs", "2", "--output", tmp_path / "plain", "--ram-cache", "off", *FAST)
        assert_same_run(tmp_path / "cached", tmp_path / "plain")
        # config.json's command can be typed again: the default is left out, "off" is written as 0
        commands = [json.loads((tmp_path / r / "config.json").read_text())["resolved"]["command"]
                    for r in ("cached", "plain")]
        assert "--ram-cache" not in commands[0] and "--ram-cache 0.0" in commands[1]
        assert train.get_args_parser().parse_args(shlex.split(commands[1])[2:]).ram_cache == 0.0
