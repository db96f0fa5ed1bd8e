"""Which rows fit the models' context windows.

A scoring context is a variant's prompt plus the response: the teacher's carries the question and the
reference, so it can be much longer than the student's. Counting the question and reference tokens
at data load (data.max_*_tokens) is not enough: a row whose teacher prompt plus `rollout.max_new_tokens`
exceeds the scorer's positions, or whose student prompt plus `max_new_tokens` exceeds the rollout
engine's `max_model_len`, is skipped at start and counted per variant, never trained on with a cut
context. The scorer refuses a longer context at run time (scoring.ContextTooLong).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from opsd_ray.common import rollout_max_len
from opsd_ray.data.prompts import PROMPT_OF, build_prompt_ids
from opsd_ray.models.loading import resolve_model_path

SLACK = 16  # tokens a chat template's merges at the text boundaries may add beyond the empty prompt's


@lru_cache(maxsize=8)
def _positions(path: str, trust_remote_code: bool) -> int | None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def model_positions(model_cfg) -> int | None:
    """The model's context window (max_position_embeddings; None when its config has none)."""

    return _positions(resolve_model_path(model_cfg), bool(model_cfg.trust_remote_code))


@dataclass
class ContextLimits:
    """The longest context each variant may have (prompt + response)."""

    limits: dict[str, int]  # variant -> tokens (student: the rollout engine's, the others: the scorer's)
    new_tokens: int  # rollout.max_new_tokens: the longest response

    @classmethod
    def of(cls, cfg) -> ContextLimits:
        model = model_positions(cfg.model) or 10**9
        scorer = {v: model for v in ("teacher", "ref", "base")}
        return cls({"student": min(rollout_max_len(cfg), model), **scorer}, int(cfg.rollout.max_new_tokens))

    def over(self, prompts) -> list[str]:
        """The variants whose prompt (a PromptIds) plus the longest response does not fit."""
        return [v for v, limit in self.limits.items()
                if len(getattr(prompts, PROMPT_OF[v])) + self.new_tokens > limit]


def drop_unfit(examples: list, tok, cfg) -> tuple[list, dict[str, int], ContextLimits]:
    """The examples whose every variant fits (kept in order), the count of rows over each variant's limit,
    and the limits. When the token budgets alone guarantee a fit, no prompt is built."""
    limits = ContextLimits.of(cfg)
    if _budgets_fit(tok, cfg, limits):
        return examples, {}, limits
    kept, over = [], {}
    for ex in examples:
        too_long = limits.over(build_prompt_ids(tok, ex.question, ex.reference, cfg.model, cfg.prompt))
        for v in too_long:
            over[v] = over.get(v, 0) + 1
        if not too_long:
            kept.append(ex)
    return kept, over, limits


def _budgets_fit(tok, cfg, limits: ContextLimits) -> bool:
    """Whether a row at the data's token budgets fits every variant: the empty prompts' template and
    instruction tokens, plus the budgets, plus a slack for merges at the text boundaries."""
    empty = build_prompt_ids(tok, "", "", cfg.model, cfg.prompt)
    q, r = cfg.data.max_question_tokens, cfg.data.max_reference_tokens
    longest = {"student": len(empty.student) + q, "base": len(empty.student) + q,
               "teacher": len(empty.teacher) + q + r, "ref": len(empty.ref) + r}
    return all(longest[v] + SLACK + limits.new_tokens <= limit for v, limit in limits.limits.items())
