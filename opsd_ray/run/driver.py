"""The driver (also the Ray job entrypoint): the paper's algorithm, one step at a time.

    for step in 1..T:
        q, r      <- sample a batch of prompts
        y_hat     <- rollout: the student pi_theta writes its solutions            (RolloutGroup)
        frozen    <- scoring: pi_0 reads y_hat under (q, r), (r) and (q) at once  (ScoringGroup)
        theta     <- learner: JSD(pi_theta || P_target) with P_target from frozen (LearnerGroup)
        sync      <- the new adapter goes to every rollout worker

Within a step the work streams between the groups as it finishes (opsd_ray.run.schedule; or phase
by phase with train.schedule=phases). With rollout.one_step_off the rollout of step k+1 runs with
adapter k-1 while step k learns. The driver owns the run folder (opsd_ray.run.runfolder).
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import ray
from tqdm import tqdm

from opsd_ray.common import ConfigError, RunStopped
from opsd_ray.config.recipes import config_yaml
from opsd_ray.data.contexts import drop_unfit
from opsd_ray.data.prompts import build_prompt_ids
from opsd_ray.data.sources import PromptSampler, load_examples, token_counter, tokenizer_id
from opsd_ray.models.loading import load_tokenizer
from opsd_ray.objective.registry import objective_of
from opsd_ray.run.checkpoints import (
    check_checkpoint,
    checkpoint_step,
    restore,
    resume_hint,
    save_checkpoint,
    saves,
    start_checkpoint,
    with_card,
)
from opsd_ray.run.cluster import check_fits, init_ray, resources_of, role_requests
from opsd_ray.run.console import engine_logs, say
from opsd_ray.run.evaluation import eval_points, evaluate_checkpoints, evaluate_step, inline
from opsd_ray.run.faults import LearnersLost, SkipCounter
from opsd_ray.run.groups import Generation, Groups
from opsd_ray.run.pool import WorkerPool
from opsd_ray.run.records import step_record, sync_record
from opsd_ray.run.runfolder import DriverLock, RunFolder, WriteFailed
from opsd_ray.run.schedule import run_step
from opsd_ray.run.sync_check import SyncCheck, probe_sequence
from opsd_ray.run.tracking import MetricsLog
from opsd_ray.tools.report import report_run
from opsd_ray.workers.engines import adapter_config, adapter_dtype, pick_engine


def train(cfg, pool: WorkerPool | None = None) -> Path | str:
    """Train; returns the run folder (a Path, or the URI of a remote run folder). With a pool (and Ray
    started by the caller), the run reuses workers an earlier run left there, and leaves its own."""
    run = run_folder(cfg)
    lock = DriverLock(run)
    try:
        lock.acquire()  # one driver per run: a resubmitted job takes over once the old driver is gone
        check_checkpoint(start_checkpoint(cfg, run))  # before anything loads: a checkpoint must not run code
        engine = pick_engine(cfg.rollout.engine, cfg.model.lora.r, on_gpu=cfg.rollout.gpus_per_worker > 0)
        run.write_text("config.yaml", config_yaml(cfg))
        tok, sampler = prepare_data(cfg, run)
        with engine_logs(run, cfg.logging.verbose) as logs_at:
            started_ray = init_ray(cfg)
            try:
                final, wandb_where = train_loop(cfg, run, lock, engine, sampler, tok, pool)
            finally:
                if started_ray:  # stopped here, so that its last worker lines reach the log file
                    ray.shutdown()
    except WriteFailed as e:  # a full disk: what was written is intact, the run stops where it is
        raise RunStopped(f"{e}. {resume_hint(run)} Free space (or fix the storage), then run the same "
                         "command again") from e
    finally:
        lock.release()
    print(f"\ndone: {cfg.train.steps} steps", flush=True)
    places = {"metrics": run.uri("metrics.jsonl"), "tensorboard": run.uri("tensorboard"), "wandb": wandb_where,
              "adapter": f"{final} (README.md: its model card)", "checkpoints": run.uri("checkpoints"),
              "report": report_run(run), "logs": logs_at, "config": run.uri("config.yaml")}
    for name, where in places.items():
        if where:
            print(f"  {name + ':':<13}{where}", flush=True)
    return run.local_path() or str(run)


def train_loop(cfg, run: RunFolder, lock: DriverLock, engine: str, sampler: PromptSampler,
               tok, pool: WorkerPool | None = None) -> tuple[str, str | None]:
    """The algorithm on the three groups; returns where the final adapter was written, and where the W&B
    run is (None without W&B). A lost learner restarts the group from the newest checkpoint."""
    points, T = eval_points(cfg), cfg.train.steps
    check = SyncCheck(cfg.rollout.verify_sync_every, probe_sequence(tok, sampler.examples[0], cfg))
    fresh, checkpoint = sampler.state_dict(), start_checkpoint(cfg, run)
    check_fits(role_requests(cfg), ray.cluster_resources())  # before anything is written or loaded
    log = MetricsLog(run, keep_until_step=checkpoint_step(checkpoint), cfg=cfg)  # then a W&B login problem
    groups = None
    try:
        groups = Groups.start(cfg, engine, pool=pool)
        run.write_text("logs/workers.json", json.dumps(groups.info, indent=1))  # where each worker started: node, pid
        adapter_conf, dtype = adapter_config(cfg), adapter_dtype(cfg, engine)
        step = restore(groups.learner, sampler, checkpoint, fresh)
        say(f"run {cfg.run.name}: model={cfg.model.name} data={cfg.data.name} mode={cfg.objective.mode} engine={engine}"
            f" schedule={cfg.train.schedule}{' one-step-off' if cfg.rollout.one_step_off else ''}"
            f"{f' completions/prompt={cfg.rollout.n}' if cfg.rollout.n > 1 else ''}; {groups.where()}")
        bar = tqdm(total=T, initial=step, desc="step", unit="step", dynamic_ncols=True)
        version = groups.sync(adapter_conf, dtype)["version"]
        if inline(cfg) and step == 0:  # the base model's score: the curves' first point
            log.log({"step": 0, **evaluate_step(cfg, groups.rollout, run, 0)})
        skips = SkipCounter.resumed(cfg.fault.max_skipped_steps, log.records())
        while step < T:
            try:
                for record, ahead in steps(cfg, groups, sampler, tok, step + 1, version, adapter_conf, dtype, check):
                    step = record["step"]
                    record["skipped_steps"] = skips.add(step, record["skipped"])
                    if inline(cfg) and step in points:
                        record.update(evaluate_step(cfg, groups.rollout, run, step))
                    log.log(record)
                    bar.update()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                    if saves(cfg, step) or (step in points and not inline(cfg)):  # eval.schedule=end evaluates them
                        sampler_state = ahead.sampler_state if ahead else sampler.state_dict()
                        checkpoint = run, save_checkpoint(cfg, groups.learner, run, step, sampler_state, log.records())
                    skips.check(resume_hint(run))
                    lock.check()
            except LearnersLost as e:  # restart the group from the newest checkpoint and redo the steps since
                step = bar.n = recover(groups, sampler, log, checkpoint, fresh, e)
                skips = SkipCounter.resumed(cfg.fault.max_skipped_steps, log.records())
                version = groups.sync(adapter_conf, dtype)["version"]
        bar.close()
        adapter_files = groups.learner.whole("adapter_files")
        final = run.write_files("final", with_card(cfg, adapter_files, T, log.records()))
        end_eval = points and not inline(cfg)  # eval.schedule=end: the GPUs are free for evaluation now
        groups.shutdown(pool)
        groups = None
        if end_eval:
            if pool is not None:  # its engines take every worker slot of the run: its workers stay only beside them
                pool.fit(resources_of(role_requests(cfg)), ray.cluster_resources())
            evaluate_checkpoints(cfg, run, log, engine)
        return final, log.wandb_where
    except (RunStopped, WriteFailed):  # stopped between steps: its workers are as good as a finished run's
        if groups is not None:
            groups.shutdown(pool)
            groups = None
        raise
    finally:
        log.close()
        if groups is not None:
            groups.shutdown()


def steps(cfg, groups: Groups, sampler: PromptSampler, tok, first: int, version: int, adapter_conf: dict,
          dtype: str = "float32", check: SyncCheck | None = None):
    """Steps first..train.steps of the algorithm, each with its sync; yields each step's record and,
    one-step-off, the next step's rollout, already running (its sampler state is what a checkpoint of
    this step keeps). `check`: the sync check on its steps (one-step-off: read a step later, so that the
    probe does not wait for the rollout running meanwhile)."""
    ahead, probe = None, None
    for step in range(first, cfg.train.steps + 1):
        gen = ahead or launch(cfg, groups, sampler, tok, step)  # y_hat <- pi_theta
        more = cfg.rollout.one_step_off and step < cfg.train.steps  # the next rollout starts now, one adapter behind
        ahead = launch(cfg, groups, sampler, tok, step + 1) if more else None
        diagnostics = diagnostics_step(cfg, step)
        t0 = time.time()
        variants = objective_of(cfg.objective.mode).step_variants(diagnostics)
        result = run_step(cfg, groups, gen, variants, diagnostics)  # frozen <- pi_0; theta <- learner
        if ahead is not None:
            groups.rollout.drain(ahead)  # what the next rollout finished during this step
        record = {**step_record(cfg, tok, gen, result, version, t0, variants), **groups.utilization(t0, time.time())}
        if probe is not None:  # one-step-off: the previous sync's check, read now
            record.update(check.finish(probe))
        t_sync = time.perf_counter()
        synced = groups.sync(adapter_conf, dtype, wait=ahead is None)  # sync: the adapter -> rollout
        version = synced["version"]
        record.update(sync_record(record, time.perf_counter() - t_sync, synced["bytes"]))
        probe = check.start(groups) if check is not None and check.due(step) else None
        if probe is not None and ahead is None:
            record.update(check.finish(probe))
            probe = None
        yield record, ahead


def run_folder(cfg) -> RunFolder:
    if not cfg.run.name:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.run.name = f"{cfg.model.name}-{cfg.data.name}-{cfg.objective.mode}-{stamp}"
    return RunFolder(cfg.run.output_dir.rstrip("/") + "/" + cfg.run.name)


def prepare_data(cfg, run: RunFolder):
    """The tokenizer and the prompt sampler over the valid rows that fit the context windows; the data
    report goes to the run folder and the console."""
    tok = load_tokenizer(cfg.model)
    examples, report = load_examples(cfg.data, token_counter(tok), seed=cfg.run.seed, tokenizer_id=tokenizer_id(cfg.model))
    examples, over, limits = drop_unfit(examples, tok, cfg)  # never a cut context: rows that do not fit go
    report.add_contexts(limits.limits, limits.new_tokens, over, report.valid - len(examples))
    if not examples:
        raise ConfigError(f"no row fits the models' context windows ({report.summary()}): lower "
                          "rollout.max_new_tokens or data.max_reference_tokens / data.max_question_tokens")
    run.write_text("data_report.json", report.to_json())
    print(report.summary(), flush=True)
    return tok, PromptSampler(examples, cfg.train.batch_size, seed=cfg.run.seed)


def recover(groups: Groups, sampler: PromptSampler, log: MetricsLog, checkpoint, fresh: dict,
            lost: LearnersLost) -> int:
    """A learner was lost: restart the learner group from `checkpoint` (or from the start), drop what
    was logged after it, and say how much is redone. Returns the step to continue after."""
    at = max((r["step"] for r in log.records()), default=0)
    groups.learner.restart(lost)
    start = restore(groups.learner, sampler, checkpoint, fresh)
    log.truncate(start)
    origin = f"step {start} (its newest checkpoint)" if checkpoint else "the start (no checkpoint yet)"
    say(f"a learner was lost after step {at} was logged: the learner group restarted from {origin}; "
        f"redoing from step {start + 1} ({max(at - start, 0)} logged step(s) lost)")
    return start


def diagnostics_step(cfg, step: int) -> bool:
    """Whether a step logs the decomposition diagnostics (every train.diagnostics_every steps, and step 1)."""
    every = cfg.train.diagnostics_every
    return every > 0 and (step % every == 0 or step == 1)


def request_seed(seed: int, step: int, index: int) -> int:
    """Sampling seed of one trajectory: depends on (run seed, step, position) only."""
    return (seed * 1_000_003 + step * 10_007 + index) % (2**31 - 1)


def launch(cfg, groups: Groups, sampler: PromptSampler, tok, step: int) -> Generation:
    """Draw step `step`'s prompts and start generating them on the rollout workers."""
    before = sampler.state_dict()
    batch = sampler.next_batch()
    # rollout.n completions per prompt, next to each other: a micro-batch scores their contexts once
    batch = [ex for ex in batch for _ in range(cfg.rollout.n)]
    built = {ex.id: build_prompt_ids(tok, ex.question, ex.reference, cfg.model, cfg.prompt) for ex in batch}
    prompts = [built[ex.id] for ex in batch]
    requests = [(ex.id, p.student, request_seed(cfg.run.seed, step, i)) for i, (ex, p) in enumerate(zip(batch, prompts))]
    return groups.rollout.launch(prompts, requests, step, before)


def step_once(cfg, groups: Groups, sampler: PromptSampler, tok, step: int, version: int) -> dict:
    """One step as `steps` takes it, without one-step-off and before the sync (tests, benchmarks)."""
    gen = launch(cfg, groups, sampler, tok, step)
    diagnostics = diagnostics_step(cfg, step)
    variants = objective_of(cfg.objective.mode).step_variants(diagnostics)
    t0 = time.time()
    return step_record(cfg, tok, gen, run_step(cfg, groups, gen, variants, diagnostics), version, t0, variants)
