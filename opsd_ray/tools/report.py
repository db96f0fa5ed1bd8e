"""`opsd-ray report runs/a [runs/b ...] [out=folder]`: PNG plots and a markdown summary of runs.

Reads each run's metrics.jsonl (one record per step; evaluation records may share a step or stand
alone, e.g. step 0) and eval/step_<N>/summary.json (merged in when the metrics lack them), and
config.yaml for the label (objective.mode and model.name). Several runs share the axes.

    accuracy.png       avg@k per benchmark against step (paper Fig. 1/4)
    markers.png        epistemic markers per response against step; per-marker bars, first vs last (Fig. 2/5)
    decomposition.png  cos(Δ_total, Δ_ref), cos(Δ_total, Δ_it) and the norm fractions against step (Fig. 3)
    training.png       loss, jsd, student_entropy, kl_target_base against step
    summary.md         a table per run and the four plots
    table.md           the runs as the paper's Table 1: best checkpoint's avg@k per benchmark and mean
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from opsd_ray.common import ConfigError, jsonl_records
from opsd_ray.config.recipes import _flatten
from opsd_ray.eval.markers import MARKERS, describe
from opsd_ray.eval.summary import eval_log_record
from opsd_ray.tools.results_table import avg_keys, table_markdown

TRAIN_KEYS = ("loss", "jsd", "student_entropy", "kl_target_base")


@dataclass
class Run:
    folder: Path
    label: str
    records: dict[int, dict] = field(default_factory=dict)  # step -> every metric logged at that step
    config: dict = field(default_factory=dict)  # config.yaml, flat dotted keys

    @property
    def marker_match(self) -> str:
        """markers.match of the run (runs from before the setting counted whole words)."""
        return str(self.config.get("markers.match") or "word")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        pts = [
            (s, r[key])
            for s, r in sorted(self.records.items())
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        return [p[0] for p in pts], [float(p[1]) for p in pts]

    def has(self, key: str) -> bool:
        return bool(self.series(key)[0])


# ----------------------------------------------------------------------------- reading runs
def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{folder}: no metrics.jsonl (expected a run folder such as runs/<name>)")
    records: dict[int, dict] = {}
    for rec in jsonl_records(metrics.read_text()):
        records.setdefault(int(rec.get("step", 0)), {}).update(rec)

    for path in sorted((folder / "eval").glob("step_*/summary.json")):  # evaluations the metrics lack
        step = int(path.parent.name.split("_")[1])
        rec = records.setdefault(step, {"step": step})
        for k, v in eval_log_record(json.loads(path.read_text())).items():
            rec.setdefault(k, v)
    config = run_config(folder)
    return Run(folder, run_label(folder, config), records, config)


def run_config(folder: Path) -> dict:
    """The run's config.yaml as flat dotted keys ({} without one)."""
    from omegaconf import OmegaConf


    path = folder / "config.yaml"
    return _flatten(OmegaConf.to_container(OmegaConf.load(path))) if path.is_file() else {}


def run_label(folder: Path, config: dict) -> str:
    """'<objective.mode> · <model.name>' from config.yaml, else the folder name."""
    mode, model = config.get("objective.mode"), config.get("model.name")
    if mode or model:
        return " · ".join(str(x) for x in (mode, model) if x)
    return folder.name


def unique_labels(runs: list[Run]) -> None:
    """Two runs with the same mode and model are told apart by their folder names."""
    labels = [r.label for r in runs]
    for run, label in zip(runs, labels, strict=True):
        if labels.count(label) > 1:
            run.label = f"{label} [{run.folder.name}]"
    for run in runs:  # still equal (same folder name under different parents): number them
        same = [r for r in runs if r.label == run.label]
        if len(same) > 1:
            for i, r in enumerate(same):
                r.label = f"{r.label} #{i + 1}"


def benchmarks_of(runs: list[Run]) -> list[tuple[str, str]]:
    """(benchmark, avg@k key) pairs found in any run, 'mean' last."""
    pairs = list(avg_keys(runs).items())
    if len(pairs) > 1 and any(run.has("eval/mean/avg") for run in runs):
        pairs.append(("mean", "eval/mean/avg"))
    return pairs


def marker_rule(runs: list[Run]) -> str:
    """How the runs' markers were counted (markers.match), for titles."""
    rules = sorted({run.marker_match for run in runs})
    if len(rules) > 1:
        return "counted differently: " + ", ".join(f"{r.label}: {describe(r.marker_match)}" for r in runs)
    return "counted as " + describe(rules[0])


def marker_source(runs: list[Run]) -> tuple[str, str]:
    """Markers on evaluation generations when logged (the paper's figure), else on training rollouts."""
    if any(run.has("eval/markers/total/per_response") for run in runs):
        return "eval/markers", "evaluation generations"
    return "markers", "training rollouts"


# ----------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(runs: list[Run]) -> dict[str, str]:
    palette = [
        "tab:blue",
        "tab:orange",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:gray",
    ]
    return {run.label: palette[i % len(palette)] for i, run in enumerate(runs)}


def _step_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)


def _empty(ax, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="gray", wrap=True
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)


