"""benchmarks/peer_timm.py without training: the generated data, its split and folder, and the result table."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from benchmarks import pack_accuracy, peer_timm


class TestData:
    def test_deterministic_distinct_and_labelled(self):
        a, la = peer_timm.make_images(60, 28, seed=0)
        b, lb = peer_timm.make_images(60, 28, seed=0)
        c, _ = peer_timm.make_images(60, 28, seed=1)
        assert a.shape == (60, 28, 28) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(la, lb)
        assert not np.array_equal(a, c)
        assert len({im.tobytes() for im in a}) == 60
        assert set(la.tolist()) == set(range(10))

    def test_more_images_than_digits_are_distinct(self):
        images, labels = peer_timm.make_images(1797 + 20, 12, seed=0)
        assert len({im.tobytes() for im in images}) == len(images)
        assert labels[1797] == labels[0]  # the same digit again, drawn differently

    def test_split_is_stratified_disjoint_and_seeded(self):
        labels = np.repeat(np.arange(10), 50)
        train, val = peer_timm.split(labels, 0.2, seed=0)
        assert len(train) == 400 and len(val) == 100
        assert not set(train) & set(val) and set(train) | set(val) == set(range(500))
        assert np.bincount(labels[val]).tolist() == [10] * 10
        again = peer_timm.split(labels, 0.2, seed=0)
        np.testing.assert_array_equal(val, again[1])
        assert not np.array_equal(val, peer_timm.split(labels, 0.2, seed=1)[1])

    def test_folder_counts_and_reuse(self, tmp_path):
        root, record = peer_timm.prepare_data(tmp_path / "d", 50, 28)
        train = sorted((root / "train").rglob("*.png"))
        val = sorted((root / "val").rglob("*.png"))
        assert (len(train), len(val)) == (record["train"], record["val"]) == (40, 10)
        assert {p.name for p in train}.isdisjoint(p.name for p in val)
        with Image.open(train[0]) as im:
            assert im.mode == "L" and im.size == (28, 28)
        stamp = train[0].stat().st_mtime_ns
        assert peer_timm.prepare_data(root, 50, 28) == (root, record)  # reused: nothing rewritten
        assert train[0].stat().st_mtime_ns == stamp
        _, other = peer_timm.prepare_data(root, 60, 28)  # other settings: written again
        assert other["train"] + other["val"] == 60 and len(list(root.rglob("*.png"))) == 60


def _row(rnd, config, tool, seconds, acc, rc=0):
    return {"round": rnd, "config": config, "tool": tool, "seconds": seconds, "best_acc": acc, "returncode": rc}


class TestSummary:
    configs = [peer_timm.Config("defaults", (), (), 0.6), peer_timm.Config("channels_last", ("x",), ("y",), 1.0)]

    def test_ratios_goals_and_accuracy(self):
        rows = [_row(1, "defaults", "timm", 100.0, 0.90), _row(1, "defaults", "ours", 50.0, 0.95),
                _row(2, "defaults", "ours", 70.0, 0.93), _row(2, "defaults", "timm", 100.0, 0.92),
                _row(1, "channels_last", "timm", 80.0, 0.90), _row(1, "channels_last", "ours", 96.0, 0.80)]
        d, c = peer_timm.summarise(rows, self.configs)
        assert d["rounds"] == 2 and d["timm_s"] == 100 and d["ours_s"] == 60
        assert d["ratio"] == pytest.approx(0.6) and (d["ratio_min"], d["ratio_max"]) == (0.5, 0.7)
        assert d["ours_acc"] == pytest.approx(0.94) and d["timm_acc"] == pytest.approx(0.91)
        assert (d["time_met"], d["acc_met"]) == ("yes", "yes")
        assert c["ratio"] == pytest.approx(1.2) and (c["time_met"], c["acc_met"]) == ("no", "no")

    def test_a_failed_or_half_round_does_not_count(self):
        rows = [_row(1, "defaults", "timm", 100.0, 0.9), _row(1, "defaults", "ours", 50.0, 0.9),
                _row(2, "defaults", "timm", 100.0, 0.9), _row(2, "defaults", "ours", 10.0, None, rc=1),
                _row(3, "defaults", "timm", 100.0, 0.9)]
        d, c = peer_timm.summarise(rows, self.configs)
        assert d["rounds"] == 1 and d["ratio"] == pytest.approx(0.5)
        assert c["rounds"] == 0 and c["ratio"] is None and c["time_met"] == "n/a"


def test_extra_config():
    cfg = peer_timm.parse_extra_config("best=--channels-last on --amp bf16")
    assert cfg.name == "best" and cfg.ours == ("--channels-last", "on", "--amp", "bf16")
    assert cfg.timm == tuple(peer_timm.TIMM_CHANNELS_LAST) and cfg.goal == 1.0
    with pytest.raises(SystemExit, match="NAME=ARGS"):
        peer_timm.parse_extra_config("--channels-last")


def test_ours_channels_last_flag_follows_train_py():
    flag = peer_timm.ours_channels_last_flag()
    args = train.get_args_parser().parse_args(flag)
    assert args.channels_last in (True, "on")


class TestPackConfig:
    def test_ours_reads_the_pack_only_in_the_pack_config(self):
        args = peer_timm.get_args_parser().parse_args(["--timm-train-py", "t.py"])
        configs = peer_timm.builtin_configs()
        assert configs["pack"].data == "pack" and configs["pack"].goal == 0.75
        assert configs["channels_last"].goal == 0.85 and configs["channels_last"].data == "files"
        for name, data in (("pack", "P"), ("channels_last", "D"), ("defaults", "D")):
            cmd = peer_timm.ours_command(args, configs[name], Path("D"), Path("O"), pack=Path("P"))
            assert cmd[cmd.index("--data") + 1] == data, name

    @pytest.mark.parametrize("argv, ours, timm", [([], "auto", "2"),
                                                  (["--ours-workers", "0", "--workers", "4"], "0", "4")])
    def test_each_tool_its_own_workers(self, argv, ours, timm):
        """timm gets --workers; ours --ours-workers, train.py's auto unless given, and train.py parses it."""
        args = peer_timm.get_args_parser().parse_args(["--timm-train-py", "t.py", *argv])
        cfg = peer_timm.builtin_configs()["channels_last"]
        cmd = peer_timm.ours_command(args, cfg, Path("D"), Path("O"))
        assert cmd[cmd.index("--workers") + 1] == ours
        assert str(train.get_args_parser().parse_args(cmd[2:]).workers) == ours
        cmd = peer_timm.timm_command(args, cfg, Path("D"), Path("W"), Path("O"), num_classes=10)
        assert cmd[cmd.index("--workers") + 1] == timm

    def test_the_gap_sentence(self):
        summary = [{"config": "channels_last", "ours_acc": 0.970}, {"config": "pack", "ours_acc": 0.962}]
        assert peer_timm.pack_gap(summary) == (
            "Ours from the pack against ours from the files (both channels_last): -0.80 points of best validation "
            "accuracy (goal: within 0.5 points: NOT met).")
        summary[1]["ours_acc"] = 0.973
        assert "+0.30 points" in peer_timm.pack_gap(summary) and "(goal: within 0.5 points: met)" in \
            peer_timm.pack_gap(summary)
        assert peer_timm.pack_gap(summary[:1]) is None  # no pack config run
        assert peer_timm.pack_gap([summary[0], {"config": "pack", "ours_acc": None}]) is None  # it failed


class TestPackAccuracyVerdict:
    def test_against_hand_computed_intervals(self):
        # mean 0, sd 0.1, t(2, 0.975) = 4.303: half-width 4.303 * 0.1 / sqrt(3) = 0.248
        mean, low, high, say = pack_accuracy.verdict([0.1, -0.1, 0.0])
        assert mean == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2484, abs=1e-3) and low == -high
        assert say.startswith("met: the whole 95% interval")
        # mean -0.1, sd 0.5: half-width 1.24, beyond 0.5 points
        assert pack_accuracy.verdict([0.4, -0.6, -0.1])[3].startswith("met by the mean only")
        assert pack_accuracy.verdict([-1.3, -1.2, -1.4])[3].startswith("NOT met")
        assert pack_accuracy.verdict([0.2])[3].startswith("met by the mean only")  # one seed: no interval
