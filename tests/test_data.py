"""Reading gray images (8/16 bit, colour, odd formats), folders, splits, bad files and loaders."""

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gray_effnet import DataError
from gray_effnet.augment import build_transforms
from gray_effnet.data import GrayImageFolder, collate, make_loader, set_loader_epoch
from gray_effnet.folders import find_images, load_folder, prepare_digits, split_samples
from gray_effnet.images import SCAN_CHUNK, UnreadableImageWarning, read_gray, scan_images


def gradient(h=20, w=30, hi=255, dtype=np.uint8) -> np.ndarray:
    return np.linspace(0, hi, h * w).reshape(h, w).astype(dtype)


def write_folder(root: Path, counts: dict[str, int], size=(16, 16)) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(root / cls / f"{i:03d}.png")
    return root


class TestReadGray:
    def test_8bit_stays_uint8(self, tmp_path):
        a = gradient()
        Image.fromarray(a).save(tmp_path / "g.png")
        x = read_gray(tmp_path / "g.png")
        assert x.dtype == torch.uint8 and x.shape == (1, 20, 30)
        assert torch.equal(x[0], torch.from_numpy(a))

    @pytest.mark.parametrize("suffix", [".png", ".tif"])
    def test_16bit_keeps_full_precision(self, tmp_path, suffix):
        a = gradient(hi=65535, dtype=np.uint16)
        Image.fromarray(a).save(tmp_path / f"g{suffix}")
        x = read_gray(tmp_path / f"g{suffix}")
        assert x.dtype == torch.float32
        torch.testing.assert_close(x[0], torch.from_numpy(a.astype(np.float32) / 65535), rtol=0, atol=1e-7)
        assert len(torch.unique(x)) > 256  # 'L' conversion would have clamped to 256 levels (Pillow #3011)

    @pytest.mark.parametrize("suffix", [".png", ".tif"])
    def test_12bit_in_16bit(self, tmp_path, suffix):
        a = gradient(hi=4095, dtype=np.uint16)
        path = tmp_path / f"dark{suffix}"
        Image.fromarray(a).save(path)
        full = read_gray(path)
        assert full.max().item() == pytest.approx(4095 / 65535)  # dark, but exact
        assert read_gray(path, intensity="12").max().item() == pytest.approx(1.0)
        assert len(torch.unique(read_gray(path, intensity="12"))) > 256
        minmax = read_gray(path, intensity="minmax")
        assert minmax.min().item() == 0.0 and minmax.max().item() == 1.0

    def test_bad_intensity(self, tmp_path):
        Image.fromarray(gradient()).save(tmp_path / "g.png")
        with pytest.raises(ValueError, match="unknown intensity 'bright'; expected 'full', 'minmax', a bit depth"):
            read_gray(tmp_path / "g.png", intensity="bright")

    def test_float_tiff(self, tmp_path):
        a = np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)
        Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
        torch.testing.assert_close(read_gray(tmp_path / "f.tif")[0], torch.from_numpy(a))

    @pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "LA", "CMYK", "1"])
    def test_colour_modes_to_luminance(self, tmp_path, mode):
        rgb = Image.fromarray(np.stack([gradient(), gradient()[::-1], np.full((20, 30), 90, np.uint8)], -1))
        img = rgb.convert(mode)
        path = tmp_path / ("c.jpg" if mode == "CMYK" else "c.png")
        img.save(path, quality=100) if mode == "CMYK" else img.save(path)
        x = read_gray(path)
        assert x.dtype == torch.uint8 and x.shape == (1, 20, 30)
        with Image.open(path) as ref:
            expected = np.asarray(ref.convert("L"))
        assert torch.equal(x[0], torch.from_numpy(expected.copy()))

    def test_rgb_luma_weights(self, tmp_path):
        Image.new("RGB", (4, 4), (200, 100, 50)).save(tmp_path / "c.png")
        assert read_gray(tmp_path / "c.png")[0, 0, 0].item() == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)

    # EXIF orientation tag -> what turns the stored pixels into the displayed ones (numpy, independent of Pillow).
    ORIENTATIONS = {2: np.fliplr, 3: lambda a: np.rot90(a, 2), 6: lambda a: np.rot90(a, -1), 8: np.rot90,
                    5: lambda a: np.rot90(np.fliplr(a), 1), 7: lambda a: np.rot90(np.fliplr(a), -1)}

    @pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
    def test_exif_orientation_pixels(self, tmp_path, orientation):
        """Pixels, not only the shape: the displayed image, within a JPEG's error on a smooth gradient."""
        i, j = np.mgrid[0:24, 0:40]
        a = (40 + 6 * i + 3 * j).astype(np.uint8)  # distinct along both axes: every turn and flip shows
        img = Image.fromarray(a)
        exif = img.getexif()
        exif[0x0112] = orientation
        img.save(tmp_path / "o.jpg", exif=exif, quality=95)
        x = read_gray(tmp_path / "o.jpg")[0].numpy().astype(np.int16)
        expected = self.ORIENTATIONS[orientation](a).astype(np.int16)
        assert x.shape == expected.shape
        assert np.abs(x - expected).max() <= 6  # JPEG at quality 95 on this gradient
        for other, turn in self.ORIENTATIONS.items():  # any other orientation is far off
            wrong = turn(a).astype(np.int16)
            if other != orientation and wrong.shape == x.shape:
                assert np.abs(x - wrong).mean() > 20

    def test_multipage_tiff_first_frame(self, tmp_path):
        frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (10, 200)]
        frames[0].save(tmp_path / "m.tif", save_all=True, append_images=frames[1:])
        assert read_gray(tmp_path / "m.tif").unique().tolist() == [10]

    def test_animated_gif_first_frame(self, tmp_path):
        frames = [Image.fromarray(np.full((8, 8), v, np.uint8)) for v in (30, 220)]
        frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        assert read_gray(tmp_path / "a.gif").unique().tolist() == [30]


