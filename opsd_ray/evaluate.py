"""`opsd-ray eval`: sample n solutions per benchmark problem, grade them, report avg@k / pass@k / maj@k.

    opsd-ray eval model=qwen3-8b adapter=runs/q8b-pmi/checkpoints/step_100 \
        benchmarks=[aime24,aime25,hmmt25] n_samples=12 max_new_tokens=32768

`evaluate()` is the reusable part: it takes any engine with the rollout engines' interface
(`generate(prompts_ids, seeds, max_new_tokens, temperature, top_p)`, `load_adapter(...)`,
`tokenizer`), so the training driver can run it on its own rollout workers.
Outputs (in `out`): generations.jsonl (every sample, graded), summary.json, summary.md.
"""

from __future__ import annotations

import difflib
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opsd_ray.config import (
    ConfigError,
    MarkersConfig,
    ModelConfig,
    RolloutConfig,
    load_preset,
    parse_overrides,
)
from opsd_ray.eval.benchmarks import Problem, check_benchmarks, grades_numbers, load_benchmark
from opsd_ray.eval.grading import grade, normalize
from opsd_ray.eval.markers import MATCHES, count_markers, marker_rates
from opsd_ray.eval.metrics import avg_at_k, maj_at_k, mean_pass_at_k
from opsd_ray.prompts import BOXED_INSTRUCTION, chat_prompt_ids

DEFAULT_BENCHMARKS = ["aime24", "aime25", "hmmt25"]


# ----------------------------------------------------------------------------- the reusable part
def sample_seed(seed: int, benchmark: str, problem_id: int, sample: int) -> int:
    """Seed of one sample: depends on (seed, benchmark, problem, sample index) only, not on batching."""
    return (seed * 1_000_003 + zlib.crc32(benchmark.encode()) + problem_id * 10_007 + sample) % (2**31 - 1)


def prompt_ids(tokenizer, model_cfg, problem: Problem, enable_thinking: bool | None) -> list[int]:
    thinking = bool(model_cfg.enable_thinking if enable_thinking is None else enable_thinking)
    return chat_prompt_ids(tokenizer, problem.problem, thinking=thinking, style=model_cfg.thinking_style)


def grade_sample(
    benchmark: str, problem: Problem, sample: int, seed: int, text: str, num_tokens: int, finish_reason: str,
    marker_match: str = "substring",
) -> dict:
    """One line of generations.jsonl."""
    g = grade(text, problem.answer, last_number=grades_numbers(benchmark))
    return {
        "benchmark": benchmark,
        "problem_id": problem.id,
        "sample": sample,
        "seed": seed,
        "gold": problem.answer,
        "extracted": g.answer,
        "correct": g.correct,
        "grading_error": g.error,
        "num_tokens": num_tokens,
        "finish_reason": finish_reason,
        "markers": count_markers(text, marker_match),
        "response": text,
    }


def summarize_benchmark(records: list[dict]) -> dict:
    """avg@k, pass@k, maj@k (k = samples per problem), lengths, no-answer rate, markers of one benchmark."""
    by_problem: dict[int, list[dict]] = {}
    for r in records:
        by_problem.setdefault(r["problem_id"], []).append(r)
    groups = [sorted(g, key=lambda r: r["sample"]) for g in by_problem.values()]
    k = min(len(g) for g in groups)
    correct = [[r["correct"] for r in g] for g in groups]
    keys = [[_vote_key(r["extracted"]) for r in g] for g in groups]
    n = len(records)
    return {
        "num_problems": len(groups),
        "num_samples": k,
        f"avg@{k}": avg_at_k(correct),
        f"pass@{k}": mean_pass_at_k(correct, k),
        f"maj@{k}": maj_at_k(keys, correct),
        "response_length": sum(r["num_tokens"] for r in records) / n,
        "truncation_rate": sum(r["finish_reason"] == "length" for r in records) / n,
        "no_answer_rate": sum(r["extracted"] is None for r in records) / n,
        "grading_errors": sum(r["grading_error"] is not None for r in records),
        "markers": marker_rates([r["markers"] for r in records], [r["num_tokens"] for r in records]),
    }


def _vote_key(answer: str | None) -> str | None:
    """Majority voting groups answers by their normalised form ('1/2' and '\\frac{1}{2}' vote together)."""
    if answer is None:
        return None
    try:
        return normalize(answer)
    except Exception:
        return answer.strip()


