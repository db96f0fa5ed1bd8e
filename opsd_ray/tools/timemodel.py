"""The time model of `opsd-ray plan` (a stated roofline): what an evaluation costs under each
`eval.schedule`, and the run's hours.

Evaluation is decode-bound: each engine decodes as many sequences at once as its KV cache holds at
their mean context, and every decode step reads the weights and those sequences' KV cache from memory.
The longest sample, decoded alone at the end, bounds an evaluation from below. Stated assumptions:
EVAL_MEAN_FRACTION of the budget is a mean answer's length; the planner's memory bandwidth.
"""

from __future__ import annotations

import math

from opsd_ray.config.recipes import EVAL_GPU_MEMORY
from opsd_ray.eval.benchmarks import load_benchmark
from opsd_ray.models.shapes import OVERHEAD_BYTES
from opsd_ray.run.evaluation import eval_points

EVAL_MEAN_FRACTION = 0.5  # assumed: a reasoning model's mean answer uses half the evaluation budget (AIME/HMMT)
EVAL_PROMPT_TOKENS = 256  # a benchmark problem in its chat template (upper bound)


def eval_samples(p) -> int:
    """Samples per evaluation: problems of every benchmark x eval.n_samples (`p`: a plan.Planner)."""
    e = p.cfg.eval
    return sum(len(load_benchmark(b, e.limit)) for b in e.benchmarks) * e.n_samples


def eval_seconds(p, engines: int, util: float) -> float:
    """One evaluation on `engines` engines (one GPU each): decode-bound. Each engine decodes as many
    sequences at once as its KV cache holds at their mean context; a decode step reads the weights and
    those sequences' KV cache. The longest sample, decoded alone at the end, bounds it from below."""
    s, dt, e = p.s, p.dt, p.cfg.eval
    kv, weights = s.kv_bytes_per_token(dt), s.params() * dt
    mean_len = EVAL_MEAN_FRACTION * e.max_new_tokens
    context = EVAL_PROMPT_TOKENS + mean_len / 2  # a sequence's mean context while it decodes
    per_engine = math.ceil(eval_samples(p) / engines)
    room = max(util * p.mem - weights - p.lora * dt - OVERHEAD_BYTES, kv * context)
    together = max(1, min(per_engine, int(room / (kv * context))))
    decode_step = (weights + together * context * kv) / p.bw
    tail = e.max_new_tokens * (weights + (EVAL_PROMPT_TOKENS + e.max_new_tokens / 2) * kv) / p.bw
    return max(per_engine * mean_len / together * decode_step, tail)


def run_hours(p, step_s: float, engines: dict[str, tuple[int, float]]) -> dict[str, tuple[float, float]]:
    """{schedule: (hours of evaluation, hours of the whole run)}: `engines` gives each schedule's engine
    count and vLLM memory share."""
    train_h = p.cfg.train.steps * step_s / 3600
    points = len(eval_points(p.cfg))
    out = {}
    for name, (n, util) in engines.items():
        eval_h = points * eval_seconds(p, n, util) / 3600
        out[name] = (eval_h, train_h + eval_h)
    return out


def evaluation_lines(p, split) -> list[str]:
    """What each evaluation schedule costs at the config's settings (eval.schedule=inline | end)."""
    cfg, e = p.cfg, p.cfg.eval
    ro = cfg.rollout
    rollout_engines = split.rollout_workers if split else ro.num_workers
    util = split.util if split else ro.gpu_memory_utilization
    step = split.step if split else p.step_seconds(p.seconds(ro.num_workers, ro.tensor_parallel_size, cfg.scoring.num_workers))
    hours = run_hours(p, step, {"inline": (rollout_engines, util), "end": (p.gpus, EVAL_GPU_MEMORY)})
    points = eval_points(cfg)
    lines = ["", f"evaluation {len(points)} points (steps {', '.join(map(str, points))}) x {eval_samples(p):,} samples "
             f"({', '.join(e.benchmarks)}; {e.n_samples} each), up to {e.max_new_tokens:,} new tokens (mean assumed "
             f"{EVAL_MEAN_FRACTION:.0%})"]
    for name, where in (("inline", f"on the {rollout_engines} rollout engine(s), training waits"),
                        ("end", f"after training, an engine on each of the {p.gpus} GPUs")):
        eval_h, run_h = hours[name]
        mark = "  <- eval.schedule" if name == e.schedule else ""
        lines.append(f"  {name:<7}{where}: {eval_h / len(points):.1f} h each, {eval_h:.1f} h in all = {eval_h / run_h:.0%} "
                     f"of a {run_h:.1f} h run{mark}")
    lines.append(f"  (rough: decode reads the weights and the KV cache of the sequences an engine holds at once, "
                 f"{p.bw / 1e12:g} TB/s; training {cfg.train.steps} steps x {step:.0f} s)")
    return lines
