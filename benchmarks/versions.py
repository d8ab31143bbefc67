"""Would pyproject.toml's dependency ranges admit these versions? For a machine whose packages we cannot choose.

The GPU machine comes with its own torch and numpy; this says, before a run, whether this project's declared
ranges (``[project] dependencies`` and every ``optional-dependencies`` group) accept them. Versions are compared
with ``packaging`` where it is installed, else with a small comparison of release numbers (local labels such as
``+cu130`` dropped, pre-releases compared by their release numbers only).

    python benchmarks/versions.py torch==2.11.0 numpy==2.5.2        # versions another machine has
    python benchmarks/versions.py --installed torch numpy pillow    # the versions installed here

Exit status: 0 when every version is admitted, 1 when one is not (or is not installed), 2 for bad input.
"""

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:
    Requirement = SpecifierSet = Version = None

ROOT = Path(__file__).resolve().parent.parent
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(;.*)?$")
_CLAUSE = re.compile(r"^(~=|==|!=|<=|>=|<|>)\s*(\S+)$")


def normalise(name: str) -> str:
    """PEP 503's comparable form of a project name: ``Efficientnet_Lite0`` -> ``efficientnet-lite0``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirement(text: str) -> tuple[str, str]:
    """``"torch>=2.4"`` -> ``("torch", ">=2.4")``; the name normalised, extras and environment markers dropped."""
    if Requirement is not None:
        req = Requirement(text)
        return normalise(req.name), str(req.specifier)
    m = _REQUIREMENT.match(text)
    if not m:
        raise ValueError(f"not a requirement: {text!r}")
    return normalise(m.group(1)), m.group(3).replace(" ", "")


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of ``version``: ``2.11.0+cu130`` -> (2, 11, 0); ``2.0.0rc1`` -> (2, 0, 0)."""
    m = re.match(r"^v?(\d+(?:\.\d+)*)", version.strip().split("+", 1)[0])
    if not m:
        raise ValueError(f"not a version: {version!r}")
    return tuple(int(p) for p in m.group(1).split("."))


def _padded(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def _clause_admits(op: str, bound: str, version: str) -> bool:
    v = _release(version)
    if op in ("==", "!=") and bound.endswith(".*"):
        prefix = _release(bound[:-2])
        same = v[: len(prefix)] == prefix
        return same if op == "==" else not same
    b = _release(bound)
    if op == "~=":  # ~=2.4.1 means >=2.4.1 and ==2.4.*
        return _padded(v, b)[0] >= _padded(v, b)[1] and v[: len(b) - 1] == b[: len(b) - 1]
    v, b = _padded(v, b)
    return {"==": v == b, "!=": v != b, "<=": v <= b, ">=": v >= b, "<": v < b, ">": v > b}[op]


def admits(specifier: str, version: str) -> bool:
    """Whether ``version`` satisfies ``specifier`` (``">=2.4,<3"``; empty: anything).

    Example:
        >>> admits(">=2.4", "2.11.0+cu130"), admits(">=2.12", "2.11.0")
        (True, False)
    """
    if SpecifierSet is not None:
        # A local label (+cu130) names a build, not a release: compare the public version.
        return SpecifierSet(specifier).contains(Version(version).public, prereleases=True)
    clauses = [c.strip() for c in specifier.split(",") if c.strip()]
    for clause in clauses:
        m = _CLAUSE.match(clause)
        if not m:
            raise ValueError(f"cannot read the version clause {clause!r}")
        if not _clause_admits(m.group(1), m.group(2), version):
            return False
    return True


def declared(pyproject: str | Path) -> dict[str, list[str]]:
    """Every requirement of ``pyproject``'s ``[project]``, by normalised name: ``{"torch": [">=2.4"], ...}``."""
    project = tomllib.loads(Path(pyproject).read_text()).get("project", {})
    texts = list(project.get("dependencies", []))
    for group in project.get("optional-dependencies", {}).values():
        texts += group
    out: dict[str, list[str]] = {}
    for text in texts:
        name, spec = parse_requirement(text)
        out.setdefault(name, []).append(spec)
    return out


def check(pyproject: str | Path, versions: dict[str, str | None]) -> list[dict]:
    """One row per package: its version, the ranges that name it, and whether all of them admit it.

    Args:
        pyproject: the ``pyproject.toml`` to read.
        versions: package name -> version (``None``: not installed, which fails).
    """
    ranges = declared(pyproject)
    rows = []
    for name, version in versions.items():
        specs = ranges.get(normalise(name), [])
        if version is None:
            ok, why = False, "not installed"
        elif not specs:
            ok, why = True, "not a dependency"
        else:
            ok = all(admits(s, version) for s in specs)
            why = "admitted" if ok else "REJECTED"
        rows.append({"package": name, "version": version or "-", "ranges": " and ".join(s or "any" for s in specs)
                     or "-", "ok": ok, "result": why})
    return rows


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("versions", nargs="*", metavar="NAME==VERSION", help="versions to check")
    p.add_argument("--installed", nargs="+", default=[], metavar="NAME", help="check the versions installed here")
    p.add_argument("--pyproject", default=str(ROOT / "pyproject.toml"), help="the file whose ranges to read")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    versions: dict[str, str | None] = {}
    try:
        for item in args.versions:
            name, sep, version = item.partition("==")
            if not sep or not name or not version:
                raise ValueError(f"expected NAME==VERSION; got {item!r}")
            _release(version)
            versions[name] = version
        versions.update({name: installed(name) for name in args.installed})
        if not versions:
            raise ValueError("name versions to check (NAME==VERSION) or --installed NAME")
        rows = check(args.pyproject, versions)
    except (ValueError, OSError, tomllib.TOMLDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    width = max(len(r["package"]) for r in rows)
    for r in rows:
        print(f"{r['package']:<{width}}  {r['version']:<14}  {r['result']:<16}  {r['ranges']}")
    print(f"compared with {'packaging' if SpecifierSet is not None else 'release numbers (no packaging)'}; "
          f"ranges from {args.pyproject}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
