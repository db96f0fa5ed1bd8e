"""Prompts: one template set for the student/base, teacher and reference-only variants.

Every variant goes through the model's own chat template; the student's trajectory is appended
as token ids (never re-tokenised text), so the response sits at a known offset in each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

QUESTION_SEPARATOR = "\n\n"


def with_instruction(question: str, instruction: str) -> str:
    """The question plus the answer-format instruction (not twice: benchmark problems carry it)."""
    question = question.strip()
    if not instruction or question.endswith(instruction):
        return question
    return f"{question}{QUESTION_SEPARATOR}{instruction}"


def reference_block(reference: str, p: Any) -> str:
    """What follows the question in the teacher prompt; alone, it is the reference-only prompt."""
    return (
        f"{p.reference_intro}\n{p.reference_begin}\n{reference.strip()}\n{p.reference_end}\n\n"
        f"{p.teacher_instruction}{QUESTION_SEPARATOR}{p.answer_instruction}"
    )


def student_text(question: str, p: Any) -> str:
    return with_instruction(question, p.answer_instruction)


def teacher_text(question: str, reference: str, p: Any) -> str:
    return f"{question.strip()}{QUESTION_SEPARATOR}{reference_block(reference, p)}"


def reference_only_text(reference: str, p: Any) -> str:
    """The teacher prompt with the question (and its separator) removed, nothing else changed."""
    return reference_block(reference, p)


def chat_prompt_ids(tokenizer: Any, text: str, *, thinking: bool, style: str) -> list[int]:
    """Token ids of a one-turn user prompt with the generation prompt, in the model's chat template.

    style qwen3: the template's `enable_thinking` switch; r1: the template itself opens <think>;
    none: the model has no thinking mode.
    """
    kwargs = {"enable_thinking": thinking} if style == "qwen3" else {}
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, **kwargs
    )
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return list(ids)


@dataclass
class PromptIds:
    """Chat-formatted prompt ids of one example: the student's (= base's), teacher's and ref-only's."""

    student: list[int]
    teacher: list[int]
    ref: list[int]  # the reference-only prompt (pi_ref)


def build_prompt_ids(tokenizer: Any, question: str, reference: str, model_cfg: Any, p: Any) -> PromptIds:
    thinking = bool(model_cfg.enable_thinking)
    teacher_thinking = (
        thinking if model_cfg.teacher_enable_thinking is None else bool(model_cfg.teacher_enable_thinking)
    )
    style = model_cfg.thinking_style
    return PromptIds(
        student=chat_prompt_ids(tokenizer, student_text(question, p), thinking=thinking, style=style),
        teacher=chat_prompt_ids(
            tokenizer, teacher_text(question, reference, p), thinking=teacher_thinking, style=style
        ),
        ref=chat_prompt_ids(
            tokenizer, reference_only_text(reference, p), thinking=teacher_thinking, style=style
        ),
    )


@dataclass
class ScoringSequence:
    """One variant's full sequence: prompt ids + response ids; the response starts at `start`.

    The logits at positions start-1 .. start+len(response)-2 predict the response tokens.
    """

    ids: list[int]
    start: int

    @property
    def predict_slice(self) -> slice:
        return slice(self.start - 1, len(self.ids) - 1)


def append_response(prompt: list[int], response: list[int]) -> ScoringSequence:
    return ScoringSequence(ids=list(prompt) + list(response), start=len(prompt))


# Which prompt each sequence reads: the base model P0 reads the student's prompt (the question only).
PROMPT_OF = {"student": "student", "teacher": "teacher", "ref": "ref", "base": "student"}


def sequence_of(prompts: PromptIds, variant: str, response: list[int]) -> ScoringSequence:
    """The response after the prompt that `variant` reads."""
    return append_response(getattr(prompts, PROMPT_OF[variant]), response)


