"""Row-level numerics shared by the objectives and the fused loss: float32 log-softmaxes with the
-inf convention below, KL and JSD rows, the PMI target from log-probabilities, the decomposition
rows, masks and chunking. Pure torch.

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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

NEG = -1e30  # finite stand-in for -inf log-probabilities (see the module docstring)


DECOMPOSITION_KEYS = ("cos_total_ref", "cos_total_it", "norm_frac_ref", "norm_frac_it")


NORM_EPS = 1e-12  # norms below this are clamped (like F.cosine_similarity's eps)


class FrozenVariants(NamedTuple):
    """The three frozen-model variants, read at the same positions as the student.

    Logits [..., V], or final hidden states [..., H] when `opsd_loss(frozen_lm_head=...)` is given.
    `ref` and `base` may be None for mode="standard" (base then only feeds a metric).
    """

    teacher: Tensor
    ref: Tensor | None = None
    base: Tensor | None = None


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def has_padding(*xs: Tensor | None) -> bool:
    """Whether any of these logit / log-prob tensors holds padding (-inf or NEG entries).

    One cheap reduction per tensor and one host sync; lets the common case skip every
    clamp and padding mask.
    """
    mins = [x.detach().amin().float() for x in xs if x is not None and x.numel()]
    return bool(mins) and bool(torch.stack(mins).amin() <= NEG / 2)


def safe_log_softmax(logits: Tensor, temperature: float = 1.0, padded: bool = True) -> Tensor:
    """log_softmax in float32 (or float64); with `padded`, -inf is replaced by NEG."""
    x = logits.to(compute_dtype(logits))
    if temperature != 1.0:
        x = x / temperature
    out = F.log_softmax(x, dim=-1)
    if not padded:
        return out
    # in place where autograd does not need the output (the fused loss runs under no_grad)
    return out.clamp_min(NEG) if out.requires_grad else out.clamp_min_(NEG)


def vecdot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a * b per row. (torch.sum's cascade summation: a BLAS dot via bmm is faster but
    ~3e-4 relative off in float32 at V = 152k.)"""
    return (a * b).sum(-1)


def kl_rows(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row from log-probs (autograd path; NEG entries give exactly 0)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def jsd_rows(log_s: Tensor, log_t: Tensor, lam: float) -> Tensor:
    """Per-row generalized JSD_lam(student, target) from log-probs (autograd path)."""
    if lam == 0.0:
        return kl_rows(log_t, log_s)  # forward KL(target || student)
    if lam == 1.0:
        return kl_rows(log_s, log_t)  # reverse KL(student || target)
    log_m = torch.logaddexp(log_t + math.log(lam), log_s + math.log1p(-lam))
    return lam * kl_rows(log_t, log_m) + (1.0 - lam) * kl_rows(log_s, log_m)


def check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam (JSD mixture weight) must be in [0, 1], got {lam}")


def flat_mask(mask: Tensor | None, x: Tensor) -> Tensor | None:
    """mask [...] matching x [..., V] -> flat bool [N] (None stays None)."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match inputs {tuple(x.shape[:-1])}")
    return mask.reshape(-1).to(device=x.device, dtype=torch.bool)


def masked_rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """[..., V] -> [n, V]: the unmasked positions only."""
    x2 = x.reshape(-1, x.shape[-1])
    flat = flat_mask(mask, x)
    return x2 if flat is None else x2[flat]


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    """Tokens per chunk when chunk_size=None: about 64 MiB per float32 [chunk, V] buffer on CPU
    (110 rows at V = 152k) and 256 MiB on accelerators (441 rows). Each chunk runs ~60 tensor ops,
    so chunks should be large enough that per-op costs (kernel launches, thread hand-offs on a busy
    CPU) stay small; the loss keeps about eight such buffers alive, plus the student's gradient."""
    budget = 2**24 if torch.device(device).type == "cpu" else 2**26  # float32 elements
    return int(min(4096, max(32, budget // max(vocab_size, 1))))


def row_slices(mask_flat: Tensor | None, n_rows: int, chunk_size: int) -> list[tuple[int, int]]:
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


def pmi_from_logprobs(log_pi_T, log_pi_ref, log_P0, *, beta, clip, center, padded, stats=None) -> Tensor:
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
    return safe_log_softmax(delta.add_(log_P0), padded=padded)  # Eq. 16-17


def decomposition_rows(log_s: Tensor, log_T: Tensor, log_ref: Tensor, padded: bool) -> Tensor:
    """Per row: [cos(total, ref), cos(total, it), |ref|/|total|, |it|/|total|], shape [n, 4]."""
    d_total = log_T - log_s  # = d_ref + d_it
    d_ref = log_ref - log_s
    d_it = log_T - log_ref
    if padded:  # leave entries that are padding anywhere out
        pad = (log_s <= NEG / 2) | (log_T <= NEG / 2) | (log_ref <= NEG / 2)
        d_total, d_ref, d_it = (d.masked_fill_(pad, 0.0) for d in (d_total, d_ref, d_it))
    n_total, n_ref, n_it = (d.norm(dim=-1).clamp_min(NORM_EPS) for d in (d_total, d_ref, d_it))
    return torch.stack(
        [
            vecdot(d_total, d_ref) / (n_total * n_ref),
            vecdot(d_total, d_it) / (n_total * n_it),
            n_ref / n_total,
            n_it / n_total,
        ],
        dim=-1,
    )
