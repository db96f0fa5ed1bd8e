"""Evaluation: sample n solutions per benchmark problem with an engine, grade them, summarise.

`evaluate()` takes any engine of opsd_ray.workers.engines (`generate`, `load_adapter`, `tokenizer`), so the
training driver runs the same jobs on its own rollout workers (`run_jobs`, a share each). Every
sample has its own seed, so the split does not decide what is sampled. `opsd-ray eval` (opsd_ray.cli)
is the command line; outputs (in `out`): generations.jsonl (every sample, graded), summary.json,
summary.md.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

from opsd_ray.data.prompts import BOXED_INSTRUCTION, chat_prompt_ids
from opsd_ray.eval.benchmarks import Problem, grades_numbers, load_benchmark
from opsd_ray.eval.grading import grade
from opsd_ray.eval.markers import count_markers
from opsd_ray.eval.summary import summarize, write_outputs

DEFAULT_BENCHMARKS = ["aime24", "aime25", "hmmt25"]


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


def eval_points(cfg) -> list[int]:
    """The steps a run evaluates: 0 (the base model), every eval.every steps, and the last."""
    every, steps = cfg.eval.every, cfg.train.steps
    if not every:
        return []
    return [0, *(s for s in range(1, steps + 1) if s % every == 0 or s == steps)]


def all_jobs(benchmarks, n_samples: int, limit: int | None, seed: int) -> list[EvalJob]:
    """Every sample of every benchmark: one evaluation is one dispatch (no benchmark waits for another's tail)."""
    return [j for bench in benchmarks for j in eval_jobs(bench, n_samples, limit, seed)]


def expected_tokens(records: list[dict]) -> dict[tuple[str, int], float]:
    """Each problem's mean response length in an earlier evaluation's generations (its best guess of the next)."""
    sums: dict[tuple[str, int], list[float]] = {}
    for r in records:
        s = sums.setdefault((r["benchmark"], r["problem_id"]), [0.0, 0])
        s[0] += r["num_tokens"]
        s[1] += 1
    return {k: total / n for k, (total, n) in sums.items()}


def balance(jobs: list[EvalJob], workers: int, expected: dict[tuple[str, int], float] | None = None) -> list[list[EvalJob]]:
    """Deal the jobs to `workers` engines, longest expected first, each to the engine with the least expected
    work so far (LPT); each share runs longest first, so no engine ends with a long tail of its own. A
    problem never seen before counts as longest (the budget, not a guess, bounds it)."""
    expected = expected or {}
    longest = max(expected.values(), default=1.0)
    cost = [expected.get((j.benchmark, j.problem.id), longest * 2) for j in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -cost[i])  # stable: ties keep the jobs' order
    shares: list[list[EvalJob]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for i in order:
        k = min(range(workers), key=lambda w: (load[w], len(shares[w]), w))
        shares[k].append(jobs[i])
        load[k] += cost[i]
    return shares


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


def read_adapter(folder: str | Path) -> tuple[dict, dict]:
    """(state dict, adapter_config.json) of a saved peft adapter folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    return load_file(folder / "adapter_model.safetensors"), json.loads(
        (folder / "adapter_config.json").read_text()
    )