def summarize(records: list[dict], benchmarks: list[str]) -> dict:
    per = {b: summarize_benchmark([r for r in records if r["benchmark"] == b]) for b in benchmarks}
    avg_keys = {b: next(k for k in s if k.startswith("avg@")) for b, s in per.items()}
    return {
        "benchmarks": per,
        "mean": {"avg": sum(per[b][avg_keys[b]] for b in benchmarks) / len(benchmarks)},
        "markers": marker_rates([r["markers"] for r in records], [r["num_tokens"] for r in records]),
    }


@dataclass(frozen=True)
class EvalJob:
    """One sample to generate. Its seed depends on (seed, benchmark, problem, sample) only, so the HF
    engine generates the same text whatever the split of the jobs over engines (vLLM's batched GPU
    kernels are not batch-invariant: there a sample can change with its batch-mates)."""

    benchmark: str
    problem: Problem
    sample: int
    seed: int


def eval_jobs(benchmark: str, n_samples: int, limit: int | None, seed: int,
              instruction: str = BOXED_INSTRUCTION) -> list[EvalJob]:
    problems = load_benchmark(benchmark, limit, instruction)
    return [EvalJob(benchmark, p, s, sample_seed(seed, benchmark, p.id, s)) for p in problems for s in range(n_samples)]


def run_jobs(engine, tokenizer, model_cfg, jobs: list[EvalJob], *, max_new_tokens: int, temperature: float,
             top_p: float, enable_thinking: bool | None = None, marker_match: str = "substring") -> list[dict]:
    """Generate every job with `engine` (one batch) and grade it: the generations.jsonl records, in order."""
    prompts = {}
    for j in jobs:
        key = (j.benchmark, j.problem.id)
        if key not in prompts:
            prompts[key] = prompt_ids(tokenizer, model_cfg, j.problem, enable_thinking)
    outputs = engine.generate([prompts[(j.benchmark, j.problem.id)] for j in jobs], [j.seed for j in jobs],
                              max_new_tokens, temperature, top_p)
    return [
        grade_sample(j.benchmark, j.problem, j.sample, j.seed, tokenizer.decode(ids, skip_special_tokens=True),
                     len(ids), finish, marker_match)
        for j, (ids, finish) in zip(jobs, outputs, strict=True)
    ]


def benchmark_line(bench: str, records: list[dict], seconds: float) -> str:
    part = summarize_benchmark(records)
    k = part["num_samples"]
    return f"eval {bench}: {part['num_problems']} problems x {k} samples, avg@{k} {part[f'avg@{k}']:.3f} ({seconds:.0f}s)"


def evaluate(
    model_cfg,
    engine,
    benchmarks: list[str],
    n_samples: int = 12,
    *,
    max_new_tokens: int = 1024,
    temperature: float = 0.6,
    top_p: float = 0.95,
    limit: int | None = None,
    seed: int = 0,
    enable_thinking: bool | None = None,
    instruction: str = BOXED_INSTRUCTION,
    adapter_state: dict | None = None,
    adapter_config: dict | None = None,
    adapter_version: int = 0,
    tokenizer=None,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] = print,
    settings: dict | None = None,
    marker_match: str = "substring",
) -> dict:
    """Generate `n_samples` per problem with `engine`, grade them, return the summary dict.

    `adapter_state` (a peft state dict; with `adapter_config` for vLLM) is loaded into the engine first.
    With `out_dir`, writes generations.jsonl, summary.json and summary.md there; `settings` are recorded.
    """
    check_benchmarks(list(benchmarks))
    tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
    if adapter_state is not None:
        engine.load_adapter(adapter_version, adapter_state, adapter_config or {})
    records: list[dict] = []
    t_start = time.perf_counter()
    for bench in benchmarks:
        t0 = time.perf_counter()
        part = run_jobs(engine, tokenizer, model_cfg, eval_jobs(bench, n_samples, limit, seed, instruction),
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        enable_thinking=enable_thinking, marker_match=marker_match)
        records += part
        log(benchmark_line(bench, part, time.perf_counter() - t0))
    run_settings = eval_settings(str(model_cfg.name), n_samples, max_new_tokens, temperature, top_p, limit, seed,
                                 enable_thinking, adapter_version, markers=marker_match, **(settings or {}))
    return finish(records, list(benchmarks), run_settings, time.perf_counter() - t_start, out_dir)


def eval_settings(model: str, n_samples: int, max_new_tokens: int, temperature: float, top_p: float,
                  limit: int | None, seed: int, enable_thinking: bool | None, adapter_version, **extra) -> dict:
    """What summary.json records about how an evaluation was run."""
    return {"n_samples": n_samples, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
            "limit": limit, "seed": seed, "enable_thinking": enable_thinking, "model": model,
            "adapter_version": adapter_version, **extra}


