"""gray_effnet.intensity: the canonical intensity specs, strict parsing, and the --windows words."""

import numpy as np
import pytest

from gray_effnet import InputError
from gray_effnet.intensity import Intensity, parse_intensity, parse_intensity_args, parse_windows


class TestParse:
    @pytest.mark.parametrize("spec", ["full", "minmax", "window", "12", "1", "32", "range:-1024:3071",
                                      "range:0.5:2.25", "range:-1e-3:0"])
    def test_round_trip(self, spec):
        parsed = parse_intensity(spec)
        assert parse_intensity(str(parsed)) == parsed
        assert parse_intensity(parsed) is parsed

    def test_canonical_forms(self):
        assert str(parse_intensity(" range:-1024.0:3071 ")) == "range:-1024:3071"
        assert parse_intensity("12") == Intensity("bits", bits=12)
        assert parse_intensity("range:-1024:3071") == Intensity("range", low=-1024.0, high=3071.0)

    @pytest.mark.parametrize(("spec", "message"), [
        ("bright", "unknown intensity 'bright'; expected 'full', 'minmax', a bit depth 1..32, 'window' or 'range"),
        ("0", "intensity bit depth must be 1..32; got '0'"),
        ("33", "intensity bit depth must be 1..32; got '33'"),
        ("range:-1024", "a range is written 'range:LO:HI'"),
        ("range:3071:-1024", "the range's low end must be below its high end"),
        ("range:a:1", "'a' is not a finite number"),
        ("range:nan:1", "'nan' is not a finite number"),
        ("range:0:inf", "'inf' is not a finite number"),
        ("ranged:0:1", "a range is written 'range:LO:HI'"),
    ])
    def test_errors(self, spec, message):
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_intensity(spec)

    def test_not_a_string(self):
        with pytest.raises(InputError, match="intensity must be a string"):
            parse_intensity(12)

    def test_dicom_only(self):
        assert parse_intensity("window").dicom_only and parse_intensity("range:0:1").dicom_only
        assert not parse_intensity("full").dicom_only and not parse_intensity("8").dicom_only

    def test_to_unit(self):
        np.testing.assert_allclose(parse_intensity("range:-1000:1000").to_unit([-2000, -1000, 0, 500, 5000]),
                                   [0, 0, 0.5, 0.75, 1])
        with pytest.raises(InputError, match="only a 'range' intensity maps physical values"):
            parse_intensity("full").to_unit(0)


class TestCommandLine:
    @pytest.mark.parametrize(("words", "canonical"), [
        (["range", "-1024", "3071"], "range:-1024:3071"), (["range:-1024:3071"], "range:-1024:3071"),
        (["minmax"], "minmax"), (["12"], "12"), ("full", "full"),
    ])
    def test_words(self, words, canonical):
        assert str(parse_intensity_args(words)) == canonical

    def test_not_given(self):
        assert parse_intensity_args(None) is None

    def test_too_many(self):
        with pytest.raises(InputError, match="expected one word, or 'range LO HI'"):
            parse_intensity_args(["minmax", "12"])

    def test_train_parser_takes_negative_bounds(self):
        train = pytest.importorskip("train")
        args = train.get_args_parser().parse_args(["--intensity", "range", "-1024", "3071",
                                                   "--windows=40:80,-600:1500,600:2800"])
        assert str(parse_intensity_args(args.intensity)) == "range:-1024:3071"
        assert parse_windows(args.windows) == [[40, 80], [-600, 1500], [600, 2800]]
        args = train.get_args_parser().parse_args(["--windows", "40:80", "80:200", "600:2800"])
        assert parse_windows(args.windows) == [[40, 80], [80, 200], [600, 2800]]


class TestWindows:
    @pytest.mark.parametrize(("word", "message"), [("40", "expected CENTER:WIDTH"), ("40:0", "must be positive"),
                                                    ("40:-5", "must be positive"), ("a:5", "not a finite number")])
    def test_errors(self, word, message):
        with pytest.raises(InputError, match=message):
            parse_windows([word])
