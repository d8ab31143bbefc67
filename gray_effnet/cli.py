"""What the command lines share: option groups defined once, the --help format, errors as one line, the device.

``train.py`` and ``python -m gray_effnet {pack,predict,...}`` declare their data, intensity and speed options
through the functions here, so a flag means the same everywhere. This module imports nothing heavy (no torch),
so that ``--help`` answers at once.
"""

import argparse
import sys
from collections.abc import Callable

from .errors import GrayEffnetError
from .intensity import INTENSITY_HELP
from .limits import MAX_PIXELS_HELP

__all__ = ["CHANNELS_LAST_MODES", "HelpFormatter", "add_data_options", "add_speed_options", "resolve_device",
           "run_cli"]

CHANNELS_LAST_MODES = ("auto", "on", "off")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown in ``--help`` (but ``None`` and ``False``: nothing to show); descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""


def add_data_options(group, *, data_help: str, img_size_help: str, data_required: bool = False,
                     img_size_required: bool = False, intensity_default: list[str] | None = None,
                     workers_help: str = "data loader processes", workers_default: int | None = 2) -> None:
    """--data, --img-size, --intensity, --strict-data, --max-pixels and --workers."""
    group.add_argument("--data", required=data_required, default=None, help=data_help)
    group.add_argument("--img-size", nargs=2, type=int, required=img_size_required, default=None,
                       metavar=("H", "W"), help=img_size_help)
    group.add_argument("--intensity", nargs="+", default=intensity_default, metavar="MAPPING", help=INTENSITY_HELP)
    group.add_argument("--strict-data", action="store_true",
                       help="decode every file first; refuse to start if any is bad")
    group.add_argument("--max-pixels", type=int, default=None, metavar="N", help=MAX_PIXELS_HELP)
    group.add_argument("--workers", type=int, default=workers_default, help=workers_help)


def add_speed_options(group, *, amp: bool = True) -> None:
    """--device, --channels-last, --threads (and --amp)."""
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda where available)")
    group.add_argument("--channels-last", default="auto", choices=CHANNELS_LAST_MODES,
                       help="NHWC memory format; auto: on with CUDA, on the CPU where a short probe finds it faster")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads of each process (default: its share of the cores; the first lines say)")
    if amp:
        group.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype")


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