def plot_accuracy(runs: list[Run], path: Path) -> None:
    plt = _plt()
    benches = benchmarks_of(runs)
    n = max(len(benches), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    colors = _colors(runs)
    if not benches:
        _empty(axes[0][0], "no evaluation records\n(train with eval.every>0 and eval.benchmarks=[...])")
    for ax, (bench, key) in zip(axes[0], benches, strict=False):
        k = key.rsplit("@", 1)[-1] if "@" in key else "k"
        for run in runs:
            steps, vals = run.series(key)
            if steps:
                ax.plot(steps, [100 * v for v in vals], marker="o", color=colors[run.label], label=run.label)
        ax.set_title(f"{bench}: avg@{k}" if bench != "mean" else "mean avg@k over benchmarks")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, max(ax.get_ylim()[1], 1.0))  # an all-zero curve sits on the axis, not mid-plot
        _step_axis(ax)
    if benches:
        axes[0][0].legend(fontsize=8)
    fig.suptitle("Accuracy against training step")
    _save(fig, path)


def _first_last(run: Run, prefix: str) -> list[tuple[int, dict[str, float]]]:
    steps, _ = run.series(f"{prefix}/total/per_response")
    picks = sorted({steps[0], steps[-1]}) if steps else []
    return [(s, {m: run.records[s].get(f"{prefix}/{m}/per_response", 0.0) for m in MARKERS}) for s in picks]


def plot_markers(runs: list[Run], path: Path) -> None:
    plt = _plt()
    import numpy as np

    prefix, source = marker_source(runs)
    colors = _colors(runs)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2), gridspec_kw={"width_ratios": [1, 1, 2.2]})
    for ax, unit, what in (
        (axes[0], "per_response", "per response"),
        (axes[1], "per_1k_tokens", "per 1k tokens"),
    ):
        drawn = False
        for run in runs:
            steps, vals = run.series(f"{prefix}/total/{unit}")
            if steps:
                drawn = True
                ax.plot(steps, vals, marker="o", color=colors[run.label], label=run.label)
        if drawn:
            ax.set_ylabel(f"all markers {what}")
            ax.set_ylim(0, max(ax.get_ylim()[1], 1.0))
            ax.legend(fontsize=7)
            _step_axis(ax)
        else:
            _empty(ax, "no marker records")
        ax.set_title(f"All markers {what}")

    ax_b = axes[2]
    bars = [
        (run, i, step, counts) for run in runs for i, (step, counts) in enumerate(_first_last(run, prefix))
    ]
    if bars:
        x = np.arange(len(MARKERS))
        width = 0.8 / len(bars)
        for j, (run, i, step, counts) in enumerate(bars):
            first = i == 0 and len(_first_last(run, prefix)) > 1
            ax_b.bar(
                x + (j - (len(bars) - 1) / 2) * width,
                [counts[m] for m in MARKERS],
                width,
                color=colors[run.label],
                alpha=0.4 if first else 1.0,
                hatch="//" if first else None,
                label=f"{run.label}, step {step}",
            )
        ax_b.set_xticks(x, MARKERS, rotation=30)
        ax_b.set_ylabel("count per response")
        ax_b.set_ylim(0, max(ax_b.get_ylim()[1], 1.0))
        ax_b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax_b.grid(alpha=0.3, axis="y")
    else:
        _empty(ax_b, "no marker records")
    ax_b.set_title("Per marker: first (hatched) vs last step")
    fig.suptitle(f"Epistemic markers on {source} ({marker_rule(runs)})")
    _save(fig, path)


def plot_decomposition(runs: list[Run], path: Path) -> None:
    plt = _plt()
    colors = _colors(runs)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = (
        ("cos(Δ_total, ·)", (("cos_total_ref", "Δ_ref"), ("cos_total_it", "Δ_it"))),
        ("‖·‖ / ‖Δ_total‖", (("norm_frac_ref", "Δ_ref"), ("norm_frac_it", "Δ_it"))),
    )
    for ax, (title, keys) in zip(axes, panels, strict=True):
        drawn = False
        for run in runs:
            for (key, name), style, mark in zip(keys, ("-", "--"), ("o", "s"), strict=True):
                steps, vals = run.series(key)
                if steps:
                    drawn = True
                    ax.plot(
                        steps, vals, style, marker=mark, color=colors[run.label], label=f"{run.label}: {name}"
                    )
        if drawn:
            ax.legend(fontsize=7)
            _step_axis(ax)
        else:
            _empty(ax, "no decomposition records (train.diagnostics_every)")
        ax.set_title(title)
    fig.suptitle("Decomposition Δ_total = Δ_ref + Δ_it (solid, circles: Δ_ref; dashed, squares: Δ_it)")
    _save(fig, path)


def plot_training(runs: list[Run], path: Path) -> None:
    plt = _plt()
    colors = _colors(runs)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, key in zip(axes.flat, TRAIN_KEYS, strict=True):
        drawn = False
        for run in runs:
            steps, vals = run.series(key)
            if steps:
                drawn = True
                ax.plot(
                    steps,
                    vals,
                    marker="." if len(steps) < 50 else None,
                    color=colors[run.label],
                    label=run.label,
                )
        if drawn:
            ax.legend(fontsize=7)
            _step_axis(ax)
        else:
            _empty(ax, f"no '{key}' records" + (" (pmi mode only)" if key == "kl_target_base" else ""))
        ax.set_title(key)
    fig.suptitle("Training metrics against step")
    _save(fig, path)


