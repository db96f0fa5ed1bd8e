"""The fused, chunked OPSD loss (paper Eq. 18) the learner uses: value, metrics and the closed-form
gradient in one pass over chunks of tokens, so that peak memory is O(chunk x V) (see docs/objective.md,
"How the fused loss saves memory"). Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

from opsd_ray.objective.numerics import (
    DECOMPOSITION_KEYS,
    FrozenVariants,
    check_lam,
    compute_dtype,
    decomposition_rows,
    default_chunk_size,
    flat_mask,
    has_padding,
    row_slices,
    safe_log_softmax,
    vecdot,
)
from opsd_ray.objective.registry import objective_of


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
    rows = {"student_entropy": -vecdot(p_s, log_s), "target_entropy": -vecdot(p_t, log_t)}
    if log_P0 is not None:  # KL(target || P0) = -H(target) - E_target[log P0]
        rows["kl_target_base"] = -rows["target_entropy"] - vecdot(p_t, log_P0)
    if lam == 0.0:
        rows["jsd"] = vecdot(p_t, log_t - log_s)
        return rows, (p_s.sub_(p_t) if want_grad else None)
    if lam == 1.0:
        diff = log_s - log_t
        rows["jsd"] = vecdot(p_s, diff)
        sum_g = rows["jsd"]
    else:
        log_m = torch.add(p_s, p_t, alpha=lam / (1.0 - lam)).mul_(1.0 - lam)
        log_m = log_m.clamp_min_(torch.finfo(log_m.dtype).tiny).log_()
        kl_t = vecdot(p_t, log_t - log_m)
        diff = log_m.neg_().add_(log_s)  # s - m, in place
        kl_s = vecdot(p_s, diff)
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
    mode: an objective of opsd_ray.objective.registry: "pmi" (target = P_target, Eq. 16) or "standard"
      (target = pi_T, plain OPSD).
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
    objective = objective_of(mode)
    settings = SimpleNamespace(beta=beta, clip=clip, center=center, lam=lam, temperature=temperature)
    check_lam(lam)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    teacher, ref, base = FrozenVariants(*frozen)
    given = {"teacher": teacher, "ref": ref, "base": base}
    missing = [v for v in objective.variants if given[v] is None]
    if missing:
        raise ValueError(f"mode={mode!r} needs the frozen variant(s) {', '.join(missing)}")
    if diagnostics and ref is None:
        raise ValueError("diagnostics need frozen.ref")
    if "ref" not in objective.step_variants(diagnostics):
        ref = None  # not needed: skip its log-softmax
    weight = lm_head if isinstance(lm_head, Tensor) else None
    if isinstance(lm_head, torch.nn.Module) and any(p.requires_grad for p in lm_head.parameters()):
        raise ValueError("a callable lm_head must be frozen; pass its weight [V, H] to train it")

    need_student_grad = torch.is_grad_enabled() and student.requires_grad
    need_weight_grad = torch.is_grad_enabled() and weight is not None and weight.requires_grad
    want_grad = need_student_grad or need_weight_grad

    student_2d = student.detach().reshape(-1, student.shape[-1])
    frozen_2d = [None if x is None else x.detach().reshape(-1, x.shape[-1]) for x in (teacher, ref, base)]
    mask_flat = flat_mask(mask, student)
    if chunk_size is None:
        chunk_size = default_chunk_size(_vocab_size(student, lm_head), student.device)
    slices = row_slices(mask_flat, student_2d.shape[0], chunk_size)
    n_tokens = sum(end - start for start, end in slices)
    if normalizer is not None and float(normalizer) <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    denom = float(normalizer) if normalizer is not None else float(max(n_tokens, 1))

    grad_student = None
    if need_student_grad:
        grad_student = torch.zeros_like(student_2d) if mask is not None else torch.empty_like(student_2d)
    grad_weight = torch.zeros_like(weight, dtype=compute_dtype(weight)) if need_weight_grad else None
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
            padded = has_padding(z, *frozen_z)
            log_s = safe_log_softmax(z.detach(), temperature, padded)
            log_T, log_ref, log_P0 = (
                None if x is None else safe_log_softmax(x, temperature, padded) for x in frozen_z
            )
            del frozen_z
            if diagnostics:
                add("decomposition", decomposition_rows(log_s, log_T, log_ref, padded))

            stats: dict[str, Tensor] = {}
            log_t = objective.target(log_T, log_ref, log_P0, settings, padded, stats)
            for name, rows_of_stat in stats.items():
                add(name, rows_of_stat)
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
    value = (total / denom).to(compute_dtype(student))
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
