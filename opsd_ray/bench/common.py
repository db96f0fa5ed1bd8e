"""What the benchmarks share: configs and data, timing, interleaved A/B runs, medians."""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from collections.abc import Callable

from opsd_ray.config.recipes import load_train_config
from opsd_ray.data.prompts import build_prompt_ids
from opsd_ray.data.sources import load_examples
from opsd_ray.models.loading import load_model, load_tokenizer
from opsd_ray.workers.scoring import ScoringItem

STEP_PHASES = ("rollout", "scoring", "learning", "sync")


# ----------------------------------------------------------------------------- helpers
def bench_cfg(model: str, *overrides: str, batch: int = 4, new_tokens: int = 32, mode: str = "pmi"):
    """A validated training config for `model` on GSM8K (plus `key=value` overrides), then lr = 0
    (identical repetitions)."""

    cfg = load_train_config(
        [
            f"model={model}",
            "data=gsm8k",
            f"train.batch_size={batch}",
            f"rollout.max_new_tokens={new_tokens}",
            f"objective.mode={mode}",
            "train.diagnostics_every=0",
            "run.name=bench",
            *overrides,
        ]
    )
    cfg.learner.lr = 0.0
    return cfg


def examples_of(cfg, n: int | None = None):

    examples, _ = load_examples(cfg.data, None, seed=cfg.run.seed)  # no token counting: fast
    return examples[:n] if n else examples


def scoring_items(cfg, tok, n: int, response_tokens: int):
    """n GSM8K prompts; the response is the reference solution's first `response_tokens` token ids."""

    items = []
    for ex in examples_of(cfg, n):
        prompts = build_prompt_ids(tok, ex.question, ex.reference, cfg.model, cfg.prompt)
        response = tok(ex.reference, add_special_tokens=False)["input_ids"][:response_tokens]
        items.append(ScoringItem(prompts, response))
    return items


def frozen_model(cfg):
    import torch


    torch.set_num_threads(os.cpu_count() or 1)  # as the roles do: the phases run one after another
    return load_model(cfg.model).eval().requires_grad_(False), load_tokenizer(cfg.model)


def interleaved(arms: dict[str, Callable[[], object]], reps: int) -> dict[str, list[tuple[object, float]]]:
    """Run every arm once per repetition, alternating the order (ABC, CBA, ...); per arm, a list of
    (what it returned, its wall time in seconds)."""
    out: dict[str, list[tuple[object, float]]] = {name: [] for name in arms}
    names = list(arms)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            result = arms[name]()
            out[name].append((result, time.perf_counter() - t0))
    return out


def paired_median(a: list[float], b: list[float]) -> float:
    """Median over repetitions of a[i] / b[i] (adjacent runs: slow drifts of the machine cancel)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs) if runs else math.nan


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"  [{time.perf_counter() - _T0:6.0f} s] {msg}", flush=True)


def cpu_seconds() -> float:
    """User + system CPU time of this process over all threads (robust to a busy machine)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
