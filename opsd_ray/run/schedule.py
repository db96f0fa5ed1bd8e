"""How one step's work flows between the groups (the driver calls `run_step`).

The unit of work is a *micro-batch*: `learner.micro_batch_size` consecutive trajectories of the step.
A micro-batch is scored in one call by one scoring worker and learnt in one call by one learner
(learner r takes a contiguous range of micro-batches, in order). What is computed therefore does not
depend on when or where it runs, and `train.schedule` only decides when work starts:

- "phases" (the reference): every rollout, then every micro-batch's scoring, then the learners;
- "streaming" (default): a micro-batch goes to a scoring worker as soon as its last trajectory
  arrives, and to its learner as soon as it is dispatched (Ray hands the frozen variants over when they
  exist), so scoring overlaps rollout and learning overlaps scoring. The update is bit for bit the
  phases one. In-process groups run the same code one call after another.

One-step-off rollout (rollout.max_staleness=1) is the driver's business: it launches the next step's
rollout before this step learns. Frozen variants only ever travel as object refs, scoring worker to
learner; the driver sees trajectories (token ids) and small timing records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from opsd_ray.run.faults import is_actor_loss
from opsd_ray.run.groups import Generation, Groups
from opsd_ray.workers.rollout import Trajectory
from opsd_ray.workers.scoring import ScoringItem, split_evenly


def micro_batch_bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class StepResult:
    trajectories: list[Trajectory]
    metrics: dict[str, float]  # the learners' step metrics (identical on every rank)
    rollout_done: float  # time.time() when the last trajectory arrived
    scoring_done: float
    learning_done: float


class MicroBatches:
    """The bookkeeping of one step: which trajectories each micro-batch still waits for, where it went."""

    def __init__(self, groups: Groups, gen: Generation, size: int, variants: tuple[str, ...], diagnostics: bool):
        self.groups, self.gen = groups, gen
        self.variants, self.diagnostics = variants, diagnostics
        self.bounds = micro_batch_bounds(len(gen.requests), size)
        self.batch_of = [k for k, (a, b) in enumerate(self.bounds) for _ in range(a, b)]
        self.missing = [b - a for a, b in self.bounds]
        self.trajectories: list[Trajectory | None] = [None] * len(gen.requests)
        owners = split_evenly(list(range(len(self.bounds))), len(groups.learner))
        self.queue = [list(batches) for batches in owners]  # each learner's micro-batches, in order
        self.frozen: dict[int, object] = {}  # micro-batch -> FrozenBatch handle, once scored without error
        self.scoring: dict = {}  # busy-interval handle -> (micro-batch, worker, its incarnation, FrozenBatch handle)
        self.learning: list[tuple[int, object]] = []  # (learner rank, handle of accumulate's record)
        self.dispatched = 0

    def items(self, k: int) -> list[ScoringItem]:
        a, b = self.bounds[k]
        return [ScoringItem(self.gen.prompts[i], self.trajectories[i].response_ids) for i in range(a, b)]

    def arrived(self, index: int, trajectory: Trajectory) -> int | None:
        """Record a trajectory; the micro-batch it completes, if any."""
        self.trajectories[index] = trajectory
        k = self.batch_of[index]
        self.missing[k] -= 1
        return k if self.missing[k] == 0 else None

    def score(self, k: int, w: int | None = None) -> None:
        """Micro-batch k to the next scoring worker (round robin in dispatch order), or to worker `w`."""
        if w is None:
            w = self.dispatched % len(self.groups.scoring)
            self.dispatched += 1
        stats, frozen, sent_at = self.groups.scoring.score(w, self.items(k), self.variants)
        self.scoring[stats] = (k, w, sent_at, frozen)

    def scored(self, stats) -> bool:
        """A scoring call finished: True if it succeeded; a lost worker is replaced and the micro-batch redone."""
        k, w, sent_at, frozen = self.scoring.pop(stats)
        scoring = self.groups.scoring
        try:
            interval = scoring.calls.get(stats)
        except Exception as e:
            if not is_actor_loss(e):
                raise
            scoring.busy.abandon(w)
            scoring.lost(w, e, sent_at)
            self.score(k, w)
            return False
        scoring.busy.stop(w, interval["start"], interval["end"])
        self.frozen[k] = frozen
        return True

    def feed_learners(self) -> None:
        """Hand each learner its next micro-batches, in order, as far as they are scored.

        fsdp: a micro-batch's forward and backward are collectives of the whole group, so round i (every
        learner's i-th micro-batch) goes out only once all of them are scored; a learner never waits
        inside a collective for another's scoring."""
        if self.groups.learner.fsdp:
            while all(self.queue) and all(q[0] in self.frozen for q in self.queue):
                for r in range(len(self.queue)):
                    self._learn(r, self.queue[r].pop(0))
            return
        for r, batches in enumerate(self.queue):
            while batches and batches[0] in self.frozen:
                self._learn(r, batches.pop(0))

    def _learn(self, r: int, k: int) -> None:
        a, b = self.bounds[k]
        versions = [self.trajectories[i].adapter_version for i in range(a, b)]
        handle = self.groups.learner.accumulate(r, self.items(k), versions, self.diagnostics, self.frozen[k])
        self.learning.append((r, handle))


def run_step(cfg, groups: Groups, gen: Generation, variants: tuple[str, ...], diagnostics: bool) -> StepResult:
    """Score and learn one step's trajectories as they stream in (or phase by phase).

    One loop waits on whatever comes next: a trajectory from a rollout stream, or a scored micro-batch.
    A micro-batch goes to scoring when its last trajectory arrives (streaming) or when all have
    (phases), and to its learner once it is scored without error (streaming) or once all are (phases).
    A lost learner raises LearnersLost (the driver restarts the group).
    """
    streaming = cfg.train.schedule == "streaming"
    batches = MicroBatches(groups, gen, cfg.learner.micro_batch_size, variants, diagnostics)
    rollout, calls = groups.rollout, groups.rollout.calls
    rollout_done = None
    while True:
        while gen.arrived:
            k = batches.arrived(*gen.arrived.pop(0))
            if streaming and k is not None:
                batches.score(k)
        if rollout_done is None and not gen.pending:
            rollout_done = time.time()
            if not streaming:
                for k in range(len(batches.bounds)):
                    batches.score(k)
        if not gen.pending and not batches.scoring:
            break
        (ready,) = calls.ready([*gen.pending, *batches.scoring])
        if ready in gen.pending:
            rollout.read(gen, None, ready)
        elif batches.scored(ready) and streaming:
            batches.feed_learners()
    scoring_done = time.time()
    batches.feed_learners()  # phases: every micro-batch; streaming: what is left
    learner = groups.learner
    done = learner.gather([handle for _, handle in batches.learning])
    for (r, _), stats in zip(batches.learning, done, strict=True):
        learner.busy.stop(r, stats["start"], stats["end"])
    num_tokens = sum(len(t.response_ids) for t in batches.trajectories)
    metrics = learner.step(num_tokens)
    return StepResult(batches.trajectories, metrics[0], rollout_done, scoring_done, time.time())
