"""GPU self-check: what opsd_ray computes on a GPU, on the tiny model, against float32 on the CPU.

    python -m opsd_ray.tools.gpucheck                  # on a GPU node; needs CUDA, torch, transformers, peft
    python -m opsd_ray.tools.gpucheck --device cpu     # the same checks with bf16 on the CPU (no GPU needed)

Checks (model: a random 2-layer Qwen3 with Qwen3's vocabulary, V = 151,936; run in bf16 on the device):
- scoring/<layout>: the frozen variants' final hidden states at the response positions, padded and
  shared-prefix layouts with sdpa (and padded with flash-attention 2 when it imports), against the
  padded layout in float32 on the CPU;
- loss: the fused OPSD loss and its gradient at V = 151,936 on the device, against the same inputs
  in float64 on the CPU (isolates the loss kernels from input rounding);
- learner/*: one learner step (LoRA student with gradient checkpointing, fused loss, AdamW): the
  loss, the LoRA gradient and the change of the LoRA weights, against float32 on the CPU.
Each row shows the relative error ||got - want|| / ||want|| and its tolerance. Exit code 0 when every
check passes, or when there is no GPU (it says so); 1 when a check fails.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from opsd_ray.common import lora_config
from opsd_ray.data.prompts import PromptIds
from opsd_ray.models.builtin import build_tiny_model
from opsd_ray.models.loading import load_model
from opsd_ray.objective.formulas import FrozenVariants, opsd_loss
from opsd_ray.workers.learner import micro_batch_loss
from opsd_ray.workers.scoring import VARIANTS, ScoringItem, score

OBJECTIVE = SimpleNamespace(mode="pmi", beta=1.0, clip=10.0, center=True, lam=0.5, temperature=1.0, chunk_size=1024)
LORA = SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])
# bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2%): on the CPU the hidden states differ by
# 0.5%, the LoRA gradient by 0.7% (the tolerances leave room for the GPU's own kernels). The loss runs
# in float32 whatever its inputs (5e-6 measured); its gradient comes back in the input's dtype (0.2%).
# Adam's first step moves each weight by about lr * sign(gradient), so gradients near zero that change
# sign under bf16 rounding make the update differ by 11% on the CPU; a wrong sign, scale or a missing
# step differs by 100% or more.
TOLERANCE = {"scoring": 3e-2, "loss/value": 1e-4, "loss/grad": 1e-2, "learner/loss": 3e-2, "learner/grad": 5e-2,
             "learner/update": 0.3}


@dataclass
class Check:
    name: str
    error: float  # relative: ||got - want|| / ||want||
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


def compare(name: str, got: torch.Tensor, want: torch.Tensor, tolerance: float) -> Check:
    """Relative error of `got` against `want`, computed in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise ValueError(f"{name}: shape {tuple(got.shape)} against {tuple(want.shape)}")
    error = float((got - want).norm() / want.norm().clamp_min(1e-30))
    return Check(name, error if torch.isfinite(got).all() else float("nan"), tolerance)


# ----------------------------------------------------------------------------- inputs
def synthetic_items(n: int = 4, seed: int = 0) -> list[ScoringItem]:
    """Prompts shaped like the real ones (a shared chat header; the base prompt shares header and
    question with the teacher's) and responses, as token ids of the Qwen3 vocabulary."""
    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(0, 151_000, (k,), generator=g).tolist()

    items = []
    for i in range(n):
        header, question, reference, tail, answer = ids(4), ids(10 + i), ids(24 + 3 * i), ids(6), ids(3)
        prompts = PromptIds(student=header + question + answer, teacher=header + question + reference + tail,
                            ref=header + reference + tail)
        items.append(ScoringItem(prompts, ids(20 + 5 * i)))
    return items


_TINY_DIR: list[str] = []


def tiny(device: str, dtype: torch.dtype, attn: str = "sdpa"):
    """The tiny model loaded as models.load_model loads every model (from_pretrained in `dtype`, onto
    `device`, with `attn`), from a folder written once per process (and removed when it exits)."""
    import atexit
    import shutil
    import tempfile

    if not _TINY_DIR:
        _TINY_DIR.append(tempfile.mkdtemp(prefix="opsd_ray_gpucheck_"))
        atexit.register(shutil.rmtree, _TINY_DIR[0], True)
        build_tiny_model().save_pretrained(_TINY_DIR[0])
    spec = SimpleNamespace(path=_TINY_DIR[0], dtype=dtype, attn_implementation=attn)
    return load_model(spec, device=device).eval()


