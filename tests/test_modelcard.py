"""The model card (README.md) of a saved adapter: Hub-valid header, method and settings, eval numbers."""

import yaml

from opsd_ray.config.recipes import load_train_config
from opsd_ray.tools.modelcard import last_evaluation, model_card


def header_and_body(card):
    assert card.startswith("---\n")
    head, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def test_card_names_the_method_settings_data_and_the_last_evaluation():
    cfg = load_train_config(["model=qwen3-8b", "data=gsm8k", "run.name=q8", "objective.beta=2", "objective.clip=5",
                             "objective.lam=0.3", "eval.n_samples=4"])
    records = [{"step": 0, "eval/mean/avg": 0.1, "eval/aime24/avg@4": 0.1},
               {"step": 50, "loss": 0.1, "eval/mean/avg": 0.3, "eval/aime24/avg@4": 0.25, "eval/aime24/pass@4": 0.5,
                "eval/hmmt25/avg@4": 0.35},
               {"step": 51, "loss": 0.1}]
    assert last_evaluation(records)[0] == 50
    meta, body = header_and_body(model_card(cfg, "Qwen/Qwen3-8B", 51, last_evaluation(records)))
    assert meta["base_model"] == "Qwen/Qwen3-8B" and meta["library_name"] == "peft"
    assert "opsd-pmi" in meta["tags"] and all(isinstance(t, str) for t in meta["tags"])
    assert "OPSD-PMI" in body and "β=2" in body and "c=5" in body and "λ=0.3" in body and "centered" in body
    assert "| steps | 51 of 200 |" in body and "gsm8k" in body
    assert "At step 50" in body
    assert "| aime24 | 25.0 | 50.0 |" in body and "| hmmt25 | 35.0 | – |" in body
    assert "PeftModel.from_pretrained" in body and "--lora-modules q8=" in body and "--max-lora-rank 64" in body
    assert "Purified OPSD" in body


def test_standard_mode_and_a_local_base_model():
    cfg = load_train_config(["model=tiny", "run.name=t", "objective.mode=standard", "objective.center=false"])
    meta, body = header_and_body(model_card(cfg, "/cache/models/tiny-v1", 3))
    assert "base_model" not in meta  # the Hub's base_model must be a Hub id: a local folder is left out
    assert "OPSD-Standard" in body and "raw teacher distribution" in body and "β=" not in body
    assert "No evaluation during training" in body
    assert "| prompts per step | 4 |" in body


def test_several_completions_per_prompt_are_on_the_card():
    cfg = load_train_config(["model=tiny", "run.name=t", "train.batch_size=4", "rollout.n=4"])
    _, body = header_and_body(model_card(cfg, "Qwen/Qwen3-8B", 3))
    assert "| prompts per step | 4 x 4 completions each |" in body


def test_the_huggingface_hub_reads_the_header():
    from huggingface_hub import ModelCard

    cfg = load_train_config(["model=qwen3-8b", "run.name=q8"])
    card = ModelCard(model_card(cfg, "Qwen/Qwen3-8B", 10))
    assert card.data.base_model == "Qwen/Qwen3-8B" and card.data.library_name == "peft"
    assert "opsd-pmi" in card.data.tags


def test_a_reconstructed_data_set_says_so_on_the_card():
    cfg = load_train_config(["model=qwen3-8b", "data=dasd-10k", "run.name=q8"])
    _, body = header_and_body(model_card(cfg, "Qwen/Qwen3-8B", 200))
    assert "Superior-Reasoning-SFT-gpt-oss-120b`, stage1)" in body and "a reconstruction of the paper's DASD-10K" in body
