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

Numerics (float32 softmaxes, the -inf convention of vocabulary padding): opsd_ray.objective.numerics. The
fused, chunked loss the learner uses: opsd_ray.objective.fused_loss.opsd_loss (re-exported here).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from opsd_ray.objective.fused_loss import opsd_loss
from opsd_ray.objective.numerics import (
    DECOMPOSITION_KEYS,
    NEG,
    FrozenVariants,
    check_lam,
    decomposition_rows,
    default_chunk_size,
    flat_mask,
    has_padding,
    jsd_rows,
    masked_rows,
    pmi_from_logprobs,
    row_slices,
    safe_log_softmax,
)

__all__ = [
    "DECOMPOSITION_KEYS",
    "default_chunk_size",
    "FrozenVariants",
    "decomposition",
    "generalized_jsd",
    "opsd_loss",
    "pmi_target",
]


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
        padded = has_padding(teacher_logits, ref_logits, base_logits)
        out = pmi_from_logprobs(
            *(safe_log_softmax(x, padded=padded) for x in (teacher_logits, ref_logits, base_logits)),
            beta=beta,
            clip=clip,
            center=center,
            padded=padded,
        )
        return out.masked_fill_(out <= NEG / 2, -math.inf) if padded else out


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
    check_lam(lam)
    student_logits, target_logprobs = masked_rows(student_logits, mask), masked_rows(target_logprobs.detach(), mask)
    padded = has_padding(student_logits, target_logprobs)
    log_s = safe_log_softmax(student_logits, padded=padded)
    log_t = target_logprobs.to(log_s.dtype)
    log_t = log_t.clamp_min(NEG) if padded else log_t
    per_token = jsd_rows(log_s, log_t, lam)
    return per_token.sum() / max(per_token.numel(), 1)


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
    slices = row_slices(flat_mask(mask, student_logits), flat[0].shape[0], chunk_size)
    total = torch.zeros(4, dtype=torch.float64, device=student_logits.device)
    for start, end in slices:
        chunk = [x[start:end] for x in flat]
        padded = has_padding(*chunk)
        log_s, log_T, log_ref = (safe_log_softmax(x, padded=padded) for x in chunk)
        total += decomposition_rows(log_s, log_T, log_ref, padded).sum(0).double()
    n = sum(end - start for start, end in slices)
    return dict(zip(DECOMPOSITION_KEYS, (total / max(n, 1)).tolist(), strict=True))
