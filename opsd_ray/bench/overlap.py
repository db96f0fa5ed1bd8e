"""Overlap and scale-out benchmarks .

- overlap:  whole steps through the driver's own loop (driver.steps) in three schedules on the same
            work: phase by phase, streaming, and one-step-off (streaming + rollout.one_step_off=true),
            each role pinned to its own CPU cores (as on separate GPUs, roles do not share compute),
            in pmi and standard mode; the util/<role> shares of each.
- learners: one step of N = 2 learners (one core each, gloo all-reduce) against N = 1 (both cores),
            on the same parts.

Steps run with learner.lr = 0, so every repetition sees the same trajectories, and every arm runs
the same prompts and seeds (steps 1..n of a fresh sampler): equal work, different only by schedule.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

from opsd_ray.bench import Record, record, register
from opsd_ray.bench.common import bench_cfg, examples_of, log
from opsd_ray.data.prompts import build_prompt_ids
from opsd_ray.data.sources import PromptSampler
from opsd_ray.models.loading import load_model, load_tokenizer
from opsd_ray.run.cluster import init_ray
from opsd_ray.run.driver import steps
from opsd_ray.run.groups import Groups
from opsd_ray.workers.engines import adapter_config
from opsd_ray.workers.learner import Learner
from opsd_ray.workers.scoring import VARIANTS, ScoringItem, score, split_evenly

SCHEDULES = {  # name -> (train.schedule, rollout.one_step_off)
    "phases": ("phases", False),
    "streaming": ("streaming", False),
    "one_step_off": ("streaming", True),
}


def role_cores() -> dict[str, list[int]]:
    """Rollout on its own cores, scoring and the learner on the others (a 2-core machine has no third
    core: scoring and learning share one, and overlap only with rollout)."""
    cores = sorted(os.sched_getaffinity(0))
    half = max(1, len(cores) // 2)
    rest = cores[half:] or cores
    return {"rollout": cores[:half], "scoring": rest, "learner": rest}


def schedule_steps(cfg, groups, examples, tok, conf, name: str, start: dict) -> list[dict]:
    """Steps 1..train.steps of driver.steps under one schedule, from a fresh sampler and the learner's
    checkpoint files `start` (version 0)."""

    cfg = copy.deepcopy(cfg)
    cfg.train.schedule, cfg.rollout.one_step_off = SCHEDULES[name]
    groups.learner.load_checkpoint(start)  # version 0 again
    version = groups.sync(conf)["version"]
    sampler = PromptSampler(examples, cfg.train.batch_size, seed=cfg.run.seed)
    t0 = time.perf_counter()
    records = [r for r, _ in steps(cfg, groups, sampler, tok, 1, version, conf)]
    records[-1]["wall"] = time.perf_counter() - t0
    return records


def steady_step_time(records: list[dict]) -> float:
    """Mean wall time of a step after the first (one-step-off's first step has nothing to overlap)."""
    return statistics.mean(r["time/step"] for r in records[1:])


@register("overlap", note_load=True)
def bench_overlap(args: argparse.Namespace) -> list[Record]:
    """Step time of phases, streaming and one-step-off on the same work, roles pinned to their cores."""

    model, batch, new_tokens, n_steps = ("tiny", 4, 16, 3) if args.quick else ("smollm2-135m", 8, 24, 3)
    reps = args.reps or 1  # pinned roles do not share cores: repetitions vary little (and take minutes)
    cores = role_cores()
    times: dict[tuple[str, str], list[float]] = {}
    utils: dict[tuple[str, str], dict[str, float]] = {}
    parts = ""
    for mode in ("pmi", "standard"):
        cfg = bench_cfg(model, "learner.micro_batch_size=2", "rollout.engine=hf", "checkpoint.every=0",
                        f"train.steps={n_steps}", batch=batch, new_tokens=new_tokens, mode=mode)
        tok = load_tokenizer(cfg.model)
        examples = examples_of(cfg, 64)
        init_ray(cfg)
        log(f"overlap {mode}: starting groups ({model}, cores {cores})")
        bound = copy.deepcopy(cfg)
        bound.rollout.one_step_off = True  # the learners' bound; each arm's own setting drives the driver
        groups = Groups.start(bound, "hf", cores=cores)
        try:
            start = groups.learner.whole("checkpoint_files")
            conf = adapter_config(cfg)
            warm = copy.deepcopy(cfg)
            warm.train.steps = 1
            schedule_steps(warm, groups, examples, tok, conf, "phases", start)  # warm-up: first calls, caches
            for rep in range(reps):
                for name in (list(SCHEDULES) if rep % 2 == 0 else list(SCHEDULES)[::-1]):
                    recs = schedule_steps(cfg, groups, examples, tok, conf, name, start)
                    times.setdefault((mode, name), []).append(steady_step_time(recs))
                    utils[(mode, name)] = {
                        role: statistics.mean(r[f"util/{role}"] for r in recs[1:])
                        for role in ("rollout", "scoring", "learner")
                    }
                    log(f"overlap {mode} {name}: {steady_step_time(recs):.2f} s/step; "
                         + ", ".join(f"{k} {statistics.mean(r[f'time/{k}'] for r in recs[1:]):.2f} s"
                                     for k in ("rollout", "scoring", "learning", "sync")))
            parts = f"{recs[0]['num_tokens']} response tokens in step 1"
        finally:
            groups.shutdown()
    setup = (f"{model}, {batch} GSM8K prompts x {new_tokens} new tokens, hf engine, 4 parts of 2 trajectories, "
             f"{n_steps} steps per arm (the first not counted), {reps} interleaved rep(s), median; rollout pinned to "
             f"cores {cores['rollout']}, scoring and learner to {cores['scoring']}; lr 0; {parts}")
    med = {k: statistics.median(v) for k, v in times.items()}
    out = []
    for mode in ("pmi", "standard"):
        for name, goal in (("streaming", 1.2), ("one_step_off", 1.5)):
            out.append(record(f"{name}_speedup_{mode}", med[(mode, "phases")] / med[(mode, name)], "x", goal,
                              f"phase-by-phase / {name} step time, {mode}; goal >= {goal}; {setup}"))
    for name in SCHEDULES:
        out.append(record(f"pmi_vs_standard_step_time_ratio_{name}", med[("pmi", name)] / med[("standard", name)],
                          "x", 1.02 if name != "phases" else None,
                          f"pmi / standard step time under the {name} schedule"
                          + ("; goal <= 1.02 once scoring overlaps rollout" if name != "phases" else "")
                          + f"; {setup}"))
        out.append(record(f"step_time_s_{name}", med[("pmi", name)], "s", med[("standard", name)],
                          f"pmi (value) and standard (baseline) seconds per step, {name}; {setup}"))
        for role, share in utils[("pmi", name)].items():
            out.append(record(f"util_{role}_{name}", share, "share", None,
                              f"busy share of the step, pmi, {name} (util/{role}); {setup}"))
    return out


def group_step_time(learners, parts, tokens: int, version: int) -> float:
    """Seconds for one step of a learner group: its parts split in order, then the collective step."""
    import ray


    t0 = time.perf_counter()
    for learner, share in zip(learners, split_evenly(parts, len(learners)), strict=True):
        for items, frozen in share:
            learner.accumulate.remote(items, [version] * len(items), False, frozen)
    ray.get([learner.step.remote(tokens) for learner in learners])
    return time.perf_counter() - t0


@register("learners", note_load=True)
def bench_learners(args: argparse.Namespace) -> list[Record]:
    """One learner step of N = 2 learners (a core each, gloo) against N = 1 (both cores), same parts."""
    import ray


    model, n_parts, response = ("tiny", 4, 32) if args.quick else ("smollm2-135m", 8, 64)
    reps = args.reps or (2 if args.quick else 3)
    cfg = bench_cfg(model, "learner.micro_batch_size=2", batch=2 * n_parts)
    tok = load_tokenizer(cfg.model)
    import torch

    g = torch.Generator().manual_seed(0)
    items = [ScoringItem(build_prompt_ids(tok, e.question, e.reference, cfg.model, cfg.prompt),
                         torch.randint(0, 40_000, (response,), generator=g).tolist())
             for e in examples_of(cfg, 2 * n_parts)]
    frozen_model = load_model(cfg.model)
    parts = [(items[i : i + 2], score(frozen_model, items[i : i + 2], variants=VARIANTS)) for i in range(0, len(items), 2)]
    del frozen_model
    tokens = sum(f.num_tokens for _, f in parts)
    cores = sorted(os.sched_getaffinity(0))
    init_ray(cfg)
    results = {}
    for n in (1, 2):
        pins = [cores] if n == 1 else [[c] for c in cores[:2]]
        learners = [ray.remote(Learner).options(num_cpus=0).remote(cfg, pins[r], r, n) for r in range(n)]
        try:
            if n > 1:
                address, port = ray.get(learners[0].group_address.remote())
                ray.get([learner.join_group.remote(address, port) for learner in learners])
            times = [group_step_time(learners, parts, tokens, version) for version in range(reps + 1)]
            results[n] = statistics.median(times[1:])  # the first is a warm-up
            log(f"learners N={n}: {results[n]:.2f} s per step")
        finally:
            for learner in learners:
                ray.kill(learner)
    setup = (f"{model}, {n_parts} parts of 2 trajectories x {response} response tokens ({tokens} tokens), pmi, "
             f"N = 1 on cores {cores} vs N = 2 on one core each (gloo all-reduce of the LoRA gradients); "
             f"{reps} reps after a warm-up, median")
    return [
        record("learners_2_vs_1_step_time_ratio", results[2] / results[1], "x", 1.1,
               f"N = 2 / N = 1 learner step time on the same cores; goal <= 1.1; {setup}"),
        record("learner_step_time_s", results[1], "s", results[2], f"N = 1 (value), N = 2 (baseline); {setup}"),
    ]
