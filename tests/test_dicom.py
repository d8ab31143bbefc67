"""DICOM: physical units, MONOCHROME1, windows, volumes, bad files, mixed folders, and the CLI round trip.

Test files are pydicom's own (in its wheel, read offline with ``get_testdata_file(..., download=False)``).
"""

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gray_effnet.data as data_mod
import gray_effnet.dicom as dicom_mod
from gray_effnet import DataError, GrayEfficientNet, load_model, save_weights
from gray_effnet.__main__ import main as cli
from gray_effnet.data import GrayImageFolder
from gray_effnet.dicom import MultiFrameWarning
from gray_effnet.folders import load_folder
from gray_effnet.images import UnreadableImageWarning, drop_unreadable, is_image_file, read_gray, scan_images

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

CT_RANGE = "range:-1024:3071"


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not in this pydicom wheel")
    return Path(path)


def to_hu(unit: torch.Tensor, low: float = -1024, high: float = 3071) -> np.ndarray:
    return unit[0].double().numpy() * (high - low) + low


def rewrite(src: Path, dst: Path, **changes) -> Path:
    """A copy of ``src`` with header elements replaced (``PixelArray=`` replaces the stored pixels)."""
    ds = pydicom.dcmread(src)
    pixels = changes.pop("PixelArray", None)
    for key, value in changes.items():
        setattr(ds, key, value)
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels).astype(ds.pixel_array.dtype).tobytes()
    ds.save_as(dst)
    return dst


class TestPhysicalUnits:
    def test_ct_hounsfield(self):
        ct = pydicom_file("CT_small.dcm")
        hu = to_hu(read_gray(ct, CT_RANGE))
        # Independent reference: the stored values through the header's own slope and intercept.
        ds = pydicom.dcmread(ct)
        ref = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(hu, ref, atol=1e-3)
        assert hu[:8, :8].mean() < -800  # air outside the body (partial-volume blurred in this small image)
        assert -50 < np.median(hu) < 100  # soft tissue
        assert hu.max() > 1000  # bone

    def test_range_clips(self):
        unit = read_gray(pydicom_file("CT_small.dcm"), "range:0:100")[0]
        hu = to_hu(read_gray(pydicom_file("CT_small.dcm"), CT_RANGE))
        assert unit.min() == 0 and unit.max() == 1
        np.testing.assert_allclose(unit.numpy(), np.clip(hu / 100, 0, 1), atol=1e-4)

    def test_dtype_and_shape(self):
        img = read_gray(pydicom_file("CT_small.dcm"))
        assert img.shape == (1, 128, 128) and img.dtype == torch.float32

    @pytest.mark.parametrize("variant", ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm"])
    def test_transfer_syntaxes_agree(self, variant):
        ref = read_gray(pydicom_file("MR_small.dcm"), "minmax")
        assert torch.equal(read_gray(pydicom_file(variant), "minmax"), ref)
        assert ref.std() > 0.1

    def test_window_is_the_files(self):
        mr = pydicom_file("MR_small.dcm")
        ds = pydicom.dcmread(mr)
        c, w = float(ds.WindowCenter), float(ds.WindowWidth)
        x = ds.pixel_array.astype(np.float64)
        # DICOM PS3.3 C.11.2.1.2.1, the linear window, written out as the standard gives it.
        ref = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        got = read_gray(mr, "window")[0].double().numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4)
        assert 0 < got.mean() < 1

    def test_window_needs_one(self):
        with pytest.raises(DataError, match="no WindowCenter/WindowWidth or VOI LUT; use --intensity range LO HI"):
            read_gray(pydicom_file("CT_small.dcm"), "window")

    def test_full_is_the_stored_bits_range(self):
        unit = read_gray(pydicom_file("CT_small.dcm"), "full")[0].double().numpy()
        ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))  # 16 bits stored, signed: -32768..32767
        np.testing.assert_allclose(unit, (ds.pixel_array + 32768.0) / 65535.0, atol=1e-6)

    def test_full_is_bits_stored_not_bits_allocated(self, tmp_path):
        """12 bits stored in 16 allocated (values 0..4095): full maps them onto all of [0, 1], not [0, 1/16]."""
        mr = pydicom_file("MR_small.dcm")
        stored = np.linspace(0, 4095, 64 * 64).round().reshape(64, 64)
        path = rewrite(mr, tmp_path / "12bit.dcm", BitsStored=12, HighBit=11, PixelRepresentation=0,
                       PixelArray=stored)
        ds = pydicom.dcmread(path)
        assert (ds.BitsAllocated, ds.BitsStored, int(ds.pixel_array.max())) == (16, 12, 4095)
        unit = read_gray(path, "full")[0].double().numpy()
        np.testing.assert_allclose(unit, stored / 4095.0, atol=1e-6)
        assert unit.min() == 0 and unit.max() == pytest.approx(1.0)

    def test_bit_depth_divides_stored_values(self):
        unit = read_gray(pydicom_file("MR_small.dcm"), "12")[0].double().numpy()
        np.testing.assert_allclose(unit, pydicom.dcmread(pydicom_file("MR_small.dcm")).pixel_array / 4095.0, atol=1e-6)

    def test_png_refuses_physical_mappings(self, tmp_path):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
        with pytest.raises(DataError, match="intensity range:-1024:3071 needs DICOM files"):
            read_gray(tmp_path / "a.png", CT_RANGE)


