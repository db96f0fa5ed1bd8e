"""trl: TRL's SDFTTrainer (standard OPSD, full logits) and opsd_ray on the same work, side by side.

The work: SmolLM2-135M-Instruct in float32, LoRA r 16 / alpha 32 on every linear projection, the same 4
GSM8K prompts every step, exactly 64 new tokens (TRL: min_new_tokens; opsd_ray: rollout.ignore_eos),
learning rate 0 (every step the same trajectories' work), 2 threads. Each arm runs in a process of its
own (its peak memory is its process tree's, summed by PSS), the arms alternate between repetitions,
and a step's time is the median over the steps after the first. opsd_ray runs as `make train` would:
the Ray pipeline, the CPU default's engine and schedule, standard and pmi.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from opsd_ray.bench import Record, record, register
from opsd_ray.bench.common import log
from opsd_ray.bench.peers import TRL_VERSION, loss_agreement
from opsd_ray.config.recipes import load_train_config
from opsd_ray.data.prompts import reference_block, with_instruction
from opsd_ray.data.sources import load_examples
from opsd_ray.models.loading import load_model, load_tokenizer
from opsd_ray.run.driver import train

ROOT = Path(__file__).resolve().parents[2]
PROMPTS, NEW_TOKENS, THREADS = 4, 64, 2


class PeakPss:
    """The peak, over time, of the PSS summed over this process and all its descendants (Ray's included)."""

    def __init__(self, every_s: float = 0.5):
        import psutil

        self.me, self.peak, self.every = psutil.Process(), 0, every_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.is_set():
            total = 0
            for p in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += p.memory_full_info().pss
                except Exception:  # gone, or not readable: counted by nobody
                    continue
            self.peak = max(self.peak, total)
            self.stop.wait(self.every)

    def __enter__(self) -> PeakPss:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def gsm8k_rows(n: int = PROMPTS) -> list:
    examples, _ = load_examples(load_train_config(["model=smollm2-135m", "data=gsm8k"]).data, None, seed=0)
    return sorted(examples[:n], key=lambda e: e.id)


def trl_worker(steps: int) -> dict:
    """TRL's SDFTTrainer for `steps` steps in this process: each step's seconds and the peak PSS."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer


    torch.set_num_threads(THREADS)
    cfg = load_train_config(["model=smollm2-135m", "data=gsm8k"])
    rows = gsm8k_rows()
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": with_instruction(e.question, cfg.prompt.answer_instruction)}],
                               "privileged_context": e.reference} for e in rows])
    # the teacher reads the question, then our reference block (the same text opsd_ray's teacher reads)
    block = reference_block("PRIVILEGED", cfg.prompt).replace("{", "{{").replace("}", "}}")  # \\boxed{} is no field
    template = "{prompt}\n\n" + block.replace("PRIVILEGED", "{privileged_context}")

    class Timer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    lo = cfg.model.lora
    timer = Timer()
    args = SDFTConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_sdft_"), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=PROMPTS, num_generations=1,
        gradient_accumulation_steps=1, max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=1.0, top_p=1.0, top_k=0, distillation_mode="full_logits", distillation_alpha=cfg.objective.lam,
        teacher_prompt_template=template, learning_rate=0.0, max_steps=steps, logging_steps=1, report_to="none",
        save_strategy="no", shuffle_dataset=False, seed=0)
    trainer = SDFTTrainer(
        model=load_model(cfg.model), args=args, train_dataset=data, processing_class=load_tokenizer(cfg.model),
        peft_config=LoraConfig(r=lo.r, lora_alpha=lo.alpha, target_modules=list(lo.target_modules), task_type="CAUSAL_LM"),
        callbacks=[timer])
    with PeakPss() as pss:
        trainer.train()
    return {"times": timer.times, "peak_pss": pss.peak}


def opsd_worker(steps: int, mode: str, engine: str, extra: tuple = ()) -> dict:
    """opsd_ray's `train` (the Ray pipeline, the CPU default's schedule, plus `extra` overrides) for `steps`
    steps: each step's seconds, where they went, and the peak PSS of the whole process tree."""
    out = Path(tempfile.mkdtemp(prefix="opsd_bench_"))
    data = out / "prompts.jsonl"
    data.write_text("".join(json.dumps({"question": e.question, "answer": e.reference}) + "\n" for e in gsm8k_rows()))
    cfg = load_train_config([
        "model=smollm2-135m", "data=gsm8k", f"data.path={data}", "data.strip_calculator_notes=false",
        f"run.output_dir={out}", "run.name=bench", f"train.steps={steps}", f"train.batch_size={PROMPTS}",
        f"objective.mode={mode}", f"rollout.max_new_tokens={NEW_TOKENS}", "rollout.ignore_eos=true",
        f"rollout.engine={engine}", "checkpoint.every=0", "eval.every=0", "train.diagnostics_every=0",
        "rollout.verify_sync_every=0", f"ray.num_cpus={THREADS + 2}", *extra])
    cfg.learner.lr = 0.0  # as TRL's arm: every step the same work (validation wants lr > 0 for training)
    with PeakPss() as pss:
        folder = train(cfg)
    records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return {"times": [r["time/step"] for r in records], "peak_pss": pss.peak,
            "phases": {k: [r[f"time/{k}"] for r in records] for k in ("rollout", "scoring", "learning", "sync")}}


