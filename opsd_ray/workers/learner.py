"""Learner: the LoRA student pi_theta, the fused OPSD loss, AdamW, checkpoints.

One step = all trajectories of the step, in micro-batches whose losses are normalised by the true
response-token count of the whole step, so the gradient does not depend on the micro-batch size.
The student's final hidden states meet the frozen variants' at the same response positions and the
frozen lm_head (LoRA does not touch it) turns both into logits chunk by chunk inside opsd_loss.
"""

from __future__ import annotations

import io
import json
import math
import random
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from opsd_ray.common import lora_config, pad_id_of
from opsd_ray.models.loading import default_device, load_model, load_tokenizer, to_torch_dtype
from opsd_ray.objective.formulas import FrozenVariants, opsd_loss
from opsd_ray.workers.engines import response_logprobs
from opsd_ray.workers.process import Reusable, peak_memory, use_cores, worker_info
from opsd_ray.workers.scoring import FrozenBatch, ScoringItem, response_hidden


class StaleRolloutError(RuntimeError):
    pass


def check_staleness(versions: list[int], learner_version: int, one_step_off: bool) -> None:
    """Strictly on-policy by default: rollouts must come from the learner's current adapter (one-step-off:
    or the one before it)."""
    oldest = min(versions)
    if learner_version - oldest > int(one_step_off) or max(versions) > learner_version:
        raise StaleRolloutError(
            f"rollouts from adapter versions {sorted(set(versions))} but the learner is at version "
            f"{learner_version} and rollout.one_step_off={str(one_step_off).lower()}"
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
    variants = FrozenVariants(rows["teacher"], rows.get("ref"), rows.get("base"))
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


GROUP_TIMEOUT = timedelta(hours=2)  # a rank may wait in a collective while another's micro-batches are scored


def open_group_store(world_size: int):
    """Rank 0's TCPStore on a port the OS picks (port 0), held from now on: (store, port)."""
    import torch.distributed as dist

    store = dist.TCPStore("0.0.0.0", 0, world_size, is_master=True, wait_for_workers=False, timeout=GROUP_TIMEOUT)
    return store, store.port


def join_group(backend: str, address: str, port: int, rank: int, world_size: int, store=None) -> None:
    """Join the process group through rank 0's store (rank 0 passes the store it opened)."""
    import torch.distributed as dist

    if store is None:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=GROUP_TIMEOUT)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=GROUP_TIMEOUT)


def load_student_base(cfg, device: str, fsdp: bool):
    """The base model under the LoRA student. fsdp: the whole base stays in CPU memory until its layers
    are sharded onto the GPU, and its attention is the one for the GPU (flash-attention there)."""

    return load_model(cfg.model, device="cpu" if fsdp else device, runs_on=device)


def learner_settings(cfg):
    """The part of a run's config a learner reads, and all it keeps."""
    # imported here: gpucheck imports this module on GPU nodes that have only torch, transformers and peft
    from omegaconf import OmegaConf

    return OmegaConf.create({"run": {"seed": cfg.run.seed}, "model": cfg.model, "learner": cfg.learner,
                             "objective": cfg.objective, "rollout": {"one_step_off": cfg.rollout.one_step_off}})


