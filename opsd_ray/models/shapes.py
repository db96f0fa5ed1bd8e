"""The shapes of a decoder-only model that the capacity plan needs (opsd_ray.tools.plan), and where they come
from: the model's config.json on disk (a local folder, the built-in cache, the Hugging Face cache),
else a built-in table that names its source."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from opsd_ray.common import ConfigError
from opsd_ray.models.builtin import BUILTINS, builtin_dir, tiny_qwen3_config

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OVERHEAD_BYTES = 2 * GiB  # per GPU process: CUDA context, allocator slack, vLLM graphs (rough)


@dataclass(frozen=True)
class Shapes:
    """The numbers of a decoder-only transformer the plan needs, and where they come from."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    qkv_bias: bool
    qk_norm: int  # parameters of the q/k norms per layer (Qwen3: per head, OLMo 3: full width)
    source: str

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by module name."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def layer_params(self) -> int:
        bias = self.q_dim + 2 * self.kv_dim if self.qkv_bias else 0
        return sum(a * b for a, b in self.matrices().values()) + bias + 2 * self.hidden + self.qk_norm

    def core_params(self) -> int:
        """Parameters every token goes through (the layers; the embedding is a lookup)."""
        return self.layers * self.layer_params() + self.hidden

    def params(self) -> int:
        return self.core_params() + self.vocab * self.hidden * (1 if self.tied else 2)

    def lora_params(self, r: int, targets) -> int:
        return self.layers * sum(r * (a + b) for name, (a, b) in self.matrices().items() if name in targets)

    def kv_bytes_per_token(self, dt: int) -> int:
        return 2 * self.layers * self.kv_dim * dt

    def describe(self) -> str:
        return (
            f"{self.layers} layers, hidden {self.hidden}, {self.heads} query / {self.kv_heads} key-value heads "
            f"of dim {self.head_dim}, MLP {self.intermediate}, vocab {self.vocab:,}, "
            f"{'tied' if self.tied else 'untied'} embeddings{', q/k/v bias' if self.qkv_bias else ''}"
        )


# Used when the model's config.json is not on disk. Each entry says where its numbers come from.
# fmt: off
TABLE: dict[str, Shapes] = {
    "Qwen/Qwen3-8B": Shapes(
        layers=36, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=12288, vocab=151936,
        tied=False, qkv_bias=False, qk_norm=2 * 128,
        source="built-in table (Qwen/Qwen3-8B config.json on the Hugging Face Hub)"),
    "Qwen/Qwen3-4B": Shapes(
        layers=36, hidden=2560, heads=32, kv_heads=8, head_dim=128, intermediate=9728, vocab=151936,
        tied=True, qkv_bias=False, qk_norm=2 * 128,
        source="built-in table (Qwen/Qwen3-4B config.json on the Hugging Face Hub)"),
    "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B": Shapes(
        layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064,
        tied=False, qkv_bias=True, qk_norm=0,
        source="built-in table (deepseek-ai/DeepSeek-R1-Distill-Qwen-7B config.json; Qwen2 layers carry "
               "q/k/v biases)"),
    "allenai/Olmo-3-7B-Think": Shapes(
        layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128, intermediate=11008, vocab=100278,
        tied=False, qkv_bias=False, qk_norm=2 * 4096,
        source="built-in table, NOT checked against the Hub file (no network here): the OLMo 3 report "
               "(7B: 32 layers, d_model 4096, 32 heads, no GQA) and public copies of the Olmo3 7B config "
               "(MLP 11008, vocab 100,278, untied); put config.json on disk (model.path=/folder) to use "
               "the real one"),
    "builtin:smollm2-135m": Shapes(
        layers=30, hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536, vocab=49152,
        tied=True, qkv_bias=False, qk_norm=0,
        source="built-in table (HuggingFaceTB/SmolLM2-135M-Instruct config.json)"),
}
# fmt: on


def qk_norm_params(model_type: str | None, head_dim: int, q_dim: int, kv_dim: int) -> int:
    if model_type == "qwen3":
        return 2 * head_dim  # one RMSNorm weight per head dim, for q and for k
    if model_type in ("olmo2", "olmo3"):
        return q_dim + kv_dim  # over the full q and k projections
    return 0


def shapes_from_config(config: dict, source: str) -> Shapes:
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return Shapes(
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", True)),  # transformers' default when absent
        qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        qk_norm=qk_norm_params(config.get("model_type"), head_dim, heads * head_dim, kv_heads * head_dim),
        source=source,
    )


def find_shapes(model_cfg) -> Shapes:
    """config.json on disk (local folder, built-in cache, Hugging Face cache), else the table."""
    path = str(model_cfg.path)
    candidates: list[Path] = []
    if path.startswith("builtin:"):

        name = path.removeprefix("builtin:")
        if name in BUILTINS:
            candidates.append(builtin_dir(name) / "config.json")
        if name == "tiny":  # the builder's own config: no need to build the model

            return shapes_from_config(
                tiny_qwen3_config().to_dict(), "the tiny builder's config (opsd_ray.models.loading)"
            )
    elif Path(path).expanduser().is_dir():
        candidates.append(Path(path).expanduser() / "config.json")
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # not a valid repo id: fall through to the table
            pass
    for candidate in candidates:
        if candidate.is_file():
            return shapes_from_config(json.loads(candidate.read_text()), f"{candidate}")
    if path in TABLE:
        return TABLE[path]
    raise ConfigError(
        f"no shapes for model.path={path}: its config.json is not on disk and it is not in the "
        f"built-in table ({', '.join(TABLE)}); pass model.path=/folder/with/config.json"
    )