class TestMonochrome1:
    @pytest.mark.parametrize("intensity", ["full", "minmax"])
    def test_inverted_copy_reads_the_same(self, tmp_path, intensity):
        """The same picture stored white-is-low: the model must see it bright-is-high, as before."""
        ct = pydicom_file("CT_small.dcm")
        stored = pydicom.dcmread(ct).pixel_array.astype(np.int32)
        inverted = rewrite(ct, tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1",
                           PixelArray=-1 - stored)  # int16 -32768..32767 mirrored onto itself
        ref = read_gray(ct, intensity)
        torch.testing.assert_close(read_gray(inverted, intensity), ref, atol=1e-6, rtol=0)

    @pytest.mark.parametrize("intensity", ["full", "minmax", "12", "window", "range:0:1500"])
    def test_every_mapping_inverts(self, tmp_path, intensity):
        """Only the tag changed (MR_small has a window): every mapping, window included, gives 1 - MONOCHROME2's."""
        mr = pydicom_file("MR_small.dcm")
        m1 = rewrite(mr, tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1")
        ref = read_gray(mr, intensity)
        assert (2 * ref - 1).abs().max() > 1e-3  # ref and 1 - ref differ: an image left as it was cannot pass
        torch.testing.assert_close(read_gray(m1, intensity), 1 - ref, atol=1e-6, rtol=0)

    def test_only_the_tag_changed_inverts(self, tmp_path):
        ct = pydicom_file("CT_small.dcm")
        m1 = rewrite(ct, tmp_path / "m1.dcm", PhotometricInterpretation="MONOCHROME1")
        torch.testing.assert_close(read_gray(m1, CT_RANGE), 1 - read_gray(ct, CT_RANGE), atol=1e-6, rtol=0)


class TestFilesWithoutExtension:
    @pytest.mark.parametrize("name", ["IM0001", "1.2.840.113619.2.55.3.1"])
    def test_magic(self, tmp_path, name):
        path = tmp_path / name
        shutil.copy(pydicom_file("CT_small.dcm"), path)
        assert is_image_file(path)
        assert torch.equal(read_gray(path, CT_RANGE), read_gray(pydicom_file("CT_small.dcm"), CT_RANGE))

    def test_other_files_are_not_images(self, tmp_path):
        (tmp_path / "notes").write_text("x" * 200)
        (tmp_path / "DICOMDIR.txt").write_text("DICM")
        (tmp_path / ".hidden.dcm").write_bytes(b"")
        assert not any(is_image_file(p) for p in tmp_path.iterdir())


class TestVolumes:
    def test_first_frame_and_a_warning(self):
        dose = pydicom_file("rtdose.dcm")
        with pytest.warns(MultiFrameWarning, match=r"rtdose\.dcm has 15 frames; using the first"):
            img = read_gray(dose, "minmax")
        frames = pydicom.dcmread(dose).pixel_array
        assert frames.shape[0] == 15 and img.shape == (1, *frames.shape[1:])
        first = frames[0].astype(np.float64)
        np.testing.assert_allclose(img[0].numpy(), (first - first.min()) / np.ptp(first), atol=1e-6)

    def test_scan_reports_volumes_once(self):
        samples = [(str(pydicom_file("rtdose.dcm")), 0), (str(pydicom_file("CT_small.dcm")), 1)]
        with pytest.warns(MultiFrameWarning, match=r"1 multi-frame file\(s\), of which only the first frame is "
                                                    r"used: .*rtdose\.dcm \(15 frames\)"):
            kept, scan = drop_unreadable(samples)
        assert kept == samples and scan.frames == {samples[0][0]: 15}
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the dataset does not warn again on every read
            assert GrayImageFolder(kept, intensity="minmax")[0][0].shape == (1, 10, 10)


class TestBadFiles:
    @pytest.mark.parametrize(("name", "reason"), [
        ("rtplan.dcm", r"DICOM file with no pixel data \(RT Plan Storage, modality RTPLAN\): not an image"),
        ("test-SR.dcm", r"DICOM file with no pixel data \(.*SR Storage, modality SR\): not an image"),
        ("rtplan_truncated.dcm", "no pixel data"),
    ])
    def test_not_images(self, name, reason):
        with pytest.raises(DataError, match=reason):
            read_gray(pydicom_file(name))
        (path, why), = scan_images([str(pydicom_file(name))]).bad
        assert path.endswith(name) and re.search(reason, why)

    def test_truncated(self):
        path = str(pydicom_file("MR_truncated.dcm"))
        with pytest.raises(ValueError, match="less than expected"):
            read_gray(path)
        assert scan_images([path]).bad == []  # the header is fine: only decoding shows it ...
        (_, why), = scan_images([path], verify=True).bad  # ... which --strict-data does up front
        assert "less than expected" in why

    def test_missing_handler_names_packages_and_extra(self, monkeypatch):
        class NoDecoder:
            is_available = False
            missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"]

        monkeypatch.setattr(dicom_mod, "get_decoder", lambda uid: NoDecoder())
        with pytest.raises(DataError, match=r"no installed pixel data handler decodes JPEG-LS Lossless Image "
                                            r"Compression \(pylibjpeg - requires pylibjpeg>=2.0 and "
                                            r"pylibjpeg-libjpeg>=2.1\): pip install 'gray_effnet\[dicom-codecs\]'"):
            read_gray(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))

    def test_real_missing_handler(self):
        from pydicom.pixels import get_decoder

        path = pydicom_file("MR_small_jpeg_ls_lossless.dcm")
        if get_decoder(pydicom.dcmread(path).file_meta.TransferSyntaxUID).is_available:
            pytest.skip("a JPEG-LS decoder is installed here")
        (_, why), = scan_images([str(path)]).bad
        assert "JPEG-LS" in why and "gray_effnet[dicom-codecs]" in why

    def test_without_pydicom(self, monkeypatch):
        monkeypatch.setattr(dicom_mod, "pydicom", None)
        with pytest.raises(DataError, match=r"reading DICOM needs pydicom: pip install 'gray_effnet\[dicom\]'"):
            read_gray(pydicom_file("CT_small.dcm"))

    def test_colour_has_no_physical_units(self):
        path = pydicom_file("SC_rgb_rle_2frame.dcm")
        with pytest.raises(DataError, match="needs physical units; this DICOM image is RGB colour"):
            read_gray(path, CT_RANGE, warn_frames=False)
        img = read_gray(path, "full", warn_frames=False)
        assert img.shape == (1, 100, 100) and 0 <= img.min() < img.max() <= 1


