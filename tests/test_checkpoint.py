"""Checkpoint metadata is untrusted input: every field is checked, through every command that reads it.

The fuzz cases start from real files (a 1-epoch run of train.py) and change one field each: a wrong type,
a wrong value, or a missing field. Each must end in one ``error:`` line and exit code 2 through
``predict``, ``export``, ``train.py --evaluate`` and ``train.py --resume``, with no traceback and no file
created outside the output folder.
"""

import inspect
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import train
from gray_effnet import GrayEfficientNet, InputError, WeightsError, load_model, save_weights
from gray_effnet.__main__ import main as gray_effnet_main
from gray_effnet.checkpoint import (
    META_KEY,
    STATE_NAME,
    best_epoch,
    read_checkpoint,
    validate_metadata,
)
from gray_effnet.metadata import CHECKPOINT_FIELDS, EXTRA_FIELDS, SAFE_TIMM_KWARGS, describe

from .helpers import PicklePayload

SIZE = ["--img-size", "32", "32"]
QUIET = ["--workers", "0", "--no-progress"]

# field -> bad values: (label, value), for every field of CHECKPOINT_FIELDS. A missing required field is added below.
BAD_FIELDS: dict[str, list[tuple[str, object]]] = {
    "format_version": [("type", "1"), ("newer", 99), ("zero", 0), ("bool", True)],
    "model_name": [("type", ["x"]), ("unknown", "not_a_timm_model"), ("long", "x" * 10_000)],
    "adapter": [("type", 3), ("unknown", "nope")],
    "num_classes": [("type", "3"), ("huge", 1_000_000), ("disagrees", 4), ("zero", 0), ("float", 3.0)],
    "class_names": [("type", "abc"), ("count", ["a", "b"]), ("duplicate", ["a", "a", "b"]), ("items", [1, 2, 3])],
    "img_size": [("type", "32x32"), ("zero", [0, 32]), ("length", [32]), ("huge", [10**9, 32])],
    "mean": [("type", "0.5"), ("length", [0.5, 0.5]), ("items", ["a", "b", "c"]), ("inf", [math.inf, 0, 0])],
    "std": [("type", 0.5), ("zero", [0.0, 0.5, 0.5]), ("negative", [-1.0, 0.5, 0.5])],
    "timm_kwargs": [("type", [1]), ("unknown", {"foo": 1}), ("range", {"drop_rate": 5}),
                    ("pretrained_cfg", {"pretrained_cfg_overlay": {"file": "x.pth"}})],
    "epoch": [("type", "1"), ("negative", -1)],
    "val_acc": [("type", "x"), ("range", 2.0)],
    "val_loss": [("type", []), ("negative", -1.0)],
    "val_auc": [("type", "0.5"), ("range", 1.5)],
    "task": [("type", 1), ("unknown", "regression")],
    # The run below is single-label; thresholds are for multi-label models (TestMultiLabelMetadata fuzzes those).
    "thresholds": [("type", "0.5"), ("single-label", [0.5, 0.5, 0.5])],
    "intensity": [("type", 12), ("unknown", "gamma"), ("long", "range:" + "1" * 100 + ":2")],
    "adapter_kwargs": [("type", [1]), ("foreign-option", {"windows": [[40, 80]]}),
                       ("not-numbers", {"windows": "x"})],
}
# The fields come from the one table that writes and reads them: a new field without bad values fails _cases.
FIELDS = [f.name for f in CHECKPOINT_FIELDS]
REQUIRED = [f.name for f in CHECKPOINT_FIELDS if f.required]
OPTIONAL = [f.name for f in CHECKPOINT_FIELDS if not f.required]


def _cases(meta: dict) -> list[tuple[str, object]]:
    """(name, metadata) pairs; metadata is a dict, or a str for the raw JSON text."""
    cases = []
    assert set(FIELDS) <= set(BAD_FIELDS), (
        f"fields of CHECKPOINT_FIELDS not fuzzed: {sorted(set(FIELDS) - set(BAD_FIELDS))}: add their bad values")
    assert set(meta) <= set(BAD_FIELDS), f"fields written but not fuzzed: {sorted(set(meta) - set(BAD_FIELDS))}"
    for field, bad in BAD_FIELDS.items():
        assert field in meta, f"the written checkpoint has no {field!r}: update BAD_FIELDS"
        cases += [(f"{field}-{label}", {**meta, field: value}) for label, value in bad]
    cases += [(f"{field}-missing", {k: v for k, v in meta.items() if k != field}) for field in REQUIRED]
    cases += [("unknown-field", {**meta, "evil": 1}), ("not-json", "{not json"), ("not-object", "[1, 2]")]
    return cases


