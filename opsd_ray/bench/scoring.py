"""scoring: one pass over the three frozen variants (auto layout) against three separate passes; a
prompt's rollout.n completions scored with its contexts shared against as many distinct prompts."""

from __future__ import annotations

import argparse
import statistics

from opsd_ray.bench import Record, record, register
from opsd_ray.bench.common import bench_cfg, frozen_model, interleaved, paired_median, scoring_items
from opsd_ray.common import pad_id_of
from opsd_ray.workers.scoring import VARIANTS, ScoringItem, choose_layout, score, tree_row, variant_sequences


# ----------------------------------------------------------------------------- scoring
def layout_positions(items, variants, micro_batch_size: int, layout: str) -> int:
    """Positions one forward pass computes, padding included (rows x longest row per micro-batch)."""

    total = 0
    for i in range(0, len(items), micro_batch_size):
        rows = variant_sequences(items[i : i + micro_batch_size], variants)
        if layout == "shared_prefix":
            lengths = [len(tree_row(r)[0]) for r in rows]
        else:
            lengths = [len(s.ids) for r in rows for s in r]
        total += len(lengths) * max(lengths)
    return total


def scoring_records(model: str, n_items: int, response_tokens: int, reps: int) -> list[Record]:
    import torch


    cfg = bench_cfg(model)
    net, tok = frozen_model(cfg)
    items = scoring_items(cfg, tok, n_items, response_tokens)
    mb = cfg.scoring.micro_batch_size
    kw = dict(micro_batch_size=mb, pad_id=pad_id_of(tok))

    def one_pass(layout):
        return lambda: score(net, items, variants=VARIANTS, layout=layout, **kw)

    def three_passes():
        return [score(net, items, variants=(v,), **kw) for v in VARIANTS]

    arms = {"shared_prefix": one_pass("shared_prefix"), "padded": one_pass("padded"), "three": three_passes}
    three = three_passes()  # warm-up, and every layout must agree with the three passes
    diff = max(
        (arms[a]().tensors[v] - b.tensors[v]).abs().max().item()
        for a in ("shared_prefix", "padded") for v, b in zip(VARIANTS, three, strict=True)
    )
    runs = interleaved(arms, reps)
    times = {k: [t for _, t in rs] for k, rs in runs.items()}
    tokens = len(VARIANTS) * sum(len(it.response) for it in items)
    pos = {a: layout_positions(items, VARIANTS, mb, a) for a in ("shared_prefix", "padded")}
    pos["three"] = sum(layout_positions(items, (v,), mb, "padded") for v in VARIANTS)
    first = variant_sequences(items[:mb], VARIANTS)
    auto = choose_layout("auto", net.config, first, [tree_row(r) for r in first])
    note = (
        f"{model}, {n_items} GSM8K trajectories (response = first {response_tokens} reference tokens), "
        f"scoring.micro_batch_size={mb}, {torch.get_num_threads()} threads; one pass of the 3 variants "
        f"(layout auto = {auto} here) vs score(..., variants=(v,)) per variant; {reps} interleaved reps, "
        f"median; {tokens} scored tokens (3 variants x response tokens); positions computed, padding "
        f"included: shared_prefix {pos['shared_prefix']}, padded {pos['padded']}, three passes "
        f"{pos['three']}; max |hidden difference| of either layout vs three passes {diff:.1e}"
    )
    suffix = "" if model == "smollm2-135m" else f"_{model}"
    return [
        record(
            f"scoring_one_pass_speedup{suffix}",
            paired_median(times["three"], times[auto]),
            "x",
            1.2,
            "tokens/s of one pass (scoring.layout=auto) over three passes (= three-pass / one-pass wall "
            "time); goal >= 1.2; " + note,
        ),
        record(
            f"scoring_padded_pass_speedup{suffix}",
            paired_median(times["three"], times["padded"]),
            "x",
            1.0,
            "the same with scoring.layout=padded (one row per sequence, the base prompt padded to the "
            "teacher's length); " + note,
        ),
        record(
            f"scoring_one_pass_tokens_per_s{suffix}",
            tokens / statistics.median(times[auto]),
            "tok/s",
            tokens / statistics.median(times["three"]),
            "baseline = three separate passes; " + note,
        ),
    ]


def completions_record(model: str, prompts: int, n: int, response_tokens: int, reps: int) -> Record:
    """rollout.n: scoring `prompts` x `n` completions (each prompt's contexts once per micro-batch) against
    as many trajectories of distinct prompts, one completion each; the ratio of the time per trajectory."""
    import torch

    cfg = bench_cfg(model)
    net, tok = frozen_model(cfg)
    g = torch.Generator().manual_seed(0)

    def completion():
        return torch.randint(0, len(tok), (response_tokens,), generator=g).tolist()

    distinct = [ScoringItem(it.prompts, completion()) for it in scoring_items(cfg, tok, prompts * n, response_tokens)]
    shared = [ScoringItem(it.prompts, completion()) for it in distinct[:prompts] for _ in range(n)]
    kw = dict(micro_batch_size=n, pad_id=pad_id_of(tok), layout="auto")
    arms = {"n1": lambda: score(net, distinct, **kw), f"n{n}": lambda: score(net, shared, **kw)}
    times = {k: [t for _, t in rs] for k, rs in interleaved(arms, reps).items()}
    suffix = "" if model == "smollm2-135m" else f"_{model}"
    return record(
        f"scoring_time_per_trajectory_n{n}_vs_n1{suffix}", paired_median(times[f"n{n}"], times["n1"]), "x", 1.0,
        f"{model}: {prompts} GSM8K prompts x {n} completions against {prompts * n} prompts x 1, {response_tokens} "
        f"random response tokens each, scoring.micro_batch_size={n} (a micro-batch = one prompt's completions), "
        f"layout auto, the 3 variants; time per trajectory, n={n} / n=1 (lower is better); {reps} interleaved reps, "
        f"median of the paired ratios; {torch.get_num_threads()} threads",
    )


@register("scoring", note_load=True)
def bench_scoring(args: argparse.Namespace) -> list[Record]:
    """One padded pass of the three frozen variants vs three passes: tiny, and smollm2-135m (full runs)."""
    reps = args.reps or (1 if args.quick else 3)
    records = scoring_records("tiny", 4, 64, reps) + [completions_record("tiny", 2, 4, 64, reps)]
    if args.quick:
        return records
    return records + scoring_records("smollm2-135m", 2, 64, reps) + [completions_record("smollm2-135m", 2, 4, 64, reps)]
