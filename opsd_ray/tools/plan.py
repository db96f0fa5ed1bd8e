"""Capacity plan: `opsd-ray plan model=<preset> data=<preset> gpus=<n> [gpu_mem=80] [key=value ...]`.

Per role, the GPU memory one worker needs at the config's upper bounds (the longest question and
reference the data filter lets through, the full completion budget), the scoring -> learner bytes
per step in the chosen wire format, and a split of the GPUs between the roles. Batch size, completion
length, LoRA rank, micro-batches, gradient checkpointing and wire format come from the composed
training config (recipes + overrides), so the plan describes the run `opsd-ray train` would start.

The memory model (checked against measured peak live-tensor bytes of a small bf16 Qwen3 with LoRA
in tests/test_plan.py):
- weights: parameters x dtype bytes (bf16: 2).
- LoRA: r x (in + out) per adapted matrix; peft keeps adapters of a bf16 model in float32, so
  parameters + gradients + AdamW's two moments = 16 bytes per LoRA parameter.
- learner activations, per token and layer: dt x (4H + 3 q_dim + 3 kv_dim + 4 I) saved by the
  base layer, plus 4 x (5H + q_dim + I + 7r) for the float32 copies of the LoRA inputs. With
  gradient checkpointing only each layer's input (dt x H) is kept, plus one layer recomputed at
  a time. The fused loss holds 8 float32 and 1 bf16 [chunk, vocab] buffers (counted as 9 x 4 B).
- scoring (no gradients, use_cache=False: no KV cache) needs a transient dt x (3I + 4H) per token;
  the three variants of a micro-batch are padded to the longest, the teacher sequence.
- rollout (vLLM): weights + KV cache for its share of the batch at full length + LoRA slot.
- every GPU process: 2 GiB of runtime overhead (CUDA context, allocator, vLLM graphs). Rough.
Step, evaluation and run times come from the time model (opsd_ray.tools.timemodel): gpu=h100|h200|
a100|l40s picks peak FLOP/s, bandwidth and memory (tflops=, hbm_tbs=, gpu_mem= override them), stated
efficiencies turn peaks into rates, and calibrate=gpu-proof.json replaces those by measured ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from opsd_ray.common import TEMPLATE_TOKENS
from opsd_ray.config.recipes import Config, ConfigError, compose, load_preset, parse_overrides, validate_train
from opsd_ray.models.shapes import DTYPE_BYTES, OVERHEAD_BYTES, GiB, find_shapes
from opsd_ray.objective.registry import objective_of
from opsd_ray.tools.timemodel import GPU, GPUS, TimeModel, role_seconds, step_seconds, time_lines

LOSS_BUFFERS = 9  # [chunk, vocab] buffers alive in the fused loss (measured: 8 float32 + 1 bf16)


# ----------------------------------------------------------------------------- the plan
@dataclass
class Item:
    label: str
    nbytes: float
    note: str = ""


@dataclass
class Role:
    name: str
    workers: int
    items: list[Item] = field(default_factory=list)
    budget: float = 0.0  # bytes the worker may use on its GPU(s)

    @property
    def total(self) -> float:
        return sum(i.nbytes for i in self.items)


@dataclass
class Split:
    rollout_workers: int
    tp: int
    scoring_workers: int
    learners: int  # learner.num_workers, one GPU each
    util: float  # rollout.gpu_memory_utilization the split assumes
    seconds: dict[str, float]
    step: float  # the estimated step under the config's schedule

    def overrides(self) -> str:
        return (
            f"rollout.num_workers={self.rollout_workers} rollout.gpus_per_worker=1 "
            f"rollout.tensor_parallel_size={self.tp} rollout.gpu_memory_utilization={self.util:g} "
            f"scoring.num_workers={self.scoring_workers} "
            f"scoring.gpus_per_worker=1 learner.num_workers={self.learners} learner.gpus_per_worker=1"
        )


class Planner:
    """All the arithmetic, from a composed training config and the machine's numbers."""

    def __init__(self, cfg, gpus: int, gpu_mem_gib: float, time: TimeModel | None = None):
        self.cfg, self.gpus, self.mem = cfg, gpus, gpu_mem_gib * GiB
        self.time = time or TimeModel(GPUS["h100"])
        self.s = find_shapes(cfg.model)
        self.dt = DTYPE_BYTES[cfg.model.dtype]
        d, ro = cfg.data, cfg.rollout
        # trajectories per step; with rollout.n > 1 the scorer shares each prompt's contexts, which this
        # counts per trajectory (an upper bound on scoring memory and time)
        self.batch, self.new = cfg.train.batch_size * ro.n, ro.max_new_tokens
        self.q, self.ref = d.max_question_tokens, d.max_reference_tokens
        self.len_student = self.q + TEMPLATE_TOKENS + self.new
        self.len_teacher = self.q + self.ref + TEMPLATE_TOKENS + self.new
        self.len_ref = self.ref + TEMPLATE_TOKENS + self.new
        objective = objective_of(cfg.objective.mode)  # the variants it scores (diagnostics steps: pi_ref too)
        self.variants_max = len(objective.step_variants(bool(cfg.train.diagnostics_every)))
        self.variants_typical = len(objective.variants)
        self.lora = self.s.lora_params(cfg.model.lora.r, set(cfg.model.lora.target_modules))
        self.wire_row = self.s.hidden if cfg.scoring.wire_format == "hidden" else self.s.vocab

    # ------------------------------------------------------------------ memory per worker
    def weights(self, tp: int = 1) -> Item:
        return Item(
            "weights",
            self.s.params() * self.dt / tp,
            f"{self.s.params() / 1e9:.2f} B params x {self.dt} B" + (f" / TP {tp}" if tp > 1 else ""),
        )

    def rollout(self, workers: int, tp: int, util: float) -> Role:
        seqs = math.ceil(self.batch / workers)
        kv = self.s.kv_bytes_per_token(self.dt)
        role = Role("rollout", workers, budget=util * self.mem)
        role.items = [
            self.weights(tp),
            Item(
                f"KV cache ({seqs} seqs x {self.len_student:,})",
                seqs * self.len_student * kv / tp,
                f"{kv // 1024} KiB/token = 2 (K,V) x {self.s.layers} layers x {self.s.kv_heads} heads x "
                f"{self.s.head_dim} x {self.dt} B",
            ),
            Item(
                "LoRA slot (vLLM)", self.lora * self.dt / tp, f"{self.lora / 1e6:.1f} M params x {self.dt} B"
            ),
            Item("runtime overhead", OVERHEAD_BYTES, "CUDA context, vLLM activations and graphs (rough)"),
        ]
        return role

    def scoring(self, workers: int, micro_batch: int | None = None) -> Role:
        mb = micro_batch or self.cfg.scoring.micro_batch_size
        share = math.ceil(self.batch / workers)
        mb = min(mb, share)
        tokens = self.variants_max * mb * self.len_teacher
        s = self.s
        role = Role("scoring", workers, budget=self.mem)
        role.items = [
            self.weights(),
            Item(
                "activations (transient)",
                tokens * self.dt * (3 * s.intermediate + 4 * s.hidden),
                f"{tokens:,} tokens x {self.dt} B x (3 x {s.intermediate} + 4 x {s.hidden})",
            ),
            Item(
                f"output rows ({share} traj x {self.new})",
                share * self.new * self.variants_max * self.wire_row * self.dt,
                f"{self.variants_max} x {self.wire_row:,} values/token ({self.cfg.scoring.wire_format})",
            ),
            Item("runtime overhead", OVERHEAD_BYTES, "CUDA context, allocator (rough)"),
        ]
        return role

    def layer_activation_bytes(self) -> int:
        """Bytes saved for backward per token and decoder layer (base layer + LoRA input copies)."""
        s, dt, r = self.s, self.dt, self.cfg.model.lora.r
        base = dt * (4 * s.hidden + 3 * s.q_dim + 3 * s.kv_dim + 4 * s.intermediate)
        n = len(set(self.cfg.model.lora.target_modules) & set(s.matrices()))
        lora_inputs = 4 * (5 * s.hidden + s.q_dim + s.intermediate) if dt != 4 else 0  # float32 copies
        return base + lora_inputs + 4 * n * r

    def activations(self, tokens: int, checkpointing: bool) -> float:
        s, layer = self.s, self.layer_activation_bytes()
        edge = tokens * 24 * s.hidden  # final norm in float32, the student rows and their gradient
        if checkpointing:
            return tokens * s.layers * self.dt * s.hidden + tokens * layer + edge
        return tokens * s.layers * layer + edge

    def learner(self, micro_batch: int | None = None, checkpointing: bool | None = None, learners: int | None = None) -> Role:
        """One member of the learner group. ddp: the whole model on each; fsdp: the decoder layers
        (frozen weights, LoRA and its optimizer state) sharded over the group, one layer gathered at a
        time, the embeddings and lm_head whole."""
        le, o = self.cfg.learner, self.cfg.objective
        n = learners or le.num_workers
        mb = micro_batch or le.micro_batch_size
        ckpt = le.gradient_checkpointing if checkpointing is None else checkpointing
        tokens = mb * self.len_student
        chunk = min(o.chunk_size, mb * self.new)
        other = self.activations(tokens, not ckpt)
        role = Role("learner", n, budget=self.mem)
        shard = n if le.strategy == "fsdp" and n > 1 else 1
        if shard > 1:
            s = self.s
            layers = s.layers * s.layer_params() * self.dt
            edges = (s.params() - s.layers * s.layer_params()) * self.dt
            weights = Item("weights (fsdp)", layers / shard + s.layer_params() * self.dt + edges,
                           f"decoder layers / {shard} + one gathered layer + embeddings and lm_head")
        else:
            weights = self.weights()
        role.items = [
            weights,
            Item(
                "LoRA params + grads + AdamW",
                self.lora * 16 / shard,
                f"{self.lora / 1e6:.1f} M params x 16 B (float32 x 4)" + (f" / {shard}" if shard > 1 else ""),
            ),
            Item(
                f"activations ({mb} seqs x {self.len_student:,}, checkpointing {'on' if ckpt else 'off'})",
                self.activations(tokens, ckpt),
                f"{'off' if ckpt else 'on'}: {other / GiB:.1f} GiB; {self.layer_activation_bytes():,} B/token/layer",
            ),
            Item(
                f"fused loss ({LOSS_BUFFERS} x {chunk} x vocab x 4 B)",
                LOSS_BUFFERS * chunk * self.s.vocab * 4,
                "chunk = objective.chunk_size; 8 float32 + 1 bf16 buffers measured",
            ),
            Item(
                "frozen rows of one micro-batch",
                mb * self.new * self.variants_max * self.wire_row * self.dt,
                f"{self.cfg.scoring.wire_format} wire format",
            ),
            Item("runtime overhead", OVERHEAD_BYTES, "CUDA context, allocator (rough)"),
        ]
        return role

    def wire_bytes_per_step(self) -> tuple[int, int]:
        per_token = self.variants_max * self.wire_row * self.dt
        return per_token, per_token * self.batch * self.new

    # ------------------------------------------------------------------ time and the split
    def seconds(self, rollout_workers: int, tp: int, scoring_workers: int, learners: int | None = None) -> dict[str, float]:
        """Busy time of each role in a step (opsd_ray.tools.timemodel)."""
        return role_seconds(self, rollout_workers, tp, scoring_workers, learners)

    def step_seconds(self, t: dict[str, float]) -> float:
        """The step under the config's schedule from the roles' busy times."""
        parts = max(1, self.batch // self.cfg.learner.micro_batch_size)
        return step_seconds(t, self.cfg.train.schedule, self.cfg.rollout.one_step_off, parts)

    def min_tp(self, workers: int, util: float) -> int | None:
        for tp in (1, 2, 4, 8):
            if self.rollout(workers, tp, util).total <= util * self.mem:
                return tp
        return None

    def suggest(self) -> Split | None:
        """The split with the shortest estimated step (under the config's schedule) among those that
        fit: rollout workers x TP, scoring workers and learners, one GPU each."""
        util = max(self.cfg.rollout.gpu_memory_utilization, 0.85)
        parts = self.batch // self.cfg.learner.micro_batch_size
        best = None
        fsdp = self.cfg.learner.strategy == "fsdp"
        fits = [n for n in (1, 2, 4, 8) if n <= parts and not (fsdp and parts % n) and self.learner(learners=n).total <= self.mem]
        for learners in fits:
            for workers in (w for w in range(1, self.gpus) if self.batch % w == 0):
                tp = self.min_tp(workers, util)
                if tp is None:
                    continue
                scoring = self.gpus - learners - workers * tp
                if scoring < 1 or scoring > self.batch:
                    continue
                t = self.seconds(workers, tp, scoring, learners)
                step = self.step_seconds(t)
                if best is None or step < best.step - 1e-9:
                    best = Split(workers, tp, scoring, learners, util, t, step)
        return best

    # ------------------------------------------------------------------ warnings
    def warnings(self, roles: list[Role]) -> list[str]:
        out = []
        for role in roles:
            if role.total <= role.budget:
                continue
            need, have = role.total / GiB, role.budget / GiB
            if role.name == "rollout":
                ro = self.cfg.rollout
                util = role.total / self.mem
                fix = (
                    f"raise rollout.gpu_memory_utilization to {math.ceil(util * 20) / 20:.2f}"
                    if util <= 0.95
                    else f"use rollout.tensor_parallel_size={self.min_tp(ro.num_workers, 0.9) or 'more'}"
                    " or more rollout.num_workers"
                )
                out.append(
                    f"rollout needs {need:.1f} GiB per GPU but vLLM may use {have:.1f} GiB "
                    f"(gpu_memory_utilization {ro.gpu_memory_utilization} x {self.mem / GiB:g}): {fix}"
                )
            elif role.name == "scoring":
                fits = [
                    m
                    for m in range(self.cfg.scoring.micro_batch_size, 0, -1)
                    if self.scoring(role.workers, m).total <= self.mem
                ]
                fix = (
                    f"set scoring.micro_batch_size={fits[0]}"
                    if fits
                    else "even scoring.micro_batch_size=1 does not fit: use bigger GPUs"
                )
                out.append(f"a scoring worker needs {need:.1f} GiB but a GPU has {have:.1f} GiB: {fix}")
            else:
                fits = [
                    m
                    for m in range(self.cfg.learner.micro_batch_size, 0, -1)
                    if self.batch % m == 0 and self.learner(m, True).total <= self.mem
                ]
                fix = "the model does not fit on one GPU: use bigger GPUs"
                if fits:
                    fix = " ".join(
                        (
                            []
                            if self.cfg.learner.gradient_checkpointing
                            else ["learner.gradient_checkpointing=true"]
                        )
                        + (
                            [f"learner.micro_batch_size={fits[0]}"]
                            if fits[0] != self.cfg.learner.micro_batch_size
                            else []
                        )
                    )
                    fix = f"set {fix}"
                out.append(f"the learner needs {need:.1f} GiB but a GPU has {have:.1f} GiB: {fix}")
        return out


# ----------------------------------------------------------------------------- report
def _gib(n: float) -> str:
    return f"{n / GiB:6.1f} GiB"


def render(p: Planner) -> str:
    cfg, s = p.cfg, p.s
    ro, sc = cfg.rollout, cfg.scoring
    lines = [
        f"opsd-ray plan: {cfg.model.name} on {cfg.data.name}, mode {cfg.objective.mode}, "
        f"{p.gpus} GPU(s) x {p.mem / GiB:g} GiB",
        f"model    {s.describe()}",
        f"         = {s.params() / 1e9:.2f} B parameters ({s.core_params() / 1e9:.2f} B in the layers), {cfg.model.dtype}",
        f"         shapes from: {s.source}",
        f"lengths  question <= {p.q:,}, reference <= {p.ref:,}, completion <= {p.new:,}, template <= {TEMPLATE_TOKENS}"
        f" tokens: student/base sequence {p.len_student:,}, teacher {p.len_teacher:,}, reference-only {p.len_ref:,}",
        f"batch    {cfg.train.batch_size} prompts"
        f"{f' x {cfg.rollout.n} completions = {p.batch} trajectories' if cfg.rollout.n > 1 else ''}"
        f" x {p.new:,} tokens = {p.batch * p.new:,} response tokens per step; "
        f"LoRA r {cfg.model.lora.r}: {p.lora / 1e6:.1f} M params",
        "",
    ]
    roles = [
        p.rollout(ro.num_workers, ro.tensor_parallel_size, ro.gpu_memory_utilization),
        p.scoring(sc.num_workers),
        p.learner(),
    ]
    heads = {
        "rollout": f"rollout  {ro.num_workers} worker(s) x {ro.tensor_parallel_size} GPU(s) (TP "
        f"{ro.tensor_parallel_size}), {math.ceil(p.batch / ro.num_workers)} sequences each; per GPU:",
        "scoring": f"scoring  {sc.num_workers} worker(s) x 1 GPU, micro-batch {min(sc.micro_batch_size, math.ceil(p.batch / sc.num_workers))}"
        f" trajectories x {p.variants_max} variants; per worker:",
        "learner": f"learner  {cfg.learner.num_workers} x 1 GPU ({cfg.learner.strategy}), micro-batch "
        f"{cfg.learner.micro_batch_size}; per GPU:",
    }
    for role in roles:
        lines.append(heads[role.name])
        for item in role.items:
            lines.append(f"  {item.label:<46}{_gib(item.nbytes)}   {item.note}")
        verdict = "fits" if role.total <= role.budget else "DOES NOT FIT"
        budget = (
            f"vLLM budget {ro.gpu_memory_utilization:g} x {p.mem / GiB:g} GiB"
            if role.name == "rollout"
            else f"GPU {p.mem / GiB:g} GiB"
        )
        lines += [f"  {'total':<46}{_gib(role.total)}   {verdict} ({budget})", ""]
    per_token, per_step = p.wire_bytes_per_step()
    other = "logits" if sc.wire_format == "hidden" else "hidden"
    other_row = s.vocab if sc.wire_format == "hidden" else s.hidden
    lines += [
        f"scoring -> learner per step ({sc.wire_format}): {p.variants_max} variants x {p.wire_row:,} values x "
        f"{p.dt} B = {per_token:,} B/token x {p.batch * p.new:,} tokens = {per_step / GiB:.2f} GiB "
        f"({other} would be {per_step * other_row / p.wire_row / GiB:.1f} GiB)",
        "",
    ]
    asked = (
        ro.num_workers * ro.gpus_per_worker * ro.tensor_parallel_size
        + sc.num_workers * sc.gpus_per_worker
        + cfg.learner.num_workers * cfg.learner.gpus_per_worker
    )
    lines.append(
        f"GPUs     the config asks for {asked:g} (rollout {ro.num_workers} x {ro.gpus_per_worker:g} x TP "
        f"{ro.tensor_parallel_size}, scoring {sc.num_workers} x {sc.gpus_per_worker:g}, learner "
        f"{cfg.learner.num_workers} x {cfg.learner.gpus_per_worker:g}) of {p.gpus}"
    )
    warnings = p.warnings(roles)
    split = p.suggest()
    if split is None:
        warnings.append(
            f"no split of {p.gpus} GPU(s) gives each role its own GPU(s) (needs at least 3): "
            "roles can share a GPU with fractional gpus_per_worker / learner.gpus_per_worker if the totals "
            "above fit in one GPU together"
        )
    else:
        t = split.seconds
        schedule = cfg.train.schedule + (" one-step-off" if cfg.rollout.one_step_off else "")
        lines += [
            f"suggested for {p.gpus} GPUs: rollout {split.rollout_workers} x {split.tp} GPU(s), scoring "
            f"{split.scoring_workers} x 1, learner {split.learners} x 1",
            f"         est. step <= {split.step:.0f} s at the upper-bound lengths, {schedule} (busy: rollout "
            f"{t['rollout']:.0f} s, scoring {t['scoring']:.0f} s, learner {t['learner']:.0f} s; the time model below)",
            f"         {split.overrides()}",
        ]
    lines += time_lines(p, split)
    if asked > p.gpus:
        warnings.append(
            f"the config asks for {asked:g} GPUs but gpus={p.gpus}"
            + (": use the suggested overrides above" if split else "")
        )
    lines.append("")
    lines += [f"WARNING: {w}" for w in warnings] or ["no warnings: every role fits"]
    return "\n".join(lines)


def main(args: list[str]) -> int:
    overrides = parse_overrides(args)
    model, data = overrides.pop("model", "smollm2-135m"), overrides.pop("data", "gsm8k")
    gpu_name, calibrate = overrides.pop("gpu", "h100"), overrides.pop("calibrate", None)
    if gpu_name not in GPUS:
        raise ConfigError(f"gpu={gpu_name!r} is not one of: {', '.join(GPUS)} (tflops= and hbm_tbs= describe another)")
    gpu = GPUS[gpu_name]
    numbers = {}
    for key, default, cast in (("gpus", None, int), ("gpu_mem", gpu.mem_gib, float), ("tflops", gpu.tflops, float),
                               ("hbm_tbs", gpu.hbm_tbs, float)):
        raw = overrides.pop(key, default)
        if raw is None:
            raise ConfigError("plan needs gpus=<n> (e.g. opsd-ray plan model=qwen3-8b data=math-cot-20k gpus=8)")
        try:
            numbers[key] = cast(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r} is not a number") from None
        if numbers[key] <= 0:
            raise ConfigError(f"{key} must be > 0 (got {raw})")
    # The plan reads no data: a preset whose path must be given on the command line still plans.
    preset = load_preset("data", data)
    if OmegaConf.is_missing(preset.data, "path") and "data.path" not in overrides:
        overrides["data.path"] = "not-needed-for-the-plan"
    cfg = compose(Config, {"model": model, "data": data}, overrides)
    validate_train(cfg)
    if cfg.model.dtype not in DTYPE_BYTES:
        raise ConfigError(f"model.dtype={cfg.model.dtype} is not one of {', '.join(DTYPE_BYTES)}")
    time = TimeModel(GPU(gpu.name, numbers["tflops"], numbers["hbm_tbs"], numbers["gpu_mem"]))
    planner = Planner(cfg, numbers["gpus"], numbers["gpu_mem"], time.calibrated(calibrate) if calibrate else time)
    print(render(planner))
    return 0