def finish(records: list[dict], benchmarks: list[str], settings: dict, seconds: float,
           out_dir: str | Path | None) -> dict:
    """The summary of graded records (with the settings and time), written to `out_dir` when given."""
    summary = summarize(records, benchmarks)
    summary["settings"] = settings
    summary["time_s"] = seconds
    if out_dir is not None:
        write_outputs(Path(out_dir), records, summary)
    return summary


def eval_log_record(summary: dict, prefix: str = "eval") -> dict[str, float]:
    """The flat metrics a training step logs for one evaluation (keys listed in the README)."""
    out: dict[str, float] = {}
    for bench, s in summary["benchmarks"].items():
        label = Path(bench).stem if bench.endswith(".jsonl") else bench  # a benchmark file: its name
        for key, value in s.items():
            if key.startswith(("avg@", "pass@", "maj@")) or key in (
                "response_length",
                "truncation_rate",
                "no_answer_rate",
            ):
                out[f"{prefix}/{label}/{key}"] = value
    out[f"{prefix}/mean/avg"] = summary["mean"]["avg"]
    for unit, values in summary["markers"].items():
        for marker, value in values.items():
            out[f"{prefix}/markers/{marker}/{unit}"] = value
    return out


def markdown_table(summary: dict) -> str:
    rows = [
        "| benchmark | problems | samples | avg@k | pass@k | maj@k | no answer | truncated | mean tokens "
        "| markers / response | markers / 1k tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for bench, s in summary["benchmarks"].items():
        k = s["num_samples"]
        rows.append(
            f"| {bench} | {s['num_problems']} | {k} | {100 * s[f'avg@{k}']:.1f} | {100 * s[f'pass@{k}']:.1f} | "
            f"{100 * s[f'maj@{k}']:.1f} | {100 * s['no_answer_rate']:.0f}% | {100 * s['truncation_rate']:.0f}% | "
            f"{s['response_length']:.0f} | {s['markers']['per_response']['total']:.2f} | "
            f"{s['markers']['per_1k_tokens']['total']:.2f} |"
        )
    rows.append(
        f"\nMean avg@k over benchmarks: {100 * summary['mean']['avg']:.1f} (accuracies in %; k = samples "
        "per problem; pass@k unbiased; maj@k = majority vote of the extracted answers)."
    )
    return "\n".join(rows) + "\n"


def output_files(records: list[dict], summary: dict) -> dict[str, str]:
    """generations.jsonl, summary.json and summary.md of an evaluation, as {name: text}."""
    return {
        "generations.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
        "summary.json": json.dumps(summary, indent=2) + "\n",
        "summary.md": f"# Evaluation: {summary['settings']['model']}\n\n" + markdown_table(summary),
    }


def write_outputs(folder: Path, records: list[dict], summary: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in output_files(records, summary).items():
        (folder / name).write_text(text)


# ----------------------------------------------------------------------------- the command line
@dataclass
class EvalArgs:
    model: str = "smollm2-135m"
    adapter: str | None = None  # a folder with adapter_model.safetensors + adapter_config.json
    benchmarks: list[str] = field(default_factory=lambda: list(DEFAULT_BENCHMARKS))
    n_samples: int = 12
    max_new_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.95
    limit: int | None = None  # problems per benchmark (None: all)
    engine: str = "auto"  # auto | vllm | hf
    out: str | None = None  # None: runs/eval-<model>-<time>
    seed: int = 0
    enable_thinking: bool | None = None  # None: the model preset's
    markers: MarkersConfig = field(default_factory=MarkersConfig)  # markers.match=substring|word


def parse_eval_args(args: list[str]) -> tuple[DictConfig, DictConfig, DictConfig]:
    """(eval args, model config, rollout config) from `key=value` pairs; `model.*` / `rollout.*` override
    the preset's model section and the vLLM settings."""
    overrides = parse_overrides(args)
    if "benchmarks" in overrides and not overrides["benchmarks"].lstrip().startswith("["):
        overrides["benchmarks"] = f"[{overrides['benchmarks']}]"  # benchmarks=aime24 or aime24,aime25
    sections = {"model.": {}, "rollout.": {}}
    plain = {}
    for key, value in overrides.items():
        prefix = next((p for p in sections if key.startswith(p)), None)
        (sections[prefix] if prefix else plain)[key.removeprefix(prefix or "")] = value
    schema = OmegaConf.structured(EvalArgs)
    for key in plain:
        if key.split(".")[0] not in schema:
            hint = difflib.get_close_matches(key, list(schema), n=1)
            raise ConfigError(
                f"unknown eval key '{key}'"
                + (f"; did you mean '{hint[0]}'?" if hint else "")
                + f"; keys: {', '.join(schema)}, model.*, rollout.*"
            )
    ev = _merge(schema, plain, "the command line")
    model = _merge(OmegaConf.structured(ModelConfig), {}, "")
    model = OmegaConf.merge(model, load_preset("model", ev.model).model)
    model = _merge(model, sections["model."], "model.*")
    rollout = _merge(OmegaConf.structured(RolloutConfig), sections["rollout."], "rollout.*")
    validate_eval_args(ev)
    return ev, model, rollout


def _merge(base: DictConfig, dotted: dict[str, str], source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, OmegaConf.from_dotlist([f"{k}={v}" for k, v in dotted.items()]))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        raise ConfigError(f"{source}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None


def validate_eval_args(ev: DictConfig) -> None:
    check_benchmarks(list(ev.benchmarks))
    checks = [
        (ev.n_samples >= 1, f"n_samples must be >= 1 (got {ev.n_samples})"),
        (ev.max_new_tokens >= 1, f"max_new_tokens must be >= 1 (got {ev.max_new_tokens})"),
        (ev.temperature > 0, f"temperature must be > 0 (got {ev.temperature}); avg@k needs sampling"),
        (0 < ev.top_p <= 1, f"top_p must be in (0, 1] (got {ev.top_p})"),
        (ev.limit is None or ev.limit >= 1, f"limit must be >= 1 (got {ev.limit})"),
        (ev.engine in ("auto", "vllm", "hf"), f"engine={ev.engine!r} is not one of: auto, vllm, hf"),
        (ev.markers.match in MATCHES, f"markers.match={ev.markers.match!r} is not one of: {', '.join(MATCHES)}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    if ev.adapter is not None and not (Path(ev.adapter) / "adapter_model.safetensors").is_file():
        raise ConfigError(
            f"adapter={ev.adapter}: expected a folder with adapter_model.safetensors and "
            "adapter_config.json (a run's final/ or checkpoints/step_<N>/)"
        )


def read_adapter(folder: str | Path) -> tuple[dict, dict]:
    """(state dict, adapter_config.json) of a saved peft adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    return load_file(folder / "adapter_model.safetensors"), json.loads(
        (folder / "adapter_config.json").read_text()
    )


def main(args: list[str]) -> int:
    ev, model_cfg, rollout_cfg = parse_eval_args(args)
    from opsd_ray.engines import make_engine, pick_engine
    from opsd_ray.models import load_tokenizer

    state = conf = None
    if ev.adapter is not None:
        state, conf = read_adapter(ev.adapter)
        # the engine's LoRA slots must have the adapter's shape, whatever the preset says
        model_cfg.lora.r, model_cfg.lora.alpha = int(conf["r"]), int(conf["lora_alpha"])
        model_cfg.lora.target_modules = sorted(conf["target_modules"])
    engine_name = pick_engine(ev.engine, model_cfg.lora.r)
    out = Path(ev.out or f"runs/eval-{ev.model}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    tok = load_tokenizer(model_cfg)
    longest = max(
        len(prompt_ids(tok, model_cfg, p, ev.enable_thinking))
        for b in ev.benchmarks
        for p in load_benchmark(b, ev.limit)
    )
    print(
        f"eval: model={ev.model} adapter={ev.adapter} engine={engine_name} benchmarks={list(ev.benchmarks)} "
        f"n_samples={ev.n_samples} max_new_tokens={ev.max_new_tokens}",
        flush=True,
    )
    engine = make_engine(engine_name, model_cfg, rollout_cfg, ev.seed, longest + ev.max_new_tokens + 8)
    summary = evaluate(
        model_cfg,
        engine,
        list(ev.benchmarks),
        ev.n_samples,
        max_new_tokens=ev.max_new_tokens,
        temperature=ev.temperature,
        top_p=ev.top_p,
        limit=ev.limit,
        seed=ev.seed,
        enable_thinking=ev.enable_thinking,
        adapter_state=state,
        adapter_config=conf,
        tokenizer=tok,
        out_dir=out,
        log=lambda m: print(m, flush=True),
        settings={"adapter": ev.adapter, "engine": engine_name, "model_path": str(model_cfg.path)},
        marker_match=ev.markers.match,
    )
    print(markdown_table(summary), end="")
    print(f"wrote {out / 'generations.jsonl'}, {out / 'summary.json'}, {out / 'summary.md'}", flush=True)
    return 0
