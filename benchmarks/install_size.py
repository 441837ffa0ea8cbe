"""What `pip install catdogcnn` costs: the wheel's size and the size of a fresh virtual environment holding it, as
a markdown table.

    python benchmarks/install_size.py [--extras serve report] [--before REV] [--write docs/results.md]

The wheel is built from the working tree (`pip wheel --no-deps`; it carries the shipped bundles of models/).
Each row is a new `python -m venv` with the wheel installed from PyPI's (cached) packages: the core alone, then
the core with each of `--extras`. `--before REV` adds the core of an older commit, built from `git archive REV`,
to compare with. A venv's size is every file under it, pip and its own files included (about 20 MB bare); one more
row is the core in a venv made without pip, what the package itself runs with.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from results_page import add_write_option, recorded  # a sibling script's helper

ROOT = Path(__file__).resolve().parents[1]
TARGET_MB = {"wheel": 20, "core": 200}  # the wheel, a venv with the core alone
LARGEST = 10  # rows of the core venv's breakdown
# What a venv's programs run with: this environment's PYTHONPATH (a source tree) would shadow the installed wheel.
VENV_ENV = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}


def tree_size(folder: Path) -> int:
    """Bytes of every file under `folder` (links not followed)."""
    return sum((Path(top) / name).lstat().st_size for top, _, names in os.walk(folder) for name in names)


def build_wheel(source: Path, out: Path) -> Path:
    """The wheel of the project at `source`, built into `out`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(source)],
                   check=True, capture_output=True, text=True)
    return next(out.glob("catdogcnn-*.whl"))


def install_venv(folder: Path, requirement: str, with_pip: bool = True) -> Path:
    """A fresh venv in `folder` with `requirement` installed; returns its bin folder. Without pip, the venv holds
    only what the package runs with (as a container image would), and this Python's pip installs into it. A failed
    install raises CalledProcessError with pip's output."""
    subprocess.run([sys.executable, "-m", "venv", str(folder), *([] if with_pip else ["--without-pip"])],
                   check=True, capture_output=True)
    bin_dir = folder / "bin"
    pip = [str(bin_dir / "python"), "-m", "pip"] if with_pip else [sys.executable, "-m", "pip", "--python",
                                                                    str(bin_dir / "python")]
    subprocess.run([*pip, "install", "--quiet", "--disable-pip-version-check", requirement], check=True,
                   capture_output=True, text=True, env=VENV_ENV)
    return bin_dir


def installed_packages(bin_dir: Path) -> int:
    script = "import importlib.metadata as m; print(len({d.metadata['Name'].lower() for d in m.distributions()}))"
    return int(subprocess.run([str(bin_dir / "python"), "-c", script], check=True, capture_output=True,
                              text=True, env=VENV_ENV).stdout)


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extras", nargs="*", default=["serve"], help="extras to measure on top of the core "
                        "(default: serve)")
    parser.add_argument("--before", metavar="REV", help="also the core of this commit, to compare with")
    add_write_option(parser)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, recorded(args.write, "install_size.py", "Install size"):
        tmp = Path(tmp)
        wheels = {"now": build_wheel(ROOT, tmp / "wheel")}
        if args.before:
            source = tmp / "before"
            source.mkdir()
            archive = subprocess.run(["git", "archive", args.before], cwd=ROOT, check=True, capture_output=True)
            subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
            wheels[args.before] = build_wheel(source, tmp / "wheel-before")
        rows = [(args.before, wheels[args.before], "", True)] if args.before else []
        rows += [("now", wheels["now"], "", True), ("now", wheels["now"], "", False),
                 *(("now", wheels["now"], f"[{extra}]", True) for extra in args.extras)]

        print(f"Targets: wheel <= {TARGET_MB['wheel']} MB, a venv with the core alone <= {TARGET_MB['core']} MB.\n")
        print("| code | install | wheel MB | venv MB | packages |")
        print("|---|---|---:|---:|---:|")
        venvs = {}
        for i, (code, wheel, extra, with_pip) in enumerate(rows):
            bin_dir = venvs[code, extra, with_pip] = install_venv(tmp / f"venv{i}", f"{wheel}{extra}", with_pip)
            install = f"catdogcnn{extra or ' (core)'}{'' if with_pip else ', venv without pip'}"
            print(f"| {code} | {install} | {megabytes(wheel.stat().st_size)} | "
                  f"{megabytes(tree_size(bin_dir.parent))} | {installed_packages(bin_dir)} |", flush=True)

        site_packages = next(venvs["now", "", True].parent.glob("lib/python*/site-packages"))
        sizes = sorted(((tree_size(entry) if entry.is_dir() else entry.lstat().st_size, entry.name)
                        for entry in site_packages.iterdir()), reverse=True)
        print("\nThe largest parts of the core's venv (site-packages; catdogcnn holds the shipped bundles):\n")
        print("| folder | MB |")
        print("|---|---:|")
        for size, name in sizes[:LARGEST]:
            print(f"| {name} | {megabytes(size)} |")


if __name__ == "__main__":
    main()