def _images(folder: Path, classes: list[str], n: int = 4) -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / c / f"{i}.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> tuple[Path, Path]:
    """A real 1-epoch run: its data folder and its output folder."""
    root = tmp_path_factory.mktemp("fuzz")
    _images(root / "data", ["a", "b", "c"])
    code = train.cli(["--data", str(root / "data"), "--output", str(root / "run"), "--epochs", "1",
                      "--batch-size", "4", "--no-pretrained", *SIZE, *QUIET])
    assert code == 0
    return root / "data", root / "run"


def _write_safetensors(src: Path, dst: Path, meta: object) -> None:
    text = meta if isinstance(meta, str) else json.dumps(meta)
    save_file(load_file(str(src)), str(dst), metadata={META_KEY: text})


def _files(root: Path, skip: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if skip not in p.parents and p != skip}


def _assert_one_error_line(code: int, err: str, case: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"{case}: exit code {code}, stderr {err[-500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: {err[-500:]}"
    assert "Traceback" not in err


class TestValidateMetadata:
    def test_written_metadata_reads_back(self, run_dir):
        _, run = run_dir
        tensors, meta = read_checkpoint(run / "best.safetensors")
        kwargs = validate_metadata(meta, tensors, "best")
        assert kwargs["num_classes"] == 3 and kwargs["class_names"] == ["a", "b", "c"]
        assert kwargs["img_size"] == [32, 32] and kwargs["drop_rate"] == 0.2

    def test_every_case_names_its_field(self, run_dir):
        _, run = run_dir
        tensors, meta = read_checkpoint(run / "best.safetensors")
        for case, bad in _cases(meta):
            if isinstance(bad, str):
                continue
            field = case.split("-")[0]
            with pytest.raises(WeightsError) as info:
                validate_metadata(bad, tensors, "f")
            message = str(info.value)
            assert field in message or case == "unknown-field" and "evil" in message, (case, message)

    def test_classifier_rows_checked_before_building(self, run_dir, monkeypatch):
        """A huge num_classes is refused from the file's tensors; no model is ever built for it."""
        _, run = run_dir
        tensors, meta = read_checkpoint(run / "best.safetensors")
        built = []
        monkeypatch.setattr("timm.create_model", lambda *a, **k: built.append(a))
        for n in (4, 99_999):
            with pytest.raises(WeightsError, match=f"'num_classes' says {n} but the file holds a classifier of "
                                                   r"shape \(3, 1280\)"):
                validate_metadata({**meta, "num_classes": n, "class_names": None}, tensors, "f")
        assert not built

    def test_stem_channels_checked(self, run_dir):
        _, run = run_dir
        tensors, meta = read_checkpoint(run / "best.safetensors")
        with pytest.raises(WeightsError, match=r"'sum', whose stem takes 1 input channel\(s\), but the file holds a "
                                               r"stem weight of shape \(32, 3, 3, 3\)"):
            validate_metadata({**meta, "adapter": "sum"}, tensors, "f")

    def test_allowlist_is_plain_numbers(self):
        assert set(SAFE_TIMM_KWARGS) == {"drop_rate", "drop_path_rate"}

    @pytest.mark.parametrize("field", OPTIONAL)
    def test_missing_optional_field_loads(self, run_dir, tmp_path, field):
        _, run = run_dir
        _, meta = read_checkpoint(run / "best.safetensors")
        path = tmp_path / "w.safetensors"
        _write_safetensors(run / "best.safetensors", path, {k: v for k, v in meta.items() if k != field})
        model = load_model(path)
        assert model.num_classes == 3

    @pytest.mark.parametrize("field", [f for f in CHECKPOINT_FIELDS if not f.required and f.kwarg],
                             ids=lambda f: f.name)
    def test_missing_field_rebuilds_the_models_default(self, run_dir, field):
        """A file without an optional field (an older one) rebuilds what GrayEfficientNet does without it."""
        _, run = run_dir
        tensors, meta = read_checkpoint(run / "best.safetensors")
        kwargs = validate_metadata({k: v for k, v in meta.items() if k != field.name}, tensors, "f")
        if field.kwarg.startswith("**"):  # timm_kwargs: no option at all
            assert not set(kwargs) & set(SAFE_TIMM_KWARGS), kwargs
        else:
            assert kwargs[field.kwarg] == inspect.signature(GrayEfficientNet).parameters[field.kwarg].default


class TestFieldTable:
    """CHECKPOINT_FIELDS is what describe writes and validate_metadata turns into GrayEfficientNet's arguments."""

    def test_kwargs_are_the_models_arguments(self):
        params = inspect.signature(GrayEfficientNet).parameters
        kwargs = [f.kwarg.removeprefix("**") for f in CHECKPOINT_FIELDS if f.kwarg]
        assert kwargs and all(k in params for k in kwargs), [k for k in kwargs if k not in params]
        assert params["timm_kwargs"].kind is inspect.Parameter.VAR_KEYWORD

    def test_describe_writes_the_table_in_order(self):
        model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, class_names=["x", "y"])
        written = [f.name for f in CHECKPOINT_FIELDS if f.write is not None]
        assert list(model.describe()) == written and written[0] == "format_version"
        assert EXTRA_FIELDS == ("epoch", "val_acc", "val_loss", "val_auc")
        meta = describe(model, val_auc=0.5, epoch=3)
        assert list(meta) == [*written, "epoch", "val_auc"] and (meta["epoch"], meta["val_auc"]) == (3, 0.5)
        assert meta["class_names"] == ["x", "y"] and meta["adapter"] == "broadcast"
        with pytest.raises(TypeError, match=r"describe\(\) takes only epoch, val_acc, val_loss, val_auc as extras; "
                                            r"got \['model_name'\]"):
            describe(model, model_name="efficientnet_b0")


