"""Compare two report.json files number by number: how determinism and refactors are checked.

    python benchmarks/compare_reports.py BEFORE/report.json AFTER/report.json

Walks both JSON trees and prints every path whose values differ (skipping `meta.run`, the run
directory, and wall-clock fields); exits 1 when any differs. docs/results/determinism.md and
docs/results/refactor_before_after.md were checked with it.
"""

from __future__ import annotations

import json
import sys
from typing import Any

SKIP = {"run", "machine", "seconds", "wall_s", "created_at"}


def differences(a: Any, b: Any, path: str = "") -> list[tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in SKIP:
                continue
            if key not in a or key not in b:
                out.append((f"{path}/{key}", "missing on one side"))
            else:
                out += differences(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [(path, f"lengths {len(a)} and {len(b)}")]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [(path, a, b)]


def count_numbers(x: Any) -> int:
    if isinstance(x, dict):
        return sum(count_numbers(v) for k, v in x.items() if k not in SKIP)
    if isinstance(x, list):
        return sum(count_numbers(v) for v in x)
    return int(isinstance(x, float))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    a, b = (json.loads(open(p).read()) for p in argv)
    diffs = differences(a, b)
    print(f"{count_numbers(a)} numbers compared; {len(diffs)} differences")
    for d in diffs:
        print(*d)
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
