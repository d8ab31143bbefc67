"""Every command and snippet in README.md and docs/*.md runs, as written there (extracted from the pages).

Commands run in a temporary folder, README.md's first, then each page of docs/ in ``DOCS`` order, each page's
in the order it gives them, so that a later command finds what an earlier one wrote (the demo's checkpoint,
``runs/xray``). What differs from a user's run is only what a test on 2 CPU cores needs, and each difference is
listed in ``SUBSTITUTIONS`` and ``FAST``: placeholder folders become small generated ones, and training is 1
epoch at 32x32. The README's Layout block is checked against the files and their imports, and every link of
the pages against the files and headings it points to.
"""

import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The pages of docs/ whose commands run after README.md's, in this order; a page not listed runs after them, by name.
DOCS = ["training.md", "packs.md", "dicom.md", "adapters.md", "checkpoints.md", "models.md", "benchmarks.md",
        "reliability.md"]
# Links to pages that another change of issue #19 writes.
PENDING = {"docs/tables.md"}


def pages() -> list[Path]:
    """README.md, then docs/ in DOCS order, then any other page of docs/ by name."""
    listed = [ROOT / "docs" / name for name in DOCS]
    return [ROOT / "README.md", *listed, *sorted(set((ROOT / "docs").glob("*.md")) - set(listed))]

# Placeholders in the README, and what stands for them here.
SUBSTITUTIONS = {
    "/path/to/folders": "{data}",
    "/path/to/ct": "{ct}",  # copies of pydicom's CT_small.dcm
    " DIR ": " {data} ",
    "/new/images": "{new}",
    # torch.compile on the CPU takes about two minutes per graph; compiled == eager is tested on the stem.
    " --compile": "",
    "--nproc_per_node=4": "--nproc_per_node=2",
    # Training commands get FAST's --img-size 32 32, and a pack fixes the size it is trained at.
    "--img-size 64 64 --output runs/xray-pack": "--img-size 32 32 --output runs/xray-pack",
}
# Appended to every training command (argparse keeps the last value).
FAST = ["--epochs", "1", "--img-size", "32", "32", "--batch-size", "16", "--workers", "0", "--no-progress"]
# Appended to every compare.py sweep: 2 adapters, 2 seeds, one tiny size, one epoch.
COMPARE_FAST = ["--per-class", "3", "--seeds", "2", "--epochs", "1", "--min-steps", "1", "--max-steps", "2",
                "--eval-every", "1",
                "--adapters", "repeat", "fold", "--no-scratch", "--img-size", "32", "32", "--jobs", "1"]


def blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def commands(text: str = README) -> list[str]:
    """Each command line of a page's bash blocks, without the setup before the last ``&&``."""
    out = []
    for block in blocks("bash", text):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()  # a trailing comment
            if not line or line.startswith("#"):
                continue
            if "pytest" in line:
                continue  # the test command itself: CI runs it (.ci/run), this is inside it
            if "--index-url" in line:
                continue  # the CPU-only install needs PyTorch's own index, which this machine cannot reach
            out.append(line.split("&&")[-1].strip())
    return out


