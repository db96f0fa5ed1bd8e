"""The learner and scoring in-process on the tiny model: normalisation, wire formats, staleness."""

import math

import pytest
import torch
from conftest import learn, sequences

from opsd_ray.config.recipes import load_train_config
from opsd_ray.data.prompts import build_prompt_ids
from opsd_ray.workers.learner import Learner, StaleRolloutError, check_staleness
from opsd_ray.workers.scoring import VARIANTS, ScoringItem, score, split_evenly

Q = ["What is 2+3?", "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "A train goes 60 km in 1.5 hours. What is its speed?", "Compute 7*8."]
R = ["2+3=5. #### 5", "48/2=24, 48+24=72. #### 72", "60/1.5=40 km/h. #### 40", "7*8=56. #### 56"]


def make_cfg(*extra):
    return load_train_config(["model=tiny", "train.batch_size=4", "learner.micro_batch_size=4", "learner.lr=1e-2",
                              "objective.chunk_size=16", *extra])


@pytest.fixture(scope="module")
def batch():
    from opsd_ray.models.loading import load_model, load_tokenizer

    cfg = make_cfg()
    tok = load_tokenizer(cfg.model)
    g = torch.Generator().manual_seed(0)
    items = [ScoringItem(build_prompt_ids(tok, q, r, cfg.model, cfg.prompt),
                         torch.randint(0, 151_000, (n,), generator=g).tolist()) for q, r, n in zip(Q, R, [5, 17, 9, 12])]
    base = load_model(cfg.model).eval()
    return items, base


def one_step(cfg, items, frozen, diagnostics=True):
    learner = Learner(cfg)
    metrics = learn(learner, items, [0] * len(items), diagnostics, frozen)
    _, state = learner.adapter_state()
    return metrics, state


def assert_same_update(a, b, tol=1e-5):
    """Same loss and gradient norm (Adam's first step hides the gradient's scale), same new adapter."""
    (ma, sa), (mb, sb) = a, b
    assert ma["loss"] == pytest.approx(mb["loss"], rel=tol, abs=1e-7)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=10 * tol)
    for k in sa:  # entries with |g| ~ Adam's eps may flip; 1e-3 of the step size (lr 1e-2) is allowed
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=1e-5)


def gradients(cfg, items, frozen):
    learner = Learner(cfg)
    metrics = learn(learner, items, [0] * len(items), True, frozen, update=False)
    return metrics, {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.requires_grad}


