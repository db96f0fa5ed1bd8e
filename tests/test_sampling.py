"""The HF engine's batched sampling (opsd_ray.workers.sampling) and its merged adapter.

Against references written from the definitions: nucleus filtering from its definition, a batched row
against the same prompt decoded alone, the merged adapter against peft's unmerged forward."""

import math

import pytest
import torch

from opsd_ray.config.recipes import load_train_config
from opsd_ray.models.loading import load_tokenizer
from opsd_ray.workers import sampling
from opsd_ray.workers.engines import HFEngine
from opsd_ray.workers.sampling import droppable, filter_top_p, generate_batch

MODEL = load_train_config(["model=tiny"]).model  # builtin:tiny (2 layers, the real Qwen3 tokenizer) with its LoRA


def nucleus_reference(p: list[float], top_p: float) -> list[float]:
    """Sort descending; keep tokens while the mass ranked above each is below top_p; renormalise."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, above = set(), 0.0
    for i in order:
        if above >= top_p:
            break
        kept.add(i)
        above += p[i]
    total = sum(p[i] for i in kept)
    return [p[i] / total if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.75, 0.9, 0.999, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p):
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(5, 40, generator=g, dtype=torch.float64) * 2, -1)
    got = filter_top_p(probs, top_p)
    for row, out in zip(probs.tolist(), got.tolist()):
        assert out == pytest.approx(nucleus_reference(row, top_p), abs=1e-12)
        assert sum(out) == pytest.approx(1.0) and max(out) == pytest.approx(max(nucleus_reference(row, top_p)))


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    e = HFEngine(MODEL)
    e.model.float()
    return e


@pytest.fixture(scope="module")
def prompts(engine):
    tok = load_tokenizer(MODEL)
    texts = ["What is 2+3?", "Name a prime larger than 10 and explain why it is prime.", "Hi"]
    return [tok(t)["input_ids"] for t in texts]


def test_a_row_in_a_batch_draws_what_it_draws_alone(engine, prompts):
    """Each row samples from its own seed: its tokens do not depend on its batch-mates (or their
    left padding), up to the kernels' batch variance, which at float32 on this model moves no token."""
    together = dict((i, r) for i, r, _ in generate_batch(engine.model, prompts, [7, 8, 9], 12, 1.0, 0.9, engine.eos,
                                                         engine.pad_id, ignore_eos=True))
    for i, (p, s) in enumerate(zip(prompts, [7, 8, 9])):
        [(j, alone, reason)] = list(generate_batch(engine.model, [p], [s], 12, 1.0, 0.9, engine.eos, engine.pad_id,
                                                   ignore_eos=True))
        assert alone == together[i] and len(alone) == 12 and reason == "length"
    other = dict((i, r) for i, r, _ in generate_batch(engine.model, prompts, [7, 8, 10], 12, 1.0, 0.9, engine.eos,
                                                      engine.pad_id, ignore_eos=True))
    assert other[0] == together[0] and other[2] != together[2]  # a new seed, a new draw; the others unchanged


def test_the_engine_decodes_in_batches_of_at_most_hf_max_batch_rows_and_keeps_request_order(engine, prompts,
                                                                                          monkeypatch):
    """rollout.hf_max_batch bounds the rows decoded together (the KV cache's size): 3 requests in batches
    of 2 and 1 come back in request order, each what it draws in one batch of 3."""
    from opsd_ray.workers import engines

    whole = engine.generate(prompts, [7, 8, 9], 12, 1.0, 0.9, ignore_eos=True)
    rows = []

    def counted(model, batch, *args, **kwargs):  # the real sampler, its batch sizes written down
        rows.append(len(batch))
        return generate_batch(model, batch, *args, **kwargs)

    monkeypatch.setattr(engines, "generate_batch", counted)
    monkeypatch.setattr(engine, "max_batch", 2)
    assert engine.generate(prompts, [7, 8, 9], 12, 1.0, 0.9, ignore_eos=True) == whole
    assert rows == [2, 1]


def test_a_row_stops_at_its_first_end_token_and_keeps_it(engine, prompts):
    eos = sorted({t for _, r, _ in generate_batch(engine.model, prompts, [1, 2, 3], 6, 1.0, 1.0, [], engine.pad_id)
                  for t in r[2:3]})  # the third token each row draws becomes an "end token"
    out = {i: (r, why) for i, r, why in generate_batch(engine.model, prompts, [1, 2, 3], 6, 1.0, 1.0, eos,
                                                       engine.pad_id)}
    for r, why in out.values():
        assert why == "stop" and r[-1] in eos and not set(r[:-1]) & set(eos) and len(r) <= 3


