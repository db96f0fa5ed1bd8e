"""roles.py without Ray: what Roles keeps for the workers it may have to restart."""

from opsd_ray.run.roles import RecentAdapters


def test_the_adapters_kept_for_restarted_workers_are_the_last_sent_whatever_their_versions():
    """A learner reloaded from a checkpoint sends version 0 again after versions 1..5: it is kept."""
    kept = RecentAdapters(keep=3)
    for version in (0, 1, 2, 3, 4, 5):
        kept.add(version, ("state", version))
    assert list(kept) == [3, 4, 5]
    kept.add(0, ("state", "again"))
    assert list(kept) == [4, 5, 0] and kept[0] == ("state", "again")
    kept.add(5, ("state", 5))
    assert list(kept) == [4, 0, 5]
