"""wire: bytes per response token of each scoring -> learner format; the two exact formats agree."""

from __future__ import annotations

import argparse

from opsd_ray.bench import Record, record, register
from opsd_ray.bench.common import bench_cfg, frozen_model, scoring_items
from opsd_ray.common import pad_id_of
from opsd_ray.objective.formulas import FrozenVariants, opsd_loss
from opsd_ray.workers.scoring import VARIANTS, response_hidden, score


# ----------------------------------------------------------------------------- wire
def wire_records(model: str, n_items: int, response_tokens: int) -> list[Record]:
    import torch


    cfg = bench_cfg(model)
    net, tok = frozen_model(cfg)
    items = scoring_items(cfg, tok, n_items, response_tokens)
    pad = pad_id_of(tok)
    batches = {
        fmt: score(net, items, variants=VARIANTS, wire_format=fmt, pad_id=pad) for fmt in ("hidden", "logits")
    }
    head = net.get_output_embeddings().weight
    vocab, hidden_size = head.shape
    with torch.no_grad():  # the base model as the student: the loss of both exact formats must agree
        student = response_hidden(net.get_decoder(), items, ("student",), pad)["student"]
        losses = {}
        for fmt, batch in batches.items():
            t = batch.tensors
            losses[fmt], _ = opsd_loss(
                student,
                FrozenVariants(t["teacher"], t["ref"], t["base"]),
                mode="pmi",
                chunk_size=cfg.objective.chunk_size,
                lm_head=head,
                frozen_lm_head=head if fmt == "hidden" else None,
            )
    h, lg = batches["hidden"], batches["logits"]
    elem = h.tensors["teacher"].element_size()
    values = h.nbytes / elem / h.num_tokens
    rel = abs(float(losses["hidden"]) - float(losses["logits"])) / abs(float(losses["logits"]))
    how = (
        f"{model} (H={hidden_size}, V={vocab}, {h.tensors['teacher'].dtype}), PMI mode (3 variants; standard "
        f"mode ships only the teacher: 1/3 of this), measured FrozenBatch.nbytes / response tokens over "
        f"{h.num_tokens} tokens"
    )
    qwen = "Qwen3-8B in bf16: hidden 3 x 4096 x 2 = 24,576 B/token, logits 3 x 151,936 x 2 = 911,616 B/token"
    return [
        record(
            "wire_bytes_per_token_hidden",
            h.bytes_per_token,
            "B",
            3 * hidden_size * elem,
            f"baseline = 3*H values; {how}; {qwen}",
        ),
        record(
            "wire_bytes_per_token_logits",
            lg.bytes_per_token,
            "B",
            h.bytes_per_token,
            f"baseline = the hidden format ({lg.bytes_per_token / h.bytes_per_token:.1f}x larger); {how}",
        ),
        record(
            "wire_values_per_token_hidden",
            values,
            "values",
            3 * hidden_size,
            f"goal <= 3*H = {3 * hidden_size} values per token (PMI mode); {how}",
        ),
        record(
            "wire_exact_loss_rel_diff",
            rel,
            "rel",
            0.0,
            f"|loss(hidden) - loss(logits)| / loss(logits), PMI loss with the frozen base as the student; "
            f"both formats are exact. There is no approximate (top-k) wire format, so there is no "
            f"wire_topk_loss_rel_error to report; {how}",
        ),
    ]


@register("wire", note_load=True)
def bench_wire(args: argparse.Namespace) -> list[Record]:
    """Bytes per response token of the hidden and logits wire formats (PMI mode)."""
    return wire_records("tiny" if args.quick else "smollm2-135m", 2, 64)