# A multi-label checkpoint's own fields: thresholds (one per finding, in [0, 1]) and finding names.
# case -> (the changed fields, the field the error must name)
BAD_MULTI: dict[str, tuple[dict, str]] = {
    **{f"thresholds-{label}": ({"thresholds": value}, "thresholds") for label, value in [
        ("type", "0.5"), ("count", [0.5, 0.5]), ("range", [0.5, 0.5, 1.5]), ("negative", [-0.1, 0.5, 0.5]),
        ("nan", [math.nan, 0.5, 0.5]), ("items", ["a", "b", "c"]), ("bool", [True, 0.5, 0.5])]},
    "class_names-pipe": ({"class_names": ["a|b", "c", "d"]}, "class_names"),
    "task-single-with-thresholds": ({"task": "single"}, "thresholds"),
}


@pytest.fixture(scope="module")
def multi_checkpoint(tmp_path_factory) -> Path:
    model = GrayEfficientNet("tf_efficientnet_lite0", num_classes=3, class_names=["edema", "effusion", "nodule"],
                             img_size=(32, 32), task="multi", thresholds=[0.25, 0.5, 0.875])
    return save_weights(model, tmp_path_factory.mktemp("multi") / "best.safetensors", epoch=2, val_auc=0.75)


class TestMultiLabelMetadata:
    def test_reads_back(self, multi_checkpoint):
        _, meta = read_checkpoint(multi_checkpoint)
        assert (meta["task"], meta["thresholds"], meta["val_auc"]) == ("multi", [0.25, 0.5, 0.875], 0.75)
        model = load_model(multi_checkpoint)
        assert (model.task, model.thresholds, model.class_names) == ("multi", [0.25, 0.5, 0.875],
                                                                      ["edema", "effusion", "nodule"])

    def test_every_multi_case_names_its_field(self, multi_checkpoint):
        tensors, meta = read_checkpoint(multi_checkpoint)
        for case, (changes, field) in BAD_MULTI.items():
            assert set(changes) <= set(meta), case
            with pytest.raises(WeightsError, match=f"checkpoint field '{field}' must be"):
                validate_metadata({**meta, **changes}, tensors, "f")

    def test_refused_through_predict(self, multi_checkpoint, tmp_path, capsys):
        _, meta = read_checkpoint(multi_checkpoint)
        _images(tmp_path / "data", ["a"])
        weights = tmp_path / "w.safetensors"
        _write_safetensors(multi_checkpoint, weights, {**meta, "thresholds": [0.5, 0.5, 2.0]})
        code = gray_effnet_main(["predict", "--weights", str(weights), "--data", str(tmp_path / "data" / "a"),
                                 "--workers", "0", "--output", str(tmp_path / "p.csv")])
        _assert_one_error_line(code, capsys.readouterr().err, "thresholds-range")
        assert not (tmp_path / "p.csv").exists()

    def test_model_refuses_what_the_file_may_not_hold(self):
        with pytest.raises(InputError, match="thresholds are for a multi-label model"):
            GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, thresholds=[0.5, 0.5])
        with pytest.raises(InputError, match=r"one fraction in \[0, 1\] per finding \(2\); got \[0.5\]"):
            GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, task="multi", thresholds=[0.5])
        with pytest.raises(InputError, match="finding names may not contain '|'"):
            GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, task="multi", class_names=["a|b", "c"])
        with pytest.raises(InputError, match="task must be one of single, multi; got 'regression'"):
            GrayEfficientNet("tf_efficientnet_lite0", num_classes=2, task="regression")