class Learner(Reusable):
    """One member of the learner group (rank `rank` of `world_size`; rank 0 serves the adapter and
    the checkpoint files). A step is a series of `accumulate` calls, one per micro-batch of
    trajectories, then `step`: the gradient and the metrics are summed over the micro-batches and
    the group, divided by the step's response-token count, clipped, and AdamW moves every replica
    the same way."""

    def __init__(self, cfg, num_threads: int | list[int] | None = None, rank: int = 0, world_size: int = 1,
                 pad_id: int | None = None):
        from peft import get_peft_model

        started = time.time()
        use_cores(num_threads)
        cfg = learner_settings(cfg)
        torch.manual_seed(cfg.run.seed)  # LoRA init (rank 0's is broadcast when the group forms)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.fsdp = cfg.learner.strategy == "fsdp" and world_size > 1
        self.device = default_device()
        base = load_student_base(cfg, self.device, self.fsdp)
        if cfg.learner.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        self.model = get_peft_model(base, lora_config(cfg.model))
        self.lm_head = base.get_output_embeddings().weight  # frozen: shared by student and targets
        self.pad_id = pad_id if pad_id is not None else pad_id_of(load_tokenizer(cfg.model))
        self._make_optimizer()
        self.version = 0  # adapter version = number of optimizer steps taken
        self.store = None  # rank 0 of a group: the TCPStore it opened (group_address)
        self.sums: dict[str, float] = {}  # the step being accumulated: metric x tokens
        self.info = worker_info("learner", started)

    def ready(self) -> dict:
        return self.info

    def peak_memory(self) -> dict:
        return peak_memory()

    def _make_optimizer(self) -> None:
        """AdamW over the LoRA parameters (again after FSDP has replaced them by their shards)."""
        le = self.cfg.learner
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=le.lr, betas=tuple(le.adam_betas), weight_decay=le.weight_decay
        )
        warmup = max(le.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
        )

    # ------------------------------------------------------------------ the group
    def release(self) -> None:
        """Leave the process group (a reused learner joins the next run's)."""
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.store = None

    def group_address(self) -> tuple[str, int]:
        """Where the group meets (rank 0): this node's address and the port of the group's store, which
        rank 0 opens now and holds (no other process can take the port before the group forms)."""
        import ray

        self.store, port = open_group_store(self.world_size)
        return ray.util.get_node_ip_address(), port

    def join_group(self, address: str, port: int) -> int:
        """torch.distributed over the learners (gloo on CPU, NCCL on GPU).

        ddp: every learner holds the whole model and starts from rank 0's LoRA weights; the LoRA
        gradients are all-reduced once per step. fsdp: FSDP2 `fully_shard`s each decoder layer (frozen
        base and LoRA alike) over the group, so a learner holds 1/N of the layers' weights and gathers a
        layer only while it computes; gradients are reduce-scattered. The embeddings, the final norm
        and the lm_head stay whole on every learner: the fused loss applies the lm_head itself.
        """
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        join_group(backend, address, port, self.rank, self.world_size, self.store)
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(torch.device(self.device).type, (self.world_size,))
            for layer in self.model.get_base_model().get_decoder().layers:
                # each rank keeps its shard of its own copy (identical: same seed, same LoRA init), on the
                # mesh's device; reshard after forward: a layer is whole only while it computes
                fully_shard(layer, mesh=mesh, reshard_after_forward=True)
            self.model.to(self.device)  # the embeddings, final norm and lm_head stay whole
            self.lm_head = self.model.get_base_model().get_output_embeddings().weight
            self._make_optimizer()
        else:
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, src=0)
        return self.rank

    def _lora_weights(self) -> dict[str, torch.Tensor]:
        """The LoRA parameters by model name, whole, on the CPU. With fsdp a collective: every rank
        calls it, rank 0 gets the weights, the others an empty dict."""
        if not self.fsdp:
            return {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.model, options=options)

    # ------------------------------------------------------------------ adapter
    def adapter_state(self, dtype: str = "float32") -> tuple[dict, dict[str, torch.Tensor]]:
        """({version, bytes}, the LoRA weights in `dtype`: what the rollout engine computes them in).

        peft keeps LoRA weights in float32 on a bf16 base; vLLM on a GPU casts them to the model dtype
        when it loads them, so for it they travel in that dtype (half the bytes; driver.adapter_dtype).
        Called with num_returns=2, the driver reads only the small first part; the weights go from
        here to the rollout workers.
        """
        from peft import get_peft_model_state_dict

        weights = self._lora_weights()  # with fsdp every rank calls this (LearnerGroup.whole)
        # save_embedding_layers=False: "auto" asks the Hub whether the base has a config, on every call
        state = get_peft_model_state_dict(self.model, state_dict=weights, save_embedding_layers=False) if weights else {}
        state = {k: v.detach().to("cpu", to_torch_dtype(dtype), copy=True) for k, v in state.items()}
        nbytes = sum(v.numel() * v.element_size() for v in state.values())
        return {"version": self.version, "bytes": nbytes}, state

    @torch.no_grad()
    def probe_logprobs(self, prompt: list[int], response: list[int]) -> dict:
        """The sync check's probe under this learner's adapter and under the base alone (with fsdp a
        collective: every rank calls it)."""

        self.model.eval()
        adapter = response_logprobs(self.model, prompt, response)
        with self.model.disable_adapter():
            base = response_logprobs(self.model, prompt, response)
        return {"adapter": adapter, "base": base, "version": self.version}

    # ------------------------------------------------------------------ training
    def accumulate(
        self, items: list[ScoringItem], versions: list[int], diagnostics: bool, frozen: FrozenBatch
    ) -> dict[str, float]:
        """One micro-batch: its trajectories and the scoring worker's frozen variants for them.

        The driver passes `frozen` as an object ref; Ray resolves it here, so the frozen variants go
        from the scoring worker to the learner without passing through the driver.
        """
        start = time.time()
        check_staleness(versions, self.version, self.cfg.rollout.one_step_off)
        n = self._accumulate(items, frozen.tensors, diagnostics, frozen.wire_format == "hidden")
        self.sums["wire_bytes"] = self.sums.get("wire_bytes", 0.0) + frozen.nbytes
        return {"num_tokens": n, "start": start, "end": time.time()}

    def step(self, num_tokens: int) -> dict[str, float]:
        """The update: the step's gradient over `num_tokens` response tokens (all learners), then AdamW.
        Returns the step's metrics (identical on every rank) and when this learner was busy with it."""
        start = time.time()
        metrics = self.reduce(num_tokens)
        metrics.update(self.optimizer_step(metrics["loss"]))
        return {**metrics, "start": start, "end": time.time()}

    def _accumulate(self, items, rows: dict, diagnostics: bool, frozen_is_hidden: bool) -> int:
        """Add one micro-batch's loss sum (not yet divided by the step's token count) to the gradient."""
        n = sum(len(it.response) for it in items)
        if sum(len(t) for t in rows.values()) != n * len(rows):
            raise ValueError(f"frozen rows do not match the micro-batch's {n} response tokens")
        self.model.train()
        decoder = self.model.get_base_model().get_decoder()
        rows = {v: t.to(self.lm_head.device) for v, t in rows.items()}
        loss, metrics = micro_batch_loss(decoder, self.lm_head, items, rows, self.cfg.objective, 1, self.pad_id,
                                         frozen_is_hidden=frozen_is_hidden, diagnostics=diagnostics)
        loss.backward()
        self.sums["loss"] = self.sums.get("loss", 0.0) + float(loss.detach())
        for k, v in metrics.items():
            if k != "num_tokens":
                self.sums[k] = self.sums.get(k, 0.0) + v * n  # per-token means -> sums over tokens
        return n

    def reduce(self, num_tokens: int) -> dict[str, float]:
        """Divide the accumulated gradient and metric sums by the step's token count, summed over the
        group (the loss is normalised by the whole step's response tokens, whoever computed them)."""
        # fsdp has already reduce-scattered the gradients, as a mean over the group: undo the mean
        scale = self.world_size / num_tokens if self.fsdp else 1 / num_tokens
        for p in self.params:
            if p.grad is not None:
                p.grad.mul_(scale)
        keys = sorted(self.sums)
        sums = torch.tensor([self.sums[k] for k in keys], dtype=torch.float64)
        if self.world_size > 1:
            import torch.distributed as dist

            sums = sums.to(self.lm_head.device)
            dist.all_reduce(sums)
        if self.world_size > 1 and not self.fsdp:
            import torch.distributed as dist

            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for p, g in zip(self.params, grads, strict=True):
                p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
                offset += g.numel()
        self.sums = {}
        out = {k: float(v) / num_tokens for k, v in zip(keys, sums.tolist(), strict=True)}
        out["wire_bytes_per_token"] = out.pop("wire_bytes", 0.0)
        return {**out, "num_tokens": num_tokens}

    def optimizer_step(self, loss: float = 0.0) -> dict[str, float]:
        """Clip and step; a non-finite loss or gradient norm skips the update instead (the adapter, the
        optimizer and the schedule stay as they were; every rank sees the same reduced numbers)."""
        clip = self.cfg.learner.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # fsdp: a DTensor
            grad_norm = grad_norm.full_tensor()
        skipped = not (math.isfinite(loss) and math.isfinite(float(grad_norm)))
        if not skipped:
            self.optimizer.step()
            self.scheduler.step()
            self.version += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "grad_norm": float(grad_norm),
            "lr": self.scheduler.get_last_lr()[0],
            "adapter_version": self.version,
            "skipped": int(skipped),
        }

    # ------------------------------------------------------------------ checkpoints (as files)
    def checkpoint_files(self) -> dict[str, bytes]:
        """Adapter, optimizer and RNG as {file name: bytes}: the driver writes them into its run folder
        (no node needs to see another's disk). The optimizer state is keyed by parameter name and
        whole (torch.distributed.checkpoint's full state dict), so a checkpoint resumes with any
        number of learners and either strategy. With fsdp a collective (rank 0 gets the files)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=self.fsdp)  # fsdp: gathered to rank 0
        if self.optimizer.state:
            optimizer = _to_cpu(get_optimizer_state_dict(self.model, self.optimizer, options=options))
        else:  # no step taken yet (all ranks alike): get_optimizer_state_dict would take an lr-0 Adam step to
            # make moments, and the first real update would then be Adam's second, 26% smaller
            optimizer = {"state": {}, "param_groups": [dict(self.optimizer.param_groups[0], params=[])]}
        files = self.adapter_files()
        if not files:
            return {}
        files["optimizer.pt"] = _torch_bytes({"optimizer": optimizer, "scheduler": self.scheduler.state_dict()})
        files["rng.pt"] = _torch_bytes(rng_state())
        files["learner_state.json"] = json.dumps({"adapter_version": self.version}).encode()
        return files

    def load_checkpoint_files(self, files: dict[str, bytes]) -> int:
        """Restore what checkpoint_files wrote; every learner of the group loads the same files and
        keeps its own share (no communication: with fsdp each rank cuts its shard out locally)."""
        from safetensors.torch import load as load_safetensors

        saved = load_safetensors(files["adapter_model.safetensors"])
        opt = load_plain(files["optimizer.pt"], "optimizer.pt")
        names = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(saved) != {peft_name(n) for n in names}:
            raise ValueError(f"the checkpoint's adapter does not fit this model's LoRA (r, targets): "
                             f"{sorted(set(saved) ^ {peft_name(n) for n in names})[:4]}")
        with torch.no_grad():
            for name, param in names.items():
                _assign(param, saved[peft_name(name)])
                moments = opt["optimizer"]["state"].get(name)
                self.optimizer.state.pop(param, None)  # a checkpoint from before any step has none
                if moments:
                    self.optimizer.state[param] = {
                        k: v if k == "step" else _like(param, v) for k, v in moments.items()
                    }
        self.optimizer.param_groups[0]["lr"] = opt["optimizer"]["param_groups"][0]["lr"]
        self.scheduler.load_state_dict(opt["scheduler"])
        set_rng_state(load_plain(files["rng.pt"], "rng.pt"))
        self.version = int(json.loads(files["learner_state.json"])["adapter_version"])
        return self.version

    def adapter_files(self) -> dict[str, bytes]:
        """The peft adapter folder (adapter_model.safetensors, adapter_config.json, README.md) as bytes.
        With fsdp a collective (rank 0 gets the files, the others {})."""
        weights = self._lora_weights()
        if not weights:
            return {}
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, state_dict=weights, save_embedding_layers=False)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def _like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor) laid out as `param`: on its device and dtype, and for an FSDP shard
    (a DTensor) this rank's piece of it, cut out locally."""
    full = full.to(device=param.device, dtype=param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    return full


def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    value = _like(param, full)
    if hasattr(param, "to_local"):
        param.to_local().copy_(value.to_local())
    else:
        param.copy_(value)


def peft_name(name: str, adapter: str = "default") -> str:
    """A LoRA parameter's name in a saved peft adapter: the model's name without the adapter's."""
    return name.replace(f".{adapter}.", ".")


def _to_cpu(obj):
    """A state dict's tensors on the CPU (a checkpoint must load on any machine)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds more than tensors and plain values: loading it could run code."""


def load_plain(data: bytes, name: str):
    """A torch file of tensors and plain values (dicts, lists, numbers, strings), loaded with
    weights_only=True: a pickle that would build any other object, or run code, is refused."""
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # pickle.UnpicklingError for a forbidden global; anything else: not a torch file
        detail = " ".join(str(e).split())[:200]
        raise UnsafeCheckpoint(f"{name} is not a file of tensors and plain values, so it is not loaded (loading "
                               f"it could run code): {type(e).__name__}: {detail}") from None


def rng_state() -> dict:
    """The RNGs as tensors and plain values (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
