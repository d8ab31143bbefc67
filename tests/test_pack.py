"""Packed datasets: written once, read as the files are, stale when the source changes, never half-written."""

import contextlib
import csv
import io
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import train
from gray_effnet import DataError, GrayEfficientNet, InputError, save_weights
from gray_effnet.__main__ import main as gray_main
from gray_effnet.augment import BatchAugment, RandomResizedCrop, _rotate, build_transforms, crop_box
from gray_effnet.checkpoint import read_checkpoint
from gray_effnet.data import GrayImageFolder, collate, make_loader, set_loader_epoch
from gray_effnet.folders import load_folder
from gray_effnet.images import UnreadableImageWarning, read_gray
from gray_effnet.pack import WRITTEN, PackedDataset, has_pack_json, is_pack, open_pack, validate_pack_meta, write_pack
from gray_effnet.sources import Augmentation, open_source
from gray_effnet.table_options import TableOptions

from .helpers import tree_digest
from .test_train import FAST, assert_same_run, metrics

# Two classes that differ: a bright and a dark blob, so that a model can tell them apart.
SIZE = (32, 32)


def write_images(root: Path, counts: dict[str, int], size=(40, 48), bits: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    hi = 255 if bits == 8 else 65535
    dtype = np.uint8 if bits == 8 else np.uint16
    for k, (cls, n) in enumerate(counts.items()):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = rng.integers(0, hi // 2, size).astype(np.int64) + k * (hi // 3)
            Image.fromarray(np.clip(a, 0, hi).astype(dtype)).save(root / cls / f"{i:03d}.png")
    return root


@pytest.fixture
def folder8(tmp_path) -> Path:
    return write_images(tmp_path / "src8", {"a": 6, "b": 5})


@pytest.fixture
def folder16(tmp_path) -> Path:
    return write_images(tmp_path / "src16", {"a": 6, "b": 5}, bits=16)


def pack_of(src: Path, out: Path, **kwargs):
    return write_pack(src, out, kwargs.pop("img_size", SIZE), progress=False, workers=2, **kwargs)


def files_val(src: Path, size=SIZE) -> tuple[list, GrayImageFolder]:
    folder = load_folder(src)
    return folder, GrayImageFolder(folder.val, build_transforms(size, train=False), wide=folder.scan.wide)


class TestWritePack:
    def test_8bit_val_equals_files_bitwise(self, folder8, tmp_path):
        pack = pack_of(folder8, tmp_path / "p")
        assert pack.dtype == "uint8" and is_pack(tmp_path / "p")
        folder, files = files_val(folder8)
        assert (pack.classes, pack.train, pack.val) == (folder.classes, folder.train, folder.val)
        packed = PackedDataset(pack, "val")
        assert len(packed) == len(files) > 0
        for i in range(len(files)):
            (x, y, p), (fx, fy, fp) = packed[i], files[i]
            assert x.dtype == fx.dtype == torch.uint8 and (y, p) == (fy, fp)
            assert torch.equal(x, fx)

    def test_16bit_within_uint16_rounding(self, folder16, tmp_path):
        pack = pack_of(folder16, tmp_path / "p", img_size=(24, 20))  # non-square
        assert pack.dtype == "uint16"
        _, files = files_val(folder16, (24, 20))
        packed = PackedDataset(pack, "val")
        for i in range(len(files)):
            x, fx = packed[i][0], files[i][0]
            assert x.dtype == fx.dtype == torch.float32 and x.shape == fx.shape == (1, 24, 20)
            assert (x - fx).abs().max().item() <= 0.5 / 65535 + 1e-7

    def test_float16_and_uint8_refused_for_deep_data(self, folder16, tmp_path):
        pack = pack_of(folder16, tmp_path / "f", dtype="float16")
        assert np.load(pack.root / "images.npy", mmap_mode="r").dtype == np.float16
        _, files = files_val(folder16)
        torch.testing.assert_close(PackedDataset(pack, "val")[0][0], files[0][0], atol=1e-3, rtol=0)
        with pytest.raises(InputError, match="deeper than 8 bit .*use --dtype uint16 or float16"):
            pack_of(folder16, tmp_path / "u", dtype="uint8")

    def test_bad_files_skipped_and_named(self, folder8, tmp_path):
        (folder8 / "a" / "empty.png").write_bytes(b"")
        with pytest.warns(UnreadableImageWarning, match="empty.png"):
            pack = pack_of(folder8, tmp_path / "p")
        assert [Path(p).name for p, _ in pack.scan.bad] == ["empty.png"]
        meta = json.loads((tmp_path / "p" / "pack.json").read_text())
        assert meta["skipped"][0][0] == os.path.join("a", "empty.png") and "Error" in meta["skipped"][0][1]
        assert len(pack.train) + len(pack.val) == 11

    def test_decode_failure_at_pack_time_skipped(self, folder8, tmp_path, monkeypatch):
        """A file that passes the header scan but fails to decode (truncated) is skipped and named too."""
        import gray_effnet.pack as pack_module

        real = pack_module.read_gray

        def flaky(path, *a, **k):
            if path.endswith("001.png"):
                raise OSError("image file is truncated")
            return real(path, *a, **k)

        monkeypatch.setattr(pack_module, "read_gray", flaky)
        with pytest.warns(UnreadableImageWarning, match="001.png"):
            pack = pack_of(folder8, tmp_path / "p")
        assert sorted(Path(p).name for p, _ in pack.scan.bad) == ["001.png", "001.png"]
        assert len(pack.train) + len(pack.val) == 9
        assert all(not p.endswith("001.png") for p in PackedDataset(pack, "all").paths)

    def test_strict_refuses(self, folder8, tmp_path):
        (folder8 / "b" / "empty.png").write_bytes(b"")
        with pytest.raises(DataError, match="--strict-data: 1 unreadable"):
            pack_of(folder8, tmp_path / "p", strict=True)
        assert not (tmp_path / "p").exists()

    def test_refuses_to_replace_a_folder_that_is_not_a_pack(self, folder8, tmp_path):
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep me")
        with pytest.raises(DataError, match="exists and is not a pack"):
            pack_of(folder8, tmp_path / "mine")
        assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


class TestAtomic:
    def _crash_midway(self, monkeypatch):
        import gray_effnet.pack as pack_module

        calls = {"n": 0}
        real = pack_module._store

        def crash(*a, **k):
            calls["n"] += 1
            if calls["n"] == 4:
                raise KeyboardInterrupt  # as Ctrl-C would, halfway through the images
            return real(*a, **k)

        monkeypatch.setattr(pack_module, "_store", crash)

    def test_interrupted_leaves_no_pack(self, folder8, tmp_path, monkeypatch):
        self._crash_midway(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            pack_of(folder8, tmp_path / "p")
        assert not is_pack(tmp_path / "p") and not (tmp_path / "p").exists()
        assert sorted(os.listdir(tmp_path)) == ["src8"]  # no partial folder left either

    def test_interrupted_keeps_the_older_pack(self, folder8, tmp_path, monkeypatch):
        old = pack_of(folder8, tmp_path / "p")
        before = (tmp_path / "p" / "pack.json").read_text()
        self._crash_midway(monkeypatch)
        with pytest.raises(KeyboardInterrupt):
            pack_of(folder8, tmp_path / "p", img_size=(40, 40))
        assert (tmp_path / "p" / "pack.json").read_text() == before
        assert open_pack(tmp_path / "p").img_size == old.img_size
        monkeypatch.undo()
        assert pack_of(folder8, tmp_path / "p", img_size=(40, 40)).img_size == (40, 40)  # replaced when complete
        assert sorted(os.listdir(tmp_path)) == ["p", "src8"]

    def test_leftover_partial_is_never_read_and_is_cleaned(self, folder8, tmp_path):
        """A partial folder of a killed process (its pid gone) is not a pack, and the next pack removes it."""
        pack_of(folder8, tmp_path / "p")
        leftover = tmp_path / "p.partial-999999999"
        shutil.copytree(tmp_path / "p", leftover)
        (leftover / "pack.json").unlink()  # a partial folder never has pack.json: it is written last
        assert not is_pack(leftover)
        with pytest.raises(DataError, match="is not a pack"):
            open_pack(leftover)
        pack_of(folder8, tmp_path / "p")
        assert not leftover.exists()


class TestStale:
    @pytest.fixture
    def packed(self, folder8, tmp_path):
        pack_of(folder8, tmp_path / "p")
        return folder8, tmp_path / "p"

    def test_fresh(self, packed):
        assert "unchanged since packing" in open_pack(packed[1]).note

    @pytest.mark.parametrize("change, counts", [
        ("touch", "1 modified"), ("rewrite", "1 modified"), ("add", "1 added"), ("remove", "1 removed"),
    ])
    def test_changed_source_is_refused(self, packed, change, counts):
        src, p = packed
        target = src / "a" / "002.png"
        if change == "touch":
            st = target.stat()
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        elif change == "rewrite":
            Image.fromarray(np.zeros((40, 48), np.uint8)).save(target)
        elif change == "add":
            shutil.copy(target, src / "b" / "new.png")
        else:
            target.unlink()
        source = re.escape(str(src.resolve()))
        refresh = rf"refresh it with: python -m gray_effnet pack --data {source} --img-size 32 32"
        with pytest.raises(DataError, match=rf"is stale: .* were {counts} \(.*\.png\); {refresh}"):
            open_pack(p)
        assert open_pack(p, check_stale=False).note == "staleness not checked"

    def test_counts_several(self, packed):
        src, p = packed
        for name in ("x.png", "y.png"):
            shutil.copy(src / "a" / "000.png", src / "a" / name)
        (src / "b" / "000.png").unlink()
        with pytest.raises(DataError, match=r"2 added \(a/x.png, a/y.png\); 1 removed \(b/000.png\)"):
            open_pack(p)

    def test_source_gone_is_a_note(self, packed):
        src, p = packed
        shutil.rmtree(src)
        pack = open_pack(p)
        assert "is gone: could not check whether the pack is stale" in pack.note
        assert len(PackedDataset(pack, "train")) == len(pack.train)


class TestPackedLoader:
    def test_batches_match_items_in_sampler_order(self, folder16, tmp_path):
        pack = pack_of(folder16, tmp_path / "p")
        ds = PackedDataset(pack, "train")
        loader = make_loader(ds, 4, train=True, workers=0, seed=3)
        set_loader_epoch(loader, 1, 3)
        order = list(loader.sampler)
        got = [b for b in loader]
        images = torch.cat([b.images for b in got])
        paths = [p for b in got for p in b.paths]
        want = collate([ds[i] for i in order[:len(paths)]])
        assert paths == want.paths and torch.equal(images, want.images)
        assert torch.equal(torch.cat([b.targets for b in got]), want.targets)

    def test_workers_do_not_copy_the_array(self, folder8, tmp_path):
        import pickle

        ds = PackedDataset(pack_of(folder8, tmp_path / "p"), "train")
        ds[0]  # opens the memory map
        assert len(pickle.dumps(ds)) < 4096 + 200 * len(ds)
        loader = make_loader(ds, 4, train=False, workers=1)
        assert sum(len(b.paths) for b in loader) == len(ds)


class TestBatchAugment:
    def test_shape_dtype_range(self):
        x = torch.randint(0, 256, (5, 1, 40, 30), dtype=torch.uint8)
        y = BatchAugment((24, 20), crop_scale=0.5, hflip=0.5, rotate=15)(x)
        assert y.shape == (5, 1, 24, 20) and y.dtype == torch.float32
        assert 0 <= y.min().item() and y.max().item() <= 1

    def test_crop_scale_one_keeps_the_image(self):
        """scale (1, 1) and a square image: the crop is the whole image, at any aspect ratio draw it fits."""
        x = torch.rand(3, 1, 16, 16)
        torch.testing.assert_close(BatchAugment((16, 16), crop_scale=1.0)(x), x, atol=1e-5, rtol=0)

    def test_hflip_mirrors_left_and_right(self):
        """A bright left half, flipped for sure with the whole image kept: it ends on the right, rows unchanged."""
        x = torch.zeros(3, 1, 16, 16)
        x[..., :8] = 1.0
        y = BatchAugment((16, 16), crop_scale=1.0, hflip=1.0)(x)
        torch.testing.assert_close(y, x.flip(-1), atol=1e-5, rtol=0)
        assert y[..., 8:].min() > 0.99 and y[..., :8].max() < 0.01  # not a vertical flip, which would change nothing

    @pytest.mark.parametrize("kw", [{"crop_scale": 0.4, "hflip": 0.3, "rotate": 12.0},
                                    {"crop_scale": 0.8, "hflip": 0.0, "rotate": 0.0}])
    def test_same_ranges_as_the_files_path(self, kw):
        """The pack path (per batch) and the files path (torchvision, per image): the same steps, each with the same
        ranges, read from the transforms themselves."""
        size = (24, 20)
        files = build_transforms(size, train=True, **kw).transforms
        names = ["RandomResizedCrop"] + ["RandomHorizontalFlip"] * (kw["hflip"] > 0) + ["RandomRotation"] * (
            kw["rotate"] > 0)
        assert [type(t).__name__ for t in files] == names
        batch = BatchAugment(size, **kw)
        assert tuple(files[0].size) == batch.size == size
        assert tuple(files[0].scale) == batch.scale == (kw["crop_scale"], 1.0)
        assert batch.ratio == pytest.approx(files[0].ratio) == (3 / 4, 4 / 3)
        if kw["hflip"]:
            assert files[1].p == batch.hflip == kw["hflip"]
        if kw["rotate"]:
            assert list(files[-1].degrees) == [-batch.rotate, batch.rotate] == [-kw["rotate"], kw["rotate"]]

    @pytest.mark.parametrize("shape", [(40, 30), (30, 40), (12, 40)])
    def test_boxes_are_drawn_as_torchvision_draws_them(self, shape):
        """Many boxes each way: the same means of top, left, height and width (within 4 standard errors), and the
        same share of centre-crop fallbacks. (12, 40) is wider than the widest aspect ratio, so falls back often."""
        h, w = shape
        n = 4000
        ours = BatchAugment((8, 8), crop_scale=0.3).crop_boxes(n, h, w, torch.Generator().manual_seed(0))
        ours = torch.stack([ours[:, 1], ours[:, 0], ours[:, 3] - ours[:, 1], ours[:, 2] - ours[:, 0]], 1)
        crop = v2.RandomResizedCrop((8, 8), scale=(0.3, 1.0))
        torch.manual_seed(0)
        x = torch.zeros(1, h, w)
        theirs = torch.tensor([list(crop.make_params([x]).values()) for _ in range(n)], dtype=torch.float64)
        assert ((ours[:, :2] >= 0) & (ours[:, 2:] > 0)).all()
        assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
        se = (ours.var(0) / n + theirs.var(0) / n).sqrt()
        assert ((ours.mean(0) - theirs.mean(0)).abs() <= 4 * se + 1e-9).all(), (ours.mean(0), theirs.mean(0))
        full = [(boxes[:, 2] == h).double().mean().item() for boxes in (ours, theirs)]  # mostly the fallback
        assert full[0] == pytest.approx(full[1], abs=0.03)

    def test_a_crop_equals_torchvisions_antialiased_resized_crop_of_its_box(self):
        """The files path's crop (v2 ``resized_crop``, antialias) of the very box the batch drew, down and up."""
        x = torch.rand(6, 1, 40, 30)
        for size in ((24, 20), (56, 48)):
            aug = BatchAugment(size, crop_scale=0.3, hflip=0.5)
            aug.set_epoch(3)
            y = aug(x)
            aug.set_epoch(3)  # the same step's parameters again
            gen = torch.Generator().manual_seed(
                int(np.random.SeedSequence([aug.seed, 3, 0]).generate_state(1)[0]))
            boxes = aug.crop_boxes(6, 40, 30, gen)
            flips = torch.rand(6, generator=gen) < 0.5
            assert 0 < flips.sum() < 6  # both kinds in the batch
            for b in range(6):
                left, top, right, bottom = (int(v) for v in boxes[b])
                ref = TF.resized_crop(x[b], top, left, bottom - top, right - left, list(size), antialias=True)
                ref = ref.flip(-1) if flips[b] else ref
                torch.testing.assert_close(y[b], ref, atol=1e-5, rtol=0)

    def test_rotation_turns_about_the_centre(self):
        x = torch.rand(2, 1, 9, 9)
        torch.testing.assert_close(_rotate(x, torch.tensor([180.0, 0.0])), torch.stack([x[0].flip(-1, -2), x[1]]),
                                   atol=1e-5, rtol=0)
        quarter = _rotate(x[:1], torch.tensor([90.0]))
        assert any(torch.allclose(quarter, x[:1].rot90(k, (-2, -1)), atol=1e-5) for k in (1, 3))
        wide = torch.rand(1, 1, 6, 10)  # not square: a half turn is still exact
        torch.testing.assert_close(_rotate(wide, torch.tensor([180.0])), wide.flip(-1, -2), atol=1e-5, rtol=0)

    def test_depends_only_on_seed_epoch_step(self):
        x = torch.rand(4, 1, 32, 32)

        def run(seed, epoch, steps=2):
            aug = BatchAugment((32, 32), crop_scale=0.5, hflip=0.5, rotate=20, seed=seed)
            aug.set_epoch(epoch)
            return [aug(x) for _ in range(steps)]

        a, b = run(0, 1), run(0, 1)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        assert not torch.equal(a[0], a[1])  # each step its own parameters
        assert not torch.equal(a[0], run(0, 2)[0]) and not torch.equal(a[0], run(1, 1)[0])
        assert not torch.equal(a[0][0], a[0][1])  # each image its own parameters

    @pytest.mark.cuda
    @pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
    def test_on_cuda_nothing_waits_for_the_device_and_the_crops_are_the_cpus(self, monkeypatch):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
        x = torch.randint(0, 256, (8, 1, 40, 30), dtype=torch.uint8)
        kw = {"crop_scale": 0.4, "hflip": 0.5, "rotate": 10.0, "seed": 4}
        on_cpu = BatchAugment((24, 20), **kw)(x)
        on_gpu = x.cuda()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # a read-back or a blocking copy raises
        try:
            y = BatchAugment((24, 20), **kw)(on_gpu)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(y.cpu(), on_cpu, atol=1e-4, rtol=0)

    def test_global_rng_untouched(self):
        x = torch.rand(2, 1, 16, 16)
        torch.manual_seed(5)
        state = torch.random.get_rng_state()
        BatchAugment((16, 16), crop_scale=0.5, hflip=0.5, rotate=10)(x)
        assert torch.equal(torch.random.get_rng_state(), state)


def run(*argv) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        train.main(train.get_args_parser().parse_args([str(a) for a in argv]))
    return printed.getvalue()


PACK_FAST = [a for a in FAST if a not in ("--img-size", "32")]  # a pack gives the size


@pytest.fixture(scope="module")
def trained_on_pack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packrun")
    src = write_images(tmp / "src", {"dark": 12, "bright": 12}, bits=16)
    pack_of(src, tmp / "pack")
    printed = run("--data", tmp / "pack", "--epochs", "1", "--output", tmp / "run", "--no-pretrained",
                  "--hflip", "0.5", *PACK_FAST)
    return tmp, printed


class TestRandomResizedCrop:
    """The files path's crop: BatchAugment's box rule for one image, v2's resize, and the same random source."""

    @pytest.mark.parametrize("shape", [(40, 30), (30, 40), (12, 40), (28, 28), (1, 1)])
    def test_box_is_the_batch_paths_box_from_the_same_generator_state(self, shape):
        """(12, 40) falls back to the centre crop often: that branch is compared too."""
        h, w = shape
        batch = BatchAugment((8, 8), crop_scale=0.3)
        fallbacks = 0
        for seed in range(200):
            boxes = batch.crop_boxes(1, h, w, torch.Generator().manual_seed(seed))
            left, top, right, bottom = (int(v) for v in boxes[0])
            box = crop_box(h, w, batch.scale, generator=torch.Generator().manual_seed(seed))
            assert box == (top, left, bottom - top, right - left), seed
            fallbacks += box[2] == h
        if shape == (12, 40):
            assert fallbacks > 50

    def test_a_plain_tensor_is_v2s_resized_crop_of_the_box_drawn(self):
        x = torch.randint(0, 256, (1, 40, 30), dtype=torch.uint8)
        crop = RandomResizedCrop((24, 20), scale=(0.3, 1.0), antialias=True)
        for seed in range(20):
            torch.manual_seed(seed)
            top, left, h, w = crop_box(40, 30, crop.scale, crop.ratio)
            torch.manual_seed(seed)
            y = crop(x)
            assert y.dtype == torch.uint8 and y.shape == (1, 24, 20)
            torch.testing.assert_close(y, TF.resized_crop(x, top, left, h, w, [24, 20], antialias=True), rtol=0, atol=0)

    def test_a_tv_tensor_goes_through_v2_with_the_same_result(self):
        from torchvision import tv_tensors

        x = torch.rand(1, 33, 47)
        crop = RandomResizedCrop((16, 16), scale=(0.5, 1.0), antialias=True)
        torch.manual_seed(3)
        plain = crop(x)
        torch.manual_seed(3)
        wrapped = crop(tv_tensors.Image(x))
        assert isinstance(wrapped, tv_tensors.Image)
        torch.testing.assert_close(wrapped.as_subclass(torch.Tensor), plain, rtol=0, atol=0)

    def test_draws_from_the_global_generator_as_the_per_sample_seeds_expect(self):
        """GrayImageFolder seeds torch's global generator per sample: the same seed, the same crop; another, not."""
        x = torch.rand(1, 64, 64)
        crop = build_transforms((16, 16), train=True, crop_scale=0.3)
        outs = []
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            outs.append(crop(x))
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        assert not torch.equal(outs[0], outs[2])


class TestTrainOnPack:
    def test_one_epoch(self, trained_on_pack):
        tmp, printed = trained_on_pack
        assert f"data: {tmp / 'pack'}: pack of {tmp / 'src'}, uint16, source" in printed
        assert "unchanged since packing" in printed and "float32 batches" in printed
        _, meta = read_checkpoint(tmp / "run" / "last.safetensors")
        assert meta["img_size"] == list(SIZE) and meta["class_names"] == ["bright", "dark"]
        assert len(metrics(tmp / "run")) == 1

    def test_other_img_size_refused(self, trained_on_pack):
        tmp, _ = trained_on_pack
        with pytest.raises(InputError, match="--img-size 40 40: the pack .* holds 32x32 images"):
            run("--data", tmp / "pack", "--output", tmp / "x", *PACK_FAST, "--img-size", "40", "40")

    def test_evaluate_and_predict(self, trained_on_pack, capsys):
        tmp, _ = trained_on_pack
        weights = tmp / "run" / "best.safetensors"
        # Pinned as the training run was: a timing probe or another thread count could flip a near tie.
        printed = run("--evaluate", "--weights", weights, "--data", tmp / "pack", "--output", tmp / "ev",
                      "--workers", "0", "--no-progress", "--channels-last", "off", "--threads", "1")
        val_acc = float(metrics(tmp / "run")[0]["val_acc"])
        n_val = len(open_pack(tmp / "pack").val)
        assert f"accuracy {val_acc:.4f} on {n_val} images" in printed and n_val == 4
        out = tmp / "pred.csv"
        assert gray_main(["predict", "--weights", str(weights), "--data", str(tmp / "pack"), "--output",
                          str(out)]) == 0
        assert "on 24 images" in capsys.readouterr().out
        with open(out) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 24 and all(r["target"] == Path(r["path"]).parent.name for r in rows)

    def test_resume_equals_uninterrupted(self, trained_on_pack, monkeypatch):
        tmp, _ = trained_on_pack
        full, cut = tmp / "full", tmp / "cut"
        args = ["--data", tmp / "pack", "--epochs", "2", "--no-pretrained", "--hflip", "0.5", "--rotate", "10",
                "--crop-scale", "0.5", *PACK_FAST]
        run(*args, "--output", full)

        class Crash(Exception):
            pass

        real_save = train.save_checkpoint

        def save_then_crash(*a, **k):
            real_save(*a, **k)
            raise Crash

        monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
        with pytest.raises(Crash):
            run(*args, "--output", cut)
        monkeypatch.setattr(train, "save_checkpoint", real_save)
        run(*args, "--output", cut, "--resume")
        assert_same_run(cut, full)


class TestCli:
    def test_pack_command(self, folder8, tmp_path, capsys):
        (folder8 / "a" / "broken.png").write_bytes(b"not a png")
        out = tmp_path / "p"
        assert gray_main(["pack", "--data", str(folder8), "--img-size", "32", "32", "--output", str(out),
                          "--no-progress", "--workers", "1"]) == 0
        printed = capsys.readouterr().out
        assert re.search(rf"packed 11 images of 2 classes \(a, b\) from .* into {re.escape(str(out))}: 32x32 uint8, "
                         r"\d+ train / \d+ val, [\d.]+ MB, [\d.]+s", printed), printed
        assert "skipped 1 unreadable file(s)" in printed and "broken.png: UnidentifiedImageError" in printed
        meta = json.loads((out / "pack.json").read_text())
        assert meta["command"].startswith("python -m gray_effnet") and meta["files"]

    def test_errors_are_one_line(self, tmp_path, capsys):
        assert gray_main(["pack", "--data", str(tmp_path / "nope"), "--img-size", "8", "8", "--output",
                          str(tmp_path / "p")]) == 2
        assert "does not exist" in capsys.readouterr().err

    def test_predict_refuses_another_intensity(self, folder8, tmp_path, capsys):
        pack_of(folder8, tmp_path / "p", intensity="minmax")
        model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, class_names=["a", "b"], img_size=SIZE)
        weights = save_weights(model, tmp_path / "w.safetensors")
        assert gray_main(["predict", "--weights", str(weights), "--data", str(tmp_path / "p")]) == 2
        assert "read with intensity 'minmax', this run needs 'full'" in capsys.readouterr().err


# -- pack.json is untrusted input: every field fuzzed, through the validator and through train.py ---------------
def _relabel(label):
    return lambda meta: [[meta["rows"][0][0], label], *meta["rows"][1:]]


def _repath(path):
    return lambda meta: [[path, meta["rows"][0][1]], *meta["rows"][1:]]


def _table(**change):
    """A function of pack.json: a well-formed 'table' record for its rows, with ``change`` applied (a value, a
    function of the record, or ``...`` to drop the key)."""
    def make(meta):
        path = os.path.join(meta["source"], "labels.csv")
        record = {"path": path, "size": 120, "mtime_ns": 10**18, "bad_rows": [[3, "missing file: 'x.png'"]],
                  "options": TableOptions(labels=path, label_column="y").to_json(), "test_rows": 0,
                  "split": "seeded stratified split by image, 20% of the images to val",
                  "groups": [p for p, _ in meta["rows"]]}
        for key, value in change.items():
            if value is ...:
                del record[key]
            else:
                record[key] = value(record) if callable(value) else value
        return record
    return make


def _options(**change):
    return lambda record: {**record["options"], **change}


# field -> bad values: (label, value, or a function of the written pack.json). A missing field is added below.
PACK_BAD_FIELDS: dict[str, list[tuple[str, object]]] = {
    "format": [("type", 1), ("other", "npz"), ("null", None)],
    "format_version": [("type", "2"), ("older", 1), ("newer", 3), ("zero", 0), ("bool", True)],
    "written": [("type", "images.npy"), ("extra", [*WRITTEN, "../../home"]), ("fewer", ["pack.json"])],
    "task": [("type", 1), ("null", None), ("unknown", "regression"), ("case", "Single"),
             ("multi", "multi")],  # multi-label: class indices in 'rows', and no table
    "classes": [("type", "ab"), ("empty", []), ("duplicate", ["a", "a"]), ("items", [1, 2]), ("long", ["x" * 300, "b"]),
                ("shorter", ["a"]), ("huge", [str(i) for i in range(100_001)])],
    "img_size": [("type", "32x32"), ("zero", [0, 32]), ("length", [32]), ("huge", [2**70, 1]),
                 ("bomb", [100_000, 100_000]), ("float", [32.0, 32]), ("negative", [-32, -32])],
    "dtype": [("type", 8), ("float64", "float64"), ("object", "object")],
    "dtype_requested": [("type", None), ("unknown", "int8")],
    "intensity": [("type", 12), ("unknown", "gamma"), ("long", "range:" + "1" * 1000 + ":2"), ("spaces", " full")],
    "val_split": [("type", "0.2"), ("range", 1.5), ("zero", 0), ("nan", math.nan)],
    "seed": [("type", "0"), ("huge", 2**70), ("float", 0.5)],
    "presplit": [("type", "no"), ("int", 0)],
    "source": [("type", 5), ("relative", "data/src"), ("nul", "/tmp/a\x00b"), ("long", "/" + "a" * 5000)],
    "rows": [("type", {}), ("few", lambda meta: meta["rows"][:1]), ("label-negative", _relabel(-1)),
             ("label-range", _relabel(2)), ("label-huge", _relabel(2**70)), ("label-float", _relabel(0.0)),
             ("path-absolute", _repath("/etc/passwd")), ("path-dotdot", _repath("../x.png")),
             ("item", lambda meta: ["a/000.png", *meta["rows"][1:]])],
    "train": [("type", "0"), ("empty", []), ("range", lambda meta: [len(meta["rows"])]), ("negative", [-1]),
              ("duplicate", [0, 0]), ("bool", [True])],
    "val": [("type", 0), ("range", lambda meta: [10**30]), ("negative", [-1]), ("same-as-train", lambda m: m["train"])],
    "files": [("type", []), ("value", {"a/0.png": "big"}), ("negative", {"a/0.png": [-1, 0]}),
              ("path", {"/abs.png": [1, 1]})],
    "skipped": [("type", "x"), ("item", [["a.png"]]), ("path", [["../a.png", "why"]])],
    "ignored": [("type", "x"), ("item", [1])],
    "modes": [("type", []), ("count", {"L": -1}), ("key", {"x" * 300: 1})],
    "wide_source": [("type", "yes")],
    "table": [("type", "labels.csv"), ("list", []), ("unknown-key", _table(evil=1)),
              ("missing-key", _table(groups=...)),
              ("path-relative", _table(path="labels.csv")), ("path-nul", _table(path="/t\x00.csv")),
              ("size-negative", _table(size=-1)), ("size-float", _table(size=1.5)),
              ("mtime-type", _table(mtime_ns="1")), ("options-type", _table(options="--labels t.csv")),
              ("options-unknown", _table(options=_options(evil=1))),
              ("options-missing", _table(options=lambda r: {k: v for k, v in r["options"].items() if k != "labels"})),
              ("options-column-type", _table(options=_options(label_column=5))),
              ("options-columns-type", _table(options=_options(label_columns="ab"))),
              ("options-no-label", _table(options=_options(label_column=None))),
              ("options-uncertain", _table(options=_options(uncertain="maybe"))),
              ("options-control", _table(options=_options(group_column="p\x1b[2J"))),
              ("options-flag-type", _table(options=_options(multi_label="yes"))),
              ("options-other-table", _table(options=_options(labels="/other.csv"))),
              ("options-multi", _table(options=_options(label_column="y", label_sep="|"))),
              ("bad_rows-type", _table(bad_rows={})), ("bad_rows-row", _table(bad_rows=[[0, "x"]])),
              ("bad_rows-bool", _table(bad_rows=[[True, "x"]])), ("bad_rows-reason", _table(bad_rows=[[3, 4]])),
              ("bad_rows-long", _table(bad_rows=[[3, "x" * 200_000]])),
              ("test_rows-negative", _table(test_rows=-1)), ("test_rows-type", _table(test_rows="0")),
              ("split-type", _table(split=None)), ("split-empty", _table(split="")),
              ("groups-short", _table(groups=lambda r: r["groups"][:-1])), ("groups-type", _table(groups="p1")),
              ("groups-item", _table(groups=lambda r: [1] * len(r["groups"])))],
    "command": [("type", 1), ("long", "x" * 200_000)],
    "created": [("type", 1), ("long", "x" * 300)],
    "seconds": [("type", "1"), ("negative", -1), ("inf", math.inf)],
}


def _pack_cases(meta: dict) -> list[tuple[str, object]]:
    """(name, pack.json): a dict, or a str for the raw text."""
    assert set(meta) == set(PACK_BAD_FIELDS), (
        f"fields written but not fuzzed: {sorted(set(meta) - set(PACK_BAD_FIELDS))}; "
        f"fuzzed but not written: {sorted(set(PACK_BAD_FIELDS) - set(meta))}")
    cases = []
    for name, bad in PACK_BAD_FIELDS.items():
        cases += [(f"{name}-{label}", {**meta, name: value(meta) if callable(value) else value})
                  for label, value in bad]
    cases += [(f"{name}-missing", {k: v for k, v in meta.items() if k != name}) for name in meta]
    cases += [("unknown-field", {**meta, "evil": 1}), ("not-json", "{not json"), ("not-object", "[1, 2]"),
              ("empty-object", "{}"), ("deep", "[" * 100_000 + "]" * 100_000), ("huge-int", "1" * 5000),
              ("not-utf8", b'{"x": "\xff"}'.decode("latin-1"))]
    return cases


@pytest.fixture(scope="module")
def small_pack(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fuzzpack")
    src = write_images(tmp / "src", {"a": 4, "b": 4})
    return pack_of(src, tmp / "pack").root


class TestValidatePackMeta:
    def test_written_meta_validates(self, small_pack):
        meta = json.loads((small_pack / "pack.json").read_text())
        assert validate_pack_meta(meta, "p") is meta
        assert meta["format"] == "gray_effnet.pack" and meta["written"] == list(WRITTEN) and is_pack(small_pack)
        assert (meta["task"], meta["table"]) == ("single", None)
        with_table = {**meta, "table": _table()(meta)}  # what the 'table' cases spoil is a valid record
        assert validate_pack_meta(with_table, "p") is with_table

    def test_table_options_are_checked_field_by_field(self):
        """Each field TableOptions writes has its type check in the validator (a new option needs one)."""
        import gray_effnet.pack as pack_module

        assert set(pack_module._TABLE_OPTIONS) == set(TableOptions(labels="/t.csv", label_column="y").to_json())

    def test_every_case_names_its_field(self, small_pack):
        meta = json.loads((small_pack / "pack.json").read_text())
        for case, bad in _pack_cases(meta):
            if isinstance(bad, str):
                continue
            field = case.split("-")[0]
            with pytest.raises(DataError) as info:
                validate_pack_meta(bad, "p")
            message = str(info.value)
            assert f"'{field}'" in message or case == "unknown-field" and "evil" in message, (case, message)
            assert len(message) < 2000, (case, len(message))  # a bad value is shown shortened

    @pytest.mark.slow
    def test_every_case_through_train_cli(self, small_pack, tmp_path, capsys):
        """Each case: exit 2, one ``error:`` line, no traceback, and nothing written anywhere."""
        meta = json.loads((small_pack / "pack.json").read_text())
        pack = tmp_path / "pack"
        shutil.copytree(small_pack, pack)
        for case, bad in _pack_cases(meta):
            text = bad if isinstance(bad, str) else json.dumps(bad)
            (pack / "pack.json").write_text(text, encoding="latin-1" if case == "not-utf8" else "utf-8")
            before = tree_digest(tmp_path)
            code = train.cli(["--data", str(pack), "--output", str(tmp_path / "run"), *FAST])
            err = capsys.readouterr().err
            lines = [line for line in err.splitlines() if line.strip()]
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (case, err[-1000:])
            assert "Traceback" not in err and str(pack) in lines[0], (case, lines[0][:300])
            assert tree_digest(tmp_path) == before, f"{case}: files changed"
            assert has_pack_json(pack) and not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def pack48(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pack48")
    src = write_images(tmp / "src", {"dark": 8, "bright": 8}, size=(64, 80))
    pack_of(src, tmp / "pack", img_size=(48, 48))
    return tmp


class TestLargerPack:
    """A pack larger than the training size: training crops from the packed images, evaluation resizes them."""

    def test_sizes_it_takes(self, pack48):
        source = open_source(str(pack48 / "pack"))
        assert source.settings(None, None) == ((48, 48), "full")
        assert source.settings((32, 40), None) == ((32, 40), "full")
        with pytest.raises(InputError, match="--img-size 64 48: the pack .* holds 48x48 images; train at that size "
                                             "or smaller"):
            source.settings((64, 48), None)

    def test_evaluation_resizes_training_crops(self, pack48):
        source = open_source(str(pack48 / "pack"))
        packed = source.dataset("val", None, "full")
        val = source.dataset("val", (32, 32), "full")
        x, y, path = val[0]
        assert x.shape == (1, 32, 32) and x.dtype == torch.uint8 and y == packed[0][1]
        torch.testing.assert_close(x, build_transforms((32, 32), train=False)(packed[0][0]))  # resized as in val
        direct = build_transforms((32, 32), train=False)(read_gray(path, "full"))  # the files path's val image
        assert (x.float() - direct.float()).abs().mean() < 4  # two resizes, not one: close, not equal
        aug = Augmentation(crop_scale=0.5, hflip=0.0, rotate=0.0)
        train = source.dataset("train", (32, 32), "full", augment=aug)
        batch = train.__getitems__([0, 1, 2])
        assert batch.images.shape == (3, 1, 48, 48)  # the crop comes from all the packed pixels
        assert source.batch_augment((32, 32), aug, seed=0)(batch.images).shape == (3, 1, 32, 32)

    def test_train_and_evaluate_smaller(self, pack48):
        run("--data", pack48 / "pack", "--img-size", "32", "32", "--epochs", "1", "--output", pack48 / "run",
            "--no-pretrained", *PACK_FAST)
        _, meta = read_checkpoint(pack48 / "run" / "last.safetensors")
        assert meta["img_size"] == [32, 32]
        printed = run("--evaluate", "--weights", pack48 / "run" / "best.safetensors", "--data", pack48 / "pack",
                      "--output", pack48 / "ev", "--workers", "0", "--no-progress")
        assert "accuracy" in printed and (pack48 / "ev" / "eval_predictions.csv").is_file()
