"""Batched sampling in which every row draws from its own generator.

A trajectory's tokens come from its own seed, so which other prompts share its batch changes nothing but
the kernels' batch variance (the logits of a row can differ in the last bits with the batch's shape).
The HF engine decodes a worker's share this way, up to rollout.hf_max_batch rows at a time;
`rollout.deterministic=true` keeps one sequence at a time, bit for bit the same whatever the batch
(recovery tests that compare bits).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


def filter_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering per row: keep the smallest set of tokens whose probability reaches top_p (at least
    the most likely one), renormalised."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # the mass of the tokens ranked above each one
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return kept / kept.sum(-1, keepdim=True)


def sample_rows(logits: torch.Tensor, generators: list[torch.Generator], temperature: float, top_p: float) -> torch.Tensor:
    """One token per row, each row with its own generator."""
    probs = filter_top_p(torch.softmax(logits.float() / temperature, dim=-1), top_p)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def droppable(cache) -> bool:
    """Whether rows can leave `cache`: its layers hold keys and values only. Linear-attention layers
    (Qwen3-Next, LFM2) also hold recurrent states that `batch_select_indices` does not cut: with those,
    finished rows stay in the batch."""
    return all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in getattr(cache, "layers", [None]))


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, temperature: float,
                   top_p: float, eos: list[int], pad_id: int, ignore_eos: bool = False) -> Iterator[tuple[int, list[int], str]]:
    """(index, response ids, finish reason) of each prompt as it finishes: the prompts left-padded into one
    batch, decoded together with a KV cache; a row stops at its first end token (kept), or at max_new_tokens,
    and then leaves the batch (no more compute for it)."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        mask[i, width - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    # the prompt's pass needs the logits of its last position only (all of them: B x W x V floats)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, responses = out.past_key_values, [[] for _ in prompts]
    rows = list(range(len(prompts)))  # the request index of each row of the batch
    done = [False] * len(rows)  # a finished row stays in the batch only where the cache cannot drop it
    ends = torch.tensor(eos, device=device)
    for step in range(max_new_tokens):
        tokens = sample_rows(out.logits[:, -1], generators, temperature, top_p)
        stop = torch.isin(tokens, ends).tolist() if not ignore_eos else [False] * len(rows)
        for r, i in enumerate(rows):
            if not done[r]:
                responses[i].append(int(tokens[r]))
                done[r] = stop[r]
                if stop[r]:
                    yield i, responses[i], "stop"
        if all(done) or step == max_new_tokens - 1:
            break
        if any(done) and droppable(cache):  # finished rows leave the batch and its KV cache
            keep = [r for r in range(len(rows)) if not done[r]]
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, positions, tokens = mask[index], positions[index], tokens[index]
            rows, generators, done = [rows[r] for r in keep], [generators[r] for r in keep], [False] * len(keep)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        cache = out.past_key_values
    for r, i in enumerate(rows):
        if not done[r]:
            yield i, responses[i], "length"
