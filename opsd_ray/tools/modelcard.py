"""The README.md (model card) of a saved adapter: what it is, how it was trained, how to use it.

It replaces peft's empty template in `final/` and in each checkpoint. The YAML header follows the
Hub's model-card metadata (base_model, library_name, pipeline_tag, tags), so the folder can be
pushed to the Hub as it is.
"""

from __future__ import annotations

import re

import yaml

from opsd_ray.objective.registry import objective_of
from opsd_ray.workers.engines import vllm_max_lora_rank

PAPER = "Purified OPSD: On-Policy Self-Distillation Without Losing How to Think"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_EVAL_KEY = re.compile(r"^eval/([^/]+)/(avg|pass|maj)@(\d+)$")


def method_name(cfg) -> str:
    return objective_of(cfg.objective.mode).method


def eval_table(record: dict) -> list[str]:
    """Markdown rows of an evaluation's avg@k / pass@k / maj@k per benchmark, from the flat log keys."""
    cells: dict[str, dict[str, float]] = {}
    for key, value in record.items():
        if m := _EVAL_KEY.match(key):
            cells.setdefault(m.group(1), {})[f"{m.group(2)}@{m.group(3)}"] = value
    if not cells:
        return []
    cols = sorted({c for row in cells.values() for c in row}, key=lambda c: ("apm".index(c[0]), c))
    rows = ["| benchmark | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for bench, row in sorted(cells.items()):
        rows.append(f"| {bench} | " + " | ".join(f"{100 * row[c]:.1f}" if c in row else "–" for c in cols) + " |")
    return rows


def last_evaluation(records: list[dict]) -> tuple[int, dict] | None:
    """(step, record) of the newest logged evaluation, if any."""
    evals = [r for r in records if "eval/mean/avg" in r]
    return (evals[-1]["step"], evals[-1]) if evals else None


def model_card(cfg, base_model: str, step: int, last_eval: tuple[int, dict] | None = None) -> str:
    """The card of the adapter after `step` steps; `last_eval` is (step, flat eval record) if any.
    `base_model` is the resolved model path (a Hub id, or a local folder the header leaves out)."""

    objective, lora = cfg.objective, cfg.model.lora
    meta = {
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["opsd_ray", "on-policy-self-distillation", f"opsd-{objective.mode}", "lora", "math-reasoning"],
    }
    if _HUB_ID.match(base_model):
        meta = {"base_model": base_model, **meta}
    header = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"
    target = objective_of(objective.mode).about(objective)
    lines = [
        f"# {cfg.run.name}: LoRA adapter for {cfg.model.name}, trained with {method_name(cfg)}",
        "",
        f"A LoRA adapter (r={lora.r}, alpha={lora.alpha}, on {', '.join(lora.target_modules)}) on top of "
        f"`{base_model}`, trained by on-policy self-distillation with opsd_ray: "
        f"the model writes its own solutions and learns, token by token, the generalized JSD (λ={objective.lam:g}, "
        f"temperature {objective.temperature:g}) to {target}, scored by the frozen base model.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method_name(cfg)} |",
        f"| data | {cfg.data.name} (`{cfg.data.path}`{', ' + cfg.data.hub_config if cfg.data.get('hub_config') else ''})"
        f"{': ' + cfg.data.note if cfg.data.get('note') else ''} |",
        f"| steps | {step} of {cfg.train.steps} |",
        f"| prompts per step | {cfg.train.batch_size}"
        f"{f' x {n} completions each' if (n := cfg.rollout.get('n', 1)) > 1 else ''} |",
        f"| learning rate | {cfg.learner.lr:g} (warmup {cfg.learner.warmup_steps} steps) |",
        f"| rollout | up to {cfg.rollout.max_new_tokens} new tokens, temperature {cfg.rollout.temperature:g} |",
        f"| seed | {cfg.run.seed} |",
        "",
        "The run's `config.yaml` holds every setting.",
        "",
        "## Evaluation",
        "",
    ]
    table = eval_table(last_eval[1]) if last_eval else []
    if table:
        k = cfg.eval.n_samples
        lines += [f"At step {last_eval[0]}, {k} samples per problem (temperature {cfg.eval.temperature:g}, "
                  f"top-p {cfg.eval.top_p:g}, up to {cfg.eval.max_new_tokens} new tokens), accuracy in %:", "", *table]
    else:
        lines.append("No evaluation during training: `opsd-ray eval adapter=<this folder>` runs one.")
    name = re.sub(r"[^\w.-]", "-", str(cfg.run.name))
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_model}", torch_dtype="auto")',
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_model}")',
        "```",
        "",
        "Served with vLLM:",
        "",
        "```bash",
        f"vllm serve {base_model} --enable-lora --max-lora-rank {vllm_max_lora_rank(lora.r)} "
        f"--lora-modules {name}=<this folder>",
        "```",
        "",
        "## Method",
        "",
        f"*{PAPER}* (Shen et al., 2026). Standard OPSD distills toward the teacher pi_T, the base model "
        "reading the question and a reference solution. The PMI target keeps the part of that signal the "
        "question explains: with Δ_it = log pi_T − log pi_ref (pi_ref reads the reference only), centred "
        "over the vocabulary and soft-clipped to c·tanh(·/c), log P_target = log_softmax(log P_0 + Δ_it/β), "
        "where P_0 is the base model reading the question only.",
        "",
    ]
    return header + "\n".join(lines)
