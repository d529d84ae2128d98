import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def pytest_terminal_summary(terminalreporter, config):
    """Print, per benchmark group, each entry's median and its speedup over the group's baseline:
    the Python reference (bench_pool.py), torch's F.linear, the model's own forward, SDPA or the
    torch reference (bench_cpu.py)."""
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, {})[bench.name] = bench.stats.median
    terminalreporter.section("median ratios (baseline / this)")
    for group, rows in sorted(groups.items()):
        py = next((v for k, v in rows.items() if "python" in k or k in ("linear", "model", "sdpa", "reference")), None)
        for name, med in sorted(rows.items()):
            ratio = f"{py / med:8.1f}x" if py else ""
            terminalreporter.write_line(f"{group:12s} {name:32s} median {med * 1e6:10.2f} us {ratio}")
