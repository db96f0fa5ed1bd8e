"""Tests for opsd_ray.objective.formulas against independent float64 implementations of the paper's formulas.

The reference functions below (ref_*) are written from Eq. 4-18 directly and never call the code
under test. They assume finite logits; -inf padding is tested by comparing with the same inputs
with the padding columns removed.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd_ray.objective.formulas import (
    DECOMPOSITION_KEYS,
    FrozenVariants,
    decomposition,
    generalized_jsd,
    opsd_loss,
    pmi_target,
)

SETTINGS = settings(max_examples=20, deadline=None)
KINDS = ("normal", "wide", "extreme", "onehot")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine every OpenMP hand-off in
    thousands of tiny ops can stall for a scheduler slice (gradcheck went from 2 s to 45 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# independent float64 reference implementations
# ----------------------------------------------------------------------------------------------


def ref_log_softmax(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    top = x.max(-1, keepdim=True).values
    return x - top - torch.log(torch.exp(x - top).sum(-1, keepdim=True))


def ref_delta_bar(teacher, ref, *, center=True):
    """Eq. 13-14."""
    delta = ref_log_softmax(teacher) - ref_log_softmax(ref)
    return delta - delta.mean(-1, keepdim=True) if center else delta


def ref_target(teacher, ref, base, *, beta=1.0, clip=10.0, center=True):
    """Eq. 13-17: log P_target in float64."""
    delta = ref_delta_bar(teacher, ref, center=center)
    if clip:
        delta = clip * torch.tanh(delta / clip)
    return ref_log_softmax(ref_log_softmax(base) + delta / beta)


def ref_kl(logp, logq):
    """KL(p || q) per row."""
    return (logp.exp() * (logp - logq)).sum(-1)


def ref_jsd(log_s, log_t, lam):
    """Generalized JSD per row, TRL convention, end points = plain KLs."""
    if lam == 0:
        return ref_kl(log_t, log_s)
    if lam == 1:
        return ref_kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(lam), log_s + math.log(1 - lam)]), dim=0)
    return lam * ref_kl(log_t, log_m) + (1 - lam) * ref_kl(log_s, log_m)


def ref_loss(
    student,
    teacher,
    ref,
    base,
    mask=None,
    *,
    mode="pmi",
    lam=0.5,
    beta=1.0,
    clip=10.0,
    center=True,
    temperature=1.0,
    normalizer=None,
):
    """Per-token JSD summed over unmasked tokens / normalizer; student must be float64 for grads."""
    t = temperature
    V = student.shape[-1]
    s2, T2 = student.reshape(-1, V) / t, teacher.reshape(-1, V).double() / t
    if mode == "pmi":
        log_t = ref_target(
            T2,
            ref.reshape(-1, V).double() / t,
            base.reshape(-1, V).double() / t,
            beta=beta,
            clip=clip,
            center=center,
        )
    else:
        log_t = ref_log_softmax(T2)
    per_token = ref_jsd(ref_log_softmax(s2), log_t, lam)
    keep = torch.ones_like(per_token) if mask is None else mask.reshape(-1).double()
    n = keep.sum() if normalizer is None else normalizer
    return (per_token * keep).sum() / max(float(n), 1.0), log_t, keep.bool()


def ref_decomposition_rows(student, teacher, ref):
    ls, lt, lr = ref_log_softmax(student), ref_log_softmax(teacher), ref_log_softmax(ref)
    total, d_ref, d_it = lt - ls, lr - ls, lt - lr
    nt, nr, ni = total.norm(dim=-1), d_ref.norm(dim=-1), d_it.norm(dim=-1)
    return torch.stack(
        [(total * d_ref).sum(-1) / (nt * nr), (total * d_it).sum(-1) / (nt * ni), nr / nt, ni / nt], -1
    )


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------


def make_logits(gen, shape, kind="normal", dtype=torch.float32):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if kind == "normal":
        x = 2 * x
    elif kind == "wide":
        x = 8 * x
    elif kind == "extreme":  # a few entries at +-1e4 per row
        hit = torch.rand(*shape, generator=gen, dtype=torch.float64) < 0.05
        sign = torch.where(torch.rand(*shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
        x = torch.where(hit, 1e4 * sign, 2 * x)
    elif kind == "onehot":  # near one-hot rows
        idx = torch.randint(0, shape[-1], shape[:-1], generator=gen)
        x = x + 40.0 * torch.nn.functional.one_hot(idx, shape[-1]).double()
    else:
        raise ValueError(kind)
    return x.to(dtype)


def make_case(seed, shape, kind="normal", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [make_logits(gen, shape, kind, dtype) for _ in range(4)]


def rand_mask(seed, shape, p=0.7):
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.rand(*shape, generator=gen) < p


def tol(dtype, kind):
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-9)
    if kind in ("extreme", "wide"):  # float32 sums over |log p| ~ 1e4 in the centring mean
        return dict(rtol=2e-3, atol=5e-3)
    return dict(rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------------------------
# pmi_target
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "beta,clip,center", [(1.0, 10.0, True), (0.5, 5.0, True), (2.0, None, False), (1.0, 0, True)]
)
def test_pmi_target_matches_reference(kind, dtype, beta, clip, center):
    _, T, R, B = make_case(0, (6, 97), kind, dtype)
    got = pmi_target(T, R, B, beta=beta, clip=clip, center=center)
    want = ref_target(T, R, B, beta=beta, clip=clip, center=center)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got.shape == T.shape
    # probabilities everywhere, log-probs where they are not astronomically small
    torch.testing.assert_close(got.double().exp(), want.exp(), **tol(dtype, kind))
    big = want > -50
    torch.testing.assert_close(got.double()[big], want[big], **tol(dtype, kind))


def test_pmi_target_bf16_inputs_give_float32():
    _, T, R, B = make_case(1, (4, 61), "normal", torch.bfloat16)
    got = pmi_target(T, R, B)
    assert got.dtype == torch.float32
    want = ref_target(T.double(), R.double(), B.double())  # same bf16 values, exact maths
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    beta=st.floats(0.3, 3.0),
    clip=st.sampled_from([None, 3.0, 10.0]),
    center=st.booleans(),
    scale=st.floats(0.01, 5.0),
)
def test_target_maximises_kl_regularised_reward(seed, beta, clip, center, scale):
    """Eq. 7: P_target = argmax_P E_P[delta~] - beta * KL(P || P0), with optimum beta * log Z."""
    gen = torch.Generator().manual_seed(seed)
    T, R, B = (make_logits(gen, (3, 41), "normal", torch.float64) for _ in range(3))
    log_target = pmi_target(T, R, B, beta=beta, clip=clip, center=center)
    delta = ref_delta_bar(T, R, center=center)
    reward = clip * torch.tanh(delta / clip) if clip else delta
    log_P0 = ref_log_softmax(B)

    def objective(logp):
        return (logp.exp() * reward).sum(-1) - beta * ref_kl(logp, log_P0)

    best = objective(log_target)
    log_Z = torch.logsumexp(log_P0 + reward / beta, -1)
    torch.testing.assert_close(best, beta * log_Z, rtol=1e-9, atol=1e-9)
    for _ in range(8):
        other = ref_log_softmax(log_target + scale * torch.randn(3, 41, generator=gen, dtype=torch.float64))
        assert torch.all(objective(other) <= best + 1e-9)
    assert torch.all(objective(log_P0) <= best + 1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["normal", "wide", "onehot"]))
def test_large_beta_gives_base(seed, kind):
    _, T, R, B = make_case(seed, (3, 53), kind, torch.float64)
    got = pmi_target(T, R, B, beta=1e9)
    torch.testing.assert_close(got.exp(), ref_log_softmax(B).exp(), rtol=0, atol=1e-7)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    kind=st.sampled_from(KINDS),
    clip=st.sampled_from([None, 10.0]),
    center=st.booleans(),
    beta=st.floats(0.2, 5.0),
)
def test_teacher_equal_ref_gives_base(seed, kind, clip, center, beta):
    _, T, _, B = make_case(seed, (3, 53), kind, torch.float32)
    got = pmi_target(T, T.clone(), B, beta=beta, clip=clip, center=center)
    torch.testing.assert_close(got.double().exp(), ref_log_softmax(B).exp(), rtol=0, atol=1e-6)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    shifts=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3),
    clip=st.sampled_from([None, 2.0, 10.0]),
    center=st.booleans(),
)
def test_constant_logit_shift_changes_nothing(seed, shifts, clip, center):
    _, T, R, B = make_case(seed, (3, 47), "normal", torch.float64)
    a, b, c = shifts
    got = pmi_target(T + a, R + b, B + c, clip=clip, center=center)
    want = pmi_target(T, R, B, clip=clip, center=center)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), eps=st.floats(1e-3, 0.1))
def test_clip_is_identity_for_small_delta_and_bounds_large(seed, eps):
    gen = torch.Generator().manual_seed(seed)
    T, B = (make_logits(gen, (3, 59), "normal", torch.float64) for _ in range(2))
    R = T + eps * torch.randn(3, 59, generator=gen, dtype=torch.float64)  # |delta_bar| << c
    clipped = pmi_target(T, R, B, clip=10.0)
    plain = pmi_target(T, R, B, clip=None)
    # |x - c tanh(x/c)| <= |x|^3 / (3 c^2), and |x| <= ~8 eps here
    torch.testing.assert_close(clipped, plain, rtol=0, atol=2 * (8 * eps) ** 3 / 300 + 1e-12)
    # large residuals: the correction log P_target - log P0 spans at most 2c / beta
    R_far = make_logits(gen, (3, 59), "wide", torch.float64) * 5
    for beta in (0.5, 1.0):
        corr = pmi_target(T, R_far, B, clip=10.0, beta=beta) - ref_log_softmax(B)
        assert torch.all(corr.amax(-1) - corr.amin(-1) <= 2 * 10.0 / beta + 1e-9)
        unclipped = pmi_target(T, R_far, B, clip=None, beta=beta) - ref_log_softmax(B)
        assert torch.all(unclipped.amax(-1) - unclipped.amin(-1) > 2 * 10.0 / beta)


# ----------------------------------------------------------------------------------------------
# generalized_jsd
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generalized_jsd_matches_reference(kind, lam, dtype):
    S, T, R, B = make_case(2, (2, 5, 83), kind, dtype)
    mask = rand_mask(2, (2, 5))
    target = ref_target(T, R, B).to(dtype)
    S.requires_grad_(True)
    got = generalized_jsd(S, target, mask, lam=lam)
    got.backward()
    S64 = S.detach().double().requires_grad_(True)
    want, _, _ = ref_loss(S64, T, R, B, mask, lam=lam)
    want.backward()
    t = tol(dtype, kind)
    torch.testing.assert_close(got.double(), want.detach(), **t)
    torch.testing.assert_close(S.grad.double(), S64.grad, rtol=t["rtol"], atol=t["atol"] / 10)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_jsd_end_points_are_plain_kls(lam):
    S, T, _, _ = make_case(3, (7, 67), "wide", torch.float64)
    log_t = ref_log_softmax(T)
    got = generalized_jsd(S, log_t, lam=lam)
    kl = ref_kl(log_t, ref_log_softmax(S)) if lam == 0 else ref_kl(ref_log_softmax(S), log_t)
    torch.testing.assert_close(got, kl.mean(), rtol=1e-10, atol=1e-12)
    loss, metrics = opsd_loss(S, FrozenVariants(T), mode="standard", lam=lam, chunk_size=3)
    torch.testing.assert_close(loss, kl.mean(), rtol=1e-10, atol=1e-12)
    # the interior is a different quantity: JSD_lam -> 0 as lam -> 0 or 1
    near = generalized_jsd(S, log_t, lam=1e-9 if lam == 0 else 1 - 1e-9)
    assert near < 1e-6 < kl.mean()


def test_generalized_jsd_gradcheck():
    gen = torch.Generator().manual_seed(4)
    S = make_logits(gen, (2, 3, 11), "normal", torch.float64)
    S[..., 4] = -math.inf  # padding column, also in the target
    log_t = ref_log_softmax(make_logits(gen, (2, 3, 11), "normal", torch.float64))
    log_t[..., 4] = -math.inf
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for lam in (0.0, 0.3, 1.0):
        S_ = S.clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda s, lam=lam: generalized_jsd(s, log_t, mask, lam=lam), (S_,))


def test_target_gets_no_gradient():
    S, T, _, _ = make_case(5, (4, 37), "normal")
    S.requires_grad_(True)
    target = ref_log_softmax(T).float().requires_grad_(True)
    generalized_jsd(S, target).backward()
    assert target.grad is None and S.grad is not None
    T.requires_grad_(True)
    assert pmi_target(T, T, T).grad_fn is None  # the target is a constant for the student


# ----------------------------------------------------------------------------------------------
# opsd_loss (fused, chunked)
# ----------------------------------------------------------------------------------------------


CONFIGS = [
    dict(mode="pmi"),
    dict(mode="pmi", lam=0.0, beta=0.5, clip=5.0),
    dict(mode="pmi", lam=1.0, center=False, clip=None, temperature=0.7),
    dict(mode="pmi", lam=0.2, beta=2.0, temperature=1.5),
    dict(mode="standard"),
    dict(mode="standard", lam=0.8, temperature=2.0),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opsd_loss_matches_reference(kind, cfg, dtype):
    S, T, R, B = make_case(6, (3, 7, 89), kind, dtype)
    mask = rand_mask(6, (3, 7))
    S.requires_grad_(True)
    loss, metrics = opsd_loss(S, FrozenVariants(T, R, B), mask, chunk_size=4, diagnostics=True, **cfg)
    loss.backward()
    S64 = S.detach().double().requires_grad_(True)
    want, log_t, keep = ref_loss(S64, T, R, B, mask, **cfg)
    want.backward()
    t = tol(dtype, kind)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), want.detach(), **t)
    torch.testing.assert_close(S.grad.double(), S64.grad, rtol=t["rtol"], atol=t["atol"] / 10)

    # metrics: per-token means over unmasked tokens
    temp = cfg.get("temperature", 1.0)
    V = S.shape[-1]
    log_s = ref_log_softmax(S64.detach().reshape(-1, V) / temp)[keep]
    log_t = log_t[keep]
    log_P0 = ref_log_softmax(B.reshape(-1, V).double() / temp)[keep]
    want_metrics = {
        "jsd": ref_jsd(log_s, log_t, cfg.get("lam", 0.5)).mean(),
        "student_entropy": -ref_kl(log_s, torch.zeros_like(log_s)).mean(),
        "target_entropy": -ref_kl(log_t, torch.zeros_like(log_t)).mean(),
        "kl_target_base": ref_kl(log_t, log_P0).mean(),
        "top1_agree": (log_s.argmax(-1) == log_t.argmax(-1)).double().mean(),
        "num_tokens": keep.sum().double(),
    }
    rows = ref_decomposition_rows(*(x.reshape(-1, V).double()[keep] / temp for x in (S.detach(), T, R)))
    want_metrics.update(zip(DECOMPOSITION_KEYS, rows.mean(0), strict=True))
    if cfg["mode"] == "pmi" and cfg.get("clip", 10.0):
        clip = cfg.get("clip", 10.0)
        delta_bar = ref_delta_bar(
            T.reshape(-1, V) / temp, R.reshape(-1, V) / temp, center=cfg.get("center", True)
        )
        want_metrics["clip_active_frac"] = (delta_bar[keep].abs() > clip / 2).double().mean()
    else:
        assert "clip_active_frac" not in metrics
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        assert isinstance(metrics[name], float)
        t_m = dict(rtol=1e-3, atol=1e-3) if name.startswith(("cos", "norm")) and kind == "extreme" else t
        torch.testing.assert_close(torch.tensor(metrics[name], dtype=torch.float64), value, **t_m, msg=name)


def test_opsd_loss_gradcheck_logits_and_hidden():
    gen = torch.Generator().manual_seed(7)
    S, T, R, B = (make_logits(gen, (5, 13), "normal", torch.float64) for _ in range(4))
    mask = torch.tensor([True, True, False, True, True])
    for lam in (0.0, 0.4, 1.0):

        def f(s, lam=lam):
            return opsd_loss(s, FrozenVariants(T, R, B), mask, lam=lam, temperature=1.3, chunk_size=2)[0]

        assert torch.autograd.gradcheck(f, (S.clone().requires_grad_(True),))
    H, W = (
        make_logits(gen, (5, 6), "normal", torch.float64),
        make_logits(gen, (13, 6), "normal", torch.float64),
    )
    frozen_h = FrozenVariants(*(make_logits(gen, (5, 6), "normal", torch.float64) for _ in range(3)))

    def g(h, w):
        return opsd_loss(h, frozen_h, mask, lm_head=w, frozen_lm_head=W, chunk_size=3, normalizer=7.0)[0]

    assert torch.autograd.gradcheck(g, (H.clone().requires_grad_(True), W.clone().requires_grad_(True)))


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 3),
    length=st.integers(1, 9),
    chunk=st.integers(1, 12),
    lam=st.sampled_from([0.0, 0.5, 0.7, 1.0]),
    mode=st.sampled_from(["pmi", "standard"]),
    p_mask=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_chunked_equals_unchunked(seed, batch, length, chunk, lam, mode, p_mask):
    S, T, R, B = make_case(seed, (batch, length, 71), "normal", torch.float32)
    mask = rand_mask(seed, (batch, length), p_mask)
    S1 = S.clone().requires_grad_(True)
    target = pmi_target(T, R, B) if mode == "pmi" else torch.log_softmax(T, -1)
    want = generalized_jsd(S1, target, mask, lam=lam)
    want.backward()
    S2 = S.clone().requires_grad_(True)
    got, metrics = opsd_loss(S2, FrozenVariants(T, R, B), mask, mode=mode, lam=lam, chunk_size=chunk)
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(S2.grad, S1.grad, rtol=1e-4, atol=1e-7)
    assert metrics["num_tokens"] == int(mask.sum())


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    chunk=st.integers(1, 8),
    lam=st.sampled_from([0.0, 0.5, 1.0]),
    train_head=st.booleans(),
)
def test_hidden_states_with_lm_head_equal_logits(seed, chunk, lam, train_head):
    gen = torch.Generator().manual_seed(seed)
    N, H, V = 7, 16, 61
    W = make_logits(gen, (V, H), "normal", torch.float32) / 4
    h_s, h_T, h_R, h_B = (make_logits(gen, (N, H), "normal", torch.float32) for _ in range(4))
    mask = rand_mask(seed, (N,))
    # logits path, autograd through h @ W^T
    h1, W1 = h_s.clone().requires_grad_(True), W.clone().requires_grad_(train_head)
    frozen_logits = FrozenVariants(*(x @ W.T for x in (h_T, h_R, h_B)))
    want, want_m = opsd_loss(h1 @ W1.T, frozen_logits, mask, lam=lam, chunk_size=chunk)
    want.backward()
    # hidden path with a weight, and with a frozen callable head for the frozen variants
    h2, W2 = h_s.clone().requires_grad_(True), W.clone().requires_grad_(train_head)
    got, got_m = opsd_loss(
        h2,
        FrozenVariants(h_T, h_R, h_B),
        mask,
        lam=lam,
        chunk_size=chunk,
        lm_head=W2,
        frozen_lm_head=lambda x: x @ W.T,
    )
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    if train_head:
        torch.testing.assert_close(W2.grad, W1.grad, rtol=1e-4, atol=1e-6)
    assert got_m.keys() == want_m.keys()
    # a frozen callable student head: gradient to the hidden states only
    h3 = h_s.clone().requires_grad_(True)
    head = torch.nn.Linear(H, V, bias=False)
    head.weight.data.copy_(W)
    head.requires_grad_(False)
    got3, _ = opsd_loss(h3, frozen_logits, mask, lam=lam, chunk_size=chunk, lm_head=head)
    got3.backward()
    torch.testing.assert_close(got3, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h3.grad, h1.grad, rtol=1e-4, atol=1e-6)


def test_trainable_callable_head_is_refused():
    S = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        opsd_loss(S, FrozenVariants(*torch.randn(3, 3, 5)), lm_head=torch.nn.Linear(8, 5))


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    mode=st.sampled_from(["pmi", "standard"]),
    lam=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_bf16_inputs_close_to_float32(seed, mode, lam):
    S, T, R, B = make_case(seed, (2, 6, 101), "normal", torch.float32)
    mask = rand_mask(seed, (2, 6))
    bf = [x.bfloat16() for x in (S, T, R, B)]
    Sb = bf[0].clone().requires_grad_(True)
    got, got_m = opsd_loss(Sb, FrozenVariants(*bf[1:]), mask, mode=mode, lam=lam, chunk_size=5)
    got.backward()
    assert got.dtype == torch.float32 and Sb.grad.dtype == torch.bfloat16
    # the same bf16 values in float32: identical maths up to float rounding
    Sf = bf[0].float().requires_grad_(True)
    same, same_m = opsd_loss(Sf, FrozenVariants(*(x.float() for x in bf[1:])), mask, mode=mode, lam=lam)
    same.backward()
    torch.testing.assert_close(got, same, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(Sb.grad.float(), Sf.grad, rtol=1e-2, atol=1e-5)  # grad stored in bf16
    # and close to the float32 original (bf16 rounding of logits ~ 2e-2 absolute at scale 2)
    orig, _ = opsd_loss(S, FrozenVariants(T, R, B), mask, mode=mode, lam=lam)
    torch.testing.assert_close(got, orig, rtol=0.05, atol=0.05)


def test_frozen_inputs_get_no_gradient():
    S, T, R, B = make_case(8, (5, 43), "normal")
    for x in (S, T, R, B):
        x.requires_grad_(True)
    loss, _ = opsd_loss(S, FrozenVariants(T, R, B), chunk_size=2)
    loss.backward()
    assert S.grad is not None and torch.any(S.grad != 0)
    assert T.grad is None and R.grad is None and B.grad is None
    # frozen hidden states and frozen head with requires_grad: still nothing
    hT, hR, hB = (torch.randn(5, 6, requires_grad=True) for _ in range(3))
    Wf = torch.randn(43, 6, requires_grad=True)
    loss, _ = opsd_loss(S, FrozenVariants(hT, hR, hB), frozen_lm_head=Wf)
    loss.backward()
    assert all(x.grad is None for x in (hT, hR, hB, Wf))


def test_normalizer_sums_micro_batches():
    S, T, R, B = make_case(9, (4, 6, 59), "normal")
    mask = rand_mask(9, (4, 6))
    n_total = int(mask.sum())
    S_full = S.clone().requires_grad_(True)
    full, _ = opsd_loss(S_full, FrozenVariants(T, R, B), mask)
    full.backward()
    S_parts = S.clone().requires_grad_(True)
    total = 0.0
    for part in (slice(0, 1), slice(1, 4)):
        loss, metrics = opsd_loss(
            S_parts[part], FrozenVariants(T[part], R[part], B[part]), mask[part], normalizer=n_total
        )
        loss.backward()
        total += loss.item()
        assert metrics["num_tokens"] == int(mask[part].sum())
    assert total == pytest.approx(full.item(), rel=1e-5)
    torch.testing.assert_close(S_parts.grad, S_full.grad, rtol=1e-5, atol=1e-8)


def test_backward_scales_with_grad_output_and_no_grad_mode():
    S, T, R, B = make_case(10, (6, 31), "normal")
    S1 = S.clone().requires_grad_(True)
    loss, _ = opsd_loss(S1, FrozenVariants(T, R, B))
    loss.backward()
    S2 = S.clone().requires_grad_(True)
    loss2, _ = opsd_loss(S2, FrozenVariants(T, R, B))
    (3.0 * loss2).backward()
    torch.testing.assert_close(S2.grad, 3.0 * S1.grad)
    with torch.no_grad():
        l3, m3 = opsd_loss(S2, FrozenVariants(T, R, B))
    assert not l3.requires_grad and l3.item() == pytest.approx(loss.item(), rel=1e-6)


def test_all_masked():
    S, T, R, B = make_case(11, (2, 3, 29), "normal")
    mask = torch.zeros(2, 3, dtype=torch.bool)
    S1 = S.clone().requires_grad_(True)
    jsd = generalized_jsd(S1, ref_log_softmax(T).float(), mask)
    jsd.backward()
    assert jsd.item() == 0.0 and torch.all(S1.grad == 0)
    S2 = S.clone().requires_grad_(True)
    loss, metrics = opsd_loss(S2, FrozenVariants(T, R, B), mask, diagnostics=True)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(S2.grad == 0)
    assert metrics["num_tokens"] == 0.0 and metrics["jsd"] == 0.0
    assert all(math.isfinite(v) for v in metrics.values())
    assert decomposition(S, T, R, mask) == dict.fromkeys(DECOMPOSITION_KEYS, 0.0)


# ----------------------------------------------------------------------------------------------
# -inf padding and extreme logits
# ----------------------------------------------------------------------------------------------


def pad_columns(xs, cols):
    out = []
    for x in xs:
        x = x.detach().clone()
        x[..., cols] = -math.inf
        out.append(x)
    return out


@pytest.mark.parametrize("kind", ["normal", "extreme", "onehot"])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_padding_equals_removing_the_columns(kind, lam):
    S, T, R, B = make_case(12, (2, 5, 40), kind, torch.float32)
    pad = [0, 7, 8, 39]
    keep = [c for c in range(40) if c not in pad]
    Sp, Tp, Rp, Bp = pad_columns((S, T, R, B), pad)
    Ss, Ts, Rs, Bs = (x[..., keep] for x in (S, T, R, B))
    mask = rand_mask(12, (2, 5))
    t = tol(torch.float32, kind)

    target_p = pmi_target(Tp, Rp, Bp)
    assert torch.all(target_p[..., pad] == -math.inf) and not torch.isnan(target_p).any()
    torch.testing.assert_close(target_p[..., keep], pmi_target(Ts, Rs, Bs), **t)

    for fn in ("jsd", "fused"):
        a, b = Sp.clone().requires_grad_(True), Ss.clone().requires_grad_(True)
        if fn == "jsd":
            la, lb = (
                generalized_jsd(a, target_p, mask, lam=lam),
                generalized_jsd(b, pmi_target(Ts, Rs, Bs), mask, lam=lam),
            )
            ma = mb = {}
        else:
            la, ma = opsd_loss(a, FrozenVariants(Tp, Rp, Bp), mask, lam=lam, chunk_size=3, diagnostics=True)
            lb, mb = opsd_loss(b, FrozenVariants(Ts, Rs, Bs), mask, lam=lam, chunk_size=3, diagnostics=True)
        (la + 0 * a.sum().detach()).backward()
        lb.backward()
        assert torch.isfinite(la) and torch.isfinite(a.grad).all()
        torch.testing.assert_close(la, lb, **t)
        torch.testing.assert_close(a.grad[..., keep], b.grad, rtol=t["rtol"], atol=t["atol"] / 10)
        assert torch.all(a.grad[..., pad] == 0)
        for k in mb:
            assert ma[k] == pytest.approx(mb[k], rel=1e-3, abs=1e-3), k
    got, want = decomposition(Sp, Tp, Rp, mask), decomposition(Ss, Ts, Rs, mask)
    for k in DECOMPOSITION_KEYS:
        assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-4)


def test_mismatched_padding_saturates_under_clipping():
    _, T, R, B = make_case(13, (3, 30), "normal", torch.float64)
    T[:, 3] = -math.inf  # teacher rules out an entry the reference probe allows
    R[:, 5] = -math.inf  # and the other way round
    got = pmi_target(T, R, B, clip=10.0)
    assert torch.isfinite(got).all()
    keep = [c for c in range(30) if c not in (3, 5)]
    delta = ref_log_softmax(T[:, keep]) - ref_log_softmax(R[:, keep])
    delta = 10 * torch.tanh((delta - delta.mean(-1, keepdim=True)) / 10)
    corr = got - ref_log_softmax(B)
    shift = (corr[:, keep] - delta).mean(-1, keepdim=True)  # the log Z offset
    torch.testing.assert_close(corr[:, keep] - shift, delta, rtol=0, atol=1e-9)
    torch.testing.assert_close(corr[:, 3:4] - shift, torch.full((3, 1), -10.0, dtype=torch.float64))
    torch.testing.assert_close(corr[:, 5:6] - shift, torch.full((3, 1), 10.0, dtype=torch.float64))
    S = torch.randn(3, 30, dtype=torch.float64, requires_grad=True)
    loss, metrics = opsd_loss(S, FrozenVariants(T, R, B))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(S.grad).all()


def test_extreme_logits_stay_finite():
    S, T, R, B = make_case(14, (4, 8, 50), "extreme", torch.bfloat16)
    S[0, 0] = 1e4  # constant row
    T[1, 1] = -1e4
    S.requires_grad_(True)
    for lam in (0.0, 0.5, 1.0):
        loss, metrics = opsd_loss(S, FrozenVariants(T, R, B), lam=lam, diagnostics=True)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(S.grad.float()).all()
        assert all(math.isfinite(v) for v in metrics.values())
        S.grad = None


# ----------------------------------------------------------------------------------------------
# decomposition
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_decomposition_matches_reference(kind):
    S, T, R, _ = make_case(15, (3, 4, 73), kind, torch.float32)
    mask = rand_mask(15, (3, 4))
    got = decomposition(S, T, R, mask, chunk_size=5)
    rows = ref_decomposition_rows(*(x[mask] for x in (S, T, R)))
    for key, want in zip(DECOMPOSITION_KEYS, rows.mean(0), strict=True):
        assert got[key] == pytest.approx(want.item(), rel=1e-4, abs=1e-4), key


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["normal", "wide", "onehot"]))
def test_decomposition_identity(seed, kind):
    """delta_total = delta_ref + delta_it: <t, r> + <t, i> = |t|^2 at every position."""
    S, T, R, _ = make_case(seed, (1, 67), kind, torch.float64)
    d = decomposition(S, T, R)
    lhs = d["cos_total_ref"] * d["norm_frac_ref"] + d["cos_total_it"] * d["norm_frac_it"]
    assert lhs == pytest.approx(1.0, abs=1e-9)
    assert d["norm_frac_ref"] + d["norm_frac_it"] >= 1 - 1e-9  # triangle inequality
    assert -1 - 1e-12 <= d["cos_total_ref"] <= 1 + 1e-12
    # student == teacher: delta_it = -delta_ref, so cos(total, .) is 0 by the norm clamp
    same = decomposition(T, T, R)
    assert same["norm_frac_ref"] > 1e6 and abs(same["cos_total_it"]) < 1e-9


def test_argument_errors():
    S, T, R, B = make_case(16, (3, 11), "normal")
    with pytest.raises(ValueError, match="mode"):
        opsd_loss(S, FrozenVariants(T, R, B), mode="pmi2")
    with pytest.raises(ValueError, match="lam"):
        opsd_loss(S, FrozenVariants(T, R, B), lam=1.5)
    with pytest.raises(ValueError, match="ref"):
        opsd_loss(S, FrozenVariants(T))
    with pytest.raises(ValueError, match="beta"):
        pmi_target(T, R, B, beta=0.0)
    with pytest.raises(ValueError, match="mask"):
        opsd_loss(S, FrozenVariants(T, R, B), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="normalizer"):
        opsd_loss(S, FrozenVariants(T, R, B), normalizer=0)
    loss, metrics = opsd_loss(S, (T, None, None), mode="standard")  # plain tuples work too
    assert "kl_target_base" not in metrics and "clip_active_frac" not in metrics


def test_default_chunk_size_bounds_the_chunk_buffer():
    from opsd_ray.objective.formulas import default_chunk_size

    for vocab in (37, 4096, 49_152, 151_936, 262_144):
        cpu, gpu = default_chunk_size(vocab, "cpu"), default_chunk_size(vocab, "cuda")
        assert 32 <= cpu <= gpu <= 4096
        assert cpu == 32 or cpu * vocab * 4 <= 64 * 2**20  # one float32 [chunk, V] buffer
        assert gpu == 32 or gpu * vocab * 4 <= 256 * 2**20


def test_the_sync_check_stops_an_engine_that_serves_the_base_model():
    """judge(): the engine's probe near the learner's passes; near the base (the adapter plainly moves the
    probe beyond the two stacks' noise) stops the run; within the noise nothing is judged."""
    from opsd_ray.common import RunStopped
    from opsd_ray.run.sync_check import judge

    base = [-1.0, -2.0, -0.5]
    trained = [-0.8, -2.3, -0.4]  # the adapter moves the probe by up to 0.3
    learner = {"adapter": trained, "base": base, "version": 7}
    noisy = [x + 0.01 for x in trained]
    ok = judge({"adapter": noisy, "base": [x + 0.01 for x in base], "version": 7}, learner)
    assert ok["sync/max_abs_logprob_diff"] == pytest.approx(0.01) and ok["sync/max_abs_adapter_effect"] == pytest.approx(0.3)
    with pytest.raises(RunStopped, match="not serving the trained adapter"):
        judge({"adapter": [x + 0.01 for x in base], "base": [x + 0.01 for x in base], "version": 7}, learner)
    loud = judge({"adapter": base, "base": [x + 0.1 for x in base], "version": 7}, learner)  # noise 0.1: no verdict
    assert loud["sync/max_abs_base_diff"] == pytest.approx(0.1)


def test_a_new_objective_is_one_registry_entry_and_trains_a_step(tmp_path, small_data):
    """An objective registered here (nowhere else in the package) is a valid objective.mode, scores only
    the variants it names, and trains a tiny step on the in-process groups; its loss is its own."""
    from opsd_ray.config.recipes import load_train_config
    from opsd_ray.data.sources import PromptSampler, load_examples
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.objective.registry import OBJECTIVES, Objective, register
    from opsd_ray.run.driver import step_once
    from opsd_ray.run.groups import Groups
    from opsd_ray.workers.engines import adapter_config

    def halfway(log_T, log_ref, log_P0, o, padded, stats):
        """The geometric mean of teacher and base, renormalised."""
        return torch.log_softmax(0.5 * log_T + 0.5 * log_P0, dim=-1)

    register(Objective("halfway", "OPSD-Halfway", ("teacher", "base"), halfway, lambda o: "halfway to the base"))
    try:
        losses = {}
        for mode in ("halfway", "standard"):
            cfg = load_train_config(["model=tiny", "data=gsm8k", f"data.path={small_data}", f"run.output_dir={tmp_path}",
                                     f"objective.mode={mode}", "train.batch_size=2", "learner.micro_batch_size=2",
                                     "rollout.max_new_tokens=6", "rollout.engine=hf", "train.diagnostics_every=0"])
            assert OBJECTIVES[mode].step_variants(False) == (("teacher", "base") if mode == "halfway" else ("teacher",))
            groups = Groups.in_process(cfg, "hf", threads=1)
            groups.sync(adapter_config(cfg))
            tok = load_tokenizer(cfg.model)
            record = step_once(cfg, groups, PromptSampler(load_examples(cfg.data)[0], 2), tok, 1, 0)
            assert math.isfinite(record["loss"]) and record["adapter_version"] == 1
            losses[mode] = record
        assert "kl_target_base" in losses["halfway"] and "kl_target_base" not in losses["standard"]
        assert losses["halfway"]["loss"] != losses["standard"]["loss"]  # the same trajectories, another target
        assert losses["halfway"]["response_length"] == losses["standard"]["response_length"]
    finally:
        OBJECTIVES.pop("halfway")
