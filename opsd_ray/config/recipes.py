"""Configuration: YAML recipes composed by name over the typed schema (opsd_ray.config.schema), dotlist
overrides, validation.

`opsd-ray train model=qwen3-8b data=math-cot-20k objective.beta=2` composes
schema defaults <- recipes/model/qwen3-8b.yaml <- recipes/data/math-cot-20k.yaml
<- recipes/experiment/qwen3-8b__math-cot-20k.yaml (if any) <- overrides.
Every problem is reported as one ConfigError before anything heavy loads (exit code 2).
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opsd_ray.common import ENGINES, ConfigError, RunStopped  # noqa: F401  (the config's errors, re-exported)
from opsd_ray.config.schema import (  # noqa: F401  (the schema, re-exported: `from opsd_ray.config.recipes import Config`)
    CHOICES,
    Config,
    DataConfig,
    EvalCommand,
    EvalConfig,
    LoggingConfig,
    MarkersConfig,
    ModelConfig,
    RolloutConfig,
)
from opsd_ray.eval.benchmarks import check_benchmarks
from opsd_ray.objective.registry import OBJECTIVES
from opsd_ray.workers.scoring import FLASH_NO_MASK


def recipes_dir() -> Path:
    return Path(os.environ.get("OPSD_RAY_RECIPES", Path(__file__).resolve().parents[2] / "recipes"))


# ----------------------------------------------------------------------------- presets
def known_presets(kind: str) -> list[str]:
    return sorted(p.stem for p in (recipes_dir() / kind).glob("*.yaml"))


def load_preset(kind: str, name: str) -> DictConfig:
    path = recipes_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        known = known_presets(kind)
        hint = difflib.get_close_matches(name, known, n=1)
        raise ConfigError(
            f"unknown {kind} preset '{name}'"
            + (f" (did you mean '{hint[0]}'?)" if hint else "")
            + f"; known {kind} presets: {', '.join(known)}"
        )
    return load_recipe(path)


def load_recipe(path: Path) -> DictConfig:
    """A recipe file as a config layer; a file that is not a YAML mapping is a ConfigError."""
    rel = f"recipes/{path.parent.name}/{path.name}"
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # yaml's parser errors, OmegaConf's own
        detail = " ".join(str(e).split())[:200]
        raise ConfigError(f"{rel} is not valid YAML: {detail}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{rel} must be a mapping of sections (model:, data:, ...), not a {type(layer).__name__}")
    return layer


# ----------------------------------------------------------------------------- composing
def parse_overrides(args: list[str]) -> dict[str, str]:
    """`key=value` pairs from the command line, in order (later wins)."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key:
            raise ConfigError(f"expected key=value, got '{arg}' (example: objective.beta=2.0)")
        out[key.strip()] = value
    return out


def _schema_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key in node:
        full = f"{prefix}{key}"
        keys.append(full)
        child = node[key] if not OmegaConf.is_missing(node, key) else None
        if isinstance(child, DictConfig):
            keys += _schema_keys(child, full + ".")
    return keys


# Maps whose keys are the user's (custom Ray resource names).
OPEN_KEYS = ("rollout.resources.", "scoring.resources.", "learner.resources.")


