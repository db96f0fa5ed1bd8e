"""Scoring: the frozen base model reads every trajectory under three prompts in ONE forward pass.

Variants (docs/objective.md): teacher (question + reference), ref (reference only: pi_ref), base
(question). All sequences of a micro-batch go through one forward pass, in one of two layouts:
- "padded": one row per sequence, right-padded to the longest.
- "shared_prefix": one row per trajectory. The teacher sequence is written once; the other variants
  add only what follows their longest common prefix with it (the chat header for reference-only,
  header + question for base), and attend to that prefix through a tree-shaped causal mask, with
  their own position ids. Causal attention makes this exact; it computes a third fewer positions than
  "padded" (15% fewer than three separate passes) on GSM8K-length prompts.
  Sliding-window layers (OLMo-3) get a tree mask that also drops keys beyond their window.
- "auto" (default) takes, per micro-batch, the layout with fewer estimated FLOPs (shared_prefix
  saves linear-layer work; its longer rows cost more attention when responses are long). It pads
  under flash-attention, whose kernels take no custom mask.
What goes back to the learner (the wire format) is chosen on purpose:
- "hidden" (exact, default): the final-norm hidden states at the response positions, H values per
  token and variant; the learner applies the frozen lm_head chunk by chunk (3*H vs V per token).
- "logits" (exact, large): the full-vocabulary logits, V values per token and variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opsd_ray.common import pad_id_of
from opsd_ray.data.prompts import PromptIds, ScoringSequence, sequence_of
from opsd_ray.models.loading import default_device, load_model, load_tokenizer
from opsd_ray.objective.registry import VARIANTS  # noqa: F401  (the variants, in the order they travel)
from opsd_ray.workers.process import Reusable, peak_memory, use_cores, worker_info


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


def variant_sequences(items: list[ScoringItem], variants: tuple[str, ...]) -> list[list[ScoringSequence]]:
    """Per trajectory, the sequence (prompt + response ids) of each variant, in `variants` order."""
    return [[sequence_of(it.prompts, v, it.response) for v in variants] for it in items]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def tree_row(seqs: list[ScoringSequence]) -> tuple[list[int], list[int], list[list[int]]]:
    """Pack sequences into one row: seqs[0] whole, each other one after its longest common prefix with a
    sequence already in the row (the first such one). A prompt's completions (rollout.n) share its
    contexts this way, and a trajectory's variants share the chat header and question.

    Returns the row's ids, position ids, and per sequence the row index of each of its positions.
    """
    root = seqs[0].ids
    ids, pos, where = list(root), list(range(len(root))), [list(range(len(root)))]
    for s in seqs[1:]:
        best = max(range(len(where)), key=lambda j: common_prefix(seqs[j].ids, s.ids))  # the first of the longest
        k, off = common_prefix(seqs[best].ids, s.ids), len(ids)
        ids += s.ids[k:]
        pos += range(k, len(s.ids))
        where.append(where[best][:k] + list(range(off, off + len(s.ids) - k)))
    return ids, pos, where


def prompt_groups(items: list[ScoringItem]) -> list[list[int]]:
    """Runs of consecutive items with the same prompts (a prompt's rollout.n completions): one row each."""
    groups: list[list[int]] = []
    for i, it in enumerate(items):
        if groups and items[groups[-1][0]].prompts == it.prompts:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def tree_mask(width: int, where: list[list[int]]) -> torch.Tensor:
    """[width, width] bool: position a of a sequence attends to its positions b <= a (pads: themselves)."""
    mask = torch.eye(width, dtype=torch.bool)
    for w in where:
        idx = torch.tensor(w)
        mask[idx[:, None], idx[None, :]] |= torch.ones(len(w), len(w), dtype=torch.bool).tril()
    return mask


def shared_prefix_inputs(packed: list[tuple], pad_id: int) -> tuple[dict, list[list[int]]]:
    """The `tree_row`s of a micro-batch as model inputs: a 4D bool mask (True = attend), position ids."""
    width = max(len(p[0]) for p in packed)
    ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(packed), width), dtype=torch.long)
    mask = torch.zeros((len(packed), 1, width, width), dtype=torch.bool)
    where = []
    for i, (row_ids, row_pos, row_where) in enumerate(packed):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        pos[i, : len(row_pos)] = torch.tensor(row_pos)
        mask[i, 0] = tree_mask(width, row_where)
        where.append([[i * width + j for j in w] for w in row_where])
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}, where


def layout_flops(config, rows: int, width: int) -> float:
    """Forward FLOPs of `rows` x `width` positions with dense attention: linear layers + QK^T and AV."""
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    linear = 2 * (2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * config.intermediate_size)
    return layers * rows * width * (linear + 4 * heads * head_dim * width)