class TestBestEpoch:
    @staticmethod
    def rows(**columns):
        n = len(next(iter(columns.values())))
        return [{k: v[i] for k, v in columns.items()} for i in range(n)]

    def test_each_metric_and_its_direction(self):
        history = self.rows(val_acc=[0.5, 0.9, 0.7], val_loss=[0.4, 0.6, 0.3], val_auc=[0.8, 0.7, 0.95])
        assert [best_epoch(history, m) for m in ("acc", "loss", "auc")] == [1, 2, 2]

    def test_ties_go_to_the_first_and_nan_is_worst(self):
        nan = math.nan
        assert best_epoch(self.rows(val_acc=[0.5, 0.9, 0.9]), "acc") == 1
        assert best_epoch(self.rows(val_auc=[nan, 0.6, nan, 0.6]), "auc") == 1
        assert best_epoch(self.rows(val_loss=[nan, nan]), "loss") == 0  # still a best.safetensors


class TestLegacyState:
    def test_state_written_before_select_by_resumes_by_accuracy(self, run_dir, tmp_path, capsys):
        """A state file without select_by, val_auc, val_ap, task or thresholds (before issue 20) still resumes."""
        data, run = run_dir
        state = torch.load(run / STATE_NAME, weights_only=True)
        del state["select_by"]
        state["best_val_acc"] = state["history"][0]["val_acc"]
        for key in ("task", "thresholds", "val_auc"):
            del state[META_KEY][key]
        for row in state["history"]:  # and the columns metrics.csv gained in the same release
            del row["val_auc"], row["val_ap"], row["data_wait_s"], row["val_seconds"]
        out = tmp_path / "run"
        out.mkdir()
        torch.save(state, out / STATE_NAME)
        code = train.cli(["--data", str(data), "--output", str(out), "--resume", "--epochs", "2", "--no-pretrained",
                          "--threads", "1", "--channels-last", "off", *SIZE, *QUIET])
        assert code == 0, capsys.readouterr().err
        assert "resumed from" in capsys.readouterr().out
        saved = torch.load(out / STATE_NAME, weights_only=True)
        assert saved["select_by"] == "acc" and [r["epoch"] for r in saved["history"]] == [0, 1]
        assert math.isnan(saved["history"][0]["val_auc"]) and not math.isnan(saved["history"][1]["val_auc"])

    def test_other_select_by_refused(self, run_dir, tmp_path, capsys):
        data, run = run_dir
        out = tmp_path / "run"
        shutil.copytree(run, out)
        code = train.cli(["--data", str(data), "--output", str(out), "--resume", "--epochs", "2", "--no-pretrained",
                          "--select-by", "loss", *SIZE, *QUIET])
        err = capsys.readouterr().err
        assert code == 2 and "select_by: the checkpoint has 'acc', this run has 'loss'" in err, err