# ----------------------------------------------------------------------------- summary
def _fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "–" if v is None else f"{scale * v:.{digits}f}"


def _first_last_values(run: Run, key: str) -> tuple[float | None, float | None]:
    _, vals = run.series(key)
    return (vals[0], vals[-1]) if vals else (None, None)


def summary_markdown(runs: list[Run], images: list[str]) -> str:
    lines = ["# Training report", ""]
    lines += [
        "| run | folder | steps | loss (first → last) | kl_target_base (last) |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        steps = run.series("loss")[0]
        lo = _first_last_values(run, "loss")
        kl = _first_last_values(run, "kl_target_base")[1]
        lines.append(
            f"| {run.label} | `{run.folder}` | {steps[-1] if steps else 0} | {_fmt(lo[0])} → {_fmt(lo[1])} "
            f"| {_fmt(kl)} |"
        )
    benches = benchmarks_of(runs)
    if benches:
        lines += [
            "",
            "Accuracy (avg@k, %): first evaluated step → last, and the best step.",
            "",
            "| run | " + " | ".join(b for b, _ in benches) + " |",
            "|---|" + "---|" * len(benches),
        ]
        for run in runs:
            cells = []
            for _, key in benches:
                steps, vals = run.series(key)
                if not vals:
                    cells.append("–")
                    continue
                best = max(range(len(vals)), key=lambda i: vals[i])
                cells.append(
                    f"{100 * vals[0]:.1f} → {100 * vals[-1]:.1f} (best {100 * vals[best]:.1f} @ {steps[best]})"
                )
            lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    prefix, source = marker_source(runs)
    lines += [
        "",
        f"Epistemic markers on {source} ({marker_rule(runs)}), per response: first → last.",
        "",
        "| run | total | " + " | ".join(MARKERS) + " |",
        "|---|---|" + "---|" * len(MARKERS),
    ]
    for run in runs:
        cells = []
        for m in ("total", *MARKERS):
            a, b = _first_last_values(run, f"{prefix}/{m}/per_response")
            cells.append("–" if a is None else f"{a:.2f} → {b:.2f}")
        lines.append(f"| {run.label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"![{Path(img).stem}]({img})" for img in images]
    return "\n".join(lines) + "\n"


def report(folders: list[str | Path], out: str | Path | None = None) -> Path:
    """Render the plots and summary.md of one or more runs; returns the output folder."""
    if not folders:
        raise ConfigError("report needs at least one run folder, e.g. opsd-ray report runs/<name>")
    runs = [load_run(f) for f in folders]
    unique_labels(runs)
    if out is None:
        first = Path(folders[0])
        out = (
            first / "report"
            if len(runs) == 1
            else first.parent / ("report-" + "-vs-".join(r.folder.name for r in runs))
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "accuracy.png": plot_accuracy,
        "markers.png": plot_markers,
        "decomposition.png": plot_decomposition,
        "training.png": plot_training,
    }
    for name, fn in plots.items():
        fn(runs, out / name)
    (out / "summary.md").write_text(summary_markdown(runs, list(plots)))
    (out / "table.md").write_text(table_markdown(runs))
    return out


def main(args: list[str]) -> int:
    """opsd-ray report runs/<a> [runs/<b> ...] [out=<folder>]"""
    folders = [a for a in args if "=" not in a]
    options = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(options) - {"out"})
    if unknown:
        raise ConfigError(
            f"unknown report option(s) {', '.join(unknown)}; usage: opsd-ray report runs/<a> "
            "[runs/<b> ...] [out=<folder>]"
        )
    out = report(folders, options.get("out"))
    print(f"report: {out / 'summary.md'}, {out / 'table.md'} and "
          f"{', '.join(sorted(p.name for p in out.glob('*.png')))}")
    return 0


def report_run(run) -> str | None:
    """A run's plots, summary.md and table.md (`opsd-ray report` of it) in <run>/report/ (`run`: its
    run folder, local or remote); where summary.md went, or None with a warning (the run is complete)."""
    try:
        local = run.local_path()
        if local is not None:
            return str(report([local]) / "summary.md")
        with tempfile.TemporaryDirectory() as tmp:  # a remote run folder: render locally, then copy
            copy = Path(tmp) / Path(str(run)).name
            copy.mkdir()
            for name in ("metrics.jsonl", "config.yaml"):
                (copy / name).write_bytes(run.read_text(name).encode())
            out = report([copy], Path(tmp) / "report")
            run.write_files("report", {f.name: f.read_bytes() for f in out.iterdir()})
        return run.uri("report/summary.md")
    except Exception as e:  # the run itself is complete: say so, and how to make the report again
        print(f"warning: the report was not written ({type(e).__name__}: {e}); `opsd-ray report {run.uri()}` "
              "makes it", flush=True)
        return None
