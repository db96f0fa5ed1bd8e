"""How one step's work flows between the roles (the driver's `train_step` calls `run_step`).

The unit of work is a *part*: `learner.micro_batch_size` consecutive trajectories of the step. A part
is scored in one call by one scoring worker and learnt as one micro-batch by one learner (learner r
takes a contiguous range of parts, in order). What is computed therefore does not depend on when or
where it runs, and `train.schedule` only decides when work starts:

- "phases" (the reference): every rollout, then every part's scoring, then the learners;
- "streaming" (default): a part goes to a scoring worker as soon as its last trajectory arrives, and
  to its learner as soon as it is dispatched (Ray hands the frozen variants over when they exist), so
  scoring overlaps rollout and learning overlaps scoring. The update is bit for bit the phases one.

One-step-off rollout (rollout.max_staleness=1) is the driver's business: it launches the next step's
rollout before this step learns. Frozen variants only ever travel as object refs, scoring worker to
learner; the driver sees trajectories (token ids) and small timing records.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opsd_ray.data.prompts import PromptIds
from opsd_ray.run.faults import is_actor_loss
from opsd_ray.workers.rollout import RolloutDone, Trajectory
from opsd_ray.workers.scoring import ScoringItem, split_evenly


@dataclass
class Rollout:
    """One step's rollout, launched: the batch, its prompts, and one stream per rollout worker."""

    step: int
    prompts: list[PromptIds]
    requests: list[tuple[int, list[int], int]]  # (example id, student prompt ids, seed)
    version: int  # the adapter version the workers generate it with
    sampler_state: dict  # the sampler before this batch was drawn: a checkpoint of step - 1 stores it
    launched: float = field(default_factory=time.time)
    pending: dict = field(default_factory=dict)  # stream -> (worker, its incarnation, the request indices)
    arrived: list = field(default_factory=list)  # (index, Trajectory) read, not yet used
    received: set = field(default_factory=set)  # request indices whose trajectory has come back


def launch_rollout(roles, prompts: list[PromptIds], requests: list, step: int, sampler_state: dict) -> Rollout:
    """Each rollout worker starts generating its contiguous share of the requests (a stream)."""
    rollout = Rollout(step, prompts, requests, roles.version, sampler_state)
    shares = split_evenly(list(range(len(requests))), len(roles.rollout))
    for k, indices in enumerate(shares):
        if indices:
            _stream(roles, rollout, k, indices)
    return rollout


def _stream(roles, rollout: Rollout, k: int, indices: list[int]) -> None:
    gen = roles.rollout[k].generate_stream.options(num_returns="streaming").remote(
        [rollout.requests[i] for i in indices]
    )
    rollout.pending[gen] = (k, roles.incarnation("rollout", k), indices)
    roles.busy.start("rollout", k)


