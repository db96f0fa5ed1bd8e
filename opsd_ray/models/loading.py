"""Model loading: presets, tokenizers, models, devices.

A model config node (OmegaConf or dataclass) has the attributes of `recipes/model/*.yaml`:
name, path, tokenizer, dtype, attn_implementation, enable_thinking, teacher_enable_thinking,
thinking_style, trust_remote_code, lora.

`path` is a Hub id, a local folder, or `builtin:<name>` (built offline into a cache folder once by
opsd_ray.models.builtin, then loaded like any local checkpoint).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from opsd_ray.common import ConfigError, hub_unreachable
from opsd_ray.models.builtin import BUILTIN_PREFIX, BUILTINS, _build_once, builtin_dir, cache_dir  # noqa: F401

log = logging.getLogger(__name__)




_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def load_tokenizer(model_cfg):
    """The model's tokenizer (with its chat template). Accepts a config node or a path.

    Loaded once per process and folder: transformers parses tokenizer.json in Python (about 1 s for a
    150k vocabulary), and a run asks for it in the driver, at start and in each worker. Nothing here
    changes a tokenizer after loading it; a folder whose tokenizer files change is loaded again."""
    tok_path = getattr(model_cfg, "tokenizer", None) or _path_of(model_cfg)
    trust = bool(getattr(model_cfg, "trust_remote_code", False))
    try:
        path = resolve_model_path(str(tok_path))
        return _load_tokenizer(path, trust, _files_stamp(path))
    except (OSError, ValueError) as e:  # no such repo or folder, offline, no tokenizer files in it
        key = "model.tokenizer" if getattr(model_cfg, "tokenizer", None) else "model.path"
        detail = " ".join(str(e).split())[:240]
        if hub_unreachable(e):
            raise ConfigError(f"{key}={tok_path}: the Hugging Face Hub cannot be reached ({type(e).__name__}: {detail}). "
                              "Offline, download the model where there is a network (`hf download <id> --local-dir "
                              f"<folder>`) and pass {key}=<folder>, or fill the HF cache and set HF_HUB_OFFLINE=1") from None
        raise ConfigError(f"{key}={tok_path}: cannot load a tokenizer from it ({type(e).__name__}: {detail})") from None


def _files_stamp(path: str) -> tuple:
    """What identifies a local folder's tokenizer files (name, size, mtime); () for a Hub id."""
    if not os.path.isdir(path):
        return ()
    return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)
                        if e.is_file() and ("token" in e.name or e.name.startswith(("chat_template", "special_")))))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, trust_remote_code: bool, stamp: tuple):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


def default_device() -> str:
    """The GPU Ray gave this process, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_cfg, *, dtype=None, device="cpu", runs_on=None):
    """AutoModelForCausalLM with the preset dtype and attention (train/eval mode left as is).

    `dtype` overrides the preset (a name such as "bfloat16" or a torch.dtype). Accepts a config
    node or a path (then float32, sdpa). `runs_on`: the device the model will compute on when it is
    loaded elsewhere first (FSDP learners load on the CPU, then shard onto their GPU); the attention
    is chosen for it.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = to_torch_dtype(dtype if dtype is not None else getattr(model_cfg, "dtype", "float32"))
    attn = _attn_implementation(getattr(model_cfg, "attn_implementation", None) or "sdpa", runs_on or device)
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
