"""The time model of `opsd-ray plan`: where a run's hours go, as a stated roofline.

- prefill and scoring are compute-bound: 2 x (the layers' parameters) FLOPs per token;
- decode is bandwidth-bound: every new token reads the weights, and the KV cache of the sequences the
  engine holds at once (as many as the batch, or the KV cache, allows);
- the learner costs forward, backward and (with gradient checkpointing) recompute FLOPs, 6 or 8 x the
  layers' parameters per token, plus its lm_head over the student and the frozen variants;
- each is reached at a stated efficiency of the GPU's peak bf16 FLOP/s or memory bandwidth
  (EFFICIENCY); `calibrate=gpu-proof.json` replaces them by what `make gpu-proof` measured;
- evaluation is decode-bound too: the longest sample, decoded alone at the end, bounds it from below.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from opsd_ray.common import TEMPLATE_TOKENS, ConfigError
from opsd_ray.config.recipes import EVAL_GPU_MEMORY
from opsd_ray.eval.benchmarks import load_benchmark
from opsd_ray.eval.run import eval_points
from opsd_ray.models.shapes import OVERHEAD_BYTES, Shapes

ALLREDUCE_BYTES_PER_S = 100e9  # effective all-reduce bandwidth between a node's GPUs (NVLink-class, rough)
EVAL_MEAN_FRACTION = 0.5  # assumed: a reasoning model's mean answer uses half the evaluation budget (AIME/HMMT)
EVAL_PROMPT_TOKENS = 256  # a benchmark problem in its chat template (upper bound)


@dataclass(frozen=True)
class GPU:
    name: str
    tflops: float  # peak dense bf16 TFLOP/s (the vendor's datasheet, no sparsity)
    hbm_tbs: float  # memory bandwidth, TB/s
    mem_gib: float


GPUS = {
    "h100": GPU("H100 SXM", 989, 3.35, 80),
    "h200": GPU("H200 SXM", 989, 4.8, 141),
    "a100": GPU("A100 SXM 80GB", 312, 2.04, 80),
    "l40s": GPU("L40S", 362, 0.864, 48),
}
# The devices by the name torch reports (the first that the name contains): the GPU proof's MFU
DEVICES = (("H100 PCIe", GPU("H100 PCIe", 756, 2.0, 80)), ("H100 NVL", GPU("H100 NVL", 835, 3.9, 94)),
           ("H200", GPUS["h200"]), ("H100", GPUS["h100"]), ("A100", GPUS["a100"]), ("L40S", GPUS["l40s"]))

# Stated efficiencies: the share of peak FLOP/s (prefill, scoring, learner) or of the memory bandwidth
# (decode) a role reaches. Round numbers of what well-tuned stacks report; `calibrate=` replaces them.
EFFICIENCY = {"prefill": 0.4, "decode": 0.6, "scoring": 0.4, "learner": 0.4}


def device_gpu(name: str) -> GPU | None:
    """The table's entry for a device name such as "NVIDIA H100 80GB HBM3" (None: not in the table)."""
    return next((gpu for key, gpu in DEVICES if key in name), None)


@dataclass
class TimeModel:
    gpu: GPU
    efficiency: dict[str, float] = field(default_factory=lambda: dict(EFFICIENCY))
    source: str = "stated"

    def compute(self, role: str) -> float:
        return self.gpu.tflops * 1e12 * self.efficiency[role]

    def bandwidth(self) -> float:
        return self.gpu.hbm_tbs * 1e12 * self.efficiency["decode"]

    def calibrated(self, path: str | Path) -> TimeModel:
        """The efficiencies a gpu-proof.json measured (its `efficiency`), for the roles it has."""
        try:
            measured = json.loads(Path(path).read_text())["efficiency"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"calibrate={path}: not a gpu-proof.json with an 'efficiency' section ({e})") from None
        eff = {**self.efficiency, **{k: float(v) for k, v in measured.items() if k in EFFICIENCY and v}}
        return TimeModel(self.gpu, eff, f"calibrated from {path}")

    def describe(self) -> str:
        e = self.efficiency
        return (f"{self.gpu.name}: {self.gpu.tflops:g} TFLOP/s bf16, {self.gpu.hbm_tbs:g} TB/s; efficiency ({self.source}): "
                f"prefill {e['prefill']:.2f}, scoring {e['scoring']:.2f}, learner {e['learner']:.2f} of peak FLOP/s, "
                f"decode {e['decode']:.2f} of the bandwidth")