def part_bounds(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class StepResult:
    trajectories: list[Trajectory]
    metrics: dict[str, float]  # the learners' step metrics (identical on every rank)
    rollout_done: float  # time.time() when the last trajectory arrived
    scoring_done: float
    learning_done: float


class _Parts:
    """The bookkeeping of one step: which trajectories each part still waits for, where each part went."""

    def __init__(self, roles, rollout: Rollout, size: int, variants: tuple[str, ...], diagnostics: bool):
        import ray

        self.ray, self.roles, self.rollout = ray, roles, rollout
        self.variants, self.diagnostics = variants, diagnostics
        self.bounds = part_bounds(len(rollout.requests), size)
        self.part_of = [k for k, (a, b) in enumerate(self.bounds) for _ in range(a, b)]
        self.missing = [b - a for a, b in self.bounds]
        self.trajectories: list[Trajectory | None] = [None] * len(rollout.requests)
        owners = split_evenly(list(range(len(self.bounds))), len(roles.learners))
        self.queue = [list(parts) for parts in owners]  # each learner's parts, in order
        self.frozen: dict[int, object] = {}  # part -> FrozenBatch ref, once scored without error
        self.scoring: dict = {}  # busy-interval ref -> (part, worker, its incarnation, FrozenBatch ref): in flight
        self.learner_calls: list[tuple[int, object]] = []  # (learner rank, ref of accumulate's result)
        self.dispatched = 0

    def arrived(self, index: int, trajectory: Trajectory) -> int | None:
        """Record a trajectory; the part it completes, if any."""
        self.trajectories[index] = trajectory
        k = self.part_of[index]
        self.missing[k] -= 1
        return k if self.missing[k] == 0 else None

    def score(self, k: int, w: int | None = None) -> None:
        """Part k to the next scoring worker (round robin in dispatch order), or to worker `w`."""
        if w is None:
            w = self.dispatched % len(self.roles.scoring)
            self.dispatched += 1
        a, b = self.bounds[k]
        items = [ScoringItem(self.rollout.prompts[i], self.trajectories[i].response_ids) for i in range(a, b)]
        stats, frozen = self.roles.scoring[w].score_part.options(num_returns=2).remote(items, self.variants)
        self.scoring[stats] = (k, w, self.roles.incarnation("scoring", w), frozen)
        self.roles.busy.start("scoring", w)

    def scored(self, stats) -> bool:
        """A scoring call finished: True if it succeeded; a lost worker is restarted and the part redone."""
        k, w, sent_at, frozen = self.scoring.pop(stats)
        try:
            interval = self.ray.get(stats)
        except Exception as e:
            if not is_actor_loss(e):
                raise
            self.roles.busy.abandon("scoring", w)
            self.roles.lost("scoring", w, e, sent_at)
            self.score(k, w)
            return False
        self.roles.busy.stop("scoring", w, interval["start"], interval["end"])
        self.frozen[k] = frozen
        return True

    def feed_learners(self) -> None:
        """Hand each learner its next parts, in order, as far as they are scored.

        fsdp: a micro-batch's forward and backward are collectives of the whole group, so round i (every
        learner's i-th part) goes out only once all its parts are scored; a learner never waits inside
        a collective for another's scoring."""
        if self.roles.fsdp:
            while all(self.queue) and all(q[0] in self.frozen for q in self.queue):
                for r in range(len(self.queue)):
                    self._submit(r, self.queue[r].pop(0))
            return
        for r, parts in enumerate(self.queue):
            while parts and parts[0] in self.frozen:
                self._submit(r, parts.pop(0))

    def _submit(self, r: int, k: int) -> None:
        a, b = self.bounds[k]
        items = [ScoringItem(self.rollout.prompts[i], self.trajectories[i].response_ids) for i in range(a, b)]
        versions = [self.trajectories[i].adapter_version for i in range(a, b)]
        call = self.roles.learners[r].accumulate.remote(items, versions, self.diagnostics, self.frozen[k])
        self.learner_calls.append((r, call))


def _read(roles, rollout: Rollout, timeout: float | None, gen=None) -> bool:
    """Take one item from `gen`, or from whichever stream has one (waiting up to `timeout`); False if none
    came. A lost rollout worker is restarted and generates the trajectories it had not sent back."""
    import ray

    if gen is None:
        ready, _ = ray.wait(list(rollout.pending), num_returns=1, timeout=timeout)
        if not ready:
            return False
        gen = ready[0]
    k, sent_at, indices = rollout.pending[gen]
    try:
        item = ray.get(next(gen))
    except StopIteration:
        del rollout.pending[gen]
        return True
    except Exception as e:
        if not is_actor_loss(e):
            raise
        del rollout.pending[gen]
        roles.busy.abandon("rollout", k)
        roles.lost("rollout", k, e, sent_at)
        roles.load_adapter(k, rollout.version)  # the adapter the lost generation used
        missing = [i for i in indices if i not in rollout.received]
        if missing:  # each with its own seed: the same trajectories as if nothing had happened
            _stream(roles, rollout, k, missing)
        if roles.version != rollout.version:  # one-step-off: the newer adapter, for the next generation
            roles.load_adapter(k, roles.version)
        return True
    if isinstance(item, RolloutDone):
        roles.busy.stop("rollout", k, item.start, item.end)
    else:
        index = indices[item[0]]
        rollout.arrived.append((index, item[1]))
        rollout.received.add(index)
    return True


def drain(rollout: Rollout, roles) -> None:
    """Take in what a running rollout has finished so far, without waiting (one-step-off: then its
    workers' busy time is known when the current step's util/rollout is computed)."""
    while rollout.pending and _read(roles, rollout, timeout=0):
        pass


def run_step(cfg, roles, rollout: Rollout, variants: tuple[str, ...], diagnostics: bool) -> StepResult:
    """Score and learn one step's trajectories as they stream in (or phase by phase).

    One loop waits on whatever comes next: a trajectory from a rollout stream, or a scored part. A part
    goes to scoring when its last trajectory arrives (streaming) or when all have (phases), and to its
    learner once it is scored without error (streaming) or once all are (phases).
    """
    import ray

    streaming = cfg.train.schedule == "streaming"
    parts = _Parts(roles, rollout, cfg.learner.micro_batch_size, variants, diagnostics)
    rollout_done = None
    while True:
        while rollout.arrived:
            k = parts.arrived(*rollout.arrived.pop(0))
            if streaming and k is not None:
                parts.score(k)
        if rollout_done is None and not rollout.pending:
            rollout_done = time.time()
            if not streaming:
                for k in range(len(parts.bounds)):
                    parts.score(k)
        if not rollout.pending and not parts.scoring:
            break
        ready, _ = ray.wait([*rollout.pending, *parts.scoring], num_returns=1)
        if ready[0] in rollout.pending:
            _read(roles, rollout, None, ready[0])
        elif parts.scored(ready[0]) and streaming:
            parts.feed_learners()
    scoring_done = time.time()
    parts.feed_learners()  # phases: every part; streaming: what is left
    # A lost learner raises LearnersLost here: the driver restarts the group.
    done = roles.from_learners([call for _, call in parts.learner_calls])
    for (r, _), stats in zip(parts.learner_calls, done):
        roles.busy.stop("learner", r, stats["start"], stats["end"])
    num_tokens = sum(len(t.response_ids) for t in parts.trajectories)
    steps = roles.from_learners([learner.step.remote(num_tokens) for learner in roles.learners])
    for r, m in enumerate(steps):
        roles.busy.stop("learner", r, m.pop("start"), m.pop("end"))
    return StepResult(parts.trajectories, steps[0], rollout_done, scoring_done, time.time())


class BusyLog:
    """When each worker of each role was busy (time.time() intervals), for util/<role>: the share of a
    step's wall time that the role's workers spent working, averaged over its workers."""

    def __init__(self):
        self.intervals: dict[tuple[str, int], list[tuple[float, float]]] = {}
        self.open: dict[tuple[str, int], list[float]] = {}  # calls started, not yet reported back (FIFO)

    def start(self, role: str, worker: int) -> None:
        """A long call was submitted: it counts as busy from now until stop() reports it."""
        self.open.setdefault((role, worker), []).append(time.time())

    def abandon(self, role: str, worker: int) -> None:
        """The worker died in its oldest open call: that call will not report back."""
        opened = self.open.get((role, worker))
        if opened:
            opened.pop(0)

    def stop(self, role: str, worker: int, start: float, end: float) -> None:
        """A call's real interval; closes the oldest open call of that worker (an actor runs its calls in order)."""
        opened = self.open.get((role, worker))
        if opened:
            opened.pop(0)
        self.intervals.setdefault((role, worker), []).append((start, end))

    def util(self, role: str, workers: int, t0: float, t1: float) -> float:
        """Busy share of [t0, t1]; work still running counts until t1. Forgets intervals before t0."""
        total = 0.0
        for w in range(workers):
            spans = [(a, b) for a, b in self.intervals.get((role, w), []) if b > t0]
            self.intervals[(role, w)] = spans
            spans = [*spans, *((a, t1) for a in self.open.get((role, w), []))]
            total += _covered(spans, t0, t1)
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
