"""What a run does when a worker dies: Ray restarts the actor (`max_restarts`), the driver waits for it,
gives it what it had (the adapter), and redoes only the lost work. `fault.max_restarts` per role bounds
it; past that, or when Ray gives up on an actor, the run stops with a message and a checkpoint.

Rollout and scoring work is redone exactly: every trajectory has its own seed and every part is scored
as one unit. A lost learner takes the group's state with it (collectives, the optimizer), so the driver
restarts the whole group from the newest checkpoint and replays the steps since then.
"""

from __future__ import annotations

import time

from opsd_ray.common import RunStopped
from opsd_ray.run.console import say


class LearnersLost(Exception):
    """A learner of the group died (or a collective with it failed) during a step."""


def is_actor_loss(error: BaseException) -> bool:
    """The actor's process or node is gone (Ray restarts it if it may): not a bug in the call."""
    import ray

    return isinstance(error, ray.exceptions.RayActorError)


def actor_state(actor) -> tuple[str, int]:
    """(state, number of restarts) of an actor, as Ray's GCS has it: ALIVE, RESTARTING, DEAD, ..."""
    from ray._private.state import actors  # the GCS's actor table: needs no dashboard

    info = actors(actor._actor_id.hex())
    return info.get("State", "DEAD"), int(info.get("NumRestarts", 0))


class Faults:
    """Counts lost workers per role against fault.max_restarts and waits for Ray to restart them."""

    def __init__(self, max_restarts: int, restart_timeout_s: float = 900.0):
        self.max_restarts, self.timeout = max_restarts, restart_timeout_s
        self.counts: dict[str, int] = {}

    def count(self, role: str, what: str, error: BaseException) -> None:
        """One more loss in `role`; RunStopped past the budget."""

        n = self.counts[role] = self.counts.get(role, 0) + 1
        detail = " ".join(str(error).split())[:200]
        if n <= self.max_restarts:
            say(f"warning: {what} was lost ({type(error).__name__}: {detail}); restart {n} of {self.max_restarts} "
                f"for the {role} role")
        else:
            raise RunStopped(
                f"the {role} role lost workers {n} times (fault.max_restarts={self.max_restarts}); the last: "
                f"{type(error).__name__}: {detail}. Check the nodes' health (OOM kills, preemption, GPU errors "
                "in the Ray logs), then continue with checkpoint.resume=auto"
            ) from error

    def wait_restarted(self, actor, what: str, after: float | None = None) -> dict:
        """Wait until Ray has restarted `actor` (its constructor ran again, after time `after` when
        given: a process that is still being killed may answer first); RunStopped if it will not."""
        import ray

        deadline = time.time() + self.timeout
        while time.time() < deadline:
            try:
                info = ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.time()))
            except ray.exceptions.ActorDiedError as e:
                raise RunStopped(
                    f"{what} did not come back ({type(e).__name__}): Ray has given up on it (its max_restarts "
                    "is used up, or it failed to start again: see its log). Check the node, then continue "
                    "with checkpoint.resume=auto"
                ) from e
            except (ray.exceptions.ActorUnavailableError, ray.exceptions.GetTimeoutError):
                time.sleep(0.5)  # restarting, or waiting for a node with room for its bundle
                continue
            if after is None or info["started"] > after:
                return info
            time.sleep(0.2)
        raise RunStopped(
            f"{what} did not come back within {self.timeout:.0f} s (no node with room for its placement-group "
            "bundle?). Add capacity, then continue with checkpoint.resume=auto"
        )

    def call_through_losses(self, calls, actor, role: str, what: str, method: str, *args):
        """`method` of `actor`, called again after each loss of the actor (once Ray has restarted it): each
        loss counts for `role` (RunStopped past the budget)."""
        while True:
            try:
                return calls.get(calls.submit(actor, method, *args))
            except Exception as e:
                if not is_actor_loss(e):
                    raise
                self.count(role, what, e)
                self.wait_restarted(actor, what)


class SkipCounter:
    """Steps whose update was skipped for a non-finite loss or gradient norm; too many in a row stop the run."""

    def __init__(self, limit: int):
        self.limit, self.total, self.streak = limit, 0, []

    @classmethod
    def resumed(cls, limit: int, records: list[dict]) -> SkipCounter:
        """The count as the kept records of a resumed (or replaying) run left it."""
        counter = cls(limit)
        for r in records:
            if r.get("step", 0) > 0:
                counter.total += bool(r.get("skipped"))
                counter.streak = [*counter.streak, r["step"]] if r.get("skipped") else []
        return counter

    def add(self, step: int, skipped: int) -> int:
        if skipped:
            self.total += 1
            self.streak.append(step)
            say(f"warning: step {step}: non-finite loss or gradient norm, update skipped (the adapter is unchanged)")
        else:
            self.streak = []
        return self.total

    def check(self, resume_hint: str) -> None:
        if len(self.streak) < self.limit:
            return

        raise RunStopped(
            f"{len(self.streak)} steps in a row ({', '.join(map(str, self.streak))}) had a non-finite loss or "
            f"gradient norm (fault.max_skipped_steps={self.limit}); their updates were skipped. Likely causes: "
            "NaN or Inf in the model weights (a corrupted model.path or checkpoint), float16 overflow (use "
            "bfloat16), a very small objective.temperature, or a learner.lr high enough to diverge. "
            + resume_hint
        )
