"""Scoring: the frozen base model reads every trajectory under three prompts in ONE forward pass.

Variants (DESIGN.md §1): teacher (question + reference), reference_only (reference), base
(question). The sequences of all variants of a micro-batch are right-padded into one batch.
What goes back to the learner (the wire format) is chosen on purpose:
- "hidden" (exact, default): the final-norm hidden states at the response positions, H values per
  token and variant; the learner applies the frozen lm_head chunk by chunk (3*H vs V per token).
- "logits" (exact, large): the full-vocabulary logits, V values per token and variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from opsd_ray.prompts import PromptIds, append_response

VARIANTS = ("teacher", "reference_only", "base")
_PROMPT_OF = {
    "teacher": "teacher",
    "reference_only": "reference_only",
    "base": "student",
    "student": "student",
}


@dataclass
class ScoringItem:
    prompts: PromptIds
    response: list[int]


@dataclass
class FrozenBatch:
    """Per variant, one row per response token, trajectories in order (concatenated)."""

    wire_format: str
    tensors: dict[str, torch.Tensor]
    num_tokens: int
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bytes_per_token(self) -> float:
        return self.nbytes / max(self.num_tokens, 1)


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def response_hidden(
    decoder, items: list[ScoringItem], variants: tuple[str, ...], pad_id: int
) -> dict[str, torch.Tensor]:
    """One forward pass over len(variants) x len(items) sequences; rows at the response positions.

    Row j of a variant's result is the final hidden state that predicts response token j.
    Right padding keeps position ids 0..len-1 for every real token, so padding changes nothing.
    """
    seqs = [
        append_response(getattr(it.prompts, _PROMPT_OF[v]), it.response) for v in variants for it in items
    ]
    ids, mask = pad_right([s.ids for s in seqs], pad_id)
    device = next(decoder.parameters()).device
    # no KV cache: one pass over known sequences needs none (it would cost GBs at real sizes)
    hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    rows = [hidden[i, s.predict_slice] for i, s in enumerate(seqs)]
    n = len(items)
    return {v: torch.cat(rows[k * n : (k + 1) * n]) for k, v in enumerate(variants)}


@torch.no_grad()
def score(
    model,
    items: list[ScoringItem],
    *,
    variants: tuple[str, ...] = VARIANTS,
    wire_format: str = "hidden",
    micro_batch_size: int = 4,
    pad_id: int = 0,
    logits_chunk: int = 1024,
) -> FrozenBatch:
    """Score `items` with the frozen causal LM `model` (no LoRA) in micro-batches of trajectories."""
    decoder = model.get_decoder()
    parts: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    for i in range(0, len(items), micro_batch_size):
        for v, h in response_hidden(decoder, items[i : i + micro_batch_size], variants, pad_id).items():
            parts[v].append(h)
    hidden = {v: torch.cat(p) for v, p in parts.items()}
    if wire_format == "logits":
        head = model.get_output_embeddings()
        hidden = {
            v: torch.cat([head(h[j : j + logits_chunk]) for j in range(0, len(h), logits_chunk)])
            for v, h in hidden.items()
        }
    elif wire_format != "hidden":
        raise ValueError(f"unknown wire format {wire_format!r} (hidden | logits)")
    num_tokens = sum(len(it.response) for it in items)
    return FrozenBatch(wire_format, {v: t.cpu() for v, t in hidden.items()}, num_tokens)


def split_evenly(items: list, parts: int) -> list[list]:
    """Contiguous, as-even-as-possible split (sizes differ by at most one), order kept."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        end = start + q + (k < r)
        out.append(items[start:end])
        start = end
    return out


def merge(batches: list[FrozenBatch]) -> FrozenBatch:
    batches = [b for b in batches if b.num_tokens]
    first = batches[0]
    tensors = {v: torch.cat([b.tensors[v] for b in batches]) for v in first.tensors}
    return FrozenBatch(first.wire_format, tensors, sum(b.num_tokens for b in batches))


class ScoringWorker:
    """Ray actor shell: one frozen copy of the base model."""

    def __init__(self, model_cfg, scoring_cfg, num_threads: int | None = None):
        from opsd_ray.models import default_device, load_model, load_tokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.model = load_model(model_cfg, device=default_device()).eval().requires_grad_(False)
        tok = load_tokenizer(model_cfg)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.cfg = scoring_cfg

    def score(self, items: list[ScoringItem], variants: tuple[str, ...]) -> FrozenBatch:
        return score(
            self.model,
            items,
            variants=variants,
            wire_format=self.cfg.wire_format,
            micro_batch_size=self.cfg.micro_batch_size,
            pad_id=self.pad_id,
        )