class TestFolders:
    def test_layout_and_ignored_files(self, tmp_path):
        root = write_folder(tmp_path / "d", {"a": 3, "b": 2})
        (root / "a" / ".DS_Store").write_bytes(b"\0\0")
        (root / "a" / "notes.txt").write_text("hi")
        (root / "b" / "labels.csv").write_text("x,y")
        (root / ".hidden").mkdir()
        found = find_images(root)
        assert found.classes == ["a", "b"]
        assert len(found.samples) == 5
        assert sorted(Path(p).name for p in found.ignored) == [".DS_Store", "labels.csv", "notes.txt"]

    def test_missing_folder(self, tmp_path):
        with pytest.raises(DataError, match="does not exist or is not a folder"):
            load_folder(tmp_path / "nope")

    def test_empty_folder(self, tmp_path):
        with pytest.raises(DataError, match="has no class subfolders; expected one subfolder per class"):
            load_folder(tmp_path)

    def test_loose_images(self, tmp_path):
        Image.fromarray(gradient()).save(tmp_path / "x.png")
        with pytest.raises(DataError, match=r"no class subfolders \(found loose images such as x.png\)"):
            load_folder(tmp_path)

    def test_single_class(self, tmp_path):
        with pytest.raises(DataError, match=r"has a single class \(a\); a classifier needs at least 2"):
            load_folder(write_folder(tmp_path, {"a": 4}))

    def test_empty_class_folder(self, tmp_path):
        root = write_folder(tmp_path, {"a": 4, "b": 4})
        (root / "c").mkdir()
        (root / "c" / "readme.txt").write_text("no images here")
        with pytest.raises(DataError, match="class folder\\(s\\) with no images in .*: c"):
            load_folder(root)

    def test_train_val_class_sets_differ(self, tmp_path):
        write_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
        write_folder(tmp_path / "val", {"a": 2, "b": 2, "d": 2})
        with pytest.raises(DataError, match=r"only in train: \['c'\]; only in val: \['d'\]"):
            load_folder(tmp_path)

    def test_presplit_used_as_is(self, tmp_path):
        write_folder(tmp_path / "train", {"a": 5, "b": 3})
        write_folder(tmp_path / "val", {"a": 1, "b": 2})
        data = load_folder(tmp_path)
        assert data.presplit and (len(data.train), len(data.val)) == (8, 3)


