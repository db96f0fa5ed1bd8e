"""The maths of OPSD with the purified PMI target (paper Sec. 2.4 and 3, Eq. 4-18).

Pure torch: no Ray, no I/O, no model loading. Notation follows the paper:

* pi_theta student (trainable), pi_T teacher (q + reference), pi_ref reference probe (reference
  only), P0 base (q only); all over the full vocabulary V at the same response position.
* delta_it = log pi_T - log pi_ref (Eq. 13), centred by its vocabulary mean (Eq. 14), soft-clipped
  c * tanh(. / c) (Eq. 15); log P_target = log_softmax(log P0 + delta~ / beta) (Eq. 16-17).
* loss: generalized JSD_lam between pi_theta and the target, averaged over response tokens
  (Eq. 18), TRL/GKD convention: M = lam * target + (1 - lam) * pi_theta,
  JSD_lam = lam * KL(target || M) + (1 - lam) * KL(pi_theta || M); the end points are the plain
  KLs: lam = 0 -> KL(target || pi_theta) (forward), lam = 1 -> KL(pi_theta || target) (reverse).
  (The weighted JSD itself tends to 0 at both ends; the end points are a convention, as in TRL.)

Numerics: inputs may be bf16; every softmax and reduction runs in float32 (float64 when the inputs
are float64, so that gradcheck works).

-inf convention (vocabulary padding, the same entries in every variant): after each log-softmax,
-inf is replaced by NEG = -1e30, so all arithmetic stays finite and NaN-free in values and
gradients. A padding entry has probability exactly 0, so
  * it adds exactly 0 to every KL / entropy sum and gets a zero gradient (0 * finite = 0);
  * its delta_it is exactly 0 (NEG - NEG) and it is left out of the centring mean, which runs over
    the entries that are finite in both pi_T and pi_ref; P_target is 0 there because P0 is;
  * in the decomposition its three deltas are 0, so it is left out of dot products and norms.
So every result equals the same computation with the padding columns removed. An entry that is
-inf in only some variants behaves like a logit of -1e30 (KLs that are mathematically infinite
come out around 1e30; in delta_it it is still left out of the mean and saturates to +-c under
clipping). public pmi_target() returns -inf (not NEG) where P_target is 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DECOMPOSITION_KEYS",
    "default_chunk_size",
    "FrozenVariants",
    "decomposition",
    "generalized_jsd",
    "opsd_loss",
    "pmi_target",
]

NEG = -1e30  # finite stand-in for -inf log-probabilities (see the module docstring)
DECOMPOSITION_KEYS = ("cos_total_ref", "cos_total_it", "norm_frac_ref", "norm_frac_it")
_NORM_EPS = 1e-12  # norms below this are clamped (like F.cosine_similarity's eps)


class FrozenVariants(NamedTuple):
    """The three frozen-model variants, read at the same positions as the student.

    Logits [..., V], or final hidden states [..., H] when `opsd_loss(frozen_lm_head=...)` is given.
    `ref` and `base` may be None for mode="standard" (base then only feeds a metric).
    """

    teacher: Tensor
    ref: Tensor | None = None
    base: Tensor | None = None


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _has_padding(*xs: Tensor | None) -> bool:
    """Whether any of these logit / log-prob tensors holds padding (-inf or NEG entries).

    One cheap reduction per tensor and one host sync; lets the common case skip every
    clamp and padding mask.
    """
    mins = [x.detach().amin().float() for x in xs if x is not None and x.numel()]
    return bool(mins) and bool(torch.stack(mins).amin() <= NEG / 2)


def _log_softmax(logits: Tensor, temperature: float = 1.0, padded: bool = True) -> Tensor:
    """log_softmax in float32 (or float64); with `padded`, -inf is replaced by NEG."""
    x = logits.to(_compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    out = F.log_softmax(x, dim=-1)
    if not padded:
        return out
    # in place where autograd does not need the output (the fused loss runs under no_grad)
    return out.clamp_min(NEG) if out.requires_grad else out.clamp_min_(NEG)


def _vecdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a * b per row. (torch.sum's cascade summation: a BLAS dot via bmm is faster but
    ~3e-4 relative off in float32 at V = 152k.)"""
    return (a * b).sum(-1)