@pytest.fixture
def mixed(tmp_path) -> Path:
    """Two classes mixing DICOM (named .dcm and not), PNG and bad DICOM files."""
    root = tmp_path / "mixed"
    ct, mr = pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")
    for cls, src in (("ct", ct), ("mr", mr)):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            shutil.copy(src, root / cls / f"{i}.dcm")
        shutil.copy(src, root / cls / "IM0009")
        Image.fromarray(np.full((40, 50), 60 * (cls == "ct"), np.uint8)).save(root / cls / "p.png")
    shutil.copy(pydicom_file("rtplan.dcm"), root / "ct" / "plan.dcm")
    shutil.copy(pydicom_file("test-SR.dcm"), root / "mr" / "REPORT")
    (root / "mr" / "notes.txt").write_text("not an image")
    return root


class TestMixedFolder:
    def test_load(self, mixed):
        with pytest.warns(UnreadableImageWarning) as record:
            folder = load_folder(mixed, val_split=0.4)
        named = sorted(Path(str(w.message).split()[3]).name for w in record)
        assert named == ["REPORT", "plan.dcm"]  # each bad file is named
        kept = sorted(Path(p).name for p, _ in folder.train + folder.val)
        assert kept == sorted(["0.dcm", "1.dcm", "2.dcm", "IM0009", "p.png"] * 2)
        assert [Path(p).name for p in folder.ignored] == ["notes.txt"]
        assert folder.scan.wide and folder.scan.modes["DICOM MONOCHROME2"] == 8 and folder.scan.converted == 0
        ds = GrayImageFolder(folder.train + folder.val, wide=folder.scan.wide, intensity="minmax")
        items = [ds[i] for i in range(len(ds))]
        assert {it[0].dtype for it in items} == {torch.float32}  # one batch dtype for PNG and DICOM

    def test_range_skips_the_pngs_and_names_them(self, mixed):
        with pytest.warns(UnreadableImageWarning):
            folder = load_folder(mixed, val_split=0.4)
        ds = GrayImageFolder(folder.train + folder.val, wide=True, intensity=CT_RANGE)
        with pytest.warns(UnreadableImageWarning, match=r"p\.png .*needs DICOM files"):
            items = [ds[i] for i in range(len(ds))]
        assert sum(it is None for it in items) == 2


class TestCheckpointMapping:
    @pytest.fixture
    def checkpoint(self, tmp_path):
        model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, class_names=["ct", "mr"], img_size=(32, 32),
                                 intensity=CT_RANGE)
        return save_weights(model, tmp_path / "best.safetensors")

    def test_saved_and_loaded(self, checkpoint):
        assert load_model(checkpoint).intensity == CT_RANGE

    @pytest.mark.parametrize(("given", "used"), [([], CT_RANGE), (["--intensity", "minmax"], "minmax"),
                                                 (["--intensity", "range", "-1000", "1000"], "range:-1000:1000")])
    def test_predict_applies_it(self, checkpoint, mixed, tmp_path, monkeypatch, given, used):
        seen = []
        real = data_mod.GrayImageFolder.__init__

        def spy(self, *a, **k):
            real(self, *a, **k)
            seen.append(str(self.intensity))

        monkeypatch.setattr(data_mod.GrayImageFolder, "__init__", spy)
        with pytest.warns(UnreadableImageWarning):
            assert cli(["predict", "--weights", str(checkpoint), "--data", str(mixed / "ct"), "--workers", "0",
                        "--output", str(tmp_path / "p.csv"), *given]) == 0
        assert seen == [used]
