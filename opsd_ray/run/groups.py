"""The worker groups of a run: rollout, scoring and learner.

Each group owns its workers: it starts them in the role's placement group, keeps the role's busy log,
replaces a lost worker and gives it back what it needs (`Workers.lost` counts a loss once, whichever
call saw it first), and keeps the role's state: the adapter versions sent to the rollout workers, the
learner group's membership. The driver and the step's schedule call group methods only.

`Groups.start` runs the workers as Ray actors; `Groups.in_process` calls the same classes directly in
this process (opsd_ray.run.calls): the reference the Ray step must equal, and the benchmarks' baseline.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from opsd_ray.common import pad_id_of, rollout_max_len
from opsd_ray.config.recipes import EVAL_GPU_MEMORY
from opsd_ray.models.loading import load_tokenizer
from opsd_ray.run.busy import BusyLog
from opsd_ray.run.calls import LocalCalls, RayCalls
from opsd_ray.run.cluster import check_fits, resources_of, role_requests, start_actors
from opsd_ray.run.console import say
from opsd_ray.run.faults import Faults, LearnersLost, actor_state, is_actor_loss
from opsd_ray.run.pool import WorkerPool, worker_key
from opsd_ray.workers.engines import reusable
from opsd_ray.workers.learner import Learner, learner_settings
from opsd_ray.workers.rollout import RolloutDone, RolloutWorker
from opsd_ray.workers.scoring import ScoringWorker, split_evenly


class Workers:
    """One role's workers, how they are called, and the one way back from losing one."""

    def __init__(self, role: str, workers: list, calls, faults: Faults):
        self.role, self.workers, self.calls, self.faults = role, workers, calls, faults
        self.restarts: dict[int, int] = {}  # worker -> times it was replaced
        self.busy = BusyLog()
        self.reused: list[tuple] | None = None  # the run's arguments of workers taken from a pool

    def renew(self, k: int) -> dict | None:
        """Ray restarts an actor with the arguments it was created with: worker k, taken from a pool (built by an
        earlier run), is reset to this run's; a loss meanwhile counts too. Its info, or None."""
        if self.reused is None:
            return None
        what = f"{self.role} worker {k}"
        return self.faults.call_through_losses(self.calls, self.workers[k], self.role, what, "reset", *self.reused[k])

    def __len__(self) -> int:
        return len(self.workers)

    def incarnation(self, k: int) -> int:
        """How many times worker k has been replaced: a call records it when it is sent."""
        return self.restarts.get(k, 0)

    def lost(self, k: int, error: BaseException, sent_at: int, restore: bool = True) -> None:
        """A call to worker k, sent to its incarnation `sent_at`, failed because the worker was lost: count
        the loss once (every call queued on the dead worker fails too), wait until Ray has restarted it,
        and give it back what it needs (`restore`; a caller that restores otherwise says so)."""
        if self.incarnation(k) > sent_at:
            return  # counted, and the worker restarted and restored, when an earlier call failed
        self.faults.count(self.role, f"{self.role} worker {k}", error)
        self.faults.wait_restarted(self.workers[k], f"{self.role} worker {k}")
        self.renew(k)
        self.restarts[k] = sent_at + 1
        if restore:
            self.restore(k)

    def restore(self, k: int) -> None:
        """What a replaced worker needs before its next call (nothing, unless a role says so)."""

    def retry(self, k: int, method: str, *args, **kwargs):
        """Call worker k and wait for the result; a lost worker is replaced and called again."""
        while True:
            sent_at = self.incarnation(k)
            try:
                return self.calls.get(self.calls.submit(self.workers[k], method, *args, **kwargs))
            except Exception as e:
                if not is_actor_loss(e):
                    raise
                self.lost(k, e, sent_at)


