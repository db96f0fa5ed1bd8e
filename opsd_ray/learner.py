"""Learner: the LoRA student pi_theta, the fused OPSD loss, AdamW, checkpoints.

One step = all trajectories of the step, in micro-batches whose losses are normalised by the true
response-token count of the whole step, so the gradient does not depend on the micro-batch size.
The student's final hidden states meet the frozen variants' at the same response positions and the
frozen lm_head (LoRA does not touch it) turns both into logits chunk by chunk inside opsd_loss.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from opsd_ray.models import to_torch_dtype
from opsd_ray.objectives import FrozenVariants, opsd_loss
from opsd_ray.scoring import FrozenBatch, ScoringItem, merge, response_hidden


class StaleRolloutError(RuntimeError):
    pass


def check_staleness(versions: list[int], learner_version: int, max_staleness: int) -> None:
    """Strictly on-policy by default: rollouts must come from the learner's current adapter."""
    oldest = min(versions)
    if learner_version - oldest > max_staleness or max(versions) > learner_version:
        raise StaleRolloutError(
            f"rollouts from adapter versions {sorted(set(versions))} but the learner is at version "
            f"{learner_version} and rollout.max_staleness={max_staleness}"
        )


def lora_config(model_cfg):
    from peft import LoraConfig

    lo = model_cfg.lora
    return LoraConfig(
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=list(lo.target_modules),
        task_type="CAUSAL_LM",
    )


def micro_batch_loss(
    decoder, lm_head, items: list[ScoringItem], rows: dict, objective, normalizer: int, pad_id: int, *,
    frozen_is_hidden: bool = True, diagnostics: bool = False,
):
    """(loss, metrics) of one micro-batch: the student's final hidden states at the response positions
    against the frozen variants' `rows` (hidden states, or logits), summed and divided by `normalizer`.

    The frozen lm_head (LoRA does not touch it) turns both into logits chunk by chunk inside opsd_loss.
    """
    o = objective
    student = response_hidden(decoder, items, ("student",), pad_id)["student"]
    variants = FrozenVariants(rows["teacher"], rows.get("reference_only"), rows.get("base"))
    return opsd_loss(
        student,
        variants,
        mode=o.mode,
        beta=o.beta,
        clip=o.clip or None,
        center=o.center,
        lam=o.lam,
        temperature=o.temperature,
        chunk_size=o.chunk_size,
        lm_head=lm_head,
        frozen_lm_head=lm_head if frozen_is_hidden else None,
        normalizer=normalizer,
        diagnostics=diagnostics,
    )