def test_a_finished_row_leaves_the_batch_and_the_others_draw_on_unchanged(engine, prompts, monkeypatch):
    """Row 1 ends early and leaves the batch (and its KV cache); rows 0 and 2 go on to draw exactly what
    they draw when nobody stops."""
    free = {i: r for i, r, _ in generate_batch(engine.model, prompts, [1, 2, 3], 10, 1.0, 1.0, [], engine.pad_id)}
    # row 1's end: its first token, after the first, that no other row draws and it has not drawn before
    k = next(k for k in range(1, 9) if free[1][k] not in free[0] + free[2] + free[1][:k])
    eos = [free[1][k]]
    out = list(generate_batch(engine.model, prompts, [1, 2, 3], 10, 1.0, 1.0, eos, engine.pad_id))
    assert out[0] == (1, free[1][: k + 1], "stop")  # yielded as soon as it ends
    assert sorted(out[1:]) == [(0, free[0], "length"), (2, free[2], "length")]
    # where the cache cannot drop rows (linear attention), the finished row stays in the batch unread
    monkeypatch.setattr(sampling, "droppable", lambda cache: False)
    assert list(generate_batch(engine.model, prompts, [1, 2, 3], 10, 1.0, 1.0, eos, engine.pad_id)) == out


def test_the_sampling_distribution_is_the_models_softmax(engine, prompts):
    """The first token's frequencies over many seeds match softmax(logits / T) within sampling error."""
    n, temperature = 400, 1.5
    draws = [r[0] for _, r, _ in generate_batch(engine.model, [prompts[2]] * n, list(range(n)), 1, temperature, 1.0,
                                                engine.eos, engine.pad_id)]
    with torch.no_grad():
        logits = engine.model(input_ids=torch.tensor([prompts[2]])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, -1)
    top = int(p.argmax())
    freq = draws.count(top) / n
    assert abs(freq - float(p[top])) < 4 * math.sqrt(float(p[top]) * (1 - float(p[top])) / n) + 1e-3


def random_adapter(engine, seed):
    from peft import get_peft_model_state_dict

    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in get_peft_model_state_dict(engine.model).items()}


def test_the_merged_adapter_gives_the_unmerged_models_logprobs_and_the_base_comes_back_exactly(engine, prompts):
    from peft import set_peft_model_state_dict

    base = {n: w.clone() for n, w in engine.pristine.items()}
    assert base and engine.merge  # on a CPU the adapter is merged
    response = prompts[1][:10]
    base_lp = engine.sequence_logprobs(prompts[0], response, adapter=False)
    for version in range(1, 4):
        state = random_adapter(engine, version)
        engine.load_adapter(version, state, {})
        merged = engine.sequence_logprobs(prompts[0], response)
        engine._unmerge()  # the reference: peft's own unmerged forward with the same adapter
        set_peft_model_state_dict(engine.model, state)
        unmerged = engine.sequence_logprobs(prompts[0], response)
        engine._merge()
        assert merged == pytest.approx(unmerged, abs=1e-4) and max(abs(a - b) for a, b in zip(merged, base_lp)) > 1e-3
        assert engine.sequence_logprobs(prompts[0], response, adapter=False) == base_lp  # the base alone, exactly
        assert engine.sequence_logprobs(prompts[0], response) == merged  # ... and the adapter back on
    engine._unmerge()
    assert all(torch.equal(engine.model.get_submodule(n).weight, w) for n, w in base.items())


def test_deterministic_mode_decodes_each_request_as_it_would_alone(prompts):
    torch.manual_seed(0)
    e = HFEngine(MODEL, deterministic=True)
    e.model.float()
    both = e.generate(prompts[:2], [5, 6], 8, 1.0, 0.9, ignore_eos=True)
    assert [e.generate([p], [s], 8, 1.0, 0.9, ignore_eos=True)[0] for p, s in zip(prompts[:2], [5, 6])] == both
    assert all(len(ids) == 8 and why == "length" for ids, why in both)


def test_rows_leave_only_caches_of_keys_and_values():
    """Linear-attention layers (Qwen3-Next, LFM2) hold recurrent states that batch_select_indices does not
    cut: with them, finished rows stay in the batch."""
    from types import SimpleNamespace

    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, LinearAttentionLayer

    assert droppable(SimpleNamespace(layers=[DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=8)]))
    assert not droppable(SimpleNamespace(layers=[DynamicLayer(), LinearAttentionLayer()]))


def test_a_bf16_engine_keeps_its_adapter_unmerged():
    """W + BA rounded to bf16 would lose most of a young adapter, and the learner computes LoRA in float32:
    only float32 weights on a CPU are merged."""
    e = HFEngine(load_train_config(["model=tiny", "model.dtype=bfloat16"]).model)
    assert e.model.dtype == torch.bfloat16 and not e.merge and not e.pristine
