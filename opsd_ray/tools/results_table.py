"""table.md: runs side by side as the paper's Table 1 sets them (opsd-ray report runA runB ...).

One row per run, one column per benchmark plus the mean, each cell avg@k (%) of the run's best
checkpoint: the evaluated step (after step 0) with the highest mean avg@k over the benchmarks, as the
paper reports best-checkpoint accuracy. One checkpoint per row, so the row is a model one can ship
and its mean is the mean of its cells. A run with a step-0 evaluation also gives its model a `Base`
row (once per model).
"""

from __future__ import annotations

import re

from opsd_ray.objective.registry import OBJECTIVES

_AVG = re.compile(r"^eval/([^/]+)/avg@(\d+)$")


def avg_keys(runs) -> dict[str, str]:
    """benchmark -> its avg@k key, over all runs, in name order."""
    found: dict[str, str] = {}
    for run in runs:
        for rec in run.records.values():
            for key in rec:
                if (m := _AVG.match(key)) and m.group(1) not in ("markers", "mean"):
                    found.setdefault(m.group(1), key)
    return dict(sorted(found.items()))


def best_step(run) -> int | None:
    """The evaluated step > 0 with the highest eval/mean/avg (the earliest of equals)."""
    scored = [(rec["eval/mean/avg"], -step) for step, rec in run.records.items()
              if step > 0 and isinstance(rec.get("eval/mean/avg"), (int, float))]
    return -max(scored)[1] if scored else None


def _cells(rec: dict, keys: dict[str, str]) -> list[str]:
    values = [rec.get(key) for key in keys.values()] + [rec.get("eval/mean/avg")]
    return ["–" if v is None else f"{100 * v:.1f}" for v in values]


def table_markdown(runs) -> str:
    """The table as markdown, with a line on how it was made."""
    keys = avg_keys(runs)
    ks = sorted({key.rsplit("@", 1)[1] for key in keys.values()})
    head = [f"{b} (avg@{key.rsplit('@', 1)[1]})" for b, key in keys.items()]
    lines = [
        "# Results (as the paper's Table 1)",
        "",
        f"avg@{'/'.join(ks) or 'k'} in %, of each run's best checkpoint (highest mean over the benchmarks; "
        "`step` is that checkpoint). `Base`: the model before training (the step-0 evaluation).",
        "",
        "| model | method | run | " + " | ".join([*head, "mean", "step"]) + " |",
        "|---|---|---|" + "---|" * (len(head) + 2),
    ]
    models: dict[str, list] = {}  # rows grouped by model, in the order the runs were given
    for run in runs:
        models.setdefault(str(run.config.get("model.name", "?")), []).append(run)
    for model, group in models.items():
        base = next((r for r in group if "eval/mean/avg" in r.records.get(0, {})), None)
        if base is not None:
            lines.append(f"| {model} | Base | {base.folder.name} (step 0) | "
                         + " | ".join([*_cells(base.records[0], keys), "0"]) + " |")
        for run in group:
            mode = str(run.config.get("objective.mode"))
            step = best_step(run)
            cells = _cells(run.records[step], keys) if step is not None else ["–"] * (len(keys) + 1)
            method = OBJECTIVES[mode].method if mode in OBJECTIVES else mode
            lines.append(f"| {model} | {method} | {run.folder.name} | "
                         + " | ".join([*cells, "–" if step is None else str(step)]) + " |")
    if not keys:
        lines += ["", "No run has an evaluation: train with eval.every>0 and eval.benchmarks=[...]."]
    return "\n".join(lines) + "\n"
