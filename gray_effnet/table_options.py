"""How to read a label table: the ``--labels`` flags as one checked object (``tables.py`` reads the table).

This module imports nothing heavy, so that ``cli.table_options`` can build and check the options before torch is
imported and before any file is read.
"""

from collections import Counter
from dataclasses import asdict, dataclass

from .errors import DataError, InputError
from .limits import unprintable

__all__ = ["UNCERTAIN_POLICIES", "TableOptions", "has_control"]

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")  # CheXpert's U-Ignore, U-Ones, U-Zeros


def has_control(text: str) -> bool:
    """Whether ``text`` holds characters a terminal or a spreadsheet would act on (``limits.unprintable``)."""
    return bool(unprintable(text))


@dataclass(frozen=True)
class TableOptions:
    """How to read a label table (the ``--labels`` flags, built by ``cli.table_options``).

    Args:
        labels: the CSV file.
        path_column: the column of image paths, relative to the data folder.
        label_column: the column holding one label per row (single-label) or, with a separator, the findings.
        label_columns: one column per finding, holding 1, 0, -1 or blank (multi-label).
        label_sep: split ``label_column``'s cells into findings at this string (multi-label).
        uncertain: what -1 in ``label_columns`` means: ``ignore`` (NaN), ``ones`` or ``zeros``.
        group_column: split by this column (a patient id), so that no group is in both train and val.
        split_column: the split given per row: train, val or test.
        multi_label: several findings per image; with ``label_column`` and no ``label_sep``, they are split at '|'.
    """

    labels: str
    path_column: str = "path"
    label_column: str | None = None
    label_columns: tuple[str, ...] = ()
    label_sep: str | None = None
    uncertain: str = "ignore"
    group_column: str | None = None
    split_column: str | None = None
    multi_label: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "label_columns", tuple(self.label_columns or ()))
        if self.label_column is None and not self.label_columns:
            raise InputError("--labels needs --label-column NAME (one label per row, or several findings with "
                             "--label-sep) or --label-columns NAME ... (one column per finding)")
        if self.label_column is not None and self.label_columns:
            raise InputError("give --label-column or --label-columns, not both")
        if self.label_sep is not None and self.label_columns:
            raise InputError("--label-sep splits --label-column's cells into findings; --label-columns already has "
                             "one column per finding")
        if self.label_sep is not None and (not self.label_sep or has_control(self.label_sep)):
            raise InputError(f"--label-sep must be a non-empty string without control characters; got "
                             f"{self.label_sep!r}")
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise InputError(f"--uncertain must be one of {', '.join(UNCERTAIN_POLICIES)}; got {self.uncertain!r}")
        names = [self.path_column, self.label_column, *self.label_columns, self.group_column, self.split_column]
        for name in names:
            if name is not None and (not name.strip() or has_control(name)):
                raise InputError(f"column names must be non-empty, without control characters; got {name!r}")
        used = [n.strip() for n in names if n is not None]
        repeated = sorted(n for n, k in Counter(used).items() if k > 1)
        if repeated:
            raise InputError(f"a column can serve one purpose only (path, label, group or split); {repeated} "
                             "is named twice")

    @property
    def task(self) -> str:
        """``single`` (a class index per image) or ``multi`` (a 0/1/NaN vector of findings per image)."""
        return "multi" if self.label_columns or self.label_sep is not None or self.multi_label else "single"

    @property
    def sep(self) -> str | None:
        """The separator of findings in ``label_column``, or ``None`` when it holds one class per row."""
        if self.label_column is None or self.task == "single":
            return None
        return self.label_sep if self.label_sep is not None else "|"

    def flags(self) -> list[str]:
        """The command-line flags that read the table this way (for commands printed to be run again)."""
        out = ["--labels", str(self.labels)]
        if self.path_column != "path":
            out += ["--path-column", self.path_column]
        if self.label_column is not None:
            out += ["--label-column", self.label_column]
        if self.label_columns:
            out += ["--label-columns", *self.label_columns]
        if self.label_sep is not None:
            out += ["--label-sep", self.label_sep]
        if self.multi_label and self.label_sep is None and not self.label_columns:
            out += ["--multi-label"]
        if self.uncertain != "ignore":
            out += ["--uncertain", self.uncertain]
        if self.group_column is not None:
            out += ["--group-column", self.group_column]
        if self.split_column is not None:
            out += ["--split-column", self.split_column]
        return out

    def to_json(self) -> dict:
        return {**asdict(self), "label_columns": list(self.label_columns)}

    @classmethod
    def from_json(cls, d: dict) -> "TableOptions":
        known = {f for f in cls.__dataclass_fields__}
        if not isinstance(d, dict) or set(d) - known or "labels" not in d:
            raise DataError(f"table options must be a mapping with the keys {sorted(known)}; got {d!r}")
        return cls(**d)