def _kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probs (autograd path; NEG entries give exactly 0)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _jsd_rows(log_s: Tensor, log_t: Tensor, lam: float) -> Tensor:
    """Per-row generalized JSD_lam(student, target) from log-probs (autograd path)."""
    if lam == 0.0:
        return _kl_rows(log_t, log_s)  # forward KL(target || student)
    if lam == 1.0:
        return _kl_rows(log_s, log_t)  # reverse KL(student || target)
    log_m = torch.logaddexp(log_t + math.log(lam), log_s + math.log1p(-lam))
    return lam * _kl_rows(log_t, log_m) + (1.0 - lam) * _kl_rows(log_s, log_m)


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (JSD mixture weight) must be in [0, 1], got {lam}")


def _flat_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """mask [...] matching x [..., V] -> flat bool [N] (None stays None)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match inputs {tuple(x.shape[:-1])}")
    return mask.reshape(-1).to(device=x.device, dtype=torch.bool)


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """[..., V] -> [n, V]: the unmasked positions only."""
    x2 = x.reshape(-1, x.shape[-1])
    flat = _flat_mask(mask, x)
    return x2 if flat is None else x2[flat]


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk when chunk_size=None: about 64 MiB per float32 [chunk, V] buffer on CPU
    (110 rows at V = 152k) and 256 MiB on accelerators (441 rows). Each chunk runs ~60 tensor ops,
    so chunks should be large enough that per-op costs (kernel launches, thread hand-offs on a busy
    CPU) stay small; the loss keeps about eight such buffers alive, plus the student's gradient."""
    budget = 2**24 if torch.device(device).type == "cpu" else 2**26  # float32 elements
    return int(min(4096, max(32, budget // max(vocab_size, 1))))


def _row_slices(mask_flat: Tensor | None, n_rows: int, chunk_size: int) -> list[tuple[int, int]]:
    """Row ranges [start, end) covering the unmasked rows, each at most chunk_size long.

    Chunks follow the contiguous runs of the mask (one per response, typically), so every chunk
    is a view: no gather copies of [chunk, V] rows and no scatter for the gradient.
    """
    if mask_flat is None:
        runs = [(0, n_rows)]
    else:
        m = mask_flat.to("cpu", torch.int8)
        edges = torch.diff(m, prepend=m.new_zeros(1), append=m.new_zeros(1))
        runs = zip(
            (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist(), strict=True
        )
    return [(s, min(s + chunk_size, end)) for start, end in runs for s in range(start, end, chunk_size)]


# ----------------------------------------------------------------------------------------------
# the PMI target (Eq. 13-17)
# ----------------------------------------------------------------------------------------------


def _pmi_from_logprobs(log_pi_T, log_pi_ref, log_P0, *, beta, clip, center, padded, stats=None) -> Tensor:
    """log P_target from the three (NEG-sanitised) log-softmaxes; run under no_grad.

    If `stats` is a dict it receives "clip_active" [n]: per row, the share of non-padding entries
    with |centred delta_it| > clip / 2.
    """
    if beta <= 0:
        raise ValueError(f"beta (PMI correction strength) must be > 0, got {beta}")
    delta = log_pi_T - log_pi_ref  # Eq. 13; exactly 0 where both are padding (NEG - NEG)
    pad = ((log_pi_T <= NEG / 2) | (log_pi_ref <= NEG / 2)) if padded else None
    if center:  # Eq. 14, the mean over non-padding entries
        if pad is None:
            delta.sub_(delta.mean(-1, keepdim=True))
        else:
            count = (~pad).sum(-1, keepdim=True).clamp_min(1)
            delta.sub_(delta.masked_fill(pad, 0.0).sum(-1, keepdim=True) / count)
    if stats is not None and clip:
        if pad is None:  # share of |delta| > c/2 as the mean of sign(|delta| - c/2): no bool reductions
            stats["clip_active"] = 0.5 + 0.5 * delta.abs().sub_(clip / 2).sign_().mean(-1)
        else:
            active = (delta.abs() > clip / 2) & ~pad
            stats["clip_active"] = active.sum(-1) / (~pad).sum(-1).clamp_min(1)
    if clip:  # Eq. 15, c * tanh(delta / c); None or 0 disables
        delta.div_(clip).tanh_().mul_(clip)
    if beta != 1.0:
        delta.div_(beta)
    return _log_softmax(delta.add_(log_P0), padded=padded)  # Eq. 16-17


def pmi_target(
    teacher_logits: Tensor,
    ref_logits: Tensor,
    base_logits: Tensor,
    *,
    beta: float = 1.0,
    clip: float | None = 10.0,
    center: bool = True,
) -> Tensor:
    """log P_target over the last dim (Eq. 13-17), float32 (float64 for float64 inputs).

    log P_target = log_softmax(log P0 + c * tanh(centre(log pi_T - log pi_ref) / c) / beta).
    beta: correction strength (paper: 1; larger = closer to P0); clip: soft-clip threshold c
    (paper: 10; None or 0 disables); center: subtract delta_it's vocabulary mean (paper: on).
    The target is a constant for the student: no autograd graph is built. Returns -inf where
    P_target is 0 (padding).
    """
    with torch.no_grad():
        padded = _has_padding(teacher_logits, ref_logits, base_logits)
        out = _pmi_from_logprobs(
            *(_log_softmax(x, padded=padded) for x in (teacher_logits, ref_logits, base_logits)),
            beta=beta,
            clip=clip,
            center=center,
            padded=padded,
        )
        return out.masked_fill_(out <= NEG / 2, -math.inf) if padded else out


# ----------------------------------------------------------------------------------------------
# the unchunked loss (plain autograd; the reference the fused loss must match)
# ----------------------------------------------------------------------------------------------


def generalized_jsd(
    student_logits: Tensor,
    target_logprobs: Tensor,
    mask: Tensor | None = None,
    *,
    lam: float = 0.5,
) -> Tensor:
    """Mean over unmasked positions of JSD_lam(pi_theta, target) (Eq. 18); a scalar.

    student_logits [..., V]; target_logprobs [..., V] (e.g. pmi_target(...), may hold -inf);
    mask [...] (True = response token). The target is detached: gradient reaches the student
    only. With nothing unmasked the result is 0 and still differentiable (zero gradient).
    """
    _check_lam(lam)
    student_logits, target_logprobs = _rows(student_logits, mask), _rows(target_logprobs.detach(), mask)
    padded = _has_padding(student_logits, target_logprobs)
    log_s = _log_softmax(student_logits, padded=padded)
    log_t = target_logprobs.to(log_s.dtype)
    log_t = log_t.clamp_min(NEG) if padded else log_t
    per_token = _jsd_rows(log_s, log_t, lam)
    return per_token.sum() / max(per_token.numel(), 1)


# ----------------------------------------------------------------------------------------------
# decomposition diagnostics (Eq. 4)
# ----------------------------------------------------------------------------------------------


def _decomposition_rows(log_s: Tensor, log_T: Tensor, log_ref: Tensor, padded: bool) -> Tensor:
    """Per row: [cos(total, ref), cos(total, it), |ref|/|total|, |it|/|total|], shape [n, 4]."""
    d_total = log_T - log_s  # = d_ref + d_it
    d_ref = log_ref - log_s
    d_it = log_T - log_ref
    if padded:  # leave entries that are padding anywhere out
        pad = (log_s <= NEG / 2) | (log_T <= NEG / 2) | (log_ref <= NEG / 2)
        d_total, d_ref, d_it = (d.masked_fill_(pad, 0.0) for d in (d_total, d_ref, d_it))
    n_total, n_ref, n_it = (d.norm(dim=-1).clamp_min(_NORM_EPS) for d in (d_total, d_ref, d_it))
    return torch.stack(
        [
            _vecdot(d_total, d_ref) / (n_total * n_ref),
            _vecdot(d_total, d_it) / (n_total * n_it),
            n_ref / n_total,
            n_it / n_total,
        ],
        dim=-1,
    )


@torch.no_grad()
def decomposition(
    student_logits: Tensor,
    teacher_logits: Tensor,
    ref_logits: Tensor,
    mask: Tensor | None = None,
    *,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Eq. 4: delta_total = log pi_T - log pi_theta = delta_ref + delta_it, per position over V.

    Returns the means over unmasked positions of cos(delta_total, delta_ref),
    cos(delta_total, delta_it), |delta_ref|/|delta_total| and |delta_it|/|delta_total| (norms
    clamped at 1e-12). Chunked: memory O(chunk * V).
    """
    flat = [x.reshape(-1, x.shape[-1]) for x in (student_logits, teacher_logits, ref_logits)]
    chunk_size = chunk_size or default_chunk_size(student_logits.shape[-1], student_logits.device)
    slices = _row_slices(_flat_mask(mask, student_logits), flat[0].shape[0], chunk_size)
    total = torch.zeros(4, dtype=torch.float64, device=student_logits.device)
    for start, end in slices:
        chunk = [x[start:end] for x in flat]
        padded = _has_padding(*chunk)
        log_s, log_T, log_ref = (_log_softmax(x, padded=padded) for x in chunk)
        total += _decomposition_rows(log_s, log_T, log_ref, padded).sum(0).double()
    n = sum(end - start for start, end in slices)
    return dict(zip(DECOMPOSITION_KEYS, (total / max(n, 1)).tolist(), strict=True))


# ----------------------------------------------------------------------------------------------
# the fused, chunked loss for the learner
# ----------------------------------------------------------------------------------------------


def _jsd_chunk(log_s: Tensor, log_t: Tensor, lam: float, want_grad: bool, log_P0: Tensor | None = None):
    """Per-row JSD_lam, metrics, and the gradient w.r.t. the student logits, in closed form.

    With p_s = softmax(z), s = log p_s, t = log target, m = log M:
      dJSD/ds     = (1 - lam) * p_s * (s - m)   (0 < lam < 1: the p_t terms cancel)
      dKL(s||t)/ds = p_s * (s - t) + p_s        (lam = 1; the "+ p_s" cancels below)
      dKL(t||s)/ds = -p_t                       (lam = 0)
    and through log_softmax, d/dz = g - p_s * sum(g). M is formed in probability space,
    clamped at the smallest normal float: entries where it underflows carry p < 1e-38.
    Returns (rows: dict of [n] tensors, grad [n, V] or None). Overwrites nothing it was given.
    """
    p_s, p_t = log_s.exp(), log_t.exp()
    rows = {"student_entropy": -_vecdot(p_s, log_s), "target_entropy": -_vecdot(p_t, log_t)}
    if log_P0 is not None:  # KL(target || P0) = -H(target) - E_target[log P0]
        rows["kl_target_base"] = -rows["target_entropy"] - _vecdot(p_t, log_P0)
    if lam == 0.0:
        rows["jsd"] = _vecdot(p_t, log_t - log_s)
        return rows, (p_s.sub_(p_t) if want_grad else None)
    if lam == 1.0:
        diff = log_s - log_t
        rows["jsd"] = _vecdot(p_s, diff)
        sum_g = rows["jsd"]
    else:
        log_m = torch.add(p_s, p_t, alpha=lam / (1.0 - lam)).mul_(1.0 - lam)
        log_m = log_m.clamp_min_(torch.finfo(log_m.dtype).tiny).log_()
        kl_t = _vecdot(p_t, log_t - log_m)
        diff = log_m.neg_().add_(log_s)  # s - m, in place
        kl_s = _vecdot(p_s, diff)
        rows["jsd"] = lam * kl_t + (1.0 - lam) * kl_s
        sum_g = (1.0 - lam) * kl_s
        if want_grad:
            diff.mul_(1.0 - lam)
    if not want_grad:
        return rows, None
    grad = diff.mul_(p_s)  # g
    return rows, grad.sub_(p_s.mul_(sum_g.unsqueeze(-1)))


class _AttachGrad(torch.autograd.Function):
    """Returns `value`; its backward hands out gradients computed during the forward pass.

    The buffers go through save_for_backward: autograd drops them right after backward unless
    retain_graph=True, so a plain loss.backward() lets AccumulateGrad adopt the buffer as .grad
    instead of copying it (no second [N, V] buffer).
    """

    @staticmethod
    def forward(ctx, value, student, weight, grad_student, grad_weight):
        ctx.save_for_backward(grad_student, grad_weight)
        ctx.weight_dtype = None if weight is None else weight.dtype
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grad_student, grad_weight = ctx.saved_tensors
        if not bool(grad_output == 1):  # the usual loss.backward() hands the buffers out as they are
            grad_student = None if grad_student is None else grad_student * grad_output.to(grad_student.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_output.to(grad_weight.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)  # accumulated in float32
        return None, grad_student, grad_weight, None, None


LMHead = Tensor | Callable[[Tensor], Tensor]


def _project(h: Tensor, lm_head: LMHead | None) -> Tensor:
    """Logits of a chunk: h itself, h @ W^T for a weight W [V, H], or lm_head(h) for a callable."""
    if lm_head is None:
        return h
    if isinstance(lm_head, Tensor):
        return F.linear(h.to(lm_head.dtype), lm_head)
    return lm_head(h)


def _vocab_size(x: Tensor, lm_head: LMHead | None) -> int:
    if lm_head is None:
        return x.shape[-1]
    if isinstance(lm_head, Tensor):
        return lm_head.shape[0]
    with torch.no_grad():
        return lm_head(x.detach().reshape(-1, x.shape[-1])[:1]).shape[-1]


def opsd_loss(
    student: Tensor,
    frozen: FrozenVariants | tuple,
    mask: Tensor | None = None,
    *,
    mode: str = "pmi",
    beta: float = 1.0,
    clip: float | None = 10.0,
    center: bool = True,
    lam: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    lm_head: LMHead | None = None,
    frozen_lm_head: LMHead | None = None,
    normalizer: float | Tensor | None = None,
    diagnostics: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """Fused, chunked OPSD loss = sum over unmasked tokens of JSD_lam(pi_theta, target) / normalizer.

    student: logits [..., V], or hidden states [..., H] with `lm_head` (a weight [V, H], or a
      frozen callable h -> logits whose parameters get no gradient).
    frozen: FrozenVariants(teacher, ref, base): logits [..., V], or hidden states with
      `frozen_lm_head`; ref/base may be None for mode="standard".
    mask: [...] bool, True for response tokens (default: all positions).
    mode: "pmi" (target = P_target, Eq. 16) or "standard" (target = pi_T, plain OPSD).
    beta, clip, center: the PMI target's settings (see pmi_target); lam: the JSD mixture weight.
    temperature: divides every logit inside the loss. normalizer: the loss denominator (default:
      the number of unmasked tokens here; pass the token count of a whole optimizer step when
      micro-batches are summed). chunk_size: tokens per chunk (None: default_chunk_size(V, device)).

    Memory: tokens go through in chunks; for each chunk the value, the metrics and the gradient
    w.r.t. the student (logits, or hidden states and lm_head weight) are computed in the forward
    pass with the closed-form gradient of _jsd_chunk, and the gradient is written into one buffer
    of the student's own shape and dtype. backward() only hands that buffer out, so the extra
    peak memory is O(chunk * V) plus the gradient itself in forward and backward alike; autograd
    would keep [N, V] float32 graphs, and torch.utils.checkpoint would rebuild one per chunk and
    run every chunk twice. No gradient work is done when grad mode is off or nothing needs it.

    Returns (loss, metrics). Metrics are python floats, per-token means over unmasked tokens:
    jsd, student_entropy, target_entropy, kl_target_base (if base is given), clip_active_frac
    (pmi mode with clipping: share of vocab entries with |centred delta_it| > clip / 2),
    top1_agree (argmax student == argmax target), num_tokens, and with diagnostics=True the four
    decomposition keys.
    """
    if mode not in ("pmi", "standard"):
        raise ValueError(f"mode must be 'pmi' or 'standard', got {mode!r}")
    _check_lam(lam)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    teacher, ref, base = FrozenVariants(*frozen)
    if mode == "pmi" and (ref is None or base is None):
        raise ValueError("mode='pmi' needs frozen.ref and frozen.base")
    if diagnostics and ref is None:
        raise ValueError("diagnostics need frozen.ref")
    if mode == "standard" and not diagnostics:
        ref = None  # not needed: skip its log-softmax
    weight = lm_head if isinstance(lm_head, Tensor) else None
    if isinstance(lm_head, torch.nn.Module) and any(p.requires_grad for p in lm_head.parameters()):
        raise ValueError("a callable lm_head must be frozen; pass its weight [V, H] to train it")

    need_student_grad = torch.is_grad_enabled() and student.requires_grad
    need_weight_grad = torch.is_grad_enabled() and weight is not None and weight.requires_grad
    want_grad = need_student_grad or need_weight_grad

    student_2d = student.detach().reshape(-1, student.shape[-1])
    frozen_2d = [None if x is None else x.detach().reshape(-1, x.shape[-1]) for x in (teacher, ref, base)]
    mask_flat = _flat_mask(mask, student)
    if chunk_size is None:
        chunk_size = default_chunk_size(_vocab_size(student, lm_head), student.device)
    slices = _row_slices(mask_flat, student_2d.shape[0], chunk_size)
    n_tokens = sum(end - start for start, end in slices)
    if normalizer is not None and float(normalizer) <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    denom = float(normalizer) if normalizer is not None else float(max(n_tokens, 1))

    grad_student = None
    if need_student_grad:
        grad_student = torch.zeros_like(student_2d) if mask is not None else torch.empty_like(student_2d)
    grad_weight = torch.zeros_like(weight, dtype=_compute_dtype(weight)) if need_weight_grad else None
    frozen_head = frozen_lm_head.detach() if isinstance(frozen_lm_head, Tensor) else frozen_lm_head
    sums: dict[str, Tensor] = {}

    def add(name: str, per_row: Tensor) -> None:
        s = per_row.detach().sum(0).double()
        sums[name] = sums[name] + s if name in sums else s

    with torch.no_grad():
        for start, end in slices:
            # student logits of this chunk (a callable head needs autograd for d/dh)
            h = student_2d[start:end]
            if lm_head is not None and weight is None and need_student_grad:
                h = h.clone().requires_grad_(True)
                with torch.enable_grad():
                    z = _project(h, lm_head)
            else:
                z = _project(h, lm_head)
            frozen_z = [None if x is None else _project(x[start:end], frozen_head) for x in frozen_2d]
            padded = _has_padding(z, *frozen_z)
            log_s = _log_softmax(z.detach(), temperature, padded)
            log_T, log_ref, log_P0 = (
                None if x is None else _log_softmax(x, temperature, padded) for x in frozen_z
            )
            del frozen_z
            if diagnostics:
                add("decomposition", _decomposition_rows(log_s, log_T, log_ref, padded))

            if mode == "pmi":
                stats: dict[str, Tensor] = {}
                log_t = _pmi_from_logprobs(
                    log_T, log_ref, log_P0, beta=beta, clip=clip, center=center, padded=padded, stats=stats
                )
                if clip:
                    add("clip_active_frac", stats["clip_active"])
            else:
                log_t = log_T
            del log_T, log_ref
            add("top1_agree", (log_s.argmax(-1) == log_t.argmax(-1)).double())
            rows, dz = _jsd_chunk(log_s, log_t, lam, want_grad, log_P0)
            for name, value in rows.items():
                add(name, value)
            del log_s, log_t, log_P0

            if dz is not None:
                dz = dz.div_(temperature * denom)  # d loss / d student logits of this chunk
                if lm_head is None:
                    grad_student[start:end] = dz
                elif weight is not None:
                    if grad_student is not None:
                        grad_student[start:end] = dz.to(weight.dtype) @ weight
                    if grad_weight is not None:
                        grad_weight.addmm_(dz.T.to(grad_weight.dtype), h.to(grad_weight.dtype))
                else:
                    (grad_student[start:end],) = torch.autograd.grad(z, h, dz.to(z.dtype))
            del z, dz, h

    total = sums.get("jsd", torch.zeros((), dtype=torch.float64, device=student.device))
    value = (total / denom).to(_compute_dtype(student))
    loss = value
    if want_grad:
        grad_student = None if grad_student is None else grad_student.reshape(student.shape)
        loss = _AttachGrad.apply(value, student, weight, grad_student, grad_weight)
    return loss, _metrics(sums, n_tokens)


def _metrics(sums: dict[str, Tensor], n_tokens: int) -> dict[str, float]:
    """Per-token means (0.0 when there are no tokens), with a single host sync."""
    names = list(sums)
    flat = torch.cat([sums[k].reshape(-1) for k in names]).tolist() if names else []
    out: dict[str, float] = {}
    i = 0
    for name in names:
        width = sums[name].numel()
        means = [v / max(n_tokens, 1) for v in flat[i : i + width]]
        i += width
        if name == "decomposition":
            out.update(zip(DECOMPOSITION_KEYS, means, strict=True))
        else:
            out[name] = means[0]
    for name in ("jsd", "student_entropy", "target_entropy", "top1_agree"):
        out.setdefault(name, 0.0)
    out["num_tokens"] = float(n_tokens)
    return out