FLASH_NO_MASK = (
    "scoring.layout=shared_prefix needs a custom attention mask, which flash-attention kernels do not "
    "take: use scoring.layout=auto (it pads under flash-attention) or padded, or "
    "model.attn_implementation=sdpa"
)


def uses_flash(config) -> bool:
    return "flash" in str(getattr(config, "_attn_implementation", ""))


def attention_kinds(config) -> set[str]:
    """The kinds of attention layers a model has, as transformers names them in `config.layer_types`.

    Configs without `layer_types` (Llama, Mistral) use sliding attention everywhere when they set a
    `sliding_window`, full attention otherwise.
    """
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return set(kinds)
    return {"sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"}


SHAREABLE_KINDS = {"full_attention", "sliding_attention"}  # the tree mask knows how to build these


def choose_layout(layout: str, config, seqs: list[list[ScoringSequence]], packed: list[tuple]) -> str:
    """`seqs[i]` = the variants' sequences of trajectory i, `packed[i]` its tree_row; "auto" compares
    the two layouts' FLOPs."""
    if all(len(p[2]) == 1 for p in packed):
        return "padded"  # one sequence per row: nothing to share
    if layout == "shared_prefix":
        if uses_flash(config):
            raise ValueError(FLASH_NO_MASK)  # config validation refuses it first; this guards direct use
        unknown = attention_kinds(config) - SHAREABLE_KINDS
        if unknown:
            raise ValueError(f"scoring.layout=shared_prefix cannot mask {sorted(unknown)} layers: use padded")
    if layout != "auto":
        return layout
    if uses_flash(config) or attention_kinds(config) - SHAREABLE_KINDS:
        return "padded"  # flash kernels take no custom mask; other layer kinds get their masks from the model
    padded = layout_flops(config, sum(map(len, seqs)), max(len(s.ids) for r in seqs for s in r))
    shared = layout_flops(config, len(packed), max(len(p[0]) for p in packed))
    return "shared_prefix" if shared < padded else "padded"


def layer_masks(mask: torch.Tensor, pos: torch.Tensor, config) -> torch.Tensor | dict[str, torch.Tensor]:
    """The tree mask as each kind of attention layer of the model needs it.

    A custom 4D mask replaces the masks transformers would build per layer kind, so sliding-window
    layers (OLMo-3: 3 of 4 layers) would see the whole sequence. Their mask also drops keys
    `sliding_window` or more positions back, counted in each sequence's own positions (as
    transformers' `sliding_window_overlay` does on a plain row). Models with mixed kinds take a
    mapping from kind to mask. A model without sliding layers gets `mask` itself: nothing is built.
    """
    kinds = attention_kinds(config)
    if "sliding_attention" not in kinds:
        return mask if len(kinds) == 1 else dict.fromkeys(kinds, mask)
    sliding = sliding_window_mask(mask, pos, getattr(config, "sliding_window", None) or 0)
    per_kind = {k: sliding if k == "sliding_attention" else mask for k in kinds}
    return next(iter(per_kind.values())) if len(per_kind) == 1 else per_kind


def sliding_window_mask(mask: torch.Tensor, pos: torch.Tensor, window: int, rows: int = 256) -> torch.Tensor:
    """`mask` [B, 1, W, W] without the keys `window` or more positions behind each query. Built a block of
    query rows at a time: no [B, W, W] position difference (int64, 8 bytes a pair) is ever made."""
    out = mask.clone()
    pos = pos.to(torch.int32)
    for a in range(0, pos.shape[1], rows):
        out[:, 0, a : a + rows] &= (pos[:, a : a + rows, None] - pos[:, None, :]) < window
    return out


