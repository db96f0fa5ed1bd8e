"""The typed configuration schema: every section and key with its default (the paper's settings) and
the allowed values of the keys that take a choice. opsd_ray.config.recipes composes and validates it."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from opsd_ray.common import ENGINES
from opsd_ray.data.prompts import BOXED_INSTRUCTION

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- schema
@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_LINEAR))


@dataclass
class ModelConfig:
    name: str = MISSING
    path: str = MISSING  # Hub id, local folder, or builtin:<name>
    tokenizer: str | None = None  # None: same as path
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2
    enable_thinking: bool = False  # student and base prompts (must match)
    teacher_enable_thinking: bool | None = None  # None: same as enable_thinking
    thinking_style: str = "none"  # qwen3 | r1 | none
    trust_remote_code: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    name: str = MISSING
    path: str = MISSING  # jsonl / parquet file, saved HF dataset folder, Hub id, or builtin:<file>
    format: str = "auto"  # auto | jsonl | parquet | hf_disk | hub
    split: str = "train"
    question_key: str = "question"
    reference_key: str = "answer"
    answer_key: str | None = None  # None: taken from the reference with answer_pattern
    answer_pattern: str | None = None  # regex with one group applied to the reference, e.g. '####\s*(.+)$'
    strip_calculator_notes: bool = False  # GSM8K's <<48/2=24>> notes
    max_reference_tokens: int = 4096
    max_question_tokens: int = 2048
    limit: int | None = None  # keep the first N valid rows (after shuffling)
    hub_config: str | None = None  # a Hub data set's configuration (its "subset"), e.g. stage1
    require_answer: bool = False  # skip rows without a final answer (no answer_key value, no answer_pattern match)
    sample: int | None = None  # the data set is N valid rows drawn by a seeded hash of their text (cached)
    sample_seed: int = 0
    note: str | None = None  # how the data set was made: the data report and the model card say it


@dataclass
class PromptConfig:
    answer_instruction: str = BOXED_INSTRUCTION
    reference_intro: str = "Here is a reference solution to this problem:"
    reference_begin: str = "=== Reference solution begin ==="
    reference_end: str = "=== Reference solution end ==="
    teacher_instruction: str = (
        "After reading the reference solution above, solve the problem yourself: reason on your own "
        "rather than copying the reference."
    )


@dataclass
class ObjectiveConfig:
    mode: str = "pmi"  # an objective of opsd_ray.objective.registry: pmi | standard
    beta: float = 1.0  # PMI correction strength
    clip: float = 10.0  # tanh soft clip c; 0 disables
    center: bool = True
    lam: float = 0.5  # generalized-JSD mixture weight (0 forward KL, 1 reverse KL)
    temperature: float = 1.0
    chunk_size: int = 1024  # tokens per chunk in the fused loss


@dataclass
class RolloutConfig:
    engine: str = "auto"  # auto | vllm | hf
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    tensor_parallel_size: int = 1
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1  # completions per prompt (TRL's num_generations, veRL's rollout.n); 1 = the paper
    one_step_off: bool = False  # false: strictly on-policy (the paper); true: rollout k+1 runs with adapter k-1 while step k learns
    deterministic: bool = False  # hf engine: one sequence at a time, bit for bit whatever the batch (else batched)
    hf_max_batch: int = 16  # hf engine: sequences decoded together at most (its KV cache grows with rows x length)
    ignore_eos: bool = False  # every completion max_new_tokens long (benchmarks and the GPU proof force lengths)
    verify_sync_every: int = 25  # the sync check: engine and learner score a probe at step 1 and every N steps (0: never)
    gpu_memory_utilization: float = 0.45
    vllm_cpu_kvcache_gib: int = 1
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker


@dataclass
class ScoringConfig:
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 0.5
    micro_batch_size: int = 4  # trajectories per forward pass (x3 sequences)
    wire_format: str = "hidden"  # hidden (exact, 3*H per token) | logits (exact, full vocab)
    layout: str = "auto"  # one pass as: padded rows | shared_prefix (tree mask) | auto (fewer FLOPs)
    dtype: str | None = None  # the frozen scorer's dtype; null: model.dtype (bfloat16: AMX/GPU speed)
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker


@dataclass
class LearnerConfig:
    num_workers: int = 1  # learner actors in one torch.distributed group
    strategy: str = "ddp"  # ddp: each learner holds the model, LoRA gradients all-reduced | fsdp: base sharded
    gpus_per_worker: float = 0.0  # per learner
    cpus_per_worker: float = 1.0  # per learner
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per learner
    lr: float = 5e-6
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    grad_clip: float = 1.0
    micro_batch_size: int = 4  # trajectories per micro-batch: the unit of work that flows between roles
    gradient_checkpointing: bool = True  # paper setting


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 32  # prompts per step
    diagnostics_every: int = 10
    schedule: str = "streaming"  # streaming: work flows as it finishes | phases: rollout, then scoring, then learning


@dataclass
class CheckpointConfig:
    every: int = 50
    resume: str = "auto"  # auto | never | path to a step_<N> folder


@dataclass
class EvalSampling:
    """What an evaluation samples (training's `eval` section and `opsd-ray eval` alike)."""

    benchmarks: list[str] = field(default_factory=list)
    n_samples: int = 12
    max_new_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.95
    limit: int | None = None  # problems per benchmark (None: all)


@dataclass
class EvalConfig(EvalSampling):
    every: int = 0  # 0: no evaluation during training
    schedule: str = "inline"  # inline: at its steps, on the rollout workers | end: checkpoints, evaluated after training on every GPU


@dataclass
class RayConfig:
    address: str | None = None  # None: $RAY_ADDRESS, else start local Ray
    num_cpus: int | None = None  # local Ray only


@dataclass
class FaultConfig:
    max_restarts: int = 3  # per role: worker replacements (rollout, scoring) or learner-group restarts
    max_skipped_steps: int = 3  # consecutive steps with a non-finite loss or gradient norm before stopping


@dataclass
class MarkersConfig:
    match: str = "substring"  # substring: Kim et al.'s convention, the paper's figures | word: whole words


@dataclass
class LoggingConfig:
    wandb: bool = False  # also log to Weights & Biases (pip install -e '.[wandb]'; WANDB_MODE=offline works)
    project: str = "opsd_ray"
    entity: str | None = None  # None: your W&B default entity
    name: str | None = None  # None: run.name
    tags: list[str] = field(default_factory=list)
    verbose: bool = False  # engine and worker logs on the console too (`opsd-ray train --verbose`)


@dataclass
class RunConfig:
    name: str | None = None  # None: <model>-<data>-<mode>-<timestamp>
    output_dir: str = "runs"
    seed: int = 42


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    fault: FaultConfig = field(default_factory=FaultConfig)
    markers: MarkersConfig = field(default_factory=MarkersConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


@dataclass
class EvalCommand(EvalSampling):
    """`opsd-ray eval`: what to sample (EvalSampling's keys, the paper's benchmarks by default), a model
    preset (model=, with model.* overrides), vLLM settings (rollout.*), how markers are counted."""

    benchmarks: list[str] = field(default_factory=lambda: ["aime24", "aime25", "hmmt25"])
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    markers: MarkersConfig = field(default_factory=MarkersConfig)
    adapter: str | None = None  # a folder with adapter_model.safetensors + adapter_config.json
    engine: str = "auto"  # auto | vllm | hf
    out: str | None = None  # None: runs/eval-<model>-<time>
    seed: int = 0
    enable_thinking: bool | None = None  # None: the model preset's


CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "model.thinking_style": ("qwen3", "r1", "none"),
    "data.format": ("auto", "jsonl", "parquet", "hf_disk", "hub"),
    "rollout.engine": ENGINES,
    "scoring.wire_format": ("hidden", "logits"),
    "scoring.layout": ("auto", "padded", "shared_prefix"),
    "scoring.dtype": ("float32", "bfloat16", "float16"),
    "learner.strategy": ("ddp", "fsdp"),
    "train.schedule": ("streaming", "phases"),
    "eval.schedule": ("inline", "end"),
    "markers.match": ("substring", "word"),
}