# ----------------------------------------------------------------------------- the checks
def scoring_checks(device: str, dtype: torch.dtype, items, want: dict) -> list[Check]:
    runs = [("padded", "sdpa"), ("shared_prefix", "sdpa")]
    if device != "cpu" and flash_attention_usable():
        runs.append(("padded", "flash_attention_2"))
    checks = []
    for layout, attn in runs:
        got = score(tiny(device, dtype, attn), items, layout=layout, micro_batch_size=len(items)).tensors
        for v in VARIANTS:
            checks.append(compare(f"scoring/{layout}/{attn}/{v}", got[v], want[v], TOLERANCE["scoring"]))
    return checks


def loss_check(device: str, dtype: torch.dtype, tokens: int | None = None) -> list[Check]:
    """The fused loss at the full vocabulary: device vs float64 CPU on identical (rounded) inputs. 256
    tokens on a GPU; 64 on a CPU, where bf16 matmuls without native support take 17 s for 256 tokens."""
    tokens = tokens or (256 if device.startswith("cuda") else 64)
    g = torch.Generator().manual_seed(1)
    head = tiny("cpu", torch.float32).lm_head.weight.detach().to(dtype)
    student, t, r, b = (torch.randn(tokens, head.shape[1], generator=g).to(dtype) for _ in range(4))

    def run(dev, dt):
        s = student.to(dev, dt).clone().requires_grad_(True)
        frozen = FrozenVariants(*(x.to(dev, dt) for x in (t, r, b)))
        loss, _ = opsd_loss(s, frozen, lm_head=head.to(dev, dt), frozen_lm_head=head.to(dev, dt),
                             chunk_size=min(128, max(tokens // 2, 1)))  # two chunks at least
        loss.backward()
        return loss.detach(), s.grad

    (loss, grad), (want_loss, want_grad) = run(device, dtype), run("cpu", torch.float64)
    return [compare("loss/value", loss, want_loss, TOLERANCE["loss/value"]),
            compare("loss/grad", grad, want_grad, TOLERANCE["loss/grad"])]


def learner_step(device: str, dtype: torch.dtype, items, frozen: dict) -> dict[str, torch.Tensor]:
    """One learner step as Learner.train_step takes it: LoRA on every projection, gradient
    checkpointing, the fused loss over the micro-batch, AdamW."""
    from peft import get_peft_model


    base = tiny(device, dtype)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(SimpleNamespace(lora=LORA)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B starts at zero in peft; a random B gives A a gradient too
        for name, p in sorted(model.named_parameters()):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model.train()
    lora = [p for _, p in sorted(model.named_parameters()) if p.requires_grad]
    rows = {v: t.to(device) for v, t in frozen.items()}
    total = sum(len(it.response) for it in items)
    loss, _ = micro_batch_loss(model.get_base_model().get_decoder(), base.get_output_embeddings().weight, items,
                               rows, OBJECTIVE, total, pad_id=0)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in lora])
    before = torch.cat([p.detach().flatten() for p in lora])
    torch.optim.AdamW(lora, lr=1e-3).step()
    return {"loss": loss.detach(), "grad": grad, "update": torch.cat([p.detach().flatten() for p in lora]) - before}


def learner_checks(device: str, dtype: torch.dtype, items, frozen_cpu: dict) -> list[Check]:
    got = learner_step(device, dtype, items, {v: t.to(dtype) for v, t in frozen_cpu.items()})
    want = learner_step("cpu", torch.float32, items, frozen_cpu)
    return [compare(f"learner/{k}", got[k], want[k], TOLERANCE[f"learner/{k}"]) for k in ("loss", "grad", "update")]


def run_checks(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> list[Check]:
    items = synthetic_items()
    want = score(tiny("cpu", torch.float32), items, layout="padded", micro_batch_size=len(items)).tensors
    return [*scoring_checks(device, dtype, items, want), *loss_check(device, dtype),
            *learner_checks(device, dtype, items, want)]


def flash_attention_usable() -> bool:
    try:
        from transformers.utils import is_flash_attn_2_available

        return torch.cuda.is_available() and is_flash_attn_2_available()
    except ImportError:
        return False


def report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  {'rel. error':>10}  {'tolerance':>9}  result"]
    lines += [f"{c.name:<{width}}  {c.error:10.2e}  {c.tolerance:9.0e}  {'ok' if c.ok else 'FAIL'}" for c in checks]
    failed = [c.name for c in checks if not c.ok]
    lines.append(f"{len(checks) - len(failed)} of {len(checks)} checks pass" + (f"; failed: {', '.join(failed)}"
                                                                                if failed else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opsd_ray.tools.gpucheck", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (bf16 on the CPU)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpucheck: no CUDA device here (torch.cuda.is_available() is False); nothing to check. "
              "Run it on a GPU node, or with --device cpu to try the checks on the CPU.")
        return 0
    if args.device.startswith("cuda"):
        print(f"gpucheck: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    checks = run_checks(args.device, torch.bfloat16)
    print(report(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
