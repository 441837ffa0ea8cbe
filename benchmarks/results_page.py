"""docs/results.md as the benchmarks write it: each benchmark's printed tables in a section of its own, stamped
with the date, the commit and the command that produced them; running a benchmark again replaces its section.

    with recorded(args.write, "serve_soak.py", "Serving under load"):
        ...print the tables...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from catdogcnn.bundle import atomic_write, bundled_models_dir, shipped_bundle_names

ROOT = Path(__file__).resolve().parents[1]
HEADER = "# Results, as the benchmarks wrote them\n"


def add_write_option(parser: argparse.ArgumentParser) -> None:
    """The `--write FILE` option every benchmark takes."""
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="also write the tables into FILE's section (docs/results.md)")


def add_bundle_option(parser: argparse.ArgumentParser) -> None:
    """The `--bundle NAME=PATH` option (repeatable) of the benchmarks that measure bundles side by side."""
    parser.add_argument("--bundle", action="append", default=[], metavar="NAME=PATH",
                        help="a bundle to measure (repeatable); default: every shipped bundle")


def chosen_bundles(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Path]:
    """The bundles `--bundle` names, by name; without it, every shipped bundle."""
    if not args.bundle:
        return {name: bundled_models_dir() / name for name in shipped_bundle_names()}
    if not all("=" in item for item in args.bundle):
        parser.error("--bundle takes NAME=PATH")
    return {name: Path(path) for name, path in (item.split("=", 1) for item in args.bundle)}


def rate(ms: list[float]) -> tuple[float, float, float]:
    """Photos a second from times a photo (ms): the rate at the mean time, and its 95% interval (t interval on the
    mean time)."""
    from scipy import stats

    mean = statistics.fmean(ms)
    half = stats.t.ppf(0.975, len(ms) - 1) * statistics.stdev(ms) / len(ms) ** 0.5
    return 1000 / mean, 1000 / (mean + half), 1000 / max(mean - half, 1e-9)


def git_commit() -> str:
    """The short commit, marked when the code or models differ from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src", "benchmarks", "models"],
                                 cwd=ROOT).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" with uncommitted changes" if changed else "")


def processor() -> str:
    """The processor's model name as Linux reports it, and whether it has the VNNI instructions int8 graphs run on
    (`platform.processor()` is often empty on Linux)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = re.search(r"^model name\s*:\s*(.+)$", info, re.MULTILINE)
    vnni = " with AVX-512 VNNI" if re.search(r"\bavx512_vnni\b", info) else ""
    return (name.group(1).strip() if name else platform.machine()) + vnni


def stamp() -> str:
    """Date, commit, processor, cores and load, and the command line, as a section's first lines."""
    return (f"{datetime.date.today().isoformat()}, commit {git_commit()}, {processor()}, {os.cpu_count()} cores, "
            f"load average {os.getloadavg()[0]:.1f} at the end.\n\n    {shlex.join(['python', *sys.argv])}\n")


def write_section(path: Path, name: str, text: str) -> None:
    """Put `text` between the markers of section `name` in `path`: in place of the previous one, else at the end."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    current = path.read_text() if path.exists() else HEADER
    section = f"{start}\n{text.rstrip()}\n{end}\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    current = pattern.sub(lambda _: section, current, count=1) if pattern.search(current) \
        else f"{current.rstrip()}\n\n{section}"
    atomic_write(path, current.encode())


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


@contextlib.contextmanager
def recorded(path: Path | None, name: str, title: str) -> Iterator[None]:
    """Print as usual; with `path`, also write what was printed as section `name` of `path`, under `title`."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)):
        yield
    if path:
        write_section(path, name, f"### {title}\n\n{stamp()}\n{buffer.getvalue()}")
        print(f"written to {path}", file=sys.stderr)