def check_known_keys(schema: DictConfig, cfg: DictConfig | dict, source: str, command: str = "train") -> None:
    """Unknown keys fail with the nearest known key as a suggestion."""
    known = _schema_keys(schema)
    flat = cfg if isinstance(cfg, dict) else _flatten(OmegaConf.to_container(cfg))
    for key in flat:
        if key not in known and not key.startswith(OPEN_KEYS):
            hint = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            every = ("`opsd-ray train --show-config` prints every key" if command == "train" else
                     "keys: " + ", ".join(k if not isinstance(schema[k], DictConfig) else f"{k}.*" for k in schema))
            raise ConfigError(
                f"unknown {'config' if command == 'train' else command} key '{key}' in {source}"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f" ({every})"
            )


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(_flatten(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
    return out


def compose(schema_cls: type, presets: dict[str, str], overrides: dict[str, str], command: str = "train") -> DictConfig:
    """Schema defaults <- named presets (kind -> name) <- optional experiment recipe <- overrides."""
    schema = OmegaConf.structured(schema_cls)
    cfg = schema
    layers: list[tuple[str, DictConfig]] = []
    for kind, name in presets.items():
        layers.append((f"recipes/{kind}/{name}.yaml", load_preset(kind, name)))
    experiment = recipes_dir() / "experiment" / ("__".join(presets.values()) + ".yaml")
    if presets and experiment.is_file():
        layers.append((f"recipes/experiment/{experiment.name}", load_recipe(experiment)))
    dotlist = [f"{k}={v}" for k, v in overrides.items()]
    layers.append(("the command line", OmegaConf.from_dotlist(dotlist)))
    for source, layer in layers:
        if command == "train":
            renamed(layer, source)
        check_known_keys(schema, layer, source, command)
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise ConfigError(f"{source}: {_omegaconf_message(e)}") from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
    OmegaConf.set_readonly(cfg, False)
    return cfg


def _staleness(value) -> bool:
    if str(value) not in ("0", "1"):
        raise ConfigError(f"rollout.max_staleness (now rollout.one_step_off) must be 0 (strictly on-policy, the "
                          f"paper's setting) or 1 (one-step-off); got {value}")
    return str(value) == "1"


# Keys that were renamed: old -> (new, how an old value becomes the new one). They still load, with a note.
RENAMED = {
    "learner.gpus": ("learner.gpus_per_worker", None),
    "learner.cpus": ("learner.cpus_per_worker", None),
    "rollout.max_staleness": ("rollout.one_step_off", _staleness),
}


def renamed(layer: DictConfig, source: str) -> None:
    """Move the old keys of a config layer to their new names, with a one-line note on stderr."""
    for old, (new, convert) in RENAMED.items():
        section, key = old.rsplit(".", 1)
        node = OmegaConf.select(layer, section)
        if not isinstance(node, DictConfig) or key not in node:
            continue
        value = node[key]
        del node[key]
        OmegaConf.update(layer, new, convert(value) if convert else value, force_add=True)
        print(f"note: {old} is now {new} ({source})", file=sys.stderr)


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if key:
        return f"{key}: {msg}"
    return msg


# ----------------------------------------------------------------------------- validation
def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_choices(cfg: DictConfig) -> None:
    choices_of = dict(CHOICES)
    if OmegaConf.select(cfg, "objective") is not None:
        choices_of["objective.mode"] = tuple(OBJECTIVES)  # the objectives registered (opsd_ray.objective)
    for key, choices in choices_of.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")


def validate_train(cfg: DictConfig) -> None:
    """Range and consistency checks for a training config; raises ConfigError."""
    check_choices(cfg)
    objective, train, learner, rollout, scoring = cfg.objective, cfg.train, cfg.learner, cfg.rollout, cfg.scoring
    _check(objective.beta > 0, f"objective.beta must be > 0 (got {objective.beta}); the paper uses 1.0")
    _check(objective.clip >= 0, f"objective.clip must be >= 0 (got {objective.clip}); 0 disables clipping, the paper uses 10")
    _check(0 <= objective.lam <= 1, f"objective.lam must be in [0, 1] (got {objective.lam}); 0.5 is the symmetric JSD")
    _check(objective.temperature > 0, f"objective.temperature must be > 0 (got {objective.temperature})")
    _check(objective.chunk_size >= 1, f"objective.chunk_size must be >= 1 (got {objective.chunk_size})")
    _check(learner.lr > 0, f"learner.lr must be > 0 (got {learner.lr})")
    _check(learner.grad_clip >= 0, f"learner.grad_clip must be >= 0 (got {learner.grad_clip}); 0 disables it")
    _check(
        len(learner.adam_betas) == 2 and all(0 <= b < 1 for b in learner.adam_betas),
        f"learner.adam_betas must be two numbers in [0, 1) (got {list(learner.adam_betas)})",
    )
    _check(train.steps >= 1, f"train.steps must be >= 1 (got {train.steps})")
    _check(train.batch_size >= 1, f"train.batch_size must be >= 1 (got {train.batch_size})")
    for name, mb in (
        ("learner.micro_batch_size", learner.micro_batch_size),
        ("scoring.micro_batch_size", scoring.micro_batch_size),
    ):
        _check(mb >= 1, f"{name} must be >= 1 (got {mb})")
    for name, n in (
        ("rollout.num_workers", rollout.num_workers),
        ("scoring.num_workers", scoring.num_workers),
        ("learner.num_workers", learner.num_workers),
        ("rollout.tensor_parallel_size", rollout.tensor_parallel_size),
        ("rollout.hf_max_batch", rollout.hf_max_batch),
    ):
        _check(n >= 1, f"{name} must be >= 1 (got {n})")
    _check(rollout.n >= 1, f"rollout.n (completions per prompt) must be >= 1 (got {rollout.n})")
    # a step's trajectories: train.batch_size prompts, rollout.n completions each
    traj = train.batch_size * rollout.n
    count = f"train.batch_size x rollout.n ({train.batch_size} x {rollout.n} = {traj} trajectories)"
    _check(
        traj % learner.micro_batch_size == 0,
        f"{count} must be divisible by learner.micro_batch_size ({learner.micro_batch_size})",
    )
    _check(traj % rollout.num_workers == 0, f"{count} must be divisible by rollout.num_workers ({rollout.num_workers})")
    _check(traj >= scoring.num_workers, f"scoring.num_workers ({scoring.num_workers}) must be <= {count}")
    _check(
        traj // learner.micro_batch_size >= learner.num_workers,
        f"learner.num_workers ({learner.num_workers}) learners need at least one micro-batch each: {count} / "
        f"learner.micro_batch_size ({learner.micro_batch_size}) is {traj // learner.micro_batch_size}",
    )
    parts = traj // learner.micro_batch_size
    _check(
        learner.strategy != "fsdp" or learner.num_workers == 1 or parts % learner.num_workers == 0,
        f"learner.strategy=fsdp: every learner runs every micro-batch's collectives, so the step's "
        f"{parts} micro-batches (trajectories / learner.micro_batch_size) must divide evenly among "
        f"learner.num_workers={learner.num_workers}",
    )
    _check(
        learner.num_workers == 1 or learner.gpus_per_worker == 0 or learner.gpus_per_worker >= 1,
        f"learner.num_workers={learner.num_workers} learners need a GPU each (learner.gpus_per_worker=1; got {learner.gpus_per_worker}): "
        "two ranks of one NCCL group cannot share a GPU",
    )
    for role in ("rollout", "scoring", "learner"):
        for name, v in cfg[role].resources.items():
            _check(v >= 0, f"{role}.resources.{name} must be >= 0 (got {v})")
    for name, v in (
        ("rollout.gpus_per_worker", rollout.gpus_per_worker),
        ("scoring.gpus_per_worker", scoring.gpus_per_worker),
        ("learner.gpus_per_worker", learner.gpus_per_worker),
        ("rollout.cpus_per_worker", rollout.cpus_per_worker),
        ("scoring.cpus_per_worker", scoring.cpus_per_worker),
        ("learner.cpus_per_worker", learner.cpus_per_worker),
    ):
        _check(v >= 0, f"{name} must be >= 0 (got {v})")
    _check(rollout.max_new_tokens >= 1, f"rollout.max_new_tokens must be >= 1 (got {rollout.max_new_tokens})")
    _check(
        rollout.temperature > 0,
        f"rollout.temperature must be > 0 (got {rollout.temperature}); on-policy sampling needs it",
    )
    _check(0 < rollout.top_p <= 1, f"rollout.top_p must be in (0, 1] (got {rollout.top_p})")
    _check(rollout.verify_sync_every >= 0,
           f"rollout.verify_sync_every must be >= 0 (got {rollout.verify_sync_every}); 0 turns the sync check off")
    _check(train.diagnostics_every >= 0, f"train.diagnostics_every must be >= 0 (got {train.diagnostics_every})")
    _check(cfg.checkpoint.every >= 0, f"checkpoint.every must be >= 0 (got {cfg.checkpoint.every})")
    _check(cfg.fault.max_restarts >= 0, f"fault.max_restarts must be >= 0 (got {cfg.fault.max_restarts})")
    _check(cfg.fault.max_skipped_steps >= 1, f"fault.max_skipped_steps must be >= 1 (got {cfg.fault.max_skipped_steps})")
    _check(cfg.eval.every >= 0, f"eval.every must be >= 0 (got {cfg.eval.every})")
    _check(cfg.eval.schedule == "inline" or cfg.eval.every > 0,
           "eval.schedule=end evaluates the checkpoints of eval.every's steps after training: set eval.every "
           "(e.g. eval.every=50)")
    _check(cfg.eval.n_samples >= 1, f"eval.n_samples must be >= 1 (got {cfg.eval.n_samples})")
    _check(cfg.eval.limit is None or cfg.eval.limit >= 1, f"eval.limit must be >= 1 or null (got {cfg.eval.limit})")
    if cfg.eval.every:

        _check(len(cfg.eval.benchmarks) > 0, "eval.every > 0 needs eval.benchmarks, e.g. eval.benchmarks=[aime24]")
        check_benchmarks(list(cfg.eval.benchmarks))
    _check(cfg.model.lora.r >= 1, f"model.lora.r must be >= 1 (got {cfg.model.lora.r})")
    _check(
        0 <= cfg.model.lora.dropout < 1,
        f"model.lora.dropout must be in [0, 1) (got {cfg.model.lora.dropout})",
    )
    _check(cfg.data.max_reference_tokens >= 1, "data.max_reference_tokens must be >= 1")
    _check(cfg.data.limit is None or cfg.data.limit >= 1,
           f"data.limit must be >= 1 or null (all rows); got {cfg.data.limit}")
    check_run_folder(cfg.run)
    if scoring.layout == "shared_prefix" and "flash" in str(cfg.model.attn_implementation):

        raise ConfigError(f"{FLASH_NO_MASK} (model.attn_implementation={cfg.model.attn_implementation})")
    _check(
        rollout.tensor_parallel_size == 1 or rollout.gpus_per_worker in (0, 1),
        f"rollout.tensor_parallel_size={rollout.tensor_parallel_size} needs a whole GPU per rank: "
        f"rollout.gpus_per_worker=1 (got {rollout.gpus_per_worker}); the worker then holds "
        f"{rollout.tensor_parallel_size} GPUs",
    )
    if cfg.logging.wandb:
        import importlib.util

        _check(importlib.util.find_spec("wandb") is not None,
               "logging.wandb=true needs wandb: pip install -e '.[wandb]' (or drop logging.wandb)")
    resume = cfg.checkpoint.resume
    _check(
        resume in ("auto", "never") or Path(resume).is_dir(),
        f"checkpoint.resume={resume!r}: expected auto, never, or an existing step_<N> folder",
    )
    check_paths(cfg)


def check_run_folder(run) -> None:
    """run.name is one folder name inside run.output_dir, and a local run.output_dir is (or can become) a folder."""
    name = run.name
    if name is not None:
        _check(str(name).strip() != "" and str(name) not in (".", "..") and not any(c in str(name) for c in "/\\\0"),
               f"run.name={name!r} must be a plain folder name (no '/', '\\', '..'): the run is written to "
               "run.output_dir/run.name; choose the parent with run.output_dir")
    out = str(run.output_dir)
    if "://" in out:
        return  # an object store URI: checked when the run folder opens
    path = Path(out).expanduser()
    for parent in (path, *path.parents):
        if parent.exists():
            _check(parent.is_dir(), f"run.output_dir={out}: {parent} is a file, not a folder; point run.output_dir "
                                    "at a folder (it is created if missing)")
            break


def check_paths(cfg: DictConfig) -> None:
    """Local paths that look like files must exist (Hub ids are checked when loading)."""
    for key in ("model.path", "model.tokenizer", "data.path"):
        value = OmegaConf.select(cfg, key)
        if not value or value.startswith("builtin:"):
            continue
        looks_local = value.startswith(("/", "./", "../", "~")) or Path(value).suffix in (
            ".jsonl",
            ".json",
            ".parquet",
        )
        if looks_local and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}: no such file or folder: {value}")
    check_model_folders(cfg.model)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.gguf", "*.safetensors.index.json")


def check_model_folders(model) -> None:
    """A local model folder must hold a model (config.json and weights) and, unless model.tokenizer
    points elsewhere, a tokenizer. Hub ids are checked when they load."""
    path = Path(str(model.path)).expanduser()
    if not str(model.path).startswith("builtin:") and path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.path={model.path}: no config.json: not a model folder (a Hugging Face "
                              "checkpoint folder, a Hub id, or builtin:tiny / builtin:smollm2-135m)")
        if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
            raise ConfigError(f"model.path={model.path}: no weights (*.safetensors or *.bin) in the folder")
        if not model.tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise ConfigError(f"model.path={model.path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                              "copy them there or set model.tokenizer=<folder or Hub id>")
    tok = Path(str(model.tokenizer)).expanduser() if model.tokenizer else None
    if tok is not None and tok.is_dir() and not any((tok / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"model.tokenizer={model.tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def load_train_config(args: list[str]) -> DictConfig:
    """The whole front door for `opsd-ray train`: compose, then validate."""
    overrides = parse_overrides(args)
    presets = {"model": overrides.pop("model", "smollm2-135m"), "data": overrides.pop("data", "gsm8k")}
    cfg = compose(Config, presets, overrides)
    validate_train(cfg)
    return cfg


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as the run folder's config.yaml holds it."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def load_eval_config(args: list[str]) -> DictConfig:
    """The front door for `opsd-ray eval`: the same composer and checks as training, over EvalCommand."""
    overrides = parse_overrides(args)
    if "benchmarks" in overrides and not overrides["benchmarks"].lstrip().startswith("["):
        overrides["benchmarks"] = f"[{overrides['benchmarks']}]"  # benchmarks=aime24 or aime24,aime25
    # The eval command owns its GPU (training's 0.45 leaves room for other roles on a shared one)
    overrides.setdefault("rollout.gpu_memory_utilization", str(EVAL_GPU_MEMORY))
    cfg = compose(EvalCommand, {"model": overrides.pop("model", "smollm2-135m")}, overrides, "eval")
    validate_eval(cfg)
    return cfg


EVAL_GPU_MEMORY = 0.9  # vLLM's share of a GPU that an evaluation engine has to itself


def validate_eval(cfg: DictConfig) -> None:

    check_choices(cfg)
    check_benchmarks(list(cfg.benchmarks))
    _check(cfg.n_samples >= 1, f"n_samples must be >= 1 (got {cfg.n_samples})")
    _check(cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1 (got {cfg.max_new_tokens})")
    _check(cfg.temperature > 0, f"temperature must be > 0 (got {cfg.temperature}); avg@k needs sampling")
    _check(0 < cfg.top_p <= 1, f"top_p must be in (0, 1] (got {cfg.top_p})")
    _check(cfg.rollout.hf_max_batch >= 1, f"rollout.hf_max_batch must be >= 1 (got {cfg.rollout.hf_max_batch})")
    _check(cfg.limit is None or cfg.limit >= 1, f"limit must be >= 1 (got {cfg.limit})")
    _check(cfg.engine in ENGINES, f"engine={cfg.engine!r} is not one of: {', '.join(ENGINES)}")
    _check(cfg.adapter is None or (Path(cfg.adapter) / "adapter_model.safetensors").is_file(),
           f"adapter={cfg.adapter}: expected a folder with adapter_model.safetensors and adapter_config.json "
           "(a run's final/ or checkpoints/step_<N>/)")
    check_model_folders(cfg.model)