def response_hidden(
    decoder, items: list[ScoringItem], variants: tuple[str, ...], pad_id: int, layout: str = "auto"
) -> dict[str, torch.Tensor]:
    """One forward pass over len(variants) x len(items) sequences; rows at the response positions.

    Row j of a variant's result is the final hidden state that predicts response token j.
    """
    per_item = variant_sequences(items, variants)
    groups = prompt_groups(items)
    packed = [tree_row([s for i in g for s in per_item[i]]) for g in groups]
    layout = choose_layout(layout, decoder.config, per_item, packed)
    seqs = [r[k] for k in range(len(variants)) for r in per_item]  # variant-major, as returned
    if layout == "shared_prefix":
        inputs, rows = shared_prefix_inputs(packed, pad_id)
        at = {(i, k): rows[g][a * len(variants) + k] for g, members in enumerate(groups)
              for a, i in enumerate(members) for k in range(len(variants))}
        where = [at[i, k] for k in range(len(variants)) for i in range(len(items))]
    elif layout == "padded":
        ids, mask = pad_right([s.ids for s in seqs], pad_id)
        inputs = {"input_ids": ids, "attention_mask": mask}
        where = [[i * ids.shape[1] + j for j in range(len(s.ids))] for i, s in enumerate(seqs)]
    else:
        raise ValueError(f"unknown scoring layout {layout!r} (auto | padded | shared_prefix)")
    device = next(decoder.parameters()).device
    inputs = {k: t.to(device) for k, t in inputs.items()}
    if layout == "shared_prefix":
        masks = layer_masks(inputs["attention_mask"], inputs["position_ids"], decoder.config)
        inputs["attention_mask"] = _as_attention_mask(masks, decoder)
    # no KV cache: one pass over known sequences needs none (it would cost GBs at real sizes)
    hidden = decoder(**inputs, use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])  # `where` holds flat (row * width + column) indices
    rows = [flat[torch.tensor(w[s.predict_slice], device=flat.device)] for w, s in zip(where, seqs, strict=True)]
    n = len(items)
    return {v: torch.cat(rows[k * n : (k + 1) * n]) for k, v in enumerate(variants)}


def _as_attention_mask(masks, decoder):
    """The bool mask(s) as the model's attention takes them: eager adds a float mask to the scores,
    sdpa takes the bool mask as it is."""
    if isinstance(masks, dict):
        return {k: _as_attention_mask(m, decoder) for k, m in masks.items()}
    if decoder.config._attn_implementation != "eager":
        return masks
    return torch.zeros(masks.shape, dtype=decoder.dtype, device=masks.device).masked_fill(
        ~masks, torch.finfo(decoder.dtype).min
    )


class ContextTooLong(ValueError):
    """A scoring context longer than the model's positions: scoring it would read a cut or extrapolated
    context (rows that cannot fit are skipped at start: opsd_ray.data.contexts)."""


def check_context(items: list[ScoringItem], variants: tuple[str, ...], positions: int | None) -> None:
    if positions is None:
        return
    for seqs in variant_sequences(items, variants):
        for v, s in zip(variants, seqs, strict=True):
            if len(s.ids) > positions:
                raise ContextTooLong(f"a {v} context of {len(s.ids)} tokens is longer than the scoring model's "
                                     f"{positions} positions; it is not scored")


@torch.no_grad()
def score(
    model,
    items: list[ScoringItem],
    *,
    variants: tuple[str, ...] = VARIANTS,
    wire_format: str = "hidden",
    micro_batch_size: int = 4,
    pad_id: int = 0,
    layout: str = "auto",
    logits_chunk: int = 1024,
) -> FrozenBatch:
    """Score `items` with the frozen causal LM `model` (no LoRA) in micro-batches of trajectories."""
    decoder = model.get_decoder()
    parts: dict[str, list[torch.Tensor]] = {v: [] for v in variants}
    for i in range(0, len(items), micro_batch_size):
        for v, h in response_hidden(decoder, items[i : i + micro_batch_size], variants, pad_id, layout).items():
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


class ScoringWorker(Reusable):
    """Ray actor shell: one frozen copy of the base model."""

    def __init__(self, model_cfg, scoring_cfg, num_threads: int | list[int] | None = None, pad_id: int | None = None):
        import time

        started = time.time()
        use_cores(num_threads)
        self.model = load_model(model_cfg, dtype=scoring_cfg.dtype, device=default_device())
        self.model.eval().requires_grad_(False)
        self.positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        # the driver knows the pad id: loading the tokenizer here would cost a second (a big JSON) per worker
        self.pad_id = pad_id if pad_id is not None else pad_id_of(load_tokenizer(model_cfg))
        self.cfg = scoring_cfg
        self.info = worker_info("scoring", started)

    def ready(self) -> dict:
        return self.info

    def peak_memory(self) -> dict:
        return peak_memory()

    def score_part(self, items: list[ScoringItem], variants: tuple[str, ...]) -> tuple[dict, FrozenBatch]:
        """Called with num_returns=2: the driver reads only the small first value (when this worker was
        busy); the frozen variants go to a learner as an object ref."""
        import time

        t0 = time.time()
        frozen = self.score(items, variants)
        return {"start": t0, "end": time.time()}, frozen

    def score(self, items: list[ScoringItem], variants: tuple[str, ...]) -> FrozenBatch:
        check_context(items, variants, self.positions)
        return score(
            self.model,
            items,
            variants=variants,
            wire_format=self.cfg.wire_format,
            micro_batch_size=self.cfg.micro_batch_size,
            pad_id=self.pad_id,
            layout=self.cfg.layout,
        )