def _images(folder: Path, n: int, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("readme")
    for i, name in enumerate(("normal", "effusion")):
        _images(root / "data" / name, 12, seed=i)
    _images(root / "new", 5, seed=9)
    ct = pytest.importorskip("pydicom.data").get_testdata_file("CT_small.dcm")
    for name in ("a", "b"):
        (root / "ct" / name).mkdir(parents=True)
        for i in range(6):
            (root / "ct" / name / f"{i}.dcm").write_bytes(Path(ct).read_bytes())
    (root / "work").mkdir()
    (root / "work" / "train.py").write_bytes((ROOT / "train.py").read_bytes())
    env = {**os.environ, "GRAY_EFFNET_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return root, env


ASSIGNMENT = re.compile(r"^(\w+)=\$\((.*)\)$")  # NAME=$(command): later lines use "$NAME"


def _run(line: str, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    for old, new in SUBSTITUTIONS.items():
        line = line.replace(old, new.format(data=root / "data", new=root / "new", ct=root / "ct"))
    assignment = ASSIGNMENT.match(line)
    if assignment:  # run the command, and keep its output for the lines that name the variable
        res = _run(assignment.group(2), root, env)
        env[assignment.group(1)] = res.stdout.strip()
        return res
    line = re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), line)
    argv = shlex.split(line)
    if len(argv) > 1 and argv[1].startswith("benchmarks/"):
        argv[1] = str(ROOT / argv[1])
        if "--report-only" not in argv:
            argv += COMPARE_FAST
            argv += [] if "--data" in argv else ["--data", str(root / "data")]
            runs = len(list((root / "work").glob("runs/*")))
            argv += [] if "--output" in argv else ["--output", f"runs/compare-{runs}"]
            argv += ["--device", "cpu", "--amp", "none"] if "--gpu" in argv else []  # the preset's code, on the CPU
    elif "train.py" in argv and "--evaluate" not in argv:
        argv += FAST
    elif "train.py" in argv:
        argv += ["--workers", "0", "--no-progress"]
    if argv[0] == "python":
        argv[0] = sys.executable
    return subprocess.run(argv, cwd=root / "work", env=env, capture_output=True, text=True, timeout=600)


class TestReadme:
    def test_has_the_two_commands(self):
        demo, tests = blocks("bash")[:2]
        assert "pip install -e \".[demo]\"" in demo and "python train.py" in demo
        assert "pip install -e \".[test]\"" in tests and "python -m pytest" in tests

    @pytest.mark.slow
    def test_commands_then_snippets_run(self, workdir):
        """Page by page: the bash commands in order, then the python snippets, in the folder the commands wrote to."""
        root, env = workdir
        assert any("train.py --adapter broadcast" in c for c in commands())  # the demo
        snippets = 0
        for page in pages():
            name, text = page.relative_to(ROOT).as_posix(), page.read_text()
            for line in commands(text):
                res = _run(line, root, env)
                assert res.returncode == 0, f"{name}: {line}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
            cwd = os.getcwd()
            os.chdir(root / "work")
            try:
                for code in blocks("python", text):
                    exec(compile(code, name, "exec"), {"__name__": "readme"})  # noqa: S102 - our own pages
                    snippets += 1
            finally:
                os.chdir(cwd)
        assert snippets

    def test_numbers_are_generated_from_results(self):
        """Every measured number stands in a region that tools/readme.py renders from committed results."""
        res = subprocess.run([sys.executable, str(ROOT / "tools" / "readme.py"), "--check"], capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr
        regions = [r for page in pages() for r in re.findall(r"<!-- generated:(\w+) -->\n(.*?)<!-- /generated",
                                                               page.read_text(), flags=re.S)]
        assert len(regions) >= 4
        for name, text in regions:  # a path of the machine that measured it says nothing to a reader
            assert not re.search(r"(?<![\w.:/~-])/(home|root|tmp|work|Users|mnt|opt|var)/", text), name

    def test_peer_ratios_and_verdicts_are_the_benchmarks_own(self):
        """The peer table's ratio and goal verdict per config are peer_timm.py's (the median of per-round ratios),
        not a ratio of medians, which can land on the other side of a goal."""
        report = (ROOT / "benchmarks" / "results" / "peer_timm" / "results.md").read_text()
        own = {m[0]: (float(m[1]), m[2]) for m in
               re.findall(r"^\| (\w+) \| \d+ \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|.*\| (yes|no) \| (?:yes|no) \|$",
                          report, flags=re.M)}
        page = (ROOT / "docs" / "benchmarks.md").read_text()
        shown = {m[0]: (float(m[1]), m[2]) for m in
                 re.findall(r"^\| (\w+) \| \d+ \| \d+ \| \*\*([\d.]+)x\*\* \| <= [\d.]+x \((met|NOT met)\)",
                            page, flags=re.M)}
        assert own and set(shown) == set(own)
        for config, (ratio, met) in own.items():
            assert shown[config][0] == pytest.approx(ratio, abs=0.005), config
            assert (shown[config][1] == "met") == (met == "yes"), config

    def test_explain_output_is_what_the_command_prints(self, workdir):
        """The explain output block (docs/adapters.md) is the real output of the command above it, number for number."""
        root, env = workdir
        page = next(p.read_text() for p in pages() if "python -m gray_effnet explain" in p.read_text())
        line = next(c for c in commands(page) if "gray_effnet explain" in c)
        shown = re.search(r"```\n(Why a 3-channel .*?)```", page, flags=re.S).group(1)
        res = _run(line, root, env)
        assert res.returncode == 0, res.stderr
        got, want = res.stdout.split(), shown.split()
        assert len(got) == len(want), res.stdout
        for g, w in zip(got, want):
            if _number(g) is None or _number(w) is None:
                assert g == w, res.stdout
            elif abs(_number(w)) < ROUNDING:  # float rounding, which differs between CPUs' kernels
                assert abs(_number(g)) < ROUNDING, (g, w)
            else:
                assert _number(g) == pytest.approx(_number(w), rel=0.02), (g, w)


ROUNDING = 1e-5


def _number(token: str) -> float | None:
    try:
        return float(token.rstrip("%"))
    except ValueError:
        return None


def _layout() -> list[str]:
    """The paths the README's Layout block names, in its order."""
    block = re.search(r"^## Layout\n\n```\n(.*?)```", README, flags=re.S | re.M).group(1)
    return [line.split()[0] for line in block.splitlines() if line.strip()]


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


class TestLayout:
    def test_every_module_and_script_is_listed_and_every_listed_one_exists(self):
        listed = _layout()
        for folder in ("gray_effnet", "benchmarks"):
            files = {f"{folder}/{p.name}" for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
            named = {p for p in listed if p.startswith(f"{folder}/") and p.endswith(".py")}
            assert files - named == set(), f"{folder}/ files missing from the README's Layout: {files - named}"
            assert named - files == set(), f"the README's Layout names files that do not exist: {named - files}"
        assert all((ROOT / p).exists() for p in listed), [p for p in listed if not (ROOT / p).exists()]

    def test_imports_run_down_the_list(self):
        """Each gray_effnet module imports only the package's modules listed above it (late imports included)."""
        order = [p.split("/")[1][:-3] for p in _layout() if p.startswith("gray_effnet/")]
        for i, module in enumerate(order):
            tree = ast.parse((ROOT / "gray_effnet" / f"{module}.py").read_text())
            imported = set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 1:
                    imported |= {node.module} if node.module else {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gray_effnet."):
                    imported.add(node.module.split(".")[1])
                elif isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("gray_effnet.")}
            below = imported - set(order[:i])
            assert not below, f"gray_effnet/{module}.py imports {sorted(below)}, listed below it in the README's Layout"


class TestLinks:
    def test_every_relative_link_and_anchor_resolves(self):
        bad = []
        for page in pages():
            text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code blocks hold no links
            for target in re.findall(r"\]\(([^)\s]+)\)", text):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                if dest.relative_to(ROOT).as_posix() in PENDING:
                    continue
                if not dest.exists():
                    bad.append(f"{page.name}: {target} (no such file)")
                elif anchor and dest.suffix == ".md":
                    headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", dest.read_text(), flags=re.S),
                                          flags=re.M)
                    if anchor not in {_slug(h) for h in headings}:
                        bad.append(f"{page.name}: {target} (no such heading)")
        assert not bad, bad
