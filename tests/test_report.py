"""`opsd-ray report`: plots and summary from runs' metrics.jsonl, config.yaml and eval summaries."""

import json
import math

import pytest
from omegaconf import OmegaConf

from opsd_ray.config.recipes import ConfigError
from opsd_ray.eval.markers import MARKERS
from opsd_ray.tools.report import benchmarks_of, load_run, main, report

PLOTS = ("accuracy.png", "markers.png", "decomposition.png", "training.png")


def make_run(folder, mode, steps=12, eval_every=4, in_metrics=True):
    """A run folder shaped like the driver's: per-step training records, diagnostics every 4 steps,
    evaluation at step 0 and every `eval_every` steps (in metrics.jsonl, or as eval/step_N/summary.json)."""
    folder.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"run": {"name": folder.name}, "model": {"name": "tiny"},
                                     "objective": {"mode": mode}}), folder / "config.yaml")
    gain = 0.02 if mode == "pmi" else 0.005
    lines = []
    for step in range(0, steps + 1):
        rec = {"step": step}
        if step > 0:
            rec.update(loss=0.05 * math.exp(-step / 8), jsd=0.05 * math.exp(-step / 8), student_entropy=2 - step / 20,
                       target_entropy=1.9, **({"kl_target_base": 0.1 + step / 100} if mode == "pmi" else {}))
            rec.update({f"markers/{m}/per_response": 1 + i / 10 - step * gain for i, m in enumerate(MARKERS)})
            rec["markers/total/per_response"] = sum(rec[f"markers/{m}/per_response"] for m in MARKERS)
            rec["markers/total/per_1k_tokens"] = rec["markers/total/per_response"] * 2
        if step % 4 == 0 and step > 0 or step == 1:
            rec.update(cos_total_ref=0.9 - step / 100, cos_total_it=0.3 + step / 100, norm_frac_ref=0.95,
                       norm_frac_it=0.4)
        if step % eval_every == 0:
            summary = fake_summary(0.2 + gain * step, 0.1 + gain * step, markers=3 - step * gain)
            if in_metrics:
                from opsd_ray.eval.summary import eval_log_record

                rec.update(eval_log_record(summary))
            else:
                (folder / "eval" / f"step_{step}").mkdir(parents=True)
                (folder / "eval" / f"step_{step}" / "summary.json").write_text(json.dumps(summary))
        lines.append(json.dumps(rec))
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def fake_summary(aime, hmmt, markers):
    per = {"per_response": {m: markers / 10 for m in MARKERS} | {"total": markers},
           "per_1k_tokens": {m: markers for m in MARKERS} | {"total": 10 * markers}}
    bench = {b: {"num_problems": 30, "num_samples": 12, "avg@12": v, "pass@12": min(1, 2 * v), "maj@12": v,
                 "response_length": 900.0, "truncation_rate": 0.1, "no_answer_rate": 0.05, "grading_errors": 0,
                 "markers": per} for b, v in (("aime24", aime), ("hmmt25", hmmt))}
    return {"benchmarks": bench, "mean": {"avg": (aime + hmmt) / 2}, "markers": per}


def check_pngs(out):
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name


def test_two_runs_on_the_same_axes(tmp_path):
    a = make_run(tmp_path / "a", "pmi")
    b = make_run(tmp_path / "b", "standard", in_metrics=False)  # eval from eval/step_N/summary.json
    assert main([str(a), str(b), f"out={tmp_path / 'rep'}"]) == 0
    out = tmp_path / "rep"
    check_pngs(out)
    md = (out / "summary.md").read_text()
    assert "pmi · tiny" in md and "standard · tiny" in md
    for name in PLOTS:
        assert f"({name})" in md
    assert "| aime24 | hmmt25 | mean |" in md
    assert "20.0 → 44.0 (best 44.0 @ 12)" in md  # pmi aime24: 0.2 + 0.02 * step, steps 0 .. 12
    assert "Epistemic markers on evaluation generations" in md

    run_b = load_run(b)
    assert run_b.series("eval/aime24/avg@12")[0] == [0, 4, 8, 12]
    assert run_b.series("cos_total_ref")[0] == [1, 4, 8, 12]
    assert not run_b.has("kl_target_base")
    assert benchmarks_of([load_run(a), run_b]) == [("aime24", "eval/aime24/avg@12"), ("hmmt25", "eval/hmmt25/avg@12"),
                                                   ("mean", "eval/mean/avg")]


