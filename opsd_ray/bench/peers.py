"""The peers' own code, side by side with ours (`pip install -e '.[peers]'`: TRL, pinned).

`loss_agreement`: opsd_ray's standard-mode loss (the fused `opsd_loss`) against TRL's
`compute_full_logit_self_distillation_loss` on the same student and teacher logits, for the JSD weight
lambda = TRL's distillation_alpha in {0, 0.5, 1}: loss and gradient. TRL reduces a sequence's tokens to
their mean and then averages sequences; opsd_ray divides the sum by the step's token count; with
sequences of one length the two are the same number.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # we import trl.experimental on purpose

from opsd_ray.objective.fused_loss import opsd_loss

TRL_VERSION = "1.16.0"


def loss_agreement(lam: float, batch: int = 3, length: int = 7, vocab: int = 257, seed: int = 0) -> dict[str, float]:
    """Relative differences of the loss and of the gradient w.r.t. the student's logits (float32)."""
    from trl.experimental.sdft.loss_utils import compute_full_logit_self_distillation_loss

    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(batch, length, vocab, generator=g)).requires_grad_(True)
    teacher = 2 * torch.randn(batch, length, vocab, generator=g)
    theirs = compute_full_logit_self_distillation_loss(student, teacher, distillation_alpha=lam).mean(-1).mean()
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    ours, _ = opsd_loss(student, (teacher, None, None), mode="standard", lam=lam, temperature=1.0, chunk_size=5)
    (grad_ours,) = torch.autograd.grad(ours, student)
    ours, theirs = ours.detach(), theirs.detach()
    return {"loss_rel_diff": float((ours - theirs).abs() / theirs.abs()),
            "grad_rel_diff": float((grad_ours - grad_theirs).norm() / grad_theirs.norm()),
            "loss": float(ours)}
