"""The paper's eight recipes: they compose, hold the paper's settings, fit an 8-GPU node, agree with the plan."""

import os
import subprocess
import sys

import pytest
import yaml
from conftest import NEEDS_VLLM
from omegaconf import OmegaConf

from opsd_ray.config.recipes import ConfigError, load_train_config, recipes_dir
from opsd_ray.run.cluster import check_fits, role_requests
from opsd_ray.tools.plan import Planner

MODELS = ["qwen3-8b", "qwen3-4b", "r1-distill-qwen-7b", "olmo-3-7b-think"]
DATA = ["math-cot-20k", "dasd-10k"]
SETTINGS = [(m, d) for m in MODELS for d in DATA]
ALL_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
GSM8K = str(recipes_dir().parent / "opsd_ray/assets/data/gsm8k_train.jsonl")  # any existing file


def paper_config(model, data, *extra):
    path = [f"data.path={GSM8K}"] if data == "dasd-10k" else []  # DASD-10K has no public copy
    return load_train_config([f"model={model}", f"data={data}", *path, *extra])


@pytest.mark.parametrize("model, data", SETTINGS)
def test_recipe_composes_with_the_papers_settings(model, data):
    assert (recipes_dir() / "experiment" / f"{model}__{data}.yaml").is_file()
    cfg = paper_config(model, data)
    assert cfg.model.name == model and cfg.data.name == data
    lo = cfg.model.lora
    assert (lo.r, lo.alpha, set(lo.target_modules)) == (64, 128, ALL_LINEAR)
    assert cfg.learner.lr == 5e-6 and cfg.learner.gradient_checkpointing is True
    assert cfg.train.batch_size == 32 and cfg.rollout.max_new_tokens == 1024 and cfg.train.steps == 200
    o = cfg.objective
    assert (o.mode, o.beta, o.clip, o.center) == ("pmi", 1.0, 10.0, True)
    assert cfg.checkpoint.every == 50 and cfg.eval.every == 50
    assert list(cfg.eval.benchmarks) == ["aime24", "aime25", "hmmt25"] and cfg.eval.n_samples == 12
    assert cfg.rollout.engine == "vllm"  # the paper generates with vLLM
    assert cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize("model, data", SETTINGS)
def test_recipe_fits_one_8_gpu_node_and_is_the_plans_split(model, data):
    cfg = paper_config(model, data)
    requests = role_requests(cfg)
    assert sum(r.total()[1] for r in requests) == 8
    check_fits(requests, {"CPU": 64.0, "GPU": 8.0})
    with pytest.raises(ConfigError, match="but the Ray cluster has 64 CPUs and 7 GPUs"):
        check_fits(requests, {"CPU": 64.0, "GPU": 7.0})
    p = Planner(cfg, gpus=8, gpu_mem_gib=80)
    split = p.suggest()
    assert (cfg.rollout.num_workers, cfg.rollout.tensor_parallel_size, cfg.scoring.num_workers, cfg.learner.num_workers) \
        == (split.rollout_workers, split.tp, split.scoring_workers, split.learners)
    assert cfg.learner.gpus_per_worker == 1
    ro = cfg.rollout
    roles = [p.rollout(ro.num_workers, ro.tensor_parallel_size, ro.gpu_memory_utilization),
             p.scoring(cfg.scoring.num_workers), p.learner()]
    assert p.warnings(roles) == []  # every role fits in 80 GiB


@pytest.mark.parametrize("model, data", SETTINGS)
def test_standard_opsd_is_a_one_word_override(model, data):
    pmi = OmegaConf.to_container(paper_config(model, data))
    standard = OmegaConf.to_container(paper_config(model, data, "objective.mode=standard"))
    assert standard["objective"].pop("mode") == "standard" and pmi["objective"].pop("mode") == "pmi"
    assert standard == pmi


def test_benchmarks_are_known_to_the_evaluator():
    benchmarks = pytest.importorskip("opsd_ray.eval.benchmarks")
    for model, data in SETTINGS:
        assert set(paper_config(model, data).eval.benchmarks) <= set(benchmarks.BENCHMARKS)


def test_all_eight_paper_recipes_start_as_shipped():
    """No recipe needs a path the user must find: the DASD recipes draw their reconstruction."""
    names = [p.stem for p in (recipes_dir() / "experiment").glob("*.yaml") if "__" in p.stem and "gsm8k" not in p.stem]
    assert len(names) == 8
    for name in names:
        model, data = name.split("__")
        cfg = load_train_config([f"model={model}", f"data={data}"])
        assert "/" in cfg.data.path and not cfg.data.path.startswith("/"), cfg.data.path  # a Hub id


def test_make_train_picks_the_recipe_up():
    """`make train MODEL=qwen3-8b DATA=math-cot-20k` -> opsd-ray train, whose config is the recipe's."""
    res = subprocess.run(["make", "--no-print-directory", "-n", "-o", ".venv/.installed", "train", "MODEL=qwen3-8b", "DATA=math-cot-20k"],
                         cwd=recipes_dir().parent, capture_output=True, text=True, timeout=60)
    assert res.stdout.split()[-3:] == ["train", "model=qwen3-8b", "data=math-cot-20k"], res.stdout
    res = subprocess.run([sys.executable, "-m", "opsd_ray", "train", "model=qwen3-8b", "data=math-cot-20k",
                          "--show-config"], cwd=recipes_dir().parent, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    shown = yaml.safe_load(res.stdout)
    recipe = yaml.safe_load((recipes_dir() / "experiment" / "qwen3-8b__math-cot-20k.yaml").read_text())
    for section, values in recipe.items():
        for key, value in values.items():
            assert shown[section][key] == value, (section, key)


@NEEDS_VLLM  # the paper's recipes roll out with vLLM
@pytest.mark.parametrize("data", ["math-cot-20k", "dasd-10k"])
@pytest.mark.parametrize("stage", ["model.path", "data.path"])
def test_the_papers_command_gets_past_configuration_and_stops_at_the_unreachable_hub(data, stage, tmp_path, capsys,
                                                                                     monkeypatch):
    """`make train MODEL=qwen3-8b DATA=<d>` on a machine without the Hub: the message says so (never
    "pip install datasets" or a missing data.path). HF_HUB_OFFLINE=1 (the suite's) stands for no network
    (no retries). With a local tokenizer the run gets past the model to the data, which is on the Hub too.
    The command line's main in this process (a subprocess would import torch and vLLM again for each)."""
    from opsd_ray.cli import main

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # the suite's cache: its built-in tiny, and no Hub data
    monkeypatch.chdir(recipes_dir().parent)
    local = ["model.tokenizer=builtin:tiny"] if stage == "data.path" else []
    rc = main(["train", "model=qwen3-8b", f"data={data}", f"run.output_dir={tmp_path}", *local])
    err = capsys.readouterr().err
    assert rc == 2, err[-2000:]
    assert f"{stage}=" in err and "the Hugging Face Hub cannot be reached" in err, err[-2000:]
    assert "pip install datasets" not in err and "missing required" not in err
    assert "Traceback" not in err