class TestFormatVersion:
    def test_version_1_reads_as_single_label(self, run_dir, tmp_path):
        """A file written before issue 20: format_version 1, no task, thresholds or val_auc."""
        _, run = run_dir
        _, meta = read_checkpoint(run / "best.safetensors")
        assert meta["format_version"] == 2
        old = {k: v for k, v in meta.items() if k not in ("task", "thresholds", "val_auc")}
        path = tmp_path / "v1.safetensors"
        _write_safetensors(run / "best.safetensors", path, {**old, "format_version": 1})
        model = load_model(path)
        assert (model.task, model.thresholds, model.num_classes) == ("single", None, 3)


class TestCheckpointPathPayload:
    def test_checkpoint_path_refused_and_payload_never_runs(self, run_dir, tmp_path):
        """timm_kwargs naming a pickle beside the file: refused before timm, so the pickle is never opened."""
        _, run = run_dir
        _, meta = read_checkpoint(run / "best.safetensors")
        marker = tmp_path / "pwned"
        torch.save({"state_dict": PicklePayload(marker)}, tmp_path / "cfg.pth")
        path = tmp_path / "w.safetensors"
        _write_safetensors(run / "best.safetensors", path,
                           {**meta, "timm_kwargs": {"checkpoint_path": str(tmp_path / "cfg.pth")}})
        with pytest.raises(WeightsError, match="'timm_kwargs' holds 'checkpoint_path'.*would make timm open"):
            load_model(path)
        assert not marker.exists()
        # The same payload loaded the way timm would have, to show the test would see it run.
        with pytest.raises(Exception):  # noqa: B017 - any refusal: torch's weights_only unpickler raises
            torch.load(tmp_path / "cfg.pth", weights_only=True)
        assert not marker.exists()


def _cli_cases(run_dir, tmp_path, cli: str):
    """Yield (case, argv runner, output folder) for every fuzz case through ``cli``."""
    data, run = run_dir
    tensors, meta = read_checkpoint(run / "best.safetensors")
    state = torch.load(run / STATE_NAME, weights_only=True)
    cases = _cases(meta)
    if cli == "resume":  # the state file's own fields too
        cases += [("state-epoch-type", ("epoch", "1")), ("state-history", ("history", [{"epoch": 0}])),
                  ("state-optimizer", ("optimizer", [1])), ("state-rng", ("rng", {"torch": 1})),
                  ("state-select-by", ("select_by", "x")), ("state-model-missing", ("model", None))]
    for case, bad in cases:
        out = tmp_path / case
        out.mkdir()
        if cli == "resume":
            new = dict(state)
            if case.startswith("state-"):
                key, value = bad
                new[key] = value
            elif isinstance(bad, str):
                new[META_KEY] = bad  # a string where the metadata should be
            else:
                new[META_KEY] = bad
            torch.save(new, out / STATE_NAME)
            argv = ["--data", str(data), "--output", str(out), "--resume", "--epochs", "2", "--no-pretrained",
                    *SIZE, *QUIET]
        else:
            weights = out / "best.safetensors"
            _write_safetensors(run / "best.safetensors", weights, bad)
            argv = {
                "predict": ["predict", "--weights", str(weights), "--data", str(data), "--workers", "0",
                            "--output", str(out / "p.csv")],
                "export": ["export", "--weights", str(weights), "--format", "torchscript", "--output",
                           str(out / "m.pt")],
                "evaluate": ["--evaluate", "--weights", str(weights), "--data", str(data), "--output", str(out),
                             *QUIET],
            }[cli]
        yield case, argv, out


@pytest.mark.slow
@pytest.mark.parametrize("cli", ["predict", "export", "evaluate", "resume"])
def test_fuzz_every_field_through_every_cli(run_dir, tmp_path, capsys, cli):
    entry = gray_effnet_main if cli in ("predict", "export") else train.cli
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a command that wrote to the working folder would show up in the listing
    try:
        for case, argv, out in _cli_cases(run_dir, tmp_path, cli):
            before = _files(tmp_path, out)
            marker_dir = out.parent
            code = entry(argv)
            err = capsys.readouterr().err
            _assert_one_error_line(code, err, f"{cli}/{case}")
            assert _files(tmp_path, out) == before, f"{cli}/{case} created files outside {out}"
            assert not (marker_dir / "pwned").exists()
            shutil.rmtree(out)
    finally:
        os.chdir(cwd)
