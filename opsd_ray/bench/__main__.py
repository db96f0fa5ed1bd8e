"""`python -m opsd_ray.bench NAME [NAME ...] [--quick] [--reps N] [--out FILE]`: run, print, merge into the results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opsd_ray.bench import (  # noqa: F401  (they register)
    BENCHMARKS,
    DEFAULT_OUT,
    Record,
    objectives,
    overlap,
    rollout,
    scoring,
    step,
    timemodel,
    trl,
    wire,
)
from opsd_ray.common import atomic_write_text


def format_table(records: list[Record]) -> str:
    rows = [("name", "value", "unit", "baseline")]
    for r in records:
        base = "" if r["baseline"] is None else f"{r['baseline']:.4g}"
        rows.append((r["name"], f"{r['value']:.4g}", r["unit"], base))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(records: list[Record], path: Path) -> None:
    """Merge `records` by name into the JSON list at `path`."""
    existing: dict[str, Record] = {}
    if path.exists():
        try:
            existing = {r["name"]: r for r in json.loads(path.read_text())}
        except (json.JSONDecodeError, KeyError, TypeError):
            existing = {}
    existing.update({r["name"]: r for r in records})
    atomic_write_text(path, json.dumps(sorted(existing.values(), key=lambda r: r["name"]), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opsd_ray.bench", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help=f"benchmarks to run: {', '.join(sorted(BENCHMARKS))} or all")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a fast check")
    parser.add_argument(
        "--reps", type=int, default=None, help="runs per size (default: set by each benchmark)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (merged by name)")
    args = parser.parse_args(argv)
    names = sorted(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {sorted(BENCHMARKS)}")
    records: list[Record] = []
    for name in names:
        records += BENCHMARKS[name](args)
    print(format_table(records))
    write_results(records, args.out)
    print(f"wrote {len(records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