# ----------------------------------------------------------------------------- FLOPs and bytes
def forward_flops(s: Shapes, tokens: float) -> float:
    return 2 * s.core_params() * tokens


def learner_flops(s: Shapes, sequence_tokens: float, response_tokens: float, checkpointing: bool,
                  frozen_heads: int) -> float:
    """Forward, backward (and recompute) of the layers over the student's sequences, and at the response
    tokens the student's lm_head forward and backward and the frozen variants' lm_head forwards (the
    hidden wire format)."""
    passes = 8 if checkpointing else 6
    return passes * s.core_params() * sequence_tokens + 2 * s.vocab * s.hidden * (frozen_heads + 3) * response_tokens


def decode_seconds(s: Shapes, dt: int, tm: TimeModel, steps: float, seqs: float, context: float, tp: int = 1) -> float:
    """`steps` decode steps of `seqs` sequences at a mean `context`: weights + their KV cache each step."""
    return steps * (s.params() * dt + seqs * context * s.kv_bytes_per_token(dt)) / tp / tm.bandwidth()


# ----------------------------------------------------------------------------- a step
def role_seconds(p, rollout_workers: int, tp: int, scoring_workers: int, learners: int | None = None) -> dict[str, float]:
    """Busy time of each role in a step at the config's upper-bound lengths (`p`: a plan.Planner)."""
    cfg = p.cfg
    seqs = math.ceil(p.batch / rollout_workers)
    lens = [p.len_teacher, p.len_ref, p.len_student][: p.variants_typical]
    return role_seconds_at(
        p.s, p.dt, p.time, seqs=seqs, prompt=p.q + TEMPLATE_TOKENS, new=p.new,
        scored_tokens=math.ceil(p.batch / scoring_workers) * sum(lens), learner_tokens=p.batch * p.len_student,
        response_tokens=p.batch * p.new, frozen_heads=p.variants_typical if cfg.scoring.wire_format == "hidden" else 0,
        checkpointing=cfg.learner.gradient_checkpointing, learners=learners or cfg.learner.num_workers, tp=tp,
        lora=p.lora)


def role_seconds_at(s: Shapes, dt: int, tm: TimeModel, *, seqs: float, prompt: float, new: float, scored_tokens: float,
                    learner_tokens: float, response_tokens: float, frozen_heads: int, checkpointing: bool,
                    learners: int = 1, tp: int = 1, lora: int = 0, sequential: bool = False) -> dict[str, float]:
    """The roles' busy times at given lengths: a rollout worker's `seqs` sequences (prompt, then `new`
    tokens, decoded together, or one after another by an engine that decodes `sequential`ly), the tokens
    one scoring worker reads, and the learner group's tokens."""
    together = 1 if sequential else seqs
    decode = decode_seconds(s, dt, tm, new * seqs / together, together, prompt + new / 2, tp)
    prefill = forward_flops(s, seqs * prompt) / tp / tm.compute("prefill")
    score = forward_flops(s, scored_tokens) / tm.compute("scoring")
    allreduce = 2 * lora * 4 / ALLREDUCE_BYTES_PER_S if learners > 1 else 0.0  # float32 LoRA gradients
    learn = (learner_flops(s, learner_tokens, response_tokens, checkpointing, frozen_heads) / tm.compute("learner")
             / learners + allreduce)
    return {"rollout": decode + prefill, "scoring": score, "learner": learn, "prefill": prefill, "decode": decode}


def step_seconds(t: dict[str, float], schedule: str, one_step_off: bool, micro_batches: int) -> float:
    """The step from the roles' busy times: their sum phase by phase; streaming overlaps them, and only
    the last micro-batch's scoring and learning come after the rollout; one-step-off hides the rollout
    behind the previous step's learning."""
    roles = {k: t[k] for k in ("rollout", "scoring", "learner")}
    if schedule == "phases":
        return sum(roles.values())
    if one_step_off:
        return max(roles.values())
    return max(roles.values()) + (t["scoring"] + t["learner"]) / max(1, micro_batches)


