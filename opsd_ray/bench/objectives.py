"""objectives: the naive loss (TRL GKD style, everything materialised) against the fused chunked opsd_loss."""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

from opsd_ray.bench import Record, record, register
from opsd_ray.bench.common import cpu_seconds, median_of
from opsd_ray.objective.formulas import FrozenVariants, default_chunk_size, opsd_loss

QWEN3_VOCAB = 151_936


def proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return proc_kib("VmHWM") <= proc_kib("VmRSS") + 1024


def mem_available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return math.inf



def naive_pmi_jsd(student, teacher, ref, base, *, beta=1.0, clip=10.0, lam=0.5, temperature=1.0):
    """The loss written the way TRL's GKD `generalized_jsd_loss` does it, all tokens at once in
    float32: log-softmaxes of all variants [N, V], torch.stack + logsumexp mixture, F.kl_div."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():  # the frozen target, as a learner would build it before the student part
        log_T = F.log_softmax(teacher.float() / temperature, dim=-1)
        log_ref = F.log_softmax(ref.float() / temperature, dim=-1)
        log_P0 = F.log_softmax(base.float() / temperature, dim=-1)
        delta = log_T - log_ref
        delta = delta - delta.mean(-1, keepdim=True)
        delta = clip * torch.tanh(delta / clip)
        target = F.log_softmax(log_P0 + delta / beta, dim=-1)
        del log_T, log_ref, log_P0, delta
    student_lp = F.log_softmax(student.float() / temperature, dim=-1)
    lam_t = torch.tensor(lam, dtype=student_lp.dtype)
    mixture = torch.logsumexp(
        torch.stack([student_lp + torch.log(1 - lam_t), target + torch.log(lam_t)]), dim=0
    )
    kl_teacher = F.kl_div(mixture, target, reduction="none", log_target=True)
    kl_student = F.kl_div(mixture, student_lp, reduction="none", log_target=True)
    jsd = (lam_t * kl_teacher + (1 - lam_t) * kl_student).sum(-1)
    return jsd.mean()


def objective_worker(
    variant: str,
    n_tokens: int,
    vocab: int,
    iters: int,
    seed: int,
    chunk_size: int | None = None,
    limit_memory: bool = False,
) -> dict:
    """One measurement in this (fresh) process: forward + backward of one loss variant.

    Inputs are bf16 [N, V] logits for student (requires grad), teacher, ref and base, as the
    learner receives them. Peak memory = VmHWM - VmRSS after the inputs exist (peak reset before
    the run), i.e. the EXTRA memory of the loss, including the student's gradient buffer.
    With limit_memory, the address space is capped at what the machine has available, so that
    running out raises here instead of waking the OOM killer; the result is then {"oom": True}.
    """
    import torch


    def run(student, frozen):
        if variant == "naive":
            loss = naive_pmi_jsd(student, *frozen)
        else:
            loss, _ = opsd_loss(student, FrozenVariants(*frozen), chunk_size=chunk_size)
        loss.backward()
        return loss.item()

    gen = torch.Generator().manual_seed(seed)

    def make(n):
        return [torch.randn(n, vocab, generator=gen, dtype=torch.bfloat16).mul_(3) for _ in range(4)]

    # warm up kernels and thread pools on a small problem, then build the real inputs
    s, *fz = make(8)
    run(s.requires_grad_(), fz)
    student, *frozen = make(n_tokens)
    student.requires_grad_(True)
    del s, fz
    budget_kib = int(mem_available_mib() * 1024) - 1536 * 1024
    if limit_memory:
        resource.setrlimit(resource.RLIMIT_AS, ((proc_kib("VmSize") + budget_kib) * 1024,) * 2)
    exact_reset = reset_peak_rss()
    rss0, hwm0 = proc_kib("VmRSS"), proc_kib("VmHWM")
    times, cpu_times, values = [], [], []
    try:
        for _ in range(iters):
            student.grad = None
            t0, c0 = time.perf_counter(), cpu_seconds()
            values.append(run(student, frozen))
            times.append(time.perf_counter() - t0)
            cpu_times.append(cpu_seconds() - c0)
    except (RuntimeError, MemoryError) as err:
        if "memory" not in str(err).lower() and not isinstance(err, MemoryError):
            raise
        return {"oom": True, "budget_mib": budget_kib / 1024}
    extra_kib = proc_kib("VmHWM") - (rss0 if exact_reset else max(rss0, hwm0))
    return {"time_s": min(times), "cpu_s": min(cpu_times), "peak_mib": extra_kib / 1024, "loss": values[-1]}


def _run_worker(**kwargs) -> dict:
    """objective_worker(**kwargs) in a fresh Python process (a clean peak-RSS counter)."""
    code = f"import json; from opsd_ray.bench.objectives import objective_worker; print(json.dumps(objective_worker(**{kwargs!r})))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=root)
    if out.returncode != 0:
        raise RuntimeError(f"objective worker {kwargs} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@register("objectives")
def bench_objectives(args: argparse.Namespace) -> list[Record]:
    """Naive vs fused OPSD-PMI loss, forward + backward, bf16 inputs at Qwen3's vocabulary."""

    vocab = QWEN3_VOCAB
    # (tokens, interleaved runs per variant); one run at 2,048 keeps the whole thing near 4 min
    plan = [(512, args.reps or 3)] + ([] if args.quick else [(2048, args.reps or 1)])
    how = (
        f"bf16 logits student/teacher/ref/base [N, V={vocab}], forward+backward, every run in a fresh "
        f"process, naive and fused interleaved, median; peak = VmHWM - VmRSS once the inputs exist "
        f"(extra memory incl. the student's bf16 grad); fused chunk_size={default_chunk_size(vocab, 'cpu')} "
        f"(CPU default); baseline = naive (TRL GKD style: every [N, V] at once in float32)"
    )
    records: list[Record] = []
    for n, reps in plan:
        runs: dict[str, list[dict]] = {"naive": [], "fused": []}
        for rep in range(reps):
            for variant, results in runs.items():
                r = _run_worker(
                    variant=variant, n_tokens=n, vocab=vocab, iters=1, seed=rep, limit_memory=True
                )
                results.append(r)
                shown = "out of memory" if r.get("oom") else f"{r['time_s']:.1f} s, {r['peak_mib']:.0f} MiB"
                print(f"  objectives N={n} {variant} run {rep + 1}/{reps}: {shown}", flush=True)
        naive = [r for r in runs["naive"] if not r.get("oom")]
        fused = [r for r in runs["fused"] if not r.get("oom")]
        if not fused:
            raise RuntimeError(f"the fused loss ran out of memory at N={n}")
        note = f"{how}; {reps} run(s) each"
        naive_mem = median_of(naive, "peak_mib")
        if naive:
            diff = max(
                abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(naive, fused, strict=False)
            )
            note += f"; max rel. loss difference naive vs fused {diff:.1e}"
        else:  # the naive loss did not fit in memory: the memory ratio becomes a lower bound
            naive_mem = max(r["budget_mib"] for r in runs["naive"])
            note += f"; naive ran out of memory at {naive_mem:.0f} MiB, so the memory ratio is a lower bound"
        wall = (median_of(naive, "time_s"), median_of(fused, "time_s"))
        cpu = (median_of(naive, "cpu_s"), median_of(fused, "cpu_s"))
        mem = (naive_mem, median_of(fused, "peak_mib"))
        records += [
            record(f"objective_fused_time_s_n{n}", wall[1], "s", wall[0], "wall time; " + note),
            record(
                f"objective_fused_cpu_s_n{n}", cpu[1], "s", cpu[0], "user+sys CPU time, all threads; " + note
            ),
            record(f"objective_fused_peak_mem_mib_n{n}", mem[1], "MiB", mem[0], note),
            record(
                f"objective_time_ratio_n{n}",
                wall[0] / wall[1],
                "x",
                1.0,
                "naive / fused wall time; goal >= 1",
            ),
            record(f"objective_cpu_time_ratio_n{n}", cpu[0] / cpu[1], "x", 1.0, "naive / fused CPU time"),
            record(
                f"objective_peak_mem_ratio_n{n}",
                mem[0] / mem[1],
                "x",
                8.0,
                "naive / fused extra peak memory; goal >= 8",
            ),
        ]
        if n == 2048:
            records += [
                record(
                    "objective_time_ratio",
                    wall[0] / wall[1],
                    "x",
                    1.0,
                    f"naive / fused wall time at N=2048; {note}",
                ),
                record(
                    "objective_peak_mem_ratio",
                    mem[0] / mem[1],
                    "x",
                    8.0,
                    f"naive / fused extra peak memory at N=2048; {note}",
                ),
            ]
    return records
