"""Checkpoint metadata is untrusted input: every field is checked, through every command that reads it.

The fuzz cases start from real files (a 1-epoch run of train.py) and change one field each: a wrong type,
a wrong value, or a missing field. Each must end in one ``error:`` line and exit code 2 through
``predict``, ``export``, ``train.py --evaluate`` and ``train.py --resume``, with no traceback and no file
created outside the output folder.
"""

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
from gray_effnet import WeightsError, load_model
from gray_effnet.__main__ import main as gray_effnet_main
from gray_effnet.checkpoint import META_KEY, SAFE_TIMM_KWARGS, STATE_NAME, read_checkpoint, validate_metadata

from .helpers import PicklePayload

SIZE = ["--img-size", "32", "32"]
QUIET = ["--workers", "0", "--no-progress"]

# field -> bad values: (label, value). A missing required field is added below.
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
    "intensity": [("type", 12), ("unknown", "gamma"), ("long", "range:" + "1" * 100 + ":2")],
    "adapter_kwargs": [("type", [1]), ("foreign-option", {"windows": [[40, 80]]}),
                       ("not-numbers", {"windows": "x"})],
}
REQUIRED = ["format_version", "model_name", "adapter", "num_classes", "mean", "std"]
OPTIONAL = ["class_names", "img_size", "timm_kwargs", "intensity", "adapter_kwargs", "epoch", "val_acc", "val_loss"]


def _cases(meta: dict) -> list[tuple[str, object]]:
    """(name, metadata) pairs; metadata is a dict, or a str for the raw JSON text."""
    cases = []
    assert set(meta) <= set(BAD_FIELDS) | {"format_version"} | set(REQUIRED), (
        f"fields written but not fuzzed: {sorted(set(meta) - set(BAD_FIELDS))}")
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
                  ("state-best", ("best_val_acc", "x")), ("state-model-missing", ("model", None))]
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
