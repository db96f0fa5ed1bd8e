"""timemodel: the plan's time model checked where it can be measured, on this CPU. Its efficiencies are
calibrated on one shape's step (phase by phase, in process, so that each role's time is its own); then it
predicts the step of other shapes (twice the completion, twice the batch, the standard objective) from
their lengths alone, and each prediction is set against the measured step. Goal: within +-25%."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from opsd_ray.bench import Record, record, register
from opsd_ray.bench.common import bench_cfg, examples_of, log
from opsd_ray.common import rollout_max_len
from opsd_ray.data.prompts import PROMPT_OF, build_prompt_ids
from opsd_ray.data.sources import PromptSampler
from opsd_ray.models.loading import load_tokenizer
from opsd_ray.models.shapes import DTYPE_BYTES, find_shapes
from opsd_ray.objective.registry import objective_of
from opsd_ray.run.driver import step_once
from opsd_ray.run.groups import Groups, LearnerGroup, RolloutGroup
from opsd_ray.tools.timemodel import (
    GPU,
    TimeModel,
    decode_seconds,
    forward_flops,
    learner_flops,
    role_seconds_at,
)
from opsd_ray.workers.engines import adapter_config
from opsd_ray.workers.learner import Learner
from opsd_ray.workers.rollout import RolloutWorker

CPU = GPU("this CPU (calibrated)", 1.0, 1.0, 0.0)  # unit peaks: the calibrated efficiencies are rates


def lengths(cfg, tok, examples, record: dict) -> dict[str, float]:
    """What the time model needs of a step: the rollout's prompts, the tokens scored and learnt."""
    batch, new = cfg.train.batch_size, record["response_length"]
    prompts = [build_prompt_ids(tok, e.question, e.reference, cfg.model, cfg.prompt) for e in examples[:batch]]
    variants = objective_of(cfg.objective.mode).variants
    student = sum(len(p.student) for p in prompts)
    return {"seqs": batch, "prompt": student / batch, "new": new, "response_tokens": batch * new,
            "scored_tokens": sum(len(getattr(p, PROMPT_OF[v])) + new for p in prompts for v in variants),
            "learner_tokens": student + batch * new, "frozen_heads": len(variants)}


def predict(tm: TimeModel, shapes, dt: int, cfg, n: dict) -> dict[str, float]:
    return role_seconds_at(shapes, dt, tm, seqs=n["seqs"], prompt=n["prompt"], new=n["new"],
                           scored_tokens=n["scored_tokens"], learner_tokens=n["learner_tokens"],
                           response_tokens=n["response_tokens"], frozen_heads=n["frozen_heads"],
                           checkpointing=cfg.learner.gradient_checkpointing, sequential=True)


def calibrate(shapes, dt: int, cfg, n: dict, measured: dict[str, float]) -> TimeModel:
    """The efficiencies that make the model reproduce `measured` (rollout, scoring, learner seconds): the
    HF engine decodes one sequence after another; prefill at the scorer's rate."""
    scoring = forward_flops(shapes, n["scored_tokens"]) / measured["scoring"] / 1e12
    learner = learner_flops(shapes, n["learner_tokens"], n["response_tokens"], cfg.learner.gradient_checkpointing,
                            n["frozen_heads"]) / measured["learner"] / 1e12
    prefill_s = forward_flops(shapes, n["seqs"] * n["prompt"]) / (scoring * 1e12)
    unit = TimeModel(CPU, {"prefill": scoring, "scoring": scoring, "learner": learner, "decode": 1.0})
    decode_at_unit = decode_seconds(shapes, dt, unit, n["new"] * n["seqs"], 1, n["prompt"] + n["new"] / 2)
    decode = decode_at_unit / max(measured["rollout"] - prefill_s, 1e-9)
    return TimeModel(CPU, {"prefill": scoring, "scoring": scoring, "learner": learner, "decode": decode}, "this CPU")