# ----------------------------------------------------------------------------- evaluation and the run
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
    work = decode_seconds(s, dt, p.time, per_engine * mean_len / together, together, context)
    tail = decode_seconds(s, dt, p.time, e.max_new_tokens, 1, EVAL_PROMPT_TOKENS + e.max_new_tokens / 2)
    return max(work, tail)


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


# ----------------------------------------------------------------------------- what plan prints
def time_lines(p, split) -> list[str]:
    """Per-role seconds, the step under each schedule with its critical path, the run's hours."""
    cfg, ro = p.cfg, p.cfg.rollout
    workers, tp, scoring, learners = ((split.rollout_workers, split.tp, split.scoring_workers, split.learners) if split
                                      else (ro.num_workers, ro.tensor_parallel_size, cfg.scoring.num_workers,
                                            cfg.learner.num_workers))
    t = role_seconds(p, workers, tp, scoring, learners)
    parts = max(1, p.batch // cfg.learner.micro_batch_size)
    steps = {"phases": step_seconds(t, "phases", False, parts), "streaming": step_seconds(t, "streaming", False, parts),
             "one-step-off": step_seconds(t, "streaming", True, parts)}
    critical = max(("rollout", "scoring", "learner"), key=lambda r: t[r])
    chosen = "phases" if cfg.train.schedule == "phases" else "one-step-off" if ro.one_step_off else "streaming"
    train_h = cfg.train.steps * steps[chosen] / 3600
    lines = ["", f"time     {p.time.describe()}",
             f"         per step (rollout {workers} x {tp} GPU, scoring {scoring}, learners {learners}): rollout "
             f"{t['rollout']:.1f} s (prefill {t['prefill']:.1f}, decode {t['decode']:.1f}), scoring {t['scoring']:.1f} s, "
             f"learner {t['learner']:.1f} s; critical path: {critical}",
             "         step: " + ", ".join(f"{k} {v:.1f} s" + (" <-" if k == chosen else "") for k, v in steps.items()),
             f"         training: {cfg.train.steps} steps x {steps[chosen]:.1f} s = {train_h:.2f} h"]
    if cfg.eval.every:
        lines += evaluation_lines(p, workers, split.util if split else ro.gpu_memory_utilization, steps[chosen])
    lines += ["         assumptions: prefill and scoring are compute-bound; decode reads the weights and the KV "
              "cache of the sequences an engine holds, every token; the learner costs forward, backward and "
              "recompute FLOPs; upper-bound lengths; `calibrate=gpu-proof.json` replaces the efficiencies"]
    return lines


def evaluation_lines(p, rollout_engines: int, util: float, step: float) -> list[str]:
    """What each evaluation schedule costs at the config's settings (eval.schedule=inline | end)."""
    cfg, e = p.cfg, p.cfg.eval
    hours = run_hours(p, step, {"inline": (rollout_engines, util), "end": (p.gpus, EVAL_GPU_MEMORY)})
    points = eval_points(cfg)
    lines = [f"evaluation {len(points)} points (steps {', '.join(map(str, points))}) x {eval_samples(p):,} samples "
             f"({', '.join(e.benchmarks)}; {e.n_samples} each), up to {e.max_new_tokens:,} new tokens (mean assumed "
             f"{EVAL_MEAN_FRACTION:.0%})"]
    for name, where in (("inline", f"on the {rollout_engines} rollout engine(s), training waits"),
                        ("end", f"after training, an engine on each of the {p.gpus} GPUs")):
        eval_h, run_h = hours[name]
        mark = "  <- eval.schedule" if name == e.schedule else ""
        lines.append(f"  {name:<7}{where}: {eval_h / len(points):.1f} h each, {eval_h:.1f} h in all = {eval_h / run_h:.0%} "
                     f"of a {run_h:.1f} h run{mark}")
    return lines