def test_a_run_without_evaluation_or_markers(tmp_path, capsys):
    """Only training metrics (eval.every=0): every plot still renders, saying what is missing."""
    folder = tmp_path / "plain"
    folder.mkdir()
    rows = [{"step": s, "loss": 1 / s, "jsd": 1 / s, "student_entropy": 2.0} for s in range(1, 4)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(folder)]) == 0
    out = folder / "report"  # default: inside the run
    check_pngs(out)
    md = (out / "summary.md").read_text()
    assert "| plain |" in md and "Accuracy" not in md and "training rollouts" in md
    assert "summary.md" in capsys.readouterr().out


def test_same_labels_are_told_apart(tmp_path):
    a, b = make_run(tmp_path / "x", "pmi"), make_run(tmp_path / "y", "pmi")
    out = report([a, b])
    assert out == tmp_path / "report-x-vs-y"
    md = (out / "summary.md").read_text()
    assert "pmi · tiny [x]" in md and "pmi · tiny [y]" in md


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        main([str(tmp_path)])
    with pytest.raises(ConfigError, match="at least one run"):
        main([])
    with pytest.raises(ConfigError, match="unknown report option"):
        main([str(tmp_path), "outt=x"])


def with_accuracy(folder, curve):
    """Rewrite a run's evaluations: step -> (aime24, hmmt25) avg@12."""
    from opsd_ray.eval.summary import eval_log_record

    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        for k in [k for k in rec if k.startswith("eval/")]:
            del rec[k]
        if rec["step"] in curve:
            rec.update(eval_log_record(fake_summary(*curve[rec["step"]], markers=3)))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def table_rows(md):
    return [[c.strip() for c in line.strip("|").split("|")] for line in md.splitlines()
            if line.startswith("| tiny")]


def test_table_md_holds_each_runs_best_checkpoint_as_the_papers_table_1(tmp_path):
    """Base row from step 0; each run's row is the checkpoint with the best mean avg@k (not its last, and
    not the best of each column taken from different checkpoints)."""
    pmi = with_accuracy(make_run(tmp_path / "pmi", "pmi"),
                        {0: (0.30, 0.10), 4: (0.40, 0.20), 8: (0.50, 0.12), 12: (0.35, 0.25)})
    std = with_accuracy(make_run(tmp_path / "std", "standard"),
                        {0: (0.30, 0.10), 4: (0.32, 0.11), 8: (0.28, 0.09), 12: (0.20, 0.05)})
    assert main([str(pmi), str(std), f"out={tmp_path / 'rep'}"]) == 0
    md = (tmp_path / "rep" / "table.md").read_text()
    assert "| model | method | run | aime24 (avg@12) | hmmt25 (avg@12) | mean | step |" in md
    assert table_rows(md) == [
        ["tiny", "Base", "pmi (step 0)", "30.0", "10.0", "20.0", "0"],  # once for the model
        ["tiny", "OPSD-PMI", "pmi", "50.0", "12.0", "31.0", "8"],  # mean 0.31 at step 8 beats 0.30 and 0.30 (hmmt alone peaks at 12)
        ["tiny", "OPSD-Standard", "std", "32.0", "11.0", "21.5", "4"],
    ]


def test_table_md_of_runs_without_evaluation_says_so(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    md = (report([folder]) / "table.md").read_text()
    assert "No run has an evaluation" in md