class RecentAdapters(dict):
    """The adapters sent most recently, by version: the last KEEP sent, whatever their numbers (a
    learner reloaded from a checkpoint sends lower versions again)."""

    KEEP = 3

    def add(self, version: int, adapter: tuple) -> None:
        self.pop(version, None)  # re-sent: now the newest
        self[version] = adapter
        while len(self) > self.KEEP:
            del self[next(iter(self))]  # dicts keep insertion order: the oldest sent goes


@dataclass
class Generation:
    """One step's rollout, launched: the batch, its prompts, and one stream per rollout worker."""

    step: int
    prompts: list  # PromptIds per request
    requests: list[tuple[int, list[int], int]]  # (example id, student prompt ids, seed)
    version: int  # the adapter version the workers generate it with
    sampler_state: dict  # the sampler before this batch was drawn: a checkpoint of step - 1 stores it
    launched: float = field(default_factory=time.time)
    pending: dict = field(default_factory=dict)  # stream -> (worker, its incarnation, the request indices)
    arrived: list = field(default_factory=list)  # (index, Trajectory) read, not yet used
    received: set = field(default_factory=set)  # request indices whose trajectory has come back


class RolloutGroup(Workers):
    """The student's engines: they generate a step's trajectories, evaluate, and serve the adapter the
    learner sent last (a replaced worker gets it back)."""

    def __init__(self, workers: list, calls, faults: Faults):
        super().__init__("rollout", workers, calls, faults)
        self.adapters = RecentAdapters()  # version -> (state handle, adapter config): the last few sent
        self.version = -1  # the adapter version last sent
        self.loads: list = []  # (worker, its incarnation then, handle of load_adapter), not yet settled

    def restore(self, k: int) -> None:
        if self.version >= 0:
            self.load(k, self.version)

    def serve(self, version: int, state, adapter_conf: dict, wait: bool = True) -> None:
        """Every worker loads this adapter. wait=False (one-step-off): a worker loads it after the
        generation it is running, before the next one (an actor runs its calls in order)."""
        self.settle()  # the previous loads (done by now)
        self.adapters.add(version, (state, adapter_conf))
        self.version = version
        for k in range(len(self)):
            self.load(k, version)
        if wait:
            self.settle()

    def load(self, k: int, version: int) -> None:
        """Queue an adapter version on worker k."""
        state, conf = self.adapters[version]
        handle = self.calls.submit(self.workers[k], "load_adapter", version, state, conf)
        self.loads.append((k, self.incarnation(k), handle))

    def settle(self) -> None:
        """Wait for the queued loads; a worker lost since is replaced (and given the adapter again)."""
        while self.loads:
            loads, self.loads = self.loads, []
            for k, sent_at, handle in loads:
                try:
                    self.calls.get(handle)
                except Exception as e:
                    if not is_actor_loss(e):
                        raise
                    self.lost(k, e, sent_at)

    def launch(self, prompts: list, requests: list, step: int, sampler_state: dict) -> Generation:
        """Each worker starts generating its contiguous share of the requests (a stream)."""
        gen = Generation(step, prompts, requests, self.version, sampler_state)
        for k, indices in enumerate(split_evenly(list(range(len(requests))), len(self))):
            if indices:
                self._stream(gen, k, indices)
        return gen

    def _stream(self, gen: Generation, k: int, indices: list[int]) -> None:
        stream = self.calls.stream(self.workers[k], "generate_stream", [gen.requests[i] for i in indices])
        gen.pending[stream] = (k, self.incarnation(k), indices)
        self.busy.start(k)

    def read(self, gen: Generation, timeout: float | None, stream=None) -> bool:
        """Take one item from `stream`, or from whichever stream has one (waiting up to `timeout`); False
        if none came. A lost worker is replaced and generates the trajectories it had not sent back, each
        with its own seed: the same trajectories as if nothing had happened."""
        if stream is None:
            ready = self.calls.ready(gen.pending, timeout)
            if not ready:
                return False
            stream = ready[0]
        k, sent_at, indices = gen.pending[stream]
        try:
            item = self.calls.next(stream)
        except StopIteration:
            del gen.pending[stream]
            return True
        except Exception as e:
            if not is_actor_loss(e):
                raise
            del gen.pending[stream]
            self.busy.abandon(k)
            self.lost(k, e, sent_at, restore=False)
            self.load(k, gen.version)  # the adapter the lost generation used
            missing = [i for i in indices if i not in gen.received]
            if missing:
                self._stream(gen, k, missing)
            if self.version != gen.version:  # one-step-off: the newer adapter, for the next generation
                self.load(k, self.version)
            return True
        if isinstance(item, RolloutDone):
            self.busy.stop(k, item.start, item.end)
        else:
            index = indices[item[0]]
            gen.arrived.append((index, item[1]))
            gen.received.add(index)
        return True

    def drain(self, gen: Generation) -> None:
        """Take in what a running generation has finished so far, without waiting (one-step-off: then its
        workers' busy time is known when the current step's util/rollout is computed)."""
        while gen.pending and self.read(gen, timeout=0):
            pass

    def evaluate(self, shares: dict[int, list], **generation) -> dict[int, list[dict]]:
        """Each worker's share of an evaluation, one call each, all at once; a lost worker is replaced (with
        the adapter) and redoes its share."""
        calls = {k: (self.incarnation(k), self.calls.submit(self.workers[k], "evaluate", shares[k], **generation))
                 for k in shares}
        got = {k: None for k in shares}
        for k, (sent_at, handle) in calls.items():
            try:
                got[k] = self.calls.get(handle)
            except Exception as e:
                if not is_actor_loss(e):
                    raise
                self.lost(k, e, sent_at)
                got[k] = self.retry(k, "evaluate", shares[k], **generation)
        return got

    def probe(self, prompt: list[int], response: list[int]):
        """Worker 0's log-probabilities of a probe, with its adapter and with none (a handle: it runs
        after the loads queued on the worker)."""
        return self.calls.submit(self.workers[0], "probe_logprobs", prompt, response)

    def close(self) -> None:
        """The workers delete what their engines wrote to disk (best effort: a dead worker has nothing)."""
        try:
            for k in range(len(self)):
                self.calls.get(self.calls.submit(self.workers[k], "close"), timeout=10)
        except Exception as e:
            say(f"note: a rollout worker did not remove its adapter folder ({type(e).__name__})")


