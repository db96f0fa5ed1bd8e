"""Evaluation: sampling metrics, benchmarks, arguments, evaluate() with a fake engine, and the CLI end to end."""

import itertools
import json
from math import comb

import pytest
from conftest import run_cli
from omegaconf import OmegaConf

from opsd_ray.config.recipes import (
    ConfigError,
    load_eval_config,
)
from opsd_ray.config.schema import EvalCommand
from opsd_ray.eval.benchmarks import BENCHMARKS, load_benchmark
from opsd_ray.eval.markers import MARKERS
from opsd_ray.eval.metrics import avg_at_k, maj_at_k, majority_correct, mean_pass_at_k, pass_at_k
from opsd_ray.eval.run import sample_seed
from opsd_ray.eval.summary import eval_log_record
from opsd_ray.run.calls import LocalCalls
from opsd_ray.run.evaluation import evaluate_to
from opsd_ray.run.faults import Faults
from opsd_ray.run.groups import RolloutGroup
from opsd_ray.workers.rollout import RolloutWorker


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("n,c,k", [(n, c, k) for n in range(1, 7) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    """= the chance that a random k-subset of the n samples holds a correct one."""
    samples = [True] * c + [False] * (n - c)
    hits = sum(any(s) for s in itertools.combinations(samples, k))
    assert pass_at_k(n, c, k) == pytest.approx(hits / comb(n, k))


def test_pass_at_k_bad_k():
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_avg_and_maj():
    correct = [[True, False, False, False], [True, True, True, False]]
    assert avg_at_k(correct) == pytest.approx((0.25 + 0.75) / 2)
    assert mean_pass_at_k(correct, 1) == pytest.approx(avg_at_k(correct))  # pass@1 = avg@k
    assert majority_correct(["5", "3", "3", None], [True, False, False, False]) is False
    assert majority_correct(["5", None, None, None], [True, False, False, False]) is True  # no answer: no vote
    assert majority_correct(["5", "3"], [True, False]) is True  # a tie goes to the first answer seen
    assert majority_correct([None, None], [False, False]) is False
    assert maj_at_k([["5", "3", "5"], ["1", "2", "2"]], [[True, False, True], [True, False, False]]) == 0.5


# ----------------------------------------------------------------------------- benchmarks
def test_benchmarks_load():
    sizes = {"aime24": 30, "aime25": 30, "hmmt25": 30, "amc23": 40, "math500": 500, "gsm8k": 1319}
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    for name, size in sizes.items():
        problems = load_benchmark(name)
        assert len(problems) == size, name
        assert all(p.problem.endswith(instruction) and p.problem.count(instruction) == 1 for p in problems), name
        assert all(p.answer for p in problems), name
    gsm = load_benchmark("gsm8k", limit=2)
    assert [p.answer for p in gsm] == ["18", "3"] and [p.id for p in gsm] == [0, 1]
    assert "####" not in gsm[0].problem
    assert max(int(p.answer) for p in load_benchmark("gsm8k")) > 1000  # "#### 1,234" -> "1234"
    assert load_benchmark("aime24", limit=3)[0].answer == "204"
    assert set(BENCHMARKS) == set(sizes)
    with pytest.raises(ConfigError, match="unknown benchmark"):
        load_benchmark("aime23")


def parse_eval_args(args):
    """`opsd-ray eval`'s arguments, composed and validated: (config, its model section, its rollout section)."""
    ev = load_eval_config(args)
    return ev, ev.model, ev.rollout


# ----------------------------------------------------------------------------- arguments
def test_parse_eval_args():
    ev, model, rollout = parse_eval_args(["model=tiny", "benchmarks=gsm8k", "n_samples=3", "model.enable_thinking=true",
                                          "rollout.vllm_cpu_kvcache_gib=2"])
    assert list(ev.benchmarks) == ["gsm8k"] and ev.n_samples == 3 and ev.engine == "auto"
    assert model.name == "tiny" and model.enable_thinking is True and rollout.vllm_cpu_kvcache_gib == 2
    ev, _, _ = parse_eval_args(["model=tiny", "benchmarks=[aime24,aime25]", "limit=2"])
    assert list(ev.benchmarks) == ["aime24", "aime25"] and ev.limit == 2
    ev, model, _ = parse_eval_args(["model=tiny"])
    assert list(ev.benchmarks) == ["aime24", "aime25", "hmmt25"] and ev.n_samples == 12
    assert ev.markers.match == "substring"  # Kim et al.'s convention, as the paper counts
    assert parse_eval_args(["model=tiny", "markers.match=word"])[0].markers.match == "word"


@pytest.mark.parametrize("args,message", [
    (["model=tiny", "n_sample=2"], "did you mean 'n_samples'"),
    (["model=tiny", "benchmarks=[aime24,aime99]"], "unknown benchmark"),
    (["model=nope"], "unknown model preset"),
    (["model=tiny", "n_samples=0"], "n_samples must be >= 1"),
    (["model=tiny", "n_samples=many"], "n_samples: Value 'many'"),
    (["model=tiny", "engine=jax"], "engine"),
    (["model=tiny", "temperature=0"], "temperature"),
    (["model=tiny", "adapter=/no/such/adapter"], "adapter_model.safetensors"),
    (["model=tiny", "model.bogus=1"], "model"),
    (["model=tiny", "markers.match=regex"], "markers.match='regex' is not one of: substring, word"),
    (["model=tiny", "markers.rule=word"], "markers"),
])
def test_bad_arguments(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_eval_args(args)


def test_the_marker_rule_reaches_each_graded_sample():
    from opsd_ray.eval.run import grade_sample

    problem = load_benchmark("gsm8k", limit=1)[0]
    text = "That seems unlikely; rechecking. Wait, \\boxed{18}"
    default = grade_sample("gsm8k", problem, 0, 1, text, 12, "stop")["markers"]
    word = grade_sample("gsm8k", problem, 0, 1, text, 12, "stop", marker_match="word")["markers"]
    assert (default["likely"], default["check"], default["wait"]) == (1, 1, 1)
    assert (word["likely"], word["check"], word["wait"]) == (0, 0, 1)


def test_cli_bad_argument_exits_2(capsys):
    from opsd_ray.cli import main

    assert main(["eval", "model=tiny", "benchmarks=[nope]"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


# ----------------------------------------------------------------------------- evaluate() with a fake engine
class FakeTokenizer:
    """One token per text: ids index a table of texts."""

    def __init__(self):
        self.texts: list[str] = []

    def encode(self, text: str) -> int:
        self.texts.append(text)
        return len(self.texts) - 1

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, **kwargs):
        return [self.encode(messages[0]["content"])]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.texts[i] for i in ids)


class FakeEngine:
    """Per problem, the k-th sample says: right and 'Wait', wrong, wrong, no answer."""

    def __init__(self, golds):
        self.tokenizer = FakeTokenizer()
        self.golds = golds  # problem text -> gold
        self.calls: dict[str, int] = {}
        self.loaded = None
        self.version = -1

    def load_adapter(self, version, state, config):
        self.loaded = (version, state, config)
        self.version = version

    def generate(self, prompts, seeds, max_new_tokens, temperature, top_p):
        out = []
        for p in prompts:
            text = self.tokenizer.decode(p)
            k = self.calls.get(text, 0)
            self.calls[text] = k + 1
            gold = self.golds[text]
            response = [f"Wait, so \\boxed{{{gold}}}", r"maybe \boxed{-1}", r"hmm \boxed{-1}", "no idea"][k % 4]
            ids = [self.tokenizer.encode(response), self.tokenizer.encode(""), self.tokenizer.encode("")]
            out.append((ids, "length" if k % 4 == 3 else "stop"))
        return out


def test_evaluate_with_a_fake_engine(tmp_path):
    problems = load_benchmark("gsm8k", limit=3)
    engine = FakeEngine({p.problem: p.answer for p in problems})
    model_cfg = OmegaConf.create({"name": "fake", "enable_thinking": False, "thinking_style": "none"})
    ev = OmegaConf.merge(OmegaConf.structured(EvalCommand), {"model": model_cfg, "benchmarks": ["gsm8k"],
                                                              "n_samples": 4, "limit": 3})
    # the loop opsd-ray eval runs: a group of one in-process worker around the engine
    engines = RolloutGroup([RolloutWorker(model_cfg, ev.rollout, engine)], LocalCalls(), Faults(0))
    summary = evaluate_to(engines, ev, tmp_path, (7, {"w": 1}, {"r": 1}))
    assert engine.loaded == (7, {"w": 1}, {"r": 1}) and summary["settings"]["adapter_version"] == 7
    s = summary["benchmarks"]["gsm8k"]
    assert s["num_problems"] == 3 and s["num_samples"] == 4
    assert s["avg@4"] == pytest.approx(0.25) and s["pass@4"] == 1.0 and s["maj@4"] == 0.0  # "-1" wins the vote
    assert s["no_answer_rate"] == pytest.approx(0.25) and s["truncation_rate"] == pytest.approx(0.25)
    assert s["response_length"] == 3 and s["grading_errors"] == 0
    assert s["markers"]["per_response"]["total"] == pytest.approx(0.75)
    assert s["markers"]["per_1k_tokens"]["wait"] == pytest.approx(1000 * 3 / 36)
    assert summary["mean"]["avg"] == pytest.approx(0.25)
    assert summary["settings"]["markers"] == "substring"

    lines = [json.loads(x) for x in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and sum(r["correct"] for r in lines) == 3
    first = lines[0]
    assert first["extracted"] == "18" and first["gold"] == "18" and first["markers"]["wait"] == 1
    assert first["seed"] == sample_seed(0, "gsm8k", 0, 0)
    assert json.loads((tmp_path / "summary.json").read_text())["benchmarks"]["gsm8k"]["avg@4"] == pytest.approx(0.25)
    assert "| gsm8k | 3 | 4 | 25.0 | 100.0 | 0.0 |" in (tmp_path / "summary.md").read_text()

    rec = eval_log_record(summary)
    assert rec["eval/gsm8k/avg@4"] == pytest.approx(0.25) and rec["eval/mean/avg"] == pytest.approx(0.25)
    assert {"eval/gsm8k/pass@4", "eval/gsm8k/maj@4", "eval/gsm8k/response_length", "eval/gsm8k/truncation_rate",
            "eval/gsm8k/no_answer_rate"} <= set(rec)
    assert {f"eval/markers/{m}/{u}" for m in (*MARKERS, "total") for u in ("per_response", "per_1k_tokens")} <= set(rec)


def test_seeds_do_not_depend_on_batching():
    seeds = {sample_seed(0, b, p, s) for b in ("aime24", "aime25") for p in range(30) for s in range(12)}
    assert len(seeds) == 2 * 30 * 12
    assert sample_seed(1, "aime24", 0, 0) != sample_seed(0, "aime24", 0, 0)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_eval_tiny_with_an_adapter(tmp_path):
    """`opsd-ray eval` on the tiny model: 2 GSM8K problems x 2 samples x 16 tokens, with a saved LoRA adapter
    whose rank (4) differs from the preset's (8)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from opsd_ray.config.recipes import load_preset
    from opsd_ray.models.loading import load_model

    model = get_peft_model(load_model(load_preset("model", "tiny").model),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")

    out = tmp_path / "eval"
    proc = run_cli("eval", "model=tiny", f"adapter={tmp_path / 'adapter'}", "benchmarks=gsm8k", "limit=2",
                   "n_samples=2", "max_new_tokens=16", "engine=hf", f"out={out}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| gsm8k | 2 | 2 |" in proc.stdout
    lines = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and {(r["problem_id"], r["sample"]) for r in lines} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(1 <= r["num_tokens"] <= 16 and r["finish_reason"] in ("stop", "length") for r in lines)
    assert all(isinstance(r["response"], str) and isinstance(r["correct"], bool) for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["adapter"] == str(tmp_path / "adapter") and summary["settings"]["engine"] == "hf"
    s = summary["benchmarks"]["gsm8k"]
    assert {"avg@2", "pass@2", "maj@2", "markers"} <= set(s) and 0 <= s["avg@2"] <= 1
    assert (out / "summary.md").read_text().startswith("# Evaluation: tiny")
