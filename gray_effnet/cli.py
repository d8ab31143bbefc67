"""What the command lines share: option groups defined once, the --help format, errors as one line, the device.

``train.py`` and ``python -m gray_effnet {pack,predict,...}`` declare their data, intensity and speed options
through the functions here, so a flag means the same everywhere. This module imports nothing heavy (no torch),
so that ``--help`` answers at once.
"""

import argparse
import atexit
import os
import shlex
import sys
import threading
from collections.abc import Callable

from .errors import GrayEffnetError, InputError
from .intensity import INTENSITY_HELP
from .limits import MAX_PIXELS_HELP
from .table_options import UNCERTAIN_POLICIES, TableOptions

__all__ = ["CHANNELS_LAST_MODES", "COMPILE_MODES", "HelpFormatter", "add_data_options", "add_speed_options",
           "command_line", "plural", "resolve_device", "run_cli", "table_options", "workers_count"]

CHANNELS_LAST_MODES = ("auto", "on", "off")
COMPILE_MODES = ("auto", "on", "off")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown in ``--help`` (but ``None`` and ``False``: nothing to show); descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def workers_count(text: str) -> int | str:
    """``--workers``' type: a number, or ``auto`` (``speed.choose_workers``); a negative number is ``check_args``'."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of loader processes, or auto; got {text!r}") from None


def add_data_options(group, *, data_help: str, img_size_help: str, data_required: bool = False,
                     img_size_required: bool = False, intensity_default: list[str] | None = None,
                     workers_help: str = "data loader processes", workers_default: int | str | None = 2) -> None:
    """--data, --img-size, --intensity, --strict-data, --max-pixels, --workers, and a label table's (--labels ...).

    ``workers_default`` ``"auto"`` lets ``--workers`` take ``auto`` too (train.py's ``speed.choose_workers``).
    """
    group.add_argument("--data", required=data_required, default=None, help=data_help)
    group.add_argument("--img-size", nargs=2, type=int, required=img_size_required, default=None,
                       metavar=("H", "W"), help=img_size_help)
    group.add_argument("--intensity", nargs="+", default=intensity_default, metavar="MAPPING", help=INTENSITY_HELP)
    group.add_argument("--strict-data", action="store_true",
                       help="decode every file first; refuse to start if any is bad")
    group.add_argument("--max-pixels", type=int, default=None, metavar="N", help=MAX_PIXELS_HELP)
    group.add_argument("--workers", type=workers_count if workers_default == "auto" else int,
                       default=workers_default, help=workers_help)
    # A label table (docs/tables.md). The checks are TableOptions', made by table_options below.
    group.add_argument("--labels", default=None, metavar="FILE.csv",
                       help="a CSV label table: a row per image, its path relative to --data and its labels")
    group.add_argument("--path-column", default="path", metavar="NAME", help="--labels: the column of image paths")
    group.add_argument("--label-column", default=None, metavar="NAME",
                       help="--labels: the column of labels: one class per row, or with --label-sep (or "
                       "--multi-label) several findings per cell")
    group.add_argument("--label-columns", nargs="+", default=None, metavar="NAME",
                       help="--labels: one column per finding, each cell 1, 0, -1 (uncertain) or blank (unknown, "
                       "ignored), CheXpert style; multi-label")
    group.add_argument("--label-sep", default=None, metavar="SEP",
                       help="--labels: split --label-column's cells into findings at SEP, NIH ChestX-ray14 style "
                       "('|'; 'No Finding' means none); multi-label")
    group.add_argument("--uncertain", default="ignore", choices=UNCERTAIN_POLICIES,
                       help="--label-columns: what -1 means: ignore (left out of the loss and the metrics), ones or "
                       "zeros (CheXpert's U-Ignore, U-Ones, U-Zeros); a blank is always ignored")
    group.add_argument("--group-column", default=None, metavar="NAME",
                       help="--labels: split by this column (a patient id): no group in both train and val")
    group.add_argument("--split-column", default=None, metavar="NAME",
                       help="--labels: the split given per row: train, val or test (test rows are left out)")
    group.add_argument("--multi-label", action="store_true",
                       help="--labels: several findings per image (implied by --label-columns and --label-sep; "
                       "with --label-column alone, its cells are split at '|')")


def add_speed_options(group, *, amp: bool = True) -> None:
    """--device, --channels-last, --threads (and --amp)."""
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda where available)")
    group.add_argument("--channels-last", default="auto", choices=CHANNELS_LAST_MODES,
                       help="NHWC memory format; auto: on with CUDA, on the CPU where a short probe finds it faster")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads of each process (default: its share of the cores; the first lines say)")
    if amp:
        group.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype")


_TABLE_FLAGS = {"path_column": "path", "label_column": None, "label_columns": None, "label_sep": None,
                "uncertain": "ignore", "group_column": None, "split_column": None, "multi_label": False}


def table_options(args: argparse.Namespace) -> TableOptions | None:
    """The label table options (``tables.TableOptions``, checked) of ``args``, or ``None`` without ``--labels``."""
    if getattr(args, "labels", None) is None:
        given = [f"--{k.replace('_', '-')}" for k, default in _TABLE_FLAGS.items() if getattr(args, k, default)
                 != default]
        if given:
            raise InputError(f"{', '.join(given)} read a label table: add --labels FILE.csv")
        return None
    return TableOptions(labels=args.labels, **{k: getattr(args, k) for k in _TABLE_FLAGS})


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 class``, ``3 classes``: a count with its noun."""
    return f"{n} {word if n == 1 else words or word + 's'}"


def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, prog: list[str]) -> str:
    """The command as it could be typed again: ``prog`` and every argument that is not at its default."""
    parts = list(prog)
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest == "help" or value == action.default:
            continue
        flag = action.option_strings[0]
        if value is True or value is False:
            parts.append(flag if value else f"--no-{flag[2:]}")
        else:
            parts += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
    return shlex.join(parts)


def resolve_device(name: str | None) -> str:
    """The device to run on: ``name``, or ``cuda`` where a GPU is available and ``cpu`` elsewhere."""
    if name:
        return name
    import torch  # only here: --help must not wait for torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_cli(main: Callable[[argparse.Namespace], object], args: argparse.Namespace, *,
            interrupted: str | None = None, finally_: Callable[[], None] | None = None) -> int:
    """Run ``main(args)``; this project's errors become one ``error:`` line and exit code 2.

    Args:
        main: the command.
        args: its parsed arguments.
        interrupted: printed on Ctrl-C (exit code 130); without it, Ctrl-C raises as usual.
        finally_: called in every case (e.g. to tear down a process group).
    """
    try:
        main(args)
    except GrayEffnetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    finally:
        if finally_ is not None:
            finally_()
    return 0


def exit_without_teardown(code: int) -> None:
    """End a finished command-line run with ``code``, skipping only the interpreter's teardown of its modules.

    As at a normal exit, the other non-daemon threads are joined, the ``atexit`` handlers run (multiprocessing's
    stops the loader workers) and the standard streams are flushed. What is skipped is the freeing of every module
    and object one by one, which after importing torch, torchvision and timm takes 1.0-1.4 s on 2 cores. Called
    only from ``if __name__ == "__main__"`` blocks, with what their command returned: an uncaught exception never
    gets here, and exits as usual with its traceback.
    """
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
            pass
    os._exit(code)
