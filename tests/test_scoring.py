"""Scoring layouts: the padded and the shared-prefix (tree mask) pass equal separate forwards exactly."""

import copy
from types import SimpleNamespace

import pytest
import torch
from conftest import learn, sequences

from opsd_ray.config.recipes import ConfigError, load_train_config
from opsd_ray.data.prompts import ScoringSequence, build_prompt_ids
from opsd_ray.workers.scoring import (
    VARIANTS,
    ScoringItem,
    choose_layout,
    layout_flops,
    score,
    shared_prefix_inputs,
    tree_row,
)

Q = ["What is 2+3?", "Natalia sold 48 clips in April and half as many in May. How many in total?", "Compute 7*8."]
R = ["2+3=5. #### 5", "48/2=24, 48+24=72. #### 72", "7*8=56. #### 56"]


@pytest.fixture(scope="module")
def setup():
    from opsd_ray.models.loading import load_model, load_tokenizer

    cfg = load_train_config(["model=tiny"])
    tok = load_tokenizer(cfg.model)
    g = torch.Generator().manual_seed(0)
    items = [ScoringItem(build_prompt_ids(tok, q, r, cfg.model, cfg.prompt),
                         torch.randint(0, 151_000, (n,), generator=g).tolist()) for q, r, n in zip(Q, R, [5, 17, 9])]
    return cfg, items, load_model(cfg.model).eval()


def separate_forwards(model, item):
    """Reference: each variant's sequence alone, unpadded, no mask; logits at the response positions."""
    out = {}
    for v in VARIANTS:
        seq = sequences(item.prompts, item.response)[v]
        with torch.no_grad():
            out[v] = model(input_ids=torch.tensor([seq.ids])).logits[0, seq.predict_slice]
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["padded", "shared_prefix"])
def test_each_layout_equals_separate_unpadded_forwards_in_float64(setup, layout, attn):
    _, items, base = setup
    model = copy.deepcopy(base).double()
    model.config._attn_implementation = attn
    frozen = score(model, items, wire_format="logits", micro_batch_size=3, layout=layout, pad_id=0)
    atol = 1e-9 if attn == "sdpa" else 2e-6  # HF's eager attention takes its softmax in float32
    offset = 0
    for item in items:
        ref = separate_forwards(model, item)
        n = len(item.response)
        for v in VARIANTS:
            torch.testing.assert_close(frozen.tensors[v][offset : offset + n], ref[v], rtol=0, atol=atol)
        offset += n


def test_shared_prefix_writes_the_teacher_once_and_only_the_suffixes_of_the_others(setup):
    _, items, _ = setup
    for item in items:
        seqs = sequences(item.prompts, item.response)
        t, r, b = seqs["teacher"].ids, seqs["ref"].ids, seqs["base"].ids
        header = next(k for k in range(len(r)) if r[k] != t[k])  # chat header shared with the teacher
        question = next(k for k in range(len(b)) if b[k] != t[k])  # header + question shared
        assert 0 < header < question < len(item.prompts.student)
        ids, pos, where = tree_row([seqs[v] for v in VARIANTS])
        assert len(ids) == len(t) + (len(r) - header) + (len(b) - question) < len(t) + len(r) + len(b)
        for w, s in zip(where, (t, r, b), strict=True):
            assert [ids[j] for j in w] == s  # every sequence can be read back from the row
            assert [pos[j] for j in w] == list(range(len(s)))  # with its own position ids


def test_tree_mask_is_each_sequences_own_causal_mask():
    seqs = [ScoringSequence([1, 2, 3, 4], 2), ScoringSequence([1, 2, 5], 2), ScoringSequence([1, 6, 7], 1)]
    inputs, where = shared_prefix_inputs([tree_row(seqs), tree_row(seqs[:1])], pad_id=0)
    # row 0 = 1 2 3 4 | 5 | 6 7 (positions 0 1 2 3 | 2 | 1 2); row 1 = 1 2 3 4 + 3 pads
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 0, 0, 0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 2, 1, 2], [0, 1, 2, 3, 0, 0, 0]]
    expected0 = [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # "5" follows the shared "1 2"
        [1, 0, 0, 0, 0, 1, 0],  # "6" follows the shared "1"
        [1, 0, 0, 0, 0, 1, 1],
    ]
    expected1 = [[int(j <= i) if i < 4 else int(i == j) for j in range(7)] for i in range(7)]  # pads: self only
    assert inputs["attention_mask"][:, 0].int().tolist() == [expected0, expected1]
    assert where[0] == [[0, 1, 2, 3], [0, 1, 4], [0, 5, 6]] and where[1] == [[7, 8, 9, 10]]


def test_layout_flops_counts_linear_layers_and_attention():
    cfg = SimpleNamespace(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, head_dim=4,
                          num_key_value_heads=1, intermediate_size=16)
    # per layer and position: q,o 2*(8*8) + k,v 2*(8*4) + mlp 3*8*16 = 576 MACs = 1152 FLOPs; attention 4*8*width
    assert layout_flops(cfg, rows=3, width=5) == 2 * 3 * 5 * (1152 + 4 * 8 * 5)