class TestSplit:
    samples = [(f"/d/{c}/{i:03d}.png", label) for label, (c, n) in enumerate([("a", 50), ("b", 20), ("c", 7)])
               for i in range(n)]

    def test_deterministic(self):
        assert split_samples(self.samples, 0.2, seed=3) == split_samples(list(reversed(self.samples)), 0.2, seed=3)
        assert split_samples(self.samples, 0.2, seed=3) != split_samples(self.samples, 0.2, seed=4)

    def test_stratified_and_complete(self):
        train, val = split_samples(self.samples, 0.2, seed=0)
        assert sorted(train + val) == sorted(self.samples) and not set(train) & set(val)
        per_class = [sum(1 for _, lab in val if lab == k) for k in range(3)]
        assert per_class == [10, 4, 1]

    def test_bad_fraction(self):
        with pytest.raises(DataError, match="val_split must be between 0 and 1; got 1.5"):
            split_samples(self.samples, 1.5, seed=0)


class TestBadFiles:
    @pytest.fixture
    def messy(self, tmp_path):
        root = write_folder(tmp_path, {"a": 6, "b": 6}, size=(32, 32))
        (root / "a" / "empty.png").write_bytes(b"")
        (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8)).save(buf, format="JPEG")
        (root / "b" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        return root

    def test_skipped_with_warning_naming_each(self, messy):
        with pytest.warns(UnreadableImageWarning) as record:
            data = load_folder(messy, val_split=0.25, seed=0)
        named = " ".join(str(w.message) for w in record)
        assert "empty.png" in named and "corrupt.png" in named
        kept = {Path(p).name for p, _ in data.train + data.val}
        assert not {"empty.png", "corrupt.png"} & kept
        # A truncated JPEG has a valid header: it is caught when decoded, during training, and skipped there.
        assert "truncated.jpg" in kept

    def test_truncated_skipped_at_read_time(self, messy):
        ds = GrayImageFolder([(str(messy / "b" / "truncated.jpg"), 1), (str(messy / "b" / "000.png"), 1)],
                             build_transforms((32, 32), train=False))
        with pytest.warns(UnreadableImageWarning, match="truncated.jpg"):
            batch = collate([ds[0], ds[1]])
        assert batch.images.shape == (1, 1, 32, 32) and batch.skipped == 1

    def test_any_decoder_exception_is_a_bad_file(self, messy, monkeypatch):
        """Malformed files make Pillow raise all kinds of errors, not only OSError."""
        real_open = Image.open

        def flaky_open(path, *a, **k):
            if str(path).endswith("003.png"):
                raise KeyError("a malformed chunk table")
            return real_open(path, *a, **k)

        monkeypatch.setattr(Image, "open", flaky_open)
        with pytest.warns(UnreadableImageWarning) as record:  # the messy folder's other bad files warn too
            data = load_folder(messy, val_split=0.25)
        assert any("003.png (KeyError" in str(w.message) for w in record)
        assert not any(p.endswith("003.png") for p, _ in data.train + data.val)

    def test_strict_refuses_and_lists_all(self, messy):
        with pytest.raises(DataError) as info:
            load_folder(messy, strict=True)
        message = str(info.value)
        assert "--strict-data: 3 unreadable file(s)" in message
        for name in ("empty.png", "corrupt.png", "truncated.jpg"):
            assert name in message

    def test_many_files_in_chunks_keep_their_order(self, tmp_path):
        """scan_images probes in chunks of SCAN_CHUNK files per thread: every file once, the bad ones in order."""
        good = tmp_path / "good.png"
        Image.new("L", (8, 8)).save(good)
        Image.new("I;16", (8, 8)).save(tmp_path / "wide.png")
        n = 2 * SCAN_CHUNK + 7
        bad_at = [0, SCAN_CHUNK - 1, SCAN_CHUNK, n - 1]
        paths = []
        for i in range(n):
            if i in bad_at:
                (tmp_path / f"bad{i}.png").write_bytes(b"not an image")
                paths.append(str(tmp_path / f"bad{i}.png"))
            else:
                paths.append(str(tmp_path / "wide.png") if i == 5 else str(good))
        scan = scan_images(paths, threads=3)
        assert [Path(p).name for p, _ in scan.bad] == [f"bad{i}.png" for i in bad_at]
        assert sum(scan.modes.values()) == n - len(bad_at) and scan.modes["I;16"] == 1 and scan.wide

    def test_nothing_readable(self, tmp_path):
        for cls in ("a", "b"):
            (tmp_path / cls).mkdir()
            (tmp_path / cls / "x.png").write_bytes(b"")
            (tmp_path / cls / "y.png").write_bytes(b"")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnreadableImageWarning)
            with pytest.raises(DataError, match="no readable images left"):
                load_folder(tmp_path)