def test_micro_batches_do_not_change_the_gradient(batch):
    """The loss of each micro-batch is divided by the token count of the whole step."""
    items, base = batch
    frozen = score(base, items, micro_batch_size=4)
    full_m, full_g = gradients(make_cfg("learner.micro_batch_size=4"), items, frozen)
    micro_m, micro_g = gradients(make_cfg("learner.micro_batch_size=1"), items, frozen)
    assert full_m["num_tokens"] == sum(len(i.response) for i in items) == 43
    for k in full_m:
        assert micro_m[k] == pytest.approx(full_m[k], rel=1e-5, abs=1e-7), k
    scale = max(g.abs().max() for g in full_g.values())
    assert scale > 0
    for k in full_g:
        torch.testing.assert_close(micro_g[k], full_g[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


def test_wire_formats_hidden_and_logits_give_the_same_step(batch):
    items, base = batch
    hidden = score(base, items, wire_format="hidden")
    logits = score(base, items, wire_format="logits")
    assert hidden.bytes_per_token == 3 * 64 * 4  # 3 variants x H float32
    assert logits.bytes_per_token == 3 * 151_936 * 4
    # Gradients, not Adam's update: the first Adam step is lr * g / (|g| + eps), whose slope lr / eps at
    # g ~ 0 turns the last-bit differences of a different summation order into visible ones.
    (mh, gh), (ml, gl) = gradients(make_cfg(), items, hidden), gradients(make_cfg(), items, logits)
    for k in mh.keys() - {"wire_bytes_per_token"}:
        assert ml[k] == pytest.approx(mh[k], rel=1e-4, abs=1e-7), k
    scale = max(g.abs().max() for g in gh.values())
    assert scale > 0
    for k in gh:
        torch.testing.assert_close(gl[k], gh[k], rtol=1e-4, atol=1e-5 * scale, msg=k)


def test_scoring_micro_batch_and_split_do_not_change_targets(batch):
    items, base = batch
    whole = score(base, items, micro_batch_size=4)
    for mb in (1, 3):
        other = score(base, items, micro_batch_size=mb)
        for v in VARIANTS:
            torch.testing.assert_close(whole.tensors[v], other.tensors[v], rtol=1e-5, atol=1e-5)
    assert [len(p) for p in split_evenly(list(range(7)), 3)] == [3, 2, 2]


def test_scoring_matches_a_plain_forward_of_each_variant(batch):
    """The one-pass batch of 3 x N padded sequences equals separate unpadded forwards."""
    items, base = batch
    frozen = score(base, items, wire_format="logits", micro_batch_size=4)
    item = items[1]
    offset = len(items[0].response)
    for v in VARIANTS:
        seq = sequences(item.prompts, item.response)[v]
        with torch.no_grad():
            logits = base(input_ids=torch.tensor([seq.ids])).logits[0, seq.predict_slice]
        torch.testing.assert_close(frozen.tensors[v][offset : offset + len(item.response)], logits, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_step(batch):
    items, base = batch
    frozen = score(base, items)
    assert_same_update(one_step(make_cfg(), items, frozen),
                       one_step(make_cfg("learner.gradient_checkpointing=true"), items, frozen))


def test_standard_mode_needs_only_the_teacher(batch):
    items, base = batch
    frozen = score(base, items, variants=("teacher",))
    metrics, _ = one_step(make_cfg("objective.mode=standard"), items, frozen, diagnostics=False)
    assert metrics["loss"] > 0 and "kl_target_base" not in metrics


def test_stale_rollouts_are_refused():
    check_staleness([3, 3], 3, False)
    check_staleness([2, 3], 3, True)
    with pytest.raises(StaleRolloutError, match="one_step_off=false"):
        check_staleness([2, 3], 3, False)
    with pytest.raises(StaleRolloutError):
        check_staleness([4], 3, True)  # from the future: a bug upstream


def test_checkpoint_round_trip(batch, tmp_path):
    items, base = batch
    frozen = score(base, items)
    cfg = make_cfg()
    a = Learner(cfg)
    learn(a, items, [0] * 4, False, frozen)
    files = a.checkpoint_files()
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "rng.pt"} <= set(files)
    b = Learner(cfg)
    assert b.load_checkpoint_files(files) == 1 and b.version == 1
    ma = learn(a, items, [1] * 4, False, frozen)
    mb = learn(b, items, [1] * 4, False, frozen)
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
    for (k, va), vb in zip(a.adapter_state()[1].items(), b.adapter_state()[1].values()):
        torch.testing.assert_close(va, vb, msg=k)


def test_a_checkpoint_from_before_the_first_step_changes_nothing(batch):
    """Saving before any step leaves the optimizer alone (torch's get_optimizer_state_dict would take an
    lr-0 step to make moments: the first real update would be Adam's second, 26% smaller), and loading that
    checkpoint into a learner that has stepped takes its moments away: it steps as a fresh learner does."""
    items, base = batch
    frozen = score(base, items)
    fresh, saved, back = Learner(make_cfg()), Learner(make_cfg()), Learner(make_cfg())
    start = saved.checkpoint_files()
    learn(back, items, [0] * 4, False, frozen)
    assert back.load_checkpoint_files(start) == 0 and not back.optimizer.state
    for learner in (fresh, saved, back):
        learn(learner, items, [0] * 4, False, frozen)
    expected = fresh.adapter_state()[1]
    for learner in (saved, back):
        for k, v in learner.adapter_state()[1].items():
            assert torch.equal(v, expected[k]), k


def test_a_nan_in_a_frozen_variant_skips_the_update_and_leaves_the_adapter(batch):
    import copy

    items, base = batch
    frozen = score(base, items)
    poisoned = copy.deepcopy(frozen)
    poisoned.tensors["teacher"][3, 5] = float("nan")  # one value of one frozen row
    learner = Learner(make_cfg())
    _, before = learner.adapter_state()
    metrics = learn(learner, items, [0] * 4, False, poisoned)
    assert metrics["skipped"] == 1 and not math.isfinite(metrics["loss"]) and learner.version == 0
    _, after = learner.adapter_state()
    assert all(torch.equal(before[k], after[k]) for k in before)  # unchanged
    assert all(p.grad is None for p in learner.params) and not learner.optimizer.state  # nothing carried over
    good = learn(learner, items, [0] * 4, False, frozen)  # the next good step is a normal first step
    fresh = learn(Learner(make_cfg()), items, [0] * 4, False, frozen)
    assert good["skipped"] == 0 and learner.version == 1
    assert good["loss"] == fresh["loss"] and good["grad_norm"] == fresh["grad_norm"]


def _rank_one(port, queue):
    import torch
    import torch.distributed as dist

    from opsd_ray.workers.learner import join_group

    join_group("gloo", "127.0.0.1", port, 1, 2)
    t = torch.ones(1)
    dist.all_reduce(t)
    queue.put(float(t))
    dist.destroy_process_group()


def test_the_group_port_is_held_from_the_moment_it_is_announced():
    """The learner group meets at a port rank 0's store opened itself (port 0: the OS picks a free one) and
    holds: nobody can take it between the announcement and the group forming (binding a free port,
    closing it and binding it again later was a race)."""
    import multiprocessing
    import socket

    import torch.distributed as dist

    from opsd_ray.workers.learner import join_group, open_group_store

    store, port = open_group_store(2)
    taker = socket.socket()
    with pytest.raises(OSError):  # another process trying to take it now fails
        taker.bind(("", port))
    taker.close()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    other = ctx.Process(target=_rank_one, args=(port, queue))
    other.start()
    try:
        join_group("gloo", "127.0.0.1", port, 0, 2, store)
        t = torch.ones(1)
        dist.all_reduce(t)
        assert float(t) == 2.0 and queue.get(timeout=60) == 2.0
    finally:
        other.join(timeout=60)
        if dist.is_initialized():
            dist.destroy_process_group()
