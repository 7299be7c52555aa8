"""Benchmarks report ratios measured in one run: each group has one yardstick (the reference op or the
baseline detector) and every other entry of the group is shown as ``yardstick median / its median``.

The table is printed at the end of the session and written to ``benchmarks/.last_ratios.md`` with the device,
versions and command, ready to paste into RESULTS.md.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest
import torch

YARDSTICKS = ("reference", "baseline")


def device_description() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, capability {torch.backends.cpu.get_cpu_capability()}"


def ratio_table(benchmarks) -> list[str]:
    groups: dict[str, list] = {}
    for bench in benchmarks:
        groups.setdefault(bench.group or bench.name, []).append(bench)
    lines = ["| group | entry | median (s) | speed-up vs yardstick | extra |", "|---|---|---|---|---|"]
    for group, entries in groups.items():
        yardstick = next((b for b in entries if str(b.param).split("-")[0] in YARDSTICKS
                          or any(y in b.name for y in YARDSTICKS)), None)
        for bench in entries:
            median = bench.stats.median
            ratio = f"{yardstick.stats.median / median:.2f}×" if yardstick is not None else "–"
            extra = ", ".join(f"{k}={v}" for k, v in bench.extra_info.items())
            lines.append(f"| {group} | {bench.param or bench.name} | {median:.4g} | {ratio} | {extra} |")
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    import trojanguard

    versions = (f"torch {torch.__version__}, trojanguard {trojanguard.__version__}, python {platform.python_version()}"
                + ("" if not torch.cuda.is_available() else f", CUDA {torch.version.cuda}"))
    header = [f"device: {device_description()}", f"versions: {versions}", f"command: python -m pytest {' '.join(sys.argv[1:])}", ""]
    text = "\n".join(header + ratio_table(session.benchmarks))
    terminalreporter.write_line("\nratios (measured in this run):\n" + text)
    (Path(__file__).parent / ".last_ratios.md").write_text(text + "\n")