class _SeedProbe(torch.utils.data.Dataset):
    """Items whose path reports the torch seed of the process that loaded them (in a worker: its own seed)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        return torch.zeros(1, 1, 1, dtype=torch.uint8), 0, f"{index}:{torch.initial_seed()}"


class TestLoader:
    def test_uint8_one_channel_batches(self, tmp_path):
        data = load_folder(write_folder(tmp_path, {"a": 6, "b": 6}, size=(20, 28)), val_split=0.25)
        ds = GrayImageFolder(data.train, build_transforms((32, 48), train=True), wide=data.scan.wide)
        batch = next(iter(make_loader(ds, 4, train=True, workers=0)))
        assert batch.images.dtype == torch.uint8 and batch.images.shape == (4, 1, 32, 48)
        assert batch.images.element_size() * batch.images[0].numel() == 32 * 48  # 1 byte per pixel

    def test_augmentation_keeps_size_and_dtype(self):
        x = torch.randint(0, 256, (1, 20, 28), dtype=torch.uint8)
        for train, kw in [(True, {"hflip": 1.0, "rotate": 15.0, "crop_scale": 0.5}), (False, {})]:
            out = build_transforms((32, 48), train=train, **kw)(x)
            assert out.shape == (1, 32, 48) and out.dtype == torch.uint8
        # The same seed gives the same random crop (scale 1 may still change the aspect ratio); then the flip.
        torch.manual_seed(0)
        crop = build_transforms((20, 28), train=True, crop_scale=1.0)(x)
        torch.manual_seed(0)
        assert torch.equal(build_transforms((20, 28), train=True, crop_scale=1.0, hflip=1.0)(x), crop.flip(-1))

    def test_mixed_depths_give_float_with_exact_values(self, tmp_path):
        """One 16-bit file makes every batch float in [0, 1]: 8-bit pixels v / 255, 16-bit pixels v / 65535."""
        root = write_folder(tmp_path, {"a": 3, "b": 3})
        deep = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
        deep[0, :2] = (257, 258)  # neighbours that 8 bits would merge
        Image.fromarray(deep).save(root / "b" / "deep.png")
        data = load_folder(root, val_split=0.3)
        assert data.scan.wide
        ds = GrayImageFolder(data.train + data.val, transform=None, wide=data.scan.wide)
        batches = list(make_loader(ds, 4, train=False, workers=0))
        assert all(b.images.dtype == torch.float32 for b in batches)
        got = {p: img for b in batches for p, img in zip(b.paths, b.images)}
        assert len(got) == 7
        for path, img in got.items():
            raw = np.asarray(Image.open(path))
            scale = 65535.0 if raw.dtype == np.uint16 or path.endswith("deep.png") else 255.0
            expected = torch.from_numpy(raw.astype(np.float64) / scale).float()[None]
            torch.testing.assert_close(img, expected, rtol=0, atol=1e-7, msg=path)
        assert got[str(root / "b" / "deep.png")][0, 0, 1] > got[str(root / "b" / "deep.png")][0, 0, 0]

    def test_converted_counted(self, tmp_path):
        root = write_folder(tmp_path, {"a": 3, "b": 3})
        Image.new("RGB", (16, 16), (10, 200, 30)).save(root / "a" / "rgb.png")
        Image.new("RGBA", (16, 16)).save(root / "b" / "rgba.png")
        assert load_folder(root, val_split=0.3).scan.converted == 2

    def test_epoch_order_is_reproducible(self, tmp_path):
        data = load_folder(write_folder(tmp_path, {"a": 8, "b": 8}), val_split=0.25)
        ds = GrayImageFolder(data.train, build_transforms((16, 16), train=False))

        def order(epoch):
            loader = make_loader(ds, 4, train=True, workers=0, seed=5)
            set_loader_epoch(loader, epoch, seed=5)
            return [p for batch in loader for p in batch.paths]

        assert order(1) == order(1) and order(1) != order(2)

    def test_worker_augmentation_depends_on_seed_and_epoch(self, tmp_path):
        """Two workers, random crops: (seed, epoch) fixes every pixel, whatever ran before in the process.

        An epoch started by a fresh loader (a resumed run) must see what the same epoch saw in a run that went
        through the earlier epochs, and another epoch or seed must see other crops of the same files.
        """
        data = load_folder(write_folder(tmp_path, {"a": 6, "b": 6}, size=(40, 40)), val_split=0.25)
        ds = GrayImageFolder(data.train, build_transforms((24, 24), train=True, crop_scale=0.3))

        def crops(loader, epoch, seed):
            set_loader_epoch(loader, epoch, seed=seed)
            return {p: img for batch in loader for p, img in zip(batch.paths, batch.images)}

        def fresh(seed):
            return make_loader(ds, 4, train=True, workers=2, seed=seed)

        loader = fresh(5)
        epoch0, epoch1 = crops(loader, 0, 5), crops(loader, 1, 5)
        torch.manual_seed(123)  # the main process' RNG must not matter: workers are seeded from the loader
        resumed1 = crops(fresh(5), 1, 5)
        assert len(data.train) == 8 and epoch0.keys() == epoch1.keys() == resumed1.keys() and len(epoch1) == 8
        assert all(torch.equal(epoch1[p], resumed1[p]) for p in epoch1)

        def differ(a, b):
            return sum(not torch.equal(a[p], b[p]) for p in a)

        assert differ(epoch0, epoch1) >= 6  # another epoch: other crops of the same files
        assert differ(epoch1, crops(fresh(6), 1, 6)) >= 6  # another seed likewise

    def test_persistent_workers_and_their_number_leave_the_crops_alone(self, tmp_path):
        """Image folders seed each sample from (seed, epoch, index): workers persist, and 0 or 2 of them agree."""
        data = load_folder(write_folder(tmp_path, {"a": 6, "b": 6}, size=(40, 40)), val_split=0.25)
        ds = GrayImageFolder(data.train, build_transforms((24, 24), train=True, crop_scale=0.3))

        def crops(loader, epoch):
            set_loader_epoch(loader, epoch, seed=5)
            return {p: img for batch in loader for p, img in zip(batch.paths, batch.images)}

        two, none = (make_loader(ds, 4, train=True, workers=n, seed=5) for n in (2, 0))
        assert two.persistent_workers and not none.persistent_workers
        assert make_loader(ds, 4, train=False, workers=2).persistent_workers  # evaluation: no randomness
        rng = torch.get_rng_state()
        for epoch in (0, 1, 0):
            a, b = crops(two, epoch), crops(none, epoch)
            assert a.keys() == b.keys() and all(torch.equal(a[p], b[p]) for p in a)
        assert torch.equal(torch.get_rng_state(), rng)  # workers=0 seeds in a fork of the main generator

    def test_worker_seeds_are_a_function_of_seed_and_epoch(self):
        """Each worker's torch seed, read inside the worker: new for each epoch and seed, the same on a resume.

        The crops above cannot show this alone: the epoch's shuffle changes which worker, and which of its
        draws, a file gets, so crops differ between epochs even when every epoch reuses the same seeds.
        """

        def seeds(loader, epoch, seed):
            set_loader_epoch(loader, epoch, seed=seed)
            return sorted({int(p.split(":")[1]) for batch in loader for p in batch.paths})

        def fresh(seed):
            return make_loader(_SeedProbe(), 2, train=True, workers=2, seed=seed)

        loader = fresh(5)
        epoch0, epoch1 = seeds(loader, 0, 5), seeds(loader, 1, 5)
        assert len(epoch0) == len(epoch1) == 2  # one seed per worker
        assert epoch0 != epoch1
        assert seeds(fresh(5), 1, 5) == epoch1  # a resumed run starting at epoch 1
        assert seeds(loader, 0, 5) == epoch0  # and back
        assert seeds(fresh(6), 1, 6) not in (epoch0, epoch1)

    def test_eval_covers_every_image_once_per_rank_split(self, tmp_path):
        data = load_folder(write_folder(tmp_path, {"a": 7, "b": 6}), val_split=0.5)
        ds = GrayImageFolder(data.val, build_transforms((16, 16), train=False))
        loaders = [make_loader(ds, 2, train=False, workers=0, world_size=2, rank=rank) for rank in range(2)]
        paths = [p for loader in loaders for b in loader for p in b.paths]
        assert sorted(paths) == sorted(p for p, _ in data.val)


class TestSampleSeeds:
    """Training augmentation seeded per sample from (seed, epoch, index): each image its own draw."""

    @pytest.fixture
    def same_images(self, tmp_path) -> GrayImageFolder:
        """8 copies of one gradient: any difference between their crops comes from the seeds alone."""
        samples = []
        for i in range(8):
            path = tmp_path / f"{i}.png"
            Image.fromarray(gradient(40, 40)).save(path)
            samples.append((str(path), i % 2))
        return GrayImageFolder(samples, build_transforms((12, 12), train=True, crop_scale=0.2, hflip=0.5))

    def test_each_image_its_own_crop(self, same_images):
        """One epoch of identical images: other indices, other crops; 0 or 2 workers give the same ones."""

        def crops(workers):
            loader = make_loader(same_images, 4, train=True, workers=workers, seed=5)
            set_loader_epoch(loader, 1, seed=5)
            return {p: img for batch in loader for p, img in zip(batch.paths, batch.images)}

        none, two = crops(0), crops(2)
        assert len(none) == 8 and none.keys() == two.keys()
        assert all(torch.equal(none[p], two[p]) for p in none)
        distinct = {tuple(img.flatten().tolist()) for img in none.values()}
        assert len(distinct) == 8, f"only {len(distinct)} different crops of 8 images"

    def test_seeds_are_a_function_of_seed_epoch_index(self, same_images):
        def seeds(epoch, seed=5):
            loader = make_loader(same_images, 4, train=True, workers=0, seed=seed)
            set_loader_epoch(loader, epoch, seed=seed)
            return dict(loader.sampler)  # index -> seed, as the sampler hands them to the dataset

        epoch1 = seeds(1)
        assert sorted(epoch1) == list(range(8)) and len(set(epoch1.values())) == 8  # one seed per image
        assert seeds(1) == epoch1  # a fresh loader (a resumed run) gets the same seeds
        assert not set(seeds(2).values()) & set(epoch1.values())  # another epoch, other seeds
        assert not set(seeds(1, seed=6).values()) & set(epoch1.values())  # another run seed likewise


class TestDigits:
    def test_written_once_as_png_folders(self, tmp_path):
        pytest.importorskip("sklearn")
        root = prepare_digits(tmp_path, per_class=5)
        data = find_images(root)
        assert data.classes == [str(d) for d in range(10)] and len(data.samples) == 50
        img = read_gray(data.samples[0][0])
        assert img.dtype == torch.uint8 and img.shape == (1, 8, 8) and img.max() > 200
        mtime = Path(data.samples[0][0]).stat().st_mtime_ns
        assert prepare_digits(tmp_path, per_class=5) == root
        assert Path(data.samples[0][0]).stat().st_mtime_ns == mtime  # reused, not rewritten
