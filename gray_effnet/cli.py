"""What the command lines share: the --help format. Imports nothing heavy, so --help answers at once."""

import argparse

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default shown in ``--help`` (but ``None`` and ``False``: nothing to show); descriptions as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help or ""
        return super()._get_help_string(action) or ""