def test_auto_layout_shares_prefixes_for_short_responses_and_pads_for_long_ones(setup):
    _, items, base = setup
    config = base.config

    def choose(layout, config, seqs):
        return choose_layout(layout, config, seqs, [tree_row(r) for r in seqs])

    short = [[sequences(it.prompts, it.response)[v] for v in VARIANTS] for it in items]
    long = [[sequences(it.prompts, it.response * 400)[v] for v in VARIANTS] for it in items]
    assert choose("auto", config, short) == "shared_prefix"
    assert choose("auto", config, long) == "padded"  # 3x longer rows cost more attention than they save
    assert choose("padded", config, short) == "padded"
    assert choose("shared_prefix", config, long) == "shared_prefix"
    assert choose("auto", config, [r[:1] for r in short]) == "padded"  # standard mode: teacher only
    flash = copy.copy(config)
    flash._attn_implementation = "flash_attention_2"
    assert choose("auto", flash, short) == "padded"  # flash kernels take no custom mask


def test_unknown_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="scoring.layout"):
        load_train_config(["model=tiny", "scoring.layout=packed"])


def test_scoring_dtype_sets_the_frozen_scorers_precision_and_the_learner_takes_it(setup):
    from opsd_ray.workers.learner import Learner
    from opsd_ray.workers.scoring import ScoringWorker

    _, items, _ = setup
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_train_config(["model=tiny", f"scoring.dtype={dtype}", "train.batch_size=3",
                                 "learner.micro_batch_size=3", "objective.chunk_size=16"])
        worker = ScoringWorker(cfg.model, cfg.scoring)
        assert worker.model.dtype == getattr(torch, dtype)
        frozen = worker.score(items, VARIANTS)
        assert frozen.tensors["teacher"].dtype == getattr(torch, dtype)
        assert frozen.bytes_per_token == 3 * 64 * (4 if dtype == "float32" else 2)
        losses[dtype] = learn(Learner(cfg), items, [0] * len(items), False, frozen, update=False)["loss"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
    with pytest.raises(ConfigError, match="scoring.dtype"):
        load_train_config(["model=tiny", "scoring.dtype=fp8"])


# ----------------------------------------------------------------------------- sliding-window layers
def tiny_olmo3(sliding_window=8, layer_types=None):
    """A random 4-layer OLMo-3 (sliding attention on 3 of 4 layers, as in OLMo-3-7B) in float64."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    config = Olmo3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         sliding_window=sliding_window, layer_types=layer_types, pad_token_id=0)
    torch.manual_seed(0)
    return Olmo3ForCausalLM(config).double().eval()


def synthetic_items(n=3, seed=0):
    """Prompts with the shapes of the real ones (shared chat header; the base prompt shares header +
    question with the teacher's), all longer than the window."""
    from opsd_ray.data.prompts import PromptIds

    g = torch.Generator().manual_seed(seed)

    def rand(k):
        return torch.randint(1, 300, (k,), generator=g).tolist()

    items = []
    for i in range(n):
        header, question, reference, tail, answer = rand(3), rand(6 + i), rand(10 + 2 * i), rand(4), rand(3)
        prompts = PromptIds(student=header + question + answer, teacher=header + question + reference + tail,
                            ref=header + reference + tail)
        items.append(ScoringItem(prompts, rand(12 + 3 * i)))
    return items


# eager in float32: its float32 softmax turns a float64 model's min-value mask into -inf, and padded
# rows past a sequence's end have no key inside their window (NaN); bf16 and float32 models are fine.
@pytest.mark.parametrize("attn,dtype", [("sdpa", torch.float64), ("eager", torch.float32)])
def test_sliding_window_model_gets_the_same_targets_from_every_layout(attn, dtype):
    model = tiny_olmo3().to(dtype)
    model.config._attn_implementation = attn
    assert model.config.layer_types.count("sliding_attention") == 3
    items = synthetic_items()
    assert min(len(it.prompts.ref) + len(it.response) for it in items) > 3 * 8
    by_layout = {layout: score(model, items, wire_format="logits", micro_batch_size=3, layout=layout)
                 for layout in ("padded", "shared_prefix")}
    offset = 0
    for item in items:
        ref = separate_forwards(model, item)
        n = len(item.response)
        for v in VARIANTS:
            for layout, frozen in by_layout.items():
                got = frozen.tensors[v][offset : offset + n]
                torch.testing.assert_close(got, ref[v], rtol=0, atol=1e-5, msg=f"{layout} {v}")
        offset += n


def test_the_window_matters_in_that_test():
    """Without the window the same model scores differently: the test above can fail."""
    items = synthetic_items()
    windowed = score(tiny_olmo3(), items, wire_format="logits", layout="padded")
    full = score(tiny_olmo3(layer_types=["full_attention"] * 4), items, wire_format="logits", layout="padded")
    assert (windowed.tensors["teacher"] - full.tensors["teacher"]).abs().max() > 1e-3


def test_layouts_refused_or_avoided_where_the_tree_mask_cannot_work(setup):
    _, items, base = setup
    seqs = [[sequences(it.prompts, it.response)[v] for v in VARIANTS] for it in items]
    packed = [tree_row(r) for r in seqs]
    flash = copy.copy(base.config)
    flash._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash"):
        choose_layout("shared_prefix", flash, seqs, packed)  # would crash in flash's unpad path
    chunked = copy.copy(base.config)
    chunked.layer_types = ["chunked_attention", "full_attention"]
    assert choose_layout("auto", chunked, seqs, packed) == "padded"
    with pytest.raises(ValueError, match="chunked_attention"):
        choose_layout("shared_prefix", chunked, seqs, packed)


def test_shared_prefix_with_flash_attention_is_refused_at_config_validation():
    with pytest.raises(ConfigError, match="flash-attention"):
        load_train_config(["model=qwen3-8b", "data=gsm8k", "scoring.layout=shared_prefix"])
    load_train_config(["model=qwen3-8b", "data=gsm8k", "scoring.layout=auto"])
    load_train_config(["model=qwen3-8b", "data=gsm8k", "scoring.layout=shared_prefix",
                       "model.attn_implementation=sdpa"])


def largest_cpu_allocation(fn) -> int:
    """The largest single CPU allocation (bytes) any op makes while `fn` runs (torch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_masks_for_models_without_sliding_layers_cost_nothing_and_sliding_ones_no_int64_square():
    """At the recipe's lengths the position difference was an int64 [B, W, W]: 6 GB on the GPU. Full
    attention now takes the tree mask itself; a sliding mask is built a block of rows at a time."""
    from opsd_ray.workers.scoring import layer_masks

    b, w = 2, 1024
    mask = torch.ones(b, 1, w, w, dtype=torch.bool).tril()
    pos = torch.arange(w).repeat(b, 1)
    full = tiny_olmo3(layer_types=["full_attention"] * 4).config
    assert layer_masks(mask, pos, full) is mask
    assert largest_cpu_allocation(lambda: layer_masks(mask, pos, full)) == 0
    sliding = tiny_olmo3().config
    got = layer_masks(mask, pos, sliding)
    assert largest_cpu_allocation(lambda: layer_masks(mask, pos, sliding)) <= b * w * w  # one bool mask
    reference = mask & ((pos[:, :, None] - pos[:, None, :]) < sliding.sliding_window)[:, None]  # the formula
    assert torch.equal(got["sliding_attention"], reference) and got["full_attention"] is mask


def test_a_prompts_completions_share_its_contexts_in_one_row_and_get_the_targets_they_get_alone(setup):
    """rollout.n: a prompt's completions sit next to each other in a micro-batch; its three contexts are
    written into the row once, each completion after them (two completions that begin alike share that
    beginning too), and every completion's PMI target equals scoring it alone (float64)."""
    from opsd_ray.objective.formulas import pmi_target
    from opsd_ray.workers.scoring import prompt_groups

    _, items, base = setup
    model = copy.deepcopy(base).double()
    g = torch.Generator().manual_seed(1)
    completions = []
    for item in items[:2]:  # 3 completions per prompt; the third begins as the first does
        responses = [torch.randint(0, 151_000, (n,), generator=g).tolist() for n in (6, 11)]
        responses.append(responses[0][:3] + torch.randint(0, 151_000, (5,), generator=g).tolist())
        completions += [ScoringItem(item.prompts, r) for r in responses]
    assert prompt_groups(completions) == [[0, 1, 2], [3, 4, 5]]

    seqs = [sequences(completions[0].prompts, r.response) for r in completions[:3]]
    ids, _, where = tree_row([s[v] for s in seqs for v in VARIANTS])
    prompt_positions = len(tree_row([seqs[0][v] for v in VARIANTS])[0]) - 3 * len(completions[0].response)
    assert len(ids) == prompt_positions + 3 * (6 + 11 + 8 - 3)  # each context once; the shared beginning once
    for w, s in zip(where, [s[v] for s in seqs for v in VARIANTS], strict=True):
        assert [ids[j] for j in w] == s.ids

    together = score(model, completions, wire_format="logits", micro_batch_size=6, layout="shared_prefix", pad_id=0)
    offset = 0
    for item in completions:
        alone = score(model, [item], wire_format="logits", layout="padded", pad_id=0)
        n = len(item.response)
        got = {v: together.tensors[v][offset : offset + n] for v in VARIANTS}
        torch.testing.assert_close(pmi_target(*got.values()), pmi_target(*alone.tensors.values()), rtol=0, atol=1e-9)
        offset += n
