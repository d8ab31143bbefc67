"""python -m gray_effnet predict: labelled and flat folders."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gray_effnet import GrayEfficientNet, load_model, save_weights
from gray_effnet.__main__ import main
from gray_effnet.augment import build_transforms
from gray_effnet.images import UnreadableImageWarning, read_gray


@pytest.fixture
def checkpoint(tmp_path):
    model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=3, class_names=["cat", "dog", "owl"],
                             img_size=(32, 40))
    return save_weights(model, tmp_path / "best.safetensors")


def _images(folder, n, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 30), dtype=np.uint8)).save(folder / f"{i}.png")


def _check_rows(rows: list[dict], checkpoint) -> None:
    """Each row is what the checkpoint's model gives for that file, read and resized to its img_size here."""
    model = load_model(checkpoint).eval()
    resize = build_transforms(model.img_size, train=False)
    with torch.no_grad():
        probs = model(torch.stack([resize(read_gray(r["path"])) for r in rows])).softmax(-1)
    assert probs.max(-1).values.min() < 0.99  # not a degenerate model that is sure of everything
    for row, p in zip(rows, probs):
        assert row["prediction"] == model.class_names[int(p.argmax())], row
        assert float(row["probability"]) == pytest.approx(p.max().item(), abs=1e-5)
        if row["target"]:
            assert row["target"] == Path(row["path"]).parent.name
            assert row["correct"] == str(int(row["prediction"] == row["target"]))


class TestPredict:
    def test_labelled_folder(self, checkpoint, tmp_path, capsys):
        _images(tmp_path / "data" / "dog", 3)
        _images(tmp_path / "data" / "owl", 2, seed=1)
        out = tmp_path / "p.csv"
        assert main(["predict", "--weights", str(checkpoint), "--data", str(tmp_path / "data"), "--output",
                     str(out), "--workers", "0"]) == 0
        printed = capsys.readouterr().out
        assert "on 5 images" in printed and "confusion matrix" in printed
        with open(out) as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["target"] for r in rows) == ["dog", "dog", "dog", "owl", "owl"]
        _check_rows(rows, checkpoint)
        correct = sum(int(r["correct"]) for r in rows)
        assert f"accuracy {correct / 5:.4f} on 5 images" in printed

    def test_flat_folder(self, checkpoint, tmp_path, capsys):
        _images(tmp_path / "flat", 4)
        (tmp_path / "flat" / "broken.png").write_bytes(b"")
        out = tmp_path / "p.csv"
        with pytest.warns(UnreadableImageWarning, match=r"skipping unreadable image .*broken\.png"):  # as in training
            assert main(["predict", "--weights", str(checkpoint), "--data", str(tmp_path / "flat"), "--output",
                         str(out), "--workers", "0"]) == 0
        printed = capsys.readouterr().out
        assert "4 images predicted as" in printed
        with open(out) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 4 and all(r["target"] == r["correct"] == "" for r in rows)
        _check_rows(rows, checkpoint)

    def test_unknown_class_folder(self, checkpoint, tmp_path, capsys):
        _images(tmp_path / "data" / "horse", 1)
        assert main(["predict", "--weights", str(checkpoint), "--data", str(tmp_path / "data")]) == 2
        assert "not classes of the checkpoint: ['horse']" in capsys.readouterr().err
