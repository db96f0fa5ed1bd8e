"""Summaries of graded generations: avg@k, pass@k, maj@k, lengths and markers per benchmark; the
flat metrics a training step logs; generations.jsonl, summary.json and summary.md."""

from __future__ import annotations

import json
from pathlib import Path

from opsd_ray.eval.grading import normalize
from opsd_ray.eval.markers import marker_rates
from opsd_ray.eval.metrics import avg_at_k, maj_at_k, mean_pass_at_k


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


def benchmark_line(bench: str, records: list[dict]) -> str:
    part = summarize_benchmark(records)
    k = part["num_samples"]
    return f"eval {bench}: {part['num_problems']} problems x {k} samples, avg@{k} {part[f'avg@{k}']:.3f}"
