"""What the command lines share: the --help format and the OpenMP settings made before torch loads.

Imports nothing heavy, so --help answers at once.
"""

import argparse
import os
from collections.abc import MutableMapping

__all__ = ["OPENMP_ENV", "HelpFormatter", "configure_openmp"]

# libgomp's spin before an idle thread sleeps. Its default, 300,000, starves a second process on the same cores;
# 0 (OMP_WAIT_POLICY=PASSIVE) makes a lone run much slower. benchmarks/threads.py measures the choice.
OPENMP_ENV = {"GOMP_SPINCOUNT": "3000"}


def configure_openmp(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``OPENMP_ENV`` where the user set neither it nor ``OMP_WAIT_POLICY``; return what was set.

    Call it before torch is imported: libgomp reads these once, when it loads (``gray_effnet.tuning``).
    """
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:  # the user chose the policy; a spin count would override it
        return {}
    chosen = {k: v for k, v in OPENMP_ENV.items() if k not in environ}
    environ.update(chosen)
    return chosen


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown in ``--help`` (but ``None`` and ``False``: nothing to show); descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""
