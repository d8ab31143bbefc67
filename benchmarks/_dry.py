"""Check, without running them, the Python commands that ``benchmarks/gpu.sh --dry`` wrote down.

Each line of the file is one command's arguments after ``python``, shell-quoted. A script (``train.py``,
``benchmarks/*.py``) must exist and have a ``get_args_parser()`` that parses the arguments: a renamed or
removed flag, a bad choice or a missing value fails here, as it would at the start of the real run.
``-m gray_effnet SUB ...`` goes through the package's own parser; ``-m pytest ...`` must collect at least one
test; ``-c CODE`` must compile. One process reads them all, so torch is imported once.

    python benchmarks/_dry.py COMMANDS_FILE
"""

import argparse
import contextlib
import importlib.util
import io
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_script(argv: list[str]) -> str:
    """Parse ``argv[1:]`` with the ``get_args_parser()`` of the script ``argv[0]``; '' when accepted."""
    path = ROOT / argv[0]
    if not path.is_file():
        return f"no such script: {argv[0]}"
    spec = importlib.util.spec_from_file_location(f"_dry_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_args_parser"):
        return f"{argv[0]} has no get_args_parser() to check its flags with"
    return parse_with(module.get_args_parser(), argv[1:])


def parse_with(parser: argparse.ArgumentParser, args: list[str]) -> str:
    """'' when ``parser`` accepts ``args``, else argparse's message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit as e:
        return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit status {e.code}"
    return ""


class _Count:
    """A pytest plugin that counts the collected (selected) tests."""

    items = 0

    def pytest_collection_finish(self, session) -> None:
        self.items = len(session.items)


def collect_pytest(args: list[str]) -> str:
    """'' when ``pytest --collect-only ARGS`` succeeds and selects at least one test."""
    import pytest

    count = _Count()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[count])
    if code != 0:
        return f"pytest --collect-only exited {int(code)}: {out.getvalue().strip().splitlines()[-1:]}"
    return "" if count.items else "selects no test"


def check(argv: list[str]) -> str:
    """'' when the command ``python ARGV`` would start with these arguments, else why not."""
    if not argv:
        return "empty command"
    if argv[0] == "-c":
        try:
            compile(argv[1], "<-c>", "exec")
        except (SyntaxError, IndexError) as e:
            return f"-c: {e}"
        return ""
    if argv[0] == "-m":
        module, args = argv[1], argv[2:]
        if module == "gray_effnet":
            from gray_effnet.__main__ import get_args_parser

            return parse_with(get_args_parser(), args)
        if module == "pytest":
            return collect_pytest(args)
        return f"no check for -m {module}"
    return parse_script(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("commands", help="the file of commands, one a line")
    args = p.parse_args(argv)
    lines = [line for line in Path(args.commands).read_text().splitlines() if line.strip()]
    failed = 0
    for line in lines:
        cmd = shlex.split(line)
        why = check(cmd)
        failed += bool(why)
        print(f"{'FAIL' if why else 'ok'}   python {shlex.join(cmd)}" + (f"\n      {why}" if why else ""), flush=True)
    print(f"dry run: {len(lines) - failed} of {len(lines)} commands accepted")
    return 1 if failed or not lines else 0


if __name__ == "__main__":
    sys.exit(main())
