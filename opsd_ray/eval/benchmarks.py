"""The shipped math benchmarks (opsd_ray/assets/data/benchmarks), normalised to {problem, answer}."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opsd_ray.config import BOXED_INSTRUCTION, ConfigError
from opsd_ray.prompts import with_instruction

BENCHMARK_DIR = Path(__file__).resolve().parent.parent / "assets" / "data" / "benchmarks"


@dataclass(frozen=True)
class BenchmarkSpec:
    file: str
    numeric: bool  # every answer is a number: the grader may fall back to the response's last number


BENCHMARKS = {
    "aime24": BenchmarkSpec("aime24.jsonl", numeric=True),
    "aime25": BenchmarkSpec("aime25.jsonl", numeric=True),
    "hmmt25": BenchmarkSpec("hmmt25_feb.jsonl", numeric=False),
    "amc23": BenchmarkSpec("amc2023.jsonl", numeric=True),
    "math500": BenchmarkSpec("math500.jsonl", numeric=False),
    "gsm8k": BenchmarkSpec("gsm8k_test.jsonl", numeric=True),
}


@dataclass(frozen=True)
class Problem:
    id: int  # line number in the benchmark file
    problem: str  # ends with the answer instruction
    answer: str


def check_benchmarks(names: list[str]) -> None:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    if not names:
        raise ConfigError(f"no benchmarks given; known: {', '.join(BENCHMARKS)}")


def _row(row: dict) -> tuple[str, str]:
    if "problem" in row:
        return row["problem"], str(row["answer"]).strip()
    # GSM8K: {question, answer: "worked solution ... #### 1,234"}
    return row["question"], row["answer"].rsplit("####", 1)[-1].strip().replace(",", "")


def load_benchmark(
    name: str, limit: int | None = None, instruction: str = BOXED_INSTRUCTION
) -> list[Problem]:
    """The first `limit` problems of a benchmark (all when None), each ending with `instruction`."""
    check_benchmarks([name])
    problems = []
    with (BENCHMARK_DIR / BENCHMARKS[name].file).open() as f:
        for i, line in enumerate(f):
            if limit is not None and len(problems) >= limit:
                break
            if line.strip():
                text, answer = _row(json.loads(line))
                problems.append(Problem(i, with_instruction(text, instruction), answer))
    return problems
