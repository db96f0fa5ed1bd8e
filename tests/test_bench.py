"""The benchmarks (opsd_ray.bench) on the tiny model: record schema and sane values.

No timing assertions: the machine is shared. Ray and vLLM arms are left to `make bench`.
"""

import json
import math
import os
import subprocess
import sys

import pytest

_omp = os.environ.get("OMP_WAIT_POLICY")
from opsd_ray.bench import common, overlap, scoring, step, wire  # noqa: E402  (sets OMP_WAIT_POLICY for benchmarks)

if _omp is None:  # keep the other tests' environment as it was
    os.environ.pop("OMP_WAIT_POLICY", None)

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_H, TINY_V = 64, 151_936


def check_schema(records):
    names = [r["name"] for r in records]
    assert len(names) == len(set(names))
    for r in records:
        assert set(r) == {"name", "value", "unit", "baseline", "note"}
        assert isinstance(r["value"], float | int) and math.isfinite(r["value"]), r
        assert r["baseline"] is None or math.isfinite(r["baseline"])
        assert r["unit"] and r["note"]
    return {r["name"]: r for r in records}


def test_interleaved_alternates_order_and_pairs():
    calls = []
    runs = common.interleaved({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, 3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert [r for r, _ in runs["a"]] == [1, 1, 1] and all(t >= 0 for _, t in runs["b"])
    assert common.paired_median([2.0, 4.0, 9.0], [1.0, 1.0, 3.0]) == 3.0


def test_wire_records_tiny():
    recs = check_schema(wire.wire_records("tiny", 1, 8))
    assert recs["wire_values_per_token_hidden"]["value"] == 3 * TINY_H  # the goal: at most 3*H per token
    assert recs["wire_bytes_per_token_hidden"]["value"] == 3 * TINY_H * 4  # float32
    assert recs["wire_bytes_per_token_logits"]["value"] == 3 * TINY_V * 4
    assert recs["wire_exact_loss_rel_diff"]["value"] < 1e-4  # both formats are exact
    assert "no approximate" in recs["wire_exact_loss_rel_diff"]["note"]


def test_scoring_records_tiny():
    recs = check_schema(scoring.scoring_records("tiny", 2, 16, reps=1))
    assert recs["scoring_one_pass_speedup_tiny"]["value"] > 0
    assert recs["scoring_one_pass_tokens_per_s_tiny"]["value"] > 0
    assert recs["scoring_one_pass_speedup_tiny"]["baseline"] == 1.2
    assert recs["scoring_padded_pass_speedup_tiny"]["value"] > 0 and "layout auto = " in recs["scoring_padded_pass_speedup_tiny"]["note"]


def test_local_steps_tiny_both_modes():
    """The in-process groups (the Ray benchmark's baseline): same batch and seeds, lr 0 -> same trajectories."""
    from dataclasses import replace

    from opsd_ray.data.sources import PromptSampler
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.run.groups import Groups, LearnerGroup
    from opsd_ray.workers.engines import adapter_config
    from opsd_ray.workers.learner import Learner

    cfgs = {
        m: common.bench_cfg("tiny", "learner.micro_batch_size=1", batch=1, new_tokens=4, mode=m)
        for m in ("pmi", "standard")
    }
    cfg = cfgs["pmi"]
    assert cfg.learner.lr == 0.0 and cfg.train.diagnostics_every == 0
    tok = load_tokenizer(cfg.model)
    examples = common.examples_of(cfg, 8)
    local = {"pmi": Groups.in_process(cfg, "hf")}
    g = local["pmi"]
    local["standard"] = replace(g, learner=LearnerGroup([Learner(cfgs["standard"])], g.rollout.calls, g.rollout.faults,
                                                        False, [0.0]))
    conf = adapter_config(cfg)
    assert all(groups.sync(conf)["version"] == 0 for groups in local.values())
    recs = {}
    for mode, c in cfgs.items():
        recs[mode] = step.one_step(c, local[mode], PromptSampler(examples, 1, seed=cfg.run.seed), tok, 2, conf)
    for rec in recs.values():
        assert math.isfinite(rec["loss"]) and rec["loss"] >= 0
        parts = sum(rec[f"time/{p}"] for p in common.STEP_PHASES)
        assert rec["time/step"] == pytest.approx(parts, rel=1e-6)
        assert rec["cpu/step"] > 0
    assert recs["pmi"]["num_tokens"] == recs["standard"]["num_tokens"]  # the same trajectories
    assert ("kl_target_base" in recs["pmi"]) and ("kl_target_base" not in recs["standard"])


def test_bench_main_registers_system_benchmarks(tmp_path, monkeypatch):
    """`python -m opsd_ray.bench` lists the system benchmarks; main() runs one and writes the JSON."""
    from opsd_ray import bench
    from opsd_ray.bench.__main__ import main

    help_text = subprocess.run(
        [sys.executable, "-m", "opsd_ray.bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert all(name in help_text for name in ("objectives", "rollout", "scoring", "step", "wire"))
    monkeypatch.setitem(bench.BENCHMARKS, "wire", lambda args: wire.wire_records("tiny", 1, 4))
    out = tmp_path / "latest.json"
    assert main(["wire", "--quick", "--out", str(out)]) == 0
    assert {"wire_bytes_per_token_hidden", "wire_bytes_per_token_logits"} <= {
        r["name"] for r in json.loads(out.read_text())
    }


def test_pooled_rollout_ratio_takes_one_rollout_time_for_both_arms():
    a = [{"time/rollout": 10.0, "time/scoring": 3.0, "time/learning": 2.0, "time/sync": 0.0}]
    b = [{"time/rollout": 14.0, "time/scoring": 1.0, "time/learning": 2.0, "time/sync": 0.0}]
    assert step.pooled_rollout_ratio(a, b) == pytest.approx((12 + 5) / (12 + 3))


def test_overlap_bench_pins_roles_and_skips_the_first_step(monkeypatch):
    import os


    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert overlap.role_cores() == {"rollout": [0, 1], "scoring": [2, 3], "learner": [2, 3]}
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5})
    assert overlap.role_cores() == {"rollout": [5], "scoring": [5], "learner": [5]}  # one core: shared
    assert overlap.steady_step_time([{"time/step": 9.0}, {"time/step": 2.0}, {"time/step": 4.0}]) == 3.0
    assert set(overlap.SCHEDULES) == {"phases", "streaming", "one_step_off"} and overlap.SCHEDULES["one_step_off"][1] == 1


# ----------------------------------------------------------------------------------------------
# the benchmark harness (tiny sizes, in process)
# ----------------------------------------------------------------------------------------------


def test_bench_objective_worker_and_results(tmp_path):
    from opsd_ray import bench
    from opsd_ray.bench.__main__ import format_table, write_results
    from opsd_ray.bench.objectives import objective_worker

    naive = objective_worker("naive", n_tokens=16, vocab=64, iters=1, seed=0)
    fused = objective_worker("fused", n_tokens=16, vocab=64, iters=1, seed=0)
    assert naive["loss"] == pytest.approx(fused["loss"], rel=1e-4)
    assert naive["time_s"] > 0 and fused["peak_mib"] >= 0
    out = tmp_path / "latest.json"
    out.write_text(
        json.dumps([bench.record("other", 1.0, "s"), bench.record("objective_time_ratio", 0.1, "x")])
    )
    write_results([bench.record("objective_time_ratio", 2.0, "x", 1.0, "n")], out)
    merged = {r["name"]: r for r in json.loads(out.read_text())}
    assert merged["other"]["value"] == 1.0 and merged["objective_time_ratio"]["value"] == 2.0
    assert "objective_time_ratio" in format_table(list(merged.values()))
    assert "objectives" in bench.BENCHMARKS


def test_bench_main_runs_registered_benchmarks(tmp_path, capsys):
    from opsd_ray import bench
    from opsd_ray.bench.__main__ import main

    bench.register("_unit_dummy")(
        lambda args: [bench.record("dummy_ratio", 3.0 if args.quick else 1.0, "x", 1.0)]
    )
    try:
        out = tmp_path / "results" / "latest.json"
        assert main(["_unit_dummy", "--quick", "--out", str(out)]) == 0
        assert json.loads(out.read_text()) == [bench.record("dummy_ratio", 3.0, "x", 1.0)]
        assert "dummy_ratio" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            main(["no_such_benchmark", "--out", str(out)])
    finally:
        bench.BENCHMARKS.pop("_unit_dummy")


def test_timemodel_records_tiny():
    """The time model calibrated on one shape predicts three others: one record each (the ratio's goal
    is the benchmark's business, not a timed test's)."""
    import argparse
    import math

    from opsd_ray.bench import timemodel

    recs = {r["name"]: r for r in timemodel.bench_timemodel(argparse.Namespace(quick=True, reps=1))}
    for shape in ("base", "twice_the_completion", "twice_the_batch", "standard"):
        r = recs[f"timemodel_{shape}_predicted_over_measured"]
        assert math.isfinite(r["value"]) and r["value"] > 0 and "measured" in r["note"]
    assert recs["timemodel_base_predicted_over_measured"]["value"] == pytest.approx(1.0, rel=1e-6)  # calibrated on it
    assert {f"timemodel_efficiency_{k}" for k in ("prefill", "decode", "scoring", "learner")} <= set(recs)