def in_process(fn: str, **kwargs) -> dict:
    """`fn(**kwargs)` of this module in a fresh Python (its own memory, threads and Ray)."""
    code = f"import json; from opsd_ray.bench.trl import {fn}; print('RESULT ' + json.dumps({fn}(**{kwargs!r})))"
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "TRL_EXPERIMENTAL_SILENCE": "1"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=1200)
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{fn}({kwargs}) failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


@register("trl", note_load=True)
def bench_trl(args: argparse.Namespace) -> list[Record]:
    """TRL's SDFTTrainer against opsd_ray (standard and pmi) on the same work; the loss agreement."""
    steps = 3 if args.quick else 4
    reps = args.reps or (1 if args.quick else 2)
    arms = {"trl": ("trl_worker", {}), "opsd_standard": ("opsd_worker", {"mode": "standard", "engine": "auto"}),
            "opsd_pmi": ("opsd_worker", {"mode": "pmi", "engine": "auto"})}
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    for rep in range(reps):
        for name in (list(arms) if rep % 2 == 0 else list(arms)[::-1]):
            fn, kw = arms[name]
            runs[name].append(in_process(fn, steps=steps, **kw))
            log(f"trl {name}: {[round(t, 2) for t in runs[name][-1]['times']]} s")
    step = {a: statistics.median(t for r in rs for t in r["times"][1:]) for a, rs in runs.items()}
    pss = {a: max(r["peak_pss"] for r in rs) / 2**30 for a, rs in runs.items()}
    phases = {a: {k: statistics.median(t for r in rs for t in r["phases"][k][1:]) for k in rs[0]["phases"]}
              for a, rs in runs.items() if a != "trl"}
    where = "; ".join(f"{a}: " + ", ".join(f"{k} {v:.2f} s" for k, v in p.items()) for a, p in phases.items())
    setup = (f"SmolLM2-135M float32, LoRA r16/a32 all linear, the same {PROMPTS} GSM8K prompts each step, exactly "
             f"{NEW_TOKENS} new tokens, lr 0, {THREADS} threads; TRL {TRL_VERSION} SDFTTrainer full_logits (batched "
             f"transformers generate, one process); opsd_ray: `train` on Ray with rollout.engine=auto and the default "
             f"schedule; {reps} alternating rep(s) x {steps} steps, median of the steps after the first")
    out = [
        record("trl_sdft_step_time_s", step["trl"], "s", None, f"TRL's step; {setup}"),
        record("opsd_standard_vs_trl_step_time_ratio", step["opsd_standard"] / step["trl"], "x", 0.7,
               f"opsd_ray standard / TRL step time; goal <= 0.7; opsd {step['opsd_standard']:.2f} s; {where}; {setup}"),
        record("opsd_pmi_vs_trl_step_time_ratio", step["opsd_pmi"] / step["trl"], "x", 0.8,
               f"opsd_ray pmi / TRL standard step time; goal <= 0.8; opsd {step['opsd_pmi']:.2f} s; {setup}"),
        *[record(f"{a}_peak_pss_gib", v, "GiB", None, f"peak PSS summed over the arm's processes (opsd_ray: "
                 f"driver, Ray and its workers); {setup}") for a, v in pss.items()],
    ]
    for lam in (0.0, 0.5, 1.0):
        agree = loss_agreement(lam)
        out.append(record(f"trl_loss_agreement_rel_diff_lam{lam:g}", agree["loss_rel_diff"], "rel", 1e-6,
                          f"opsd_loss(mode=standard, lam={lam:g}) vs TRL's compute_full_logit_self_distillation_loss "
                          f"on the same logits; gradient rel diff {agree['grad_rel_diff']:.1e}"))
    return out
