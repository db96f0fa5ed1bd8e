"""When each worker of a role was busy: the intervals behind util/<role>."""

from __future__ import annotations

import time


class BusyLog:
    """When each worker of a role was busy (time.time() intervals), for util/<role>: the share of a
    step's wall time that the role's workers spent working, averaged over its workers."""

    def __init__(self):
        self.intervals: dict[int, list[tuple[float, float]]] = {}
        self.open: dict[int, list[float]] = {}  # calls started, not yet reported back (FIFO)

    def start(self, worker: int) -> None:
        """A long call was submitted: it counts as busy from now until stop() reports it."""
        self.open.setdefault(worker, []).append(time.time())

    def abandon(self, worker: int) -> None:
        """The worker died in its oldest open call: that call will not report back."""
        if self.open.get(worker):
            self.open[worker].pop(0)

    def stop(self, worker: int, start: float, end: float) -> None:
        """A call's real interval; closes the worker's oldest open call (an actor runs its calls in order)."""
        if self.open.get(worker):
            self.open[worker].pop(0)
        self.intervals.setdefault(worker, []).append((start, end))

    def util(self, workers: int, t0: float, t1: float) -> float:
        """Busy share of [t0, t1]; work still running counts until t1. Forgets intervals before t0."""
        total = 0.0
        for w in range(workers):
            spans = [(a, b) for a, b in self.intervals.get(w, []) if b > t0]
            self.intervals[w] = spans
            total += _covered([*spans, *((a, t1) for a in self.open.get(w, []))], t0, t1)
        return total / (workers * max(t1 - t0, 1e-9))


def _covered(spans: list[tuple[float, float]], t0: float, t1: float) -> float:
    """Length of the union of `spans` inside [t0, t1]."""
    covered, end = 0.0, t0
    for a, b in sorted(spans):
        a, b = max(a, end), min(b, t1)
        if b > a:
            covered += b - a
            end = b
    return covered
