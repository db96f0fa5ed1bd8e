"""The groups' bookkeeping without Ray: the adapters kept for workers that may be replaced, the busy log
behind util/<role>, the micro-batches of a step."""

import pytest

from opsd_ray.run.busy import BusyLog, _covered
from opsd_ray.run.groups import RecentAdapters
from opsd_ray.run.schedule import micro_batch_bounds


def test_the_adapters_kept_for_restarted_workers_are_the_last_sent_whatever_their_versions():
    """A learner reloaded from a checkpoint sends version 0 again after versions 1..5: it is kept."""
    kept = RecentAdapters()
    assert kept.KEEP == 3
    for version in (0, 1, 2, 3, 4, 5):
        kept.add(version, ("state", version))
    assert list(kept) == [3, 4, 5]
    kept.add(0, ("state", "again"))
    assert list(kept) == [4, 5, 0] and kept[0] == ("state", "again")
    kept.add(5, ("state", 5))
    assert list(kept) == [4, 0, 5]


def test_covered_time_is_the_union_inside_the_window():
    assert _covered([(0, 2), (1, 3), (5, 6)], 0, 10) == 4
    assert _covered([(-5, 1), (9, 20)], 0, 10) == 2
    assert _covered([], 0, 10) == 0


def test_util_counts_open_calls_until_the_end_and_averages_over_workers():
    scoring = BusyLog()
    scoring.stop(0, 100.0, 104.0)
    scoring.stop(1, 102.0, 103.0)
    assert scoring.util(2, 100.0, 110.0) == pytest.approx((4 + 1) / 20)
    rollout = BusyLog()
    rollout.open[0] = [105.0]  # launched at 105, not reported back yet
    assert rollout.util(1, 100.0, 110.0) == pytest.approx(0.5)
    rollout.stop(0, 106.0, 108.0)  # the report closes it
    assert rollout.util(1, 100.0, 110.0) == pytest.approx(0.2)


def test_micro_batches_cover_the_batch_in_order():
    assert micro_batch_bounds(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert micro_batch_bounds(4, 4) == [(0, 4)]
