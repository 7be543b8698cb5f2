"""Shared pieces of `pytest benchmarks/`: generated checkpoint pairs (cached between runs),
same-run reference measurements, and the report table printed at the end of the session.

Benchmarks report numbers and never fail on them; they do fail when a result is wrong.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import fastmerge
from fastmerge.synthetic import write_pair

DEFAULT_BENCH_DIR = Path(
    os.environ.get("FASTMERGE_BENCH_DIR", Path.home() / ".cache" / "fastmerge-bench")
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastmerge")
    group.addoption(
        "--bench-dir",
        type=Path,
        default=DEFAULT_BENCH_DIR,
        help="where generated checkpoint pairs are cached (FASTMERGE_BENCH_DIR)",
    )
    group.addoption(
        "--bench-report",
        type=Path,
        default=None,
        help="also write the report table, as Markdown, to this file",
    )


@dataclass
class Report:
    """Rows of (benchmark, measurement, value, same-run reference, ratio)."""

    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)

    def add(
        self, benchmark: str, measurement: str, value: str, reference: str = "", ratio: str = ""
    ) -> None:
        self.rows.append((benchmark, measurement, value, reference, ratio))

    def markdown(self) -> str:
        header = ("benchmark", "measurement", "value", "same-run reference", "ratio")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join([machine_stamp(), "", *lines])


_REPORT = Report()


@pytest.fixture(scope="session")
def report() -> Report:
    return _REPORT


def machine_stamp() -> str:
    """CPU, cores, GPU, versions and date, so a table says where it was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU machines; any import failure means absent
        triton_version = "absent"
    import safetensors

    return (
        f"machine: {cpu}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, GPU {gpu}; "
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}, "
        f"safetensors {safetensors.__version__}, fastmerge {fastmerge.__version__}; "
        f"{datetime.date.today().isoformat()}"
    )


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _REPORT.rows:
        return
    table = _REPORT.markdown()
    terminalreporter.write_sep("=", "fastmerge benchmark report")
    terminalreporter.write_line(table)
    destination = config.getoption("--bench-report")
    if destination is not None:
        destination.write_text(table + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def bench_dir(pytestconfig: pytest.Config) -> Path:
    directory = pytestconfig.getoption("--bench-dir")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@pytest.fixture(scope="session")
def pair_135m(bench_dir: Path) -> tuple[Path, Path]:
    """SmolLM-135M-shaped bf16 pair, tied, one file each."""
    return write_pair(bench_dir / "smollm-135m", "smollm-135m")


@pytest.fixture(scope="session")
def pair_1b(bench_dir: Path) -> tuple[Path, Path]:
    """1.1B-parameter bf16 pair (22 layers, hidden 2048), untied, 3 shards each."""
    return write_pair(bench_dir / "1b", "1b", shards=3)


def best_seconds(function, rounds: int = 1) -> float:
    """The best wall time of `rounds` calls (the least disturbed by a shared machine)."""
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def write_floor(directory: Path, nbytes: int) -> float:
    """Seconds to write and fsync `nbytes` to a new file in `directory`: the time any merge
    that writes this output needs at least."""
    path = directory / "write-floor.bin"
    block = memoryview(bytearray(8 * 2**20))
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, block[: min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    path.unlink()
    return elapsed


_PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "code = subprocess.run(sys.argv[1:]).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)\n"
)


def run_measured(command: list[str]) -> tuple[float, int]:
    """Run a command in a child process; its wall time in seconds and peak RSS in bytes."""
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, *command], capture_output=True, text=True, check=True
    )
    elapsed = time.perf_counter() - started
    peak_kib, code = completed.stdout.split()[-2:]
    assert code == "0", f"{command} failed:\n{completed.stderr[-2000:]}"
    return elapsed, int(peak_kib) * 1024


def slerp_command(a: Path, b: Path, out: Path, t: float) -> list[str]:
    """The command line of a quiet `fastmerge slerp` in a fresh Python process."""
    return [
        sys.executable,
        "-m",
        "fastmerge",
        "slerp",
        str(a),
        str(b),
        "--t",
        str(t),
        "-o",
        str(out),
        "--quiet",
    ]
