"""The shipped math benchmarks (opsd_ray/assets/data/benchmarks), normalised to {problem, answer}."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from opsd_ray.common import ConfigError
from opsd_ray.data.prompts import BOXED_INSTRUCTION, with_instruction

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


def is_file_benchmark(name: str) -> bool:
    """A benchmark given as a path to a jsonl file of {problem, answer} rows (your own)."""
    return name.endswith(".jsonl")


def check_benchmarks(names: list[str]) -> None:
    unknown = [n for n in names if n not in BENCHMARKS and not is_file_benchmark(n)]
    if unknown:
        raise ConfigError(
            f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}, or a path to a "
            ".jsonl file of {problem, answer} rows"
        )
    missing = [n for n in names if is_file_benchmark(n) and not Path(n).expanduser().is_file()]
    if missing:
        raise ConfigError(f"benchmark file(s) not found: {', '.join(missing)}")
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
    if is_file_benchmark(name):
        return _load_file(Path(name).expanduser(), limit, instruction)
    problems = []
    with (BENCHMARK_DIR / BENCHMARKS[name].file).open() as f:
        for i, line in enumerate(f):
            if limit is not None and len(problems) >= limit:
                break
            if line.strip():
                text, answer = _row(json.loads(line))
                problems.append(Problem(i, with_instruction(text, instruction), answer))
    return problems


def _load_file(path: Path, limit: int | None, instruction: str) -> list[Problem]:
    """Rows with a non-empty text `problem` and a non-empty `answer`; the others are counted and skipped."""
    problems, skipped, rows = [], Counter(), 0
    with path.open("rb") as f:
        for i, raw in enumerate(f):
            if not raw.strip():
                continue
            rows += 1
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                skipped["invalid_json"] += 1
                continue
            problem = row.get("problem") if isinstance(row, dict) else None
            answer = row.get("answer") if isinstance(row, dict) else None
            if not isinstance(problem, str) or not problem.strip() or answer is None or not str(answer).strip():
                skipped["missing_problem_or_answer"] += 1
                continue
            if limit is None or len(problems) < limit:
                problems.append(Problem(i, with_instruction(problem, instruction), str(answer).strip()))
    if skipped:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()))
        print(f"benchmark {path}: skipped {sum(skipped.values())} of {rows} rows ({reasons})", flush=True)
    if not problems:
        raise ConfigError(f"benchmark file {path} has no valid problems: each line must be a JSON object with a "
                          "non-empty text 'problem' and an 'answer'")
    return problems


@lru_cache(maxsize=64)
def grades_numbers(name: str) -> bool:
    """Whether every answer of the benchmark is a number (then the grader may fall back to the last number)."""
    if name in BENCHMARKS:
        return BENCHMARKS[name].numeric
    return all(re.fullmatch(r"-?\d+(\.\d+)?", p.answer) for p in load_benchmark(name))