def measured(runs: list[dict]) -> dict[str, float]:
    return {role: statistics.median(r[f"time/{key}"] for r in runs)
            for role, key in (("rollout", "rollout"), ("scoring", "scoring"), ("learner", "learning"))}


@register("timemodel", note_load=True)
def bench_timemodel(args: argparse.Namespace) -> list[Record]:
    """Calibrate the time model on one shape's step; predict and measure three other shapes."""
    model, batch, new = ("tiny", 2, 16) if args.quick else ("smollm2-135m", 4, 32)
    reps = args.reps or (1 if args.quick else 2)
    arms = {"base": (batch, new, "pmi"), "twice_the_completion": (batch, 2 * new, "pmi"),
            "twice_the_batch": (2 * batch, new, "pmi"), "standard": (batch, new, "standard")}
    # deterministic: the HF engine decodes one sequence after another, as the model is told (sequential)
    cfgs = {name: bench_cfg(model, "train.schedule=phases", "rollout.engine=hf", "rollout.deterministic=true",
                            "rollout.ignore_eos=true",
                            f"learner.micro_batch_size={b}", f"scoring.micro_batch_size={b}", batch=b, new_tokens=n,
                            mode=m) for name, (b, n, m) in arms.items()}
    cfg = cfgs["base"]
    tok, shapes, dt = load_tokenizer(cfg.model), find_shapes(cfg.model), DTYPE_BYTES[cfg.model.dtype]
    examples = examples_of(cfg, 64)
    log(f"timemodel: {model} in process, phase by phase")
    pmi = Groups.in_process(cfg, "hf")
    g = pmi.rollout
    # the rollout worker's own config sets the completion length: the longer arm gets a worker of its own
    longer = cfgs["twice_the_completion"]
    groups_of = {"base": pmi, "twice_the_batch": pmi,
                 "standard": replace(pmi, learner=LearnerGroup([Learner(cfgs["standard"])], g.calls, g.faults, False, [0.0])),
                 "twice_the_completion": replace(pmi, rollout=RolloutGroup([RolloutWorker(
                     longer.model, longer.rollout, "hf", longer.run.seed, None, rollout_max_len(longer))], g.calls, g.faults))}
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    for rep in range(reps + 1):  # the first round warms up (first calls, caches)
        for name in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            c, groups = cfgs[name], groups_of[name]
            version = groups.sync(adapter_config(c))["version"]
            rec = step_once(c, groups, PromptSampler(examples, c.train.batch_size, seed=c.run.seed), tok, 2, version)
            if rep:
                runs[name].append(rec)
    sizes = {name: lengths(cfgs[name], tok, examples, runs[name][0]) for name in arms}
    assert sizes["twice_the_completion"]["new"] == 2 * sizes["base"]["new"]  # forced lengths (ignore_eos)
    tm = calibrate(shapes, dt, cfg, sizes["base"], measured(runs["base"]))
    out = [record("timemodel_efficiency_" + k, v, "x", None, f"calibrated on the base shape ({model}, {batch} prompts x "
                  f"{new} tokens, pmi): {'share of 1 GB/s' if k == 'decode' else 'TFLOP/s'} reached on this CPU")
           for k, v in tm.efficiency.items()]
    for name in arms:
        want = measured(runs[name])
        got = predict(tm, shapes, dt, cfgs[name], sizes[name])
        ratio = sum(got[r] for r in want) / sum(want.values())
        detail = "; ".join(f"{r} {got[r]:.2f} s predicted / {want[r]:.2f} s measured" for r in want)
        out.append(record(f"timemodel_{name}_predicted_over_measured", ratio, "x", 1.0,
                          f"{arms[name]} (batch, new tokens, objective): step predicted / measured, phase by phase; goal "
                          f"0.75-1.25; {detail}; {reps} rep(s), median; the model calibrated on 'base'"))
        log(f"timemodel {name}: {ratio:.2f}; {detail}")
    return out