class Learner:
    def __init__(self, cfg, num_threads: int | None = None):
        from peft import get_peft_model

        from opsd_ray.cluster import worker_info
        from opsd_ray.models import default_device, load_model, load_tokenizer

        started = time.time()
        if num_threads:
            torch.set_num_threads(num_threads)
        torch.manual_seed(cfg.run.seed)  # LoRA init
        self.cfg = cfg
        base = load_model(cfg.model, device=default_device())
        if cfg.learner.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self.model = get_peft_model(base, lora_config(cfg.model))
        self.lm_head = base.get_output_embeddings().weight  # frozen: shared by student and targets
        tok = load_tokenizer(cfg.model)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        params = [p for p in self.model.parameters() if p.requires_grad]
        le = cfg.learner
        self.optimizer = torch.optim.AdamW(
            params, lr=le.lr, betas=tuple(le.adam_betas), weight_decay=le.weight_decay
        )
        warmup = max(le.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )
        self.version = 0  # adapter version = number of optimizer steps taken
        self.info = worker_info("learner", started)

    def ready(self) -> dict:
        return self.info

    # ------------------------------------------------------------------ adapter
    def adapter_state(self, dtype: str = "float32") -> tuple[dict, dict[str, torch.Tensor]]:
        """({version, bytes}, the LoRA weights in `dtype`: what the rollout engine computes them in).

        peft keeps LoRA weights in float32 on a bf16 base; vLLM on a GPU casts them to the model dtype
        when it loads them, so for it they travel in that dtype (half the bytes; driver.adapter_dtype).
        Called with num_returns=2, the driver reads only the small first part; the weights go from
        here to the rollout workers.
        """
        from peft import get_peft_model_state_dict

        # save_embedding_layers=False: "auto" asks the Hub whether the base has a config, on every call
        state = get_peft_model_state_dict(self.model, save_embedding_layers=False)
        state = {k: v.detach().to("cpu", to_torch_dtype(dtype), copy=True) for k, v in state.items()}
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return {"version": self.version, "bytes": nbytes}, state

    # ------------------------------------------------------------------ training
    def train_step(
        self, items: list[ScoringItem], versions: list[int], diagnostics: bool, *frozen_parts: FrozenBatch
    ) -> dict[str, float]:
        """One update from the step's trajectories and the scoring workers' parts, in order.

        The driver passes the parts as object refs; Ray resolves them here, so the frozen variants go
        from the scoring workers to the learner without passing through the driver.
        """
        check_staleness(versions, self.version, self.cfg.rollout.max_staleness)
        frozen = merge(list(frozen_parts))
        metrics = self.backward(items, frozen, diagnostics)
        metrics.update(self.optimizer_step())
        metrics["wire_bytes_per_token"] = frozen.bytes_per_token
        return metrics

    def backward(
        self, items: list[ScoringItem], frozen: FrozenBatch, diagnostics: bool = False
    ) -> dict[str, float]:
        """Accumulate the step's gradient over micro-batches; each loss is divided by the step's token count."""
        o, mb = self.cfg.objective, self.cfg.learner.micro_batch_size
        total = frozen.num_tokens
        self.model.train()
        decoder = self.model.get_base_model().get_decoder()
        sums: dict[str, float] = {"loss": 0.0}
        offset = 0
        for i in range(0, len(items), mb):
            chunk = items[i : i + mb]
            n = sum(len(it.response) for it in chunk)
            rows = {v: t[offset : offset + n].to(self.lm_head.device) for v, t in frozen.tensors.items()}
            offset += n
            loss, metrics = micro_batch_loss(
                decoder, self.lm_head, chunk, rows, o, total, self.pad_id,
                frozen_is_hidden=frozen.wire_format == "hidden", diagnostics=diagnostics,
            )
            loss.backward()
            sums["loss"] += float(loss.detach())
            for k, v in metrics.items():
                if k != "num_tokens":
                    sums[k] = sums.get(k, 0.0) + v * n / total  # per-token means over the whole step
        if offset != total:
            raise ValueError(f"frozen batch has {total} tokens but the trajectories have {offset}")
        return {**sums, "num_tokens": total}

    def optimizer_step(self) -> dict[str, float]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = self.cfg.learner.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.version += 1
        return {
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "adapter_version": self.version,
        }

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, folder: str, trainer_state: dict) -> str:
        """Adapter + optimizer + RNG + trainer state, written to a temp folder and renamed."""
        final = Path(folder)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        self.model.save_pretrained(tmp, save_embedding_layers=False)  # adapter + adapter_config.json
        torch.save(
            {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            tmp / "optimizer.pt",
        )
        torch.save(rng_state(), tmp / "rng.pt")
        state = dict(trainer_state, adapter_version=self.version)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return str(final)

    def load_checkpoint(self, folder: str) -> dict:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        folder = Path(folder)
        set_peft_model_state_dict(self.model, load_file(folder / "adapter_model.safetensors"))
        opt = torch.load(folder / "optimizer.pt", weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
        state = json.loads((folder / "trainer_state.json").read_text())
        self.version = int(state["adapter_version"])
        return state

    def save_adapter(self, folder: str) -> str:
        final = Path(folder)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        self.model.save_pretrained(tmp, save_embedding_layers=False)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return str(final)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
