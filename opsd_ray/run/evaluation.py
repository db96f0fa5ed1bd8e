"""Evaluation within a training run (`eval.every`, `eval.schedule`).

- inline (default): at step 0 (the base model), every `eval.every` steps and the last, the rollout
  workers evaluate with the adapter they have just received, and training waits.
- end: training only saves a checkpoint at those steps. When it ends, an engine starts on every
  worker slot of the run (each rollout, scoring and learner GPU) and evaluates every saved point
  there. The files are the same as inline: eval/step_<N>/, the metrics, the curves and the report.

Either way one evaluation is one dispatch: every benchmark's samples at once, dealt over all engines
longest expected first (the previous evaluation's lengths tell), one call per engine. Every sample
has its own seed, so the split does not decide what the HF engine samples.
"""

from __future__ import annotations

import json
import time

from opsd_ray.eval.run import all_jobs, balance, eval_settings, expected_tokens, finish
from opsd_ray.eval.summary import benchmark_line, eval_log_record, markdown_table, output_files
from opsd_ray.run.console import say
from opsd_ray.run.faults import is_actor_loss
from opsd_ray.run.runfolder import RunFolder


def eval_points(cfg) -> list[int]:
    """The steps a run evaluates: 0 (the base model), every eval.every steps, and the last."""
    every, steps = cfg.eval.every, cfg.train.steps
    if not every:
        return []
    return [0, *(s for s in range(1, steps + 1) if s % every == 0 or s == steps)]


def inline(cfg) -> bool:
    return bool(cfg.eval.every) and cfg.eval.schedule == "inline"


def evaluate(cfg, roles, run: RunFolder, step: int) -> dict:
    """Every benchmark on all of `roles.rollout` with the adapter they have now; flat metrics for the log."""
    e, workers = cfg.eval, roles.rollout
    generation = dict(max_new_tokens=e.max_new_tokens, temperature=e.temperature, top_p=e.top_p,
                      marker_match=cfg.markers.match)
    t_start = time.perf_counter()
    jobs = all_jobs(e.benchmarks, e.n_samples, e.limit, cfg.run.seed)
    shares = dict(enumerate(balance(jobs, len(workers), expected_tokens(previous_generations(run, step)))))
    got = evaluate_shares(roles, {k: v for k, v in shares.items() if v}, generation)
    order = {b: i for i, b in enumerate(e.benchmarks)}
    records = sorted((dict(r, rollout_worker=k) for k in got for r in got[k]),
                     key=lambda r: (order[r["benchmark"]], r["problem_id"], r["sample"]))
    for bench in e.benchmarks:
        say(benchmark_line(bench, [r for r in records if r["benchmark"] == bench]))
    versions = sorted({r.pop("adapter_version") for r in records})
    settings = eval_settings(str(cfg.model.name), e.n_samples, e.max_new_tokens, e.temperature, e.top_p, e.limit,
                             cfg.run.seed, None, versions[0] if len(versions) == 1 else versions,
                             rollout_workers=len(workers), markers=cfg.markers.match, schedule=e.schedule)
    seconds = time.perf_counter() - t_start
    summary = finish(records, list(e.benchmarks), settings, seconds, None)
    files = {name: text.encode() for name, text in output_files(records, summary).items()}
    run.write_files(f"eval/step_{step}", files)
    say(f"evaluation at step {step} ({run.uri(f'eval/step_{step}')}, {seconds:.0f}s on {len(workers)} engine(s)):\n"
        f"{markdown_table(summary).rstrip()}")
    return {**eval_log_record(summary), "time/eval": seconds}


def previous_generations(run: RunFolder, step: int) -> list[dict]:
    """The graded samples of the newest evaluation before `step` ([] without one)."""
    done = [int(n.split("_")[1]) for n in run.listdir("eval") if n.startswith("step_")
            and int(n.split("_")[1]) < step and run.exists(f"eval/{n}/generations.jsonl")]
    return run.read_jsonl(f"eval/step_{max(done)}/generations.jsonl") if done else []


def evaluate_shares(roles, shares: dict[int, list], generation: dict) -> dict[int, list[dict]]:
    """Each rollout worker's share, in one call each; a lost worker is restarted and redoes its share."""
    import ray

    def send(k):
        return roles.incarnation("rollout", k), roles.rollout[k].evaluate.remote(shares[k], **generation)

    calls = {k: send(k) for k in shares}
    got = {}
    while calls:
        k, (sent_at, ref) = calls.popitem()
        try:
            got[k] = ray.get(ref)
        except Exception as e:
            if not is_actor_loss(e):
                raise
            roles.lost("rollout", k, e, sent_at)
            roles.load_adapter(k, roles.version)
            calls[k] = send(k)
    return got


def evaluate_checkpoints(cfg, run: RunFolder, log, engine: str) -> None:
    """eval.schedule=end: every evaluation point's checkpoint on an engine per worker slot of the run.
    Points already evaluated (a resumed job) are not redone."""
    import ray

    from opsd_ray.run.roles import Roles

    logged = {r["step"] for r in log.records() if any(k.startswith("eval/") for k in r)}
    points = [s for s in eval_points(cfg) if s not in logged]
    if not points:
        return
    engines = Roles(cfg, engine, evaluation=True)
    try:
        say(f"evaluating {len(points)} checkpoint(s) (steps {', '.join(map(str, points))}) on every worker slot: "
            f"{engines.where()}")
        for step in points:
            state, conf = saved_adapter(run, step, max(eval_points(cfg)))
            engines.serve(step, ray.put(state), conf)
            log.log({"step": step, **evaluate(cfg, engines, run, step)}, after_training=True)
    finally:
        engines.shutdown()


def saved_adapter(run: RunFolder, step: int, any_step: int) -> tuple[dict, dict]:
    """(LoRA state, adapter_config) of the checkpoint of `step`. Step 0, the base model, is an adapter of
    zeros (exactly the base: a fresh LoRA's B is zero too), shaped as a saved one (`any_step`'s)."""
    from safetensors.torch import load

    folder = f"checkpoints/step_{step or any_step}"
    state = load(run.read_bytes(f"{folder}/adapter_model.safetensors"))
    conf = json.loads(run.read_text(f"{folder}/adapter_config.json"))
    if step == 0:
        state = {k: v.zero_() for k, v in state.items()}
    return state, conf
