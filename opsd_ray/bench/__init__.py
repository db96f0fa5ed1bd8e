"""Benchmarks: `python -m opsd_ray.bench NAME [NAME ...] [--quick]`, one module per benchmark.

A registry of named benchmark functions. Each takes the parsed arguments and returns records
{"name", "value", "unit", "baseline", "note"}; `python -m opsd_ray.bench` prints them as a table and
merges them by name into bench/results/latest.json. Add a benchmark with `@register("name")` in a
module that `opsd_ray.bench.__main__` imports.

Every ratio is an interleaved A/B in the same run (the order alternates per repetition), the median
of the per-repetition ratios. Steps run with learner.lr = 0 so that every repetition and every arm
sees exactly the same trajectories (a step's compute does not depend on the learning rate).
"""

from __future__ import annotations

import os

# A shared 2-core machine: with OpenMP's default (active) wait policy, a torch op on 2 threads gets
# 5-7x slower whenever another process holds a core (threads spin at every barrier). Passive waiting
# keeps the measurements usable; it must be set before torch loads (Ray workers inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

Record = dict

BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Record]]] = {}

DEFAULT_OUT = Path("bench/results/latest.json")


def register(name: str, note_load: bool = False):
    """Decorator: add a benchmark function `fn(args) -> list[record]` under `name`. With `note_load`,
    every record's note gets the machine's load during the run (a shared machine is noisy)."""

    def deco(fn):
        def run(args: argparse.Namespace) -> list[Record]:
            before = os.getloadavg()[0]
            records = fn(args)
            load = f"; 1-min load average {before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
            return [dict(r, note=r["note"] + load) for r in records]

        BENCHMARKS[name] = run if note_load else fn
        return fn

    return deco


def record(name: str, value: float, unit: str, baseline: float | None = None, note: str = "") -> Record:
    return {"name": name, "value": value, "unit": unit, "baseline": baseline, "note": note}
