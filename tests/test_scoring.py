"""Scoring layouts: the padded and the shared-prefix (tree mask) pass equal separate forwards exactly."""

import copy
from types import SimpleNamespace

import pytest
import torch

from opsd_ray.config import ConfigError, load_train_config
from opsd_ray.prompts import ScoringSequence, build_prompt_ids, scoring_sequences
from opsd_ray.scoring import (
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
    from opsd_ray.models import load_model, load_tokenizer

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
        seq = scoring_sequences(item.prompts, item.response)[v]
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
        seqs = scoring_sequences(item.prompts, item.response)
        t, r, b = seqs["teacher"].ids, seqs["reference_only"].ids, seqs["base"].ids
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

    short = [[scoring_sequences(it.prompts, it.response)[v] for v in VARIANTS] for it in items]
    long = [[scoring_sequences(it.prompts, it.response * 400)[v] for v in VARIANTS] for it in items]
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
    from opsd_ray.learner import Learner
    from opsd_ray.scoring import ScoringWorker

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
        losses[dtype] = Learner(cfg).backward(items, frozen)["loss"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)
    with pytest.raises(ConfigError, match="scoring.dtype"):
        load_train_config(["model=tiny", "scoring.dtype=fp8"])