class ScoringGroup(Workers):
    """The frozen base model's copies: each scores a micro-batch under the frozen variants in one pass."""

    def __init__(self, workers: list, calls, faults: Faults):
        super().__init__("scoring", workers, calls, faults)

    def score(self, k: int, items: list, variants: tuple[str, ...]) -> tuple:
        """Worker k scores a micro-batch: (handle of when it was busy, handle of the frozen variants, the
        worker's incarnation). The frozen variants go to a learner as a handle, never through here."""
        stats, frozen = self.calls.submit(self.workers[k], "score_part", items, variants, returns=2)
        self.busy.start(k)
        return stats, frozen, self.incarnation(k)


class LearnerGroup(Workers):
    """The learner group: one torch.distributed group (rank 0 serves the adapter and the checkpoint
    files). A lost member takes the group's collectives and optimizer state with it: the whole group
    restarts (`restart`), and the driver restores it from a checkpoint."""

    def __init__(self, workers: list, calls, faults: Faults, fsdp: bool, started: list[float]):
        super().__init__("learner", workers, calls, faults)
        self.fsdp, self.started = fsdp, started
        self.known: list = []  # each member's Ray restart count when the group formed

    def form(self) -> None:
        """Join the members into one process group (with more than one); note who they are now."""
        if isinstance(self.calls, RayCalls):
            self.known = [actor_state(a)[1] for a in self.workers]
        if len(self) > 1:
            address, port = self.gather([self.calls.submit(self.workers[0], "group_address")])[0]
            self.gather([self.calls.submit(a, "join_group", address, port) for a in self.workers])

    def gather(self, handles: list) -> list:
        """The results of learner calls, waiting on all at once: a lost learner, or a collective that
        failed because a member was lost, becomes LearnersLost (the driver restarts the group); any other
        error is the error it is."""
        results, pending = [None] * len(handles), {h: i for i, h in enumerate(handles)}
        while pending:
            (ready,) = self.calls.ready(list(pending))
            i = pending.pop(ready)
            try:
                results[i] = self.calls.get(ready)
            except Exception as e:
                if is_actor_loss(e) or self.a_member_was_lost():
                    raise LearnersLost(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
                raise
        return results

    def a_member_was_lost(self, grace_s: float = 5.0) -> bool:
        """Whether a learner is not alive, or was restarted, since the group formed. A survivor's collective
        can fail a moment before Ray has noticed the death: asked again for `grace_s`."""
        if not isinstance(self.calls, RayCalls):
            return False
        deadline = time.time() + grace_s
        while True:
            states = [actor_state(a) for a in self.workers]
            if any(state != "ALIVE" or n != before for (state, n), before in zip(states, self.known)):
                return True
            if time.time() > deadline:
                return False
            time.sleep(0.5)

    def whole(self, method: str, *args, returns: int = 1):
        """Rank 0's result of a method that reads the whole adapter: with fsdp every learner takes part
        (the weights are sharded over the group), with ddp rank 0 alone has it all. Every member's call is
        awaited: a lost one is seen at once. With returns > 1: rank 0's first value, and handles of its
        other values."""
        targets = self.workers if self.fsdp else self.workers[:1]
        calls = [self.calls.submit(a, method, *args, returns=returns) for a in targets]
        if returns == 1:
            return self.gather(calls)[0]
        return self.gather([c[0] for c in calls])[0], *calls[0][1:]

    def accumulate(self, r: int, items: list, versions: list[int], diagnostics: bool, frozen):
        """Rank r learns one micro-batch (its frozen variants arrive as a handle); a handle of its record."""
        self.busy.start(r)
        return self.calls.submit(self.workers[r], "accumulate", items, versions, diagnostics, frozen)

    def step(self, num_tokens: int) -> list[dict]:
        """Every rank's optimizer step over the step's `num_tokens` response tokens; the metrics of each."""
        for r in range(len(self)):
            self.busy.start(r)
        done = self.gather([self.calls.submit(a, "step", num_tokens) for a in self.workers])
        for r, m in enumerate(done):
            self.busy.stop(r, m.pop("start"), m.pop("end"))
        return done

    def load_checkpoint(self, files: dict[str, bytes]) -> None:
        """Every member restores the same checkpoint files (each keeps its own share)."""
        shared = self.calls.put(files)
        self.gather([self.calls.submit(a, "load_checkpoint_files", shared) for a in self.workers])

    def restart(self, error: BaseException) -> None:
        """A learner was lost: every learner restarts, and the group forms again."""
        import ray

        self.faults.count("learner", "a learner of the group", error)
        for learner in self.workers:
            ray.kill(learner, no_restart=False)
        # ray.kill only asks: wait for each learner's new process (a later construction time)
        fresh = [self.faults.wait_restarted(a, f"learner {r}", after=self.started[r]) for r, a in enumerate(self.workers)]
        fresh = [self.renew(r) or info for r, info in enumerate(fresh)]
        self.started = [i["started"] for i in fresh]
        self.form()
        self.busy = BusyLog()  # calls of the abandoned step never report back


@dataclass
class Groups:
    """The three groups of a run (an evaluation after training has engines only: `rollout`)."""

    rollout: RolloutGroup
    scoring: ScoringGroup | None = None
    learner: LearnerGroup | None = None
    info: list[dict] = field(default_factory=list)  # where each worker runs
    pgs: dict = field(default_factory=dict)
    keys: dict = field(default_factory=dict)  # role -> its workers' key in a pool (opsd_ray.run.pool)
    claimed: dict = field(default_factory=dict)  # role -> (actors, placement group) from a pool, not yet launched

    @classmethod
    def start(cls, cfg, engine: str, cores: dict[str, list[int]] | None = None, pool: WorkerPool | None = None) -> Groups:
        """The Ray actors of a run, each role in its placement group (workers of an earlier run that
        match, from `pool`). vLLM engines start (and size their KV cache) before any other role loads
        weights onto a shared GPU."""
        import ray

        requests = {r.role: r for r in role_requests(cfg)}
        check_fits(list(requests.values()), ray.cluster_resources())
        faults, calls, cores = Faults(cfg.fault.max_restarts), RayCalls(), cores or {}
        pad_id = pad_id_of(load_tokenizer(cfg.model))  # once here, not in every worker
        threads = {role: cores.get(role) or (os.cpu_count() if r.gpus == 0 else None) for role, r in requests.items()}
        n, restarts = cfg.learner.num_workers, cfg.fault.max_restarts
        # Learners restart as a group, and the driver's kill of a live one counts as a restart for Ray
        # too: Ray restarts them without limit, and fault.max_restarts bounds the group restarts.
        specs = {
            "rollout": (RolloutWorker, restarts, [(cfg.model, cfg.rollout, engine, cfg.run.seed, threads["rollout"],
                                                   rollout_max_len(cfg))] * requests["rollout"].count),
            "scoring": (ScoringWorker, restarts, [(cfg.model, cfg.scoring, threads["scoring"], pad_id)] * requests["scoring"].count),
            "learner": (Learner, -1, [(learner_settings(cfg), threads["learner"], i, n, pad_id) for i in range(n)]),
        }
        groups = cls(RolloutGroup([], calls, faults))
        try:
            if pool is not None and engine == "vllm" and requests["rollout"].gpus > 0:
                pool.clear()  # a vLLM engine sizes its KV cache by a GPU's free memory: it starts first, alone
            elif pool is not None:
                groups.keys = {role: worker_key(role, spec[0], requests[role], spec[1], threads[role])
                               for role, spec in specs.items() if role != "rollout" or reusable(engine)}
                groups.claimed = pool.claim(groups.keys, resources_of(requests.values()), ray.cluster_resources())
            ready = groups.launch(groups.rollout, requests["rollout"], *specs["rollout"])
            if engine == "vllm":
                ray.get(ready)
            groups.scoring = ScoringGroup([], calls, faults)
            ready += groups.launch(groups.scoring, requests["scoring"], *specs["scoring"])
            fsdp = cfg.learner.strategy == "fsdp" and n > 1
            groups.learner = LearnerGroup([], calls, faults, fsdp, [])
            ready += groups.launch(groups.learner, requests["learner"], *specs["learner"])
            groups.info = ray.get(ready)
            groups.learner.started = [i["started"] for i in groups.info[-n:]]
            groups.learner.form()
        except BaseException:  # a role that fails to start must not leave the others running
            groups.shutdown()
            raise
        return groups

    def launch(self, group: Workers, request, cls_, restarts: int, args: list[tuple]) -> list:
        """A role's actors: its claimed workers reset to what new ones built from `args` would be (and reset
        so again after Ray restarts one: `Workers.renew`), or new ones. Handles of their info."""
        claimed = self.claimed.pop(request.role, None)
        group.workers, self.pgs[request.role], ready = start_actors(request, cls_, restarts, args, claimed)
        group.reused = args if claimed else None
        return ready

    @classmethod
    def in_process(cls, cfg, engine: str, threads: int | None = None) -> Groups:
        """The same workers in this process, called directly (one learner)."""
        threads = threads or os.cpu_count()
        faults, calls = Faults(cfg.fault.max_restarts), LocalCalls()
        rollout = [RolloutWorker(cfg.model, cfg.rollout, engine, cfg.run.seed, threads, rollout_max_len(cfg))
                   for _ in range(cfg.rollout.num_workers)]
        scoring = [ScoringWorker(cfg.model, cfg.scoring, threads) for _ in range(cfg.scoring.num_workers)]
        learner = Learner(cfg, threads)
        return cls(RolloutGroup(rollout, calls, faults), ScoringGroup(scoring, calls, faults),
                   LearnerGroup([learner], calls, faults, False, [0.0]))

    @classmethod
    def engines(cls, cfg, engine: str) -> Groups:
        """eval.schedule=end: an engine on every worker slot of the run (each rollout worker's, each scoring
        worker's and each learner's resources). An engine with a GPU to itself gives vLLM most of it; the
        scoring and learner slots run without tensor parallelism."""
        import ray

        requests = role_requests(cfg)
        check_fits(requests, ray.cluster_resources())
        groups = cls(RolloutGroup([], RayCalls(), Faults(cfg.fault.max_restarts)))
        try:
            ready = []
            for r in requests:
                conf = OmegaConf.merge(cfg.rollout, {"tensor_parallel_size": 1} if r.role != "rollout" else {})
                if r.gpus / (conf.tensor_parallel_size if r.role == "rollout" else 1) >= 1:
                    conf.gpu_memory_utilization = max(conf.gpu_memory_utilization, EVAL_GPU_MEMORY)
                args = (cfg.model, conf, engine, cfg.run.seed, os.cpu_count() if r.gpus == 0 else None, rollout_max_len(cfg))
                actors, groups.pgs[r.role], handles = start_actors(r, RolloutWorker, cfg.fault.max_restarts, [args] * r.count)
                groups.rollout.workers += actors
                ready += handles
            groups.info = ray.get(ready)
        except BaseException:
            groups.shutdown()
            raise
        return groups

    def sync(self, adapter_conf: dict, dtype: str = "float32", wait: bool = True) -> dict:
        """The learner's adapter -> every rollout worker; {version, bytes} of what was sent. The weights go
        from the learner to the workers as a handle; only the small first value comes here."""
        self.rollout.settle()
        info, state = self.learner.whole("adapter_state", dtype, returns=2)
        self.rollout.serve(info["version"], state, adapter_conf, wait)
        return info

    def peak_memory(self) -> dict[str, dict]:
        """Each role's largest peak memory over its workers ({bytes, how})."""
        return {g.role: max((g.retry(k, "peak_memory") for k in range(len(g))), key=lambda m: m["bytes"])
                for g in (self.rollout, self.scoring, self.learner) if g is not None}

    def utilization(self, t0: float, t1: float) -> dict[str, float]:
        """util/<role>: the share of [t0, t1] the role's workers were busy, averaged over its workers."""
        return {f"util/{g.role}": g.busy.util(len(g), t0, t1) for g in (self.rollout, self.scoring, self.learner)}

    def where(self) -> str:
        """One line: which role runs where (host and device)."""
        places: dict[str, list[str]] = {}
        for i in self.info:
            places.setdefault(i["role"], []).append(f"{i['host']}/{i['device']}")
        return "; ".join(f"{role} x{len(p)} on " + ", ".join(sorted(set(p))) for role, p in places.items())

    def shutdown(self, pool: WorkerPool | None = None) -> None:
        """End every worker and placement group (also after a failed start). With a pool (a run that
        finished), the roles whose workers were never replaced stay warm there for the next run."""
        self.rollout.close()
        if not isinstance(self.rollout.calls, RayCalls):
            return
        import ray
        from ray.util.placement_group import remove_placement_group

        ending = [(pg, actors) for actors, pg in self.claimed.values()]  # claimed, never launched
        for g in (self.rollout, self.scoring, self.learner):
            if g is None:
                continue
            if pool is not None and g.role in self.keys and pool.park(self.keys[g.role], g.workers, self.pgs[g.role]):
                del self.pgs[g.role]  # the pool keeps workers that are as new (alive, never restarted)
            else:
                ending.append((self.pgs.pop(g.role, None), g.workers))
        ending += [(pg, []) for pg in self.pgs.values()]  # a role whose actors never started
        for pg, actors in ending:
            for a in actors:
                ray.kill(a)
            if pg is not None:
                remove_placement_group(pg)
