#!/usr/bin/env python3
"""Sums the kernel durations of an ncu CSV report (`ncu --csv --metrics gpu__time_duration.sum`)
by kernel name: where a profiled range's GPU time goes, and how much of its wall time the GPU
spent running kernels at all (run-train.sh's `profile` phase).

    kernel-times.py REPORT.csv [WALL_MS]

WALL_MS, the unprofiled wall time of the same work, turns the kernels' sum into a share: far below
it, the GPU waited for the host (dispatch-bound); close to it, the kernels themselves are the time.
"""
import csv
import sys
from collections import defaultdict

UNIT_MS = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0,
           "ms": 1.0, "second": 1e3, "s": 1e3}


def rows(path):
    """The report's data rows: ncu writes its own messages (==PROF== ...) and the program's
    output around the CSV, whose header starts with "ID"."""
    with open(path, newline="", errors="replace") as f:
        lines = f.readlines()
    start = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), None)
    if start is None:
        sys.exit(f"kernel-times: no CSV header (\"ID\", ...) in {path}")
    body = [l for l in lines[start:] if l.startswith('"')]
    return csv.DictReader(body)


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    total = defaultdict(float)
    count = defaultdict(int)
    for r in rows(sys.argv[1]):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = UNIT_MS.get(r.get("Metric Unit", "").strip())
        if unit is None:
            sys.exit(f"kernel-times: unknown unit {r.get('Metric Unit')!r}")
        ms = float(r["Metric Value"].replace(",", "")) * unit
        name = r["Kernel Name"].split("(")[0].split("<")[0].strip().removeprefix("void ")
        total[name] += ms
        count[name] += 1
    all_ms = sum(total.values())
    launches = sum(count.values())
    print(f"{launches} kernels, {all_ms:.1f} ms of kernel time", end="")
    if len(sys.argv) == 3:
        wall = float(sys.argv[2])
        print(f" against {wall:.1f} ms of wall time unprofiled ({100 * all_ms / wall:.0f}%)", end="")
    print()
    print(f"{'ms':>9} {'share':>6} {'launches':>8}  kernel")
    for name, ms in sorted(total.items(), key=lambda kv: -kv[1])[:30]:
        print(f"{ms:9.2f} {100 * ms / all_ms:5.1f}% {count[name]:8d}  {name[:110]}")


if __name__ == "__main__":
    main()
