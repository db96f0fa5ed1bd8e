"""Warm workers between runs in one driver process: `train(cfg, pool)` for a sweep or a notebook.

Most of a worker's start is its process: Ray's worker, then importing torch, transformers and peft, and
loading the tokenizer (about 7 CPU-seconds per worker on a CPU; on a GPU also the CUDA context). A run
given a pool leaves its workers there when it ends; the next run takes those of each role that have the
same resources, restart budget and compute threads, and `reset`s them with its own arguments: each is
then what a new worker built from those arguments would be (tested bit for bit, also across settings).
Ray restarts a lost actor with the arguments it was created with: the run resets a restarted worker it
took from the pool to its own (`Workers.renew`). Workers a run does not take end before it starts its
own, unless the pool keeps `spare` groups: then the most recent groups a run did not take stay warm for a
later run, as long as they and the run fit in the cluster's resources together (they hold their placement
groups meanwhile). Spares never hold GPUs, and the fit is checked on the cluster's totals: on several
nodes a spare can still keep a bundle of the run from being placed (keep spare=0 there).

Not reused: vLLM engines (an engine holds processes, a memory budget, LoRA slots and a prefix cache of
its own; a second engine in one process is not something vLLM supports), and workers Ray has restarted
(their restart budget is partly spent).

    with WorkerPool() as pool:
        for lr in (1e-5, 3e-5):
            train(load_train_config([..., f"learner.lr={lr}"]), pool)  # every worker starts once

    with WorkerPool(spare=1) as pool:  # runs that alternate two group sizes keep both groups
        for n in (1, 2, 1, 2):
            train(load_train_config([..., f"scoring.num_workers={n}"]), pool)
"""

from __future__ import annotations

import json
from collections import Counter

from opsd_ray.run.faults import actor_state


def worker_key(role: str, cls, request, max_restarts: int, threads) -> str:
    """Which workers a run can reuse: the same role, class, resources, restart budget and compute threads
    (what the process keeps). The rest of a run's settings need not match: `reset` builds the worker anew
    from the run's own arguments."""
    return json.dumps([role, cls.__qualname__, repr(request), max_restarts, threads], default=repr)


def as_new(actors: list) -> bool:
    """Alive and never restarted by Ray: a reused worker starts with its whole restart budget."""
    return all(actor_state(a) == ("ALIVE", 0) for a in actors)


IDLE_WAIT_S = 2.0  # a parked worker answers a no-op call within this: no call of the run is still running


class WorkerPool:
    """The workers runs left behind, by key, in the Ray session they live in (oldest first)."""

    def __init__(self, spare: int = 0):
        self.spare = spare  # groups a run did not take that stay warm for later runs
        self.parked: dict[str, tuple[list, object]] = {}  # key -> (actors, placement group)
        self.session: tuple | None = None  # (the driver's node, its job)

    def take(self, key: str) -> tuple[list, object] | None:
        """A parked group of workers with this key (now the caller's), or None."""
        self._same_session()
        return self.parked.pop(key, None)

    def claim(self, keys: dict[str, str], need: dict[str, float] | None = None,
              have: dict[str, float] | None = None) -> dict[str, tuple[list, object]]:
        """The parked workers whose key is one of `keys` (by the same names) and that are still as new
        (a parked worker may have died). Of the others, the `spare` most recent stay if they fit in `have`
        (the cluster's resources) beside the run's `need`; the rest end, freeing their resources."""
        claimed = {}
        for name, key in keys.items():
            got = self.take(key)
            if got and as_new(got[0]):
                claimed[name] = got
            elif got:
                self._end([got])
        self.fit(need or {}, have or {})
        return claimed

    def fit(self, need: dict[str, float], have: dict[str, float]) -> None:
        """End parked groups, the oldest first, until at most `spare` are left and they fit in `have` (the
        cluster's resources) beside `need`. Groups on GPUs never stay as spares: Ray counts a GPU's share,
        not its memory, which their models keep and a vLLM engine sizes its KV cache by."""
        self._same_session()
        for key in [k for k, (_, pg) in self.parked.items() if pg is not None and held_by([pg]).get("GPU")]:
            self._end([self.parked.pop(key)])
        while self.parked and (len(self.parked) > self.spare or not fits(self.held() + Counter(need), have)):
            self._end([self.parked.pop(next(iter(self.parked)))])

    def park(self, key: str, actors: list, pg) -> bool:
        """Keep a run's workers for the next run, if they are as new (alive, never restarted) and idle (a run
        that stopped may have left a call running); False if not (the caller ends them)."""
        import ray

        self._same_session()
        if not as_new(actors):
            return False
        idle, _ = ray.wait([a.__ray_ready__.remote() for a in actors], num_returns=len(actors), timeout=IDLE_WAIT_S)
        if len(idle) < len(actors):
            return False
        if key in self.parked:  # an older group of the same workers
            self._end([self.parked.pop(key)])
        self.parked[key] = (actors, pg)
        return True

    def held(self) -> Counter:
        """The resources the parked workers' placement groups hold."""
        return held_by([pg for _, pg in self.parked.values()])

    def clear(self) -> None:
        """End every parked worker (and its placement group)."""
        self._same_session()
        parked, self.parked = self.parked, {}
        self._end(parked.values())

    @staticmethod
    def _end(groups) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actors, pg in groups:
            for a in actors:
                ray.kill(a)
            if pg is not None:
                remove_placement_group(pg)

    def __len__(self) -> int:
        return sum(len(actors) for actors, _ in self.parked.values())

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if ray.is_initialized():
            self.clear()

    def _same_session(self) -> None:
        """Workers of an earlier Ray session (or job: they end with the driver's connection) are gone with
        it, and their handles are not valid in a new one: forget them."""
        import ray

        ctx = ray.get_runtime_context() if ray.is_initialized() else None
        session = (ctx.get_node_id(), ctx.get_job_id()) if ctx else None
        if session != self.session:
            self.parked, self.session = {}, session


def fits(need: Counter, have: dict[str, float]) -> bool:
    return all(amount <= have.get(name, 0) + 1e-9 for name, amount in need.items())


def held_by(pgs: list) -> Counter:
    """The resources placement groups hold, by name."""
    held = Counter()
    for pg in pgs:
        for bundle in pg.bundle_specs if pg is not None else []:
            held.update(bundle)
    return held
