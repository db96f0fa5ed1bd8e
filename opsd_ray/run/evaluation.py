"""Evaluation on a group of engines: the one loop that training (`eval.every`) and `opsd-ray eval` run.

One evaluation is one dispatch: every benchmark's samples at once, dealt over all engines longest
expected first (the previous evaluation's lengths tell), one call per engine. Every sample has its own
seed, so the split does not decide what the HF engine samples.

Within a training run (`eval.schedule`):
- inline (default): at step 0 (the base model), every `eval.every` steps and the last, the rollout
  workers evaluate with the adapter they have just received, and training waits.
- end: training only saves a checkpoint at those steps. When it ends, an engine starts on every
  worker slot of the run (each rollout, scoring and learner GPU) and evaluates every saved point
  there. The files are the same as inline: eval/step_<N>/, the metrics, the curves and the report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors.torch import load

from opsd_ray.eval.run import all_jobs, balance, eval_points, eval_settings, expected_tokens, finish  # noqa: F401
from opsd_ray.eval.summary import benchmark_line, eval_log_record, markdown_table, output_files, write_outputs
from opsd_ray.run.console import say
from opsd_ray.run.groups import Groups, RolloutGroup
from opsd_ray.run.runfolder import RunFolder


def inline(cfg) -> bool:
    return bool(cfg.eval.every) and cfg.eval.schedule == "inline"


def evaluate(engines: RolloutGroup, e, model_name: str, seed: int, markers: str, previous: list[dict] = (),
             enable_thinking: bool | None = None, **settings) -> tuple[list[dict], dict]:
    """Every benchmark of `e` (the evaluation settings: benchmarks, n_samples, max_new_tokens, temperature,
    top_p, limit) on all `engines` with the adapter they serve; (graded samples, summary). `previous`:
    an earlier evaluation's samples, whose lengths order the dispatch."""
    t_start = time.perf_counter()
    jobs = all_jobs(e.benchmarks, e.n_samples, e.limit, seed)
    shares = balance(jobs, len(engines), expected_tokens(list(previous)))
    got = engines.evaluate({k: share for k, share in enumerate(shares) if share}, max_new_tokens=e.max_new_tokens,
                           temperature=e.temperature, top_p=e.top_p, enable_thinking=enable_thinking,
                           marker_match=markers)
    order = {b: i for i, b in enumerate(e.benchmarks)}
    records = sorted((dict(r, rollout_worker=k) for k in got for r in got[k]),
                     key=lambda r: (order[r["benchmark"]], r["problem_id"], r["sample"]))
    for bench in e.benchmarks:
        say(benchmark_line(bench, [r for r in records if r["benchmark"] == bench]))
    versions = sorted({r.pop("adapter_version") for r in records})  # -1: no adapter, the base model
    run_settings = eval_settings(model_name, e.n_samples, e.max_new_tokens, e.temperature, e.top_p, e.limit, seed,
                                 enable_thinking, versions[0] if len(versions) == 1 else versions,
                                 rollout_workers=len(engines), markers=markers, **settings)
    summary = finish(records, list(e.benchmarks), run_settings, time.perf_counter() - t_start, None)
    return records, summary


def evaluate_to(engines: RolloutGroup, ev, out_dir, served: tuple[int, dict, dict] | None = None, **settings) -> dict:
    """`opsd-ray eval`: `ev` (schema.EvalCommand) on `engines`, with the adapter `served` ((version, state,
    adapter_config); None: the base model); generations.jsonl, summary.json and summary.md in `out_dir`."""
    if served is not None:
        engines.serve(served[0], engines.calls.put(served[1]), served[2])
    records, summary = evaluate(engines, ev, str(ev.model.name), ev.seed, ev.markers.match,
                                enable_thinking=ev.enable_thinking, **settings)
    write_outputs(Path(out_dir), records, summary)
    return summary


def evaluate_step(cfg, engines: RolloutGroup, run: RunFolder, step: int) -> dict:
    """A training run's evaluation at `step`: eval/step_<N>/ in the run folder; flat metrics for the log."""
    records, summary = evaluate(engines, cfg.eval, str(cfg.model.name), cfg.run.seed, cfg.markers.match,
                                previous_generations(run, step), schedule=cfg.eval.schedule)
    files = {name: text.encode() for name, text in output_files(records, summary).items()}
    run.write_files(f"eval/step_{step}", files)
    say(f"evaluation at step {step} ({run.uri(f'eval/step_{step}')}, {summary['time_s']:.0f}s on {len(engines)} "
        f"engine(s)):\n{markdown_table(summary).rstrip()}")
    return {**eval_log_record(summary), "time/eval": summary["time_s"]}


def previous_generations(run: RunFolder, step: int) -> list[dict]:
    """The graded samples of the newest evaluation before `step` ([] without one)."""
    done = [int(n.split("_")[1]) for n in run.listdir("eval") if n.startswith("step_")
            and int(n.split("_")[1]) < step and run.exists(f"eval/{n}/generations.jsonl")]
    return run.read_jsonl(f"eval/step_{max(done)}/generations.jsonl") if done else []


def evaluate_checkpoints(cfg, run: RunFolder, log, engine: str) -> None:
    """eval.schedule=end: every evaluation point's checkpoint on an engine per worker slot of the run.
    Points already evaluated (a resumed job) are not redone."""
    logged = {r["step"] for r in log.records() if any(k.startswith("eval/") for k in r)}
    points = [s for s in eval_points(cfg) if s not in logged]
    if not points:
        return
    groups = Groups.engines(cfg, engine)
    try:
        say(f"evaluating {len(points)} checkpoint(s) (steps {', '.join(map(str, points))}) on every worker slot: "
            f"{groups.where()}")
        for step in points:
            state, conf = saved_adapter(run, step, max(eval_points(cfg)))
            groups.rollout.serve(step, groups.rollout.calls.put(state), conf)
            log.log({"step": step, **evaluate_step(cfg, groups.rollout, run, step)}, after_training=True)
    finally:
        groups.shutdown()


def saved_adapter(run: RunFolder, step: int, any_step: int) -> tuple[dict, dict]:
    """(LoRA state, adapter_config) of the checkpoint of `step`. Step 0, the base model, is an adapter of
    zeros (exactly the base: a fresh LoRA's B is zero too), shaped as a saved one (`any_step`'s)."""
    folder = f"checkpoints/step_{step or any_step}"
    state = load(run.read_bytes(f"{folder}/adapter_model.safetensors"))
    conf = json.loads(run.read_text(f"{folder}/adapter_config.json"))
    if step == 0:
        state = {k: v.zero_() for k, v in state.items()}
    return state, conf
