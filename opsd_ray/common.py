"""What several modules share, with no imports of the package's own (a leaf: it cannot form a cycle)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def pad_id_of(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token (padded
    positions are masked out, so which id it is changes no result)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


ENGINES = ("auto", "vllm", "hf")  # rollout.engine and `opsd-ray eval engine=`


class ConfigError(ValueError):
    """A configuration problem the user must fix; the CLI prints it and exits with code 2."""


class RunStopped(RuntimeError):
    """A run stopped on purpose (repeated failures, bad numbers): the CLI prints why, what to check
    and where to resume from, and exits with code 1."""


def lora_config(model_cfg):
    """The peft LoraConfig of a model config's `lora` section (the learner's student and the engines'
    LoRA slots have the same shape)."""
    from peft import LoraConfig

    lo = model_cfg.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=list(lo.target_modules),
                      task_type="CAUSAL_LM")


# Tokens a chat template and the instructions may add to a question. The rollout engines' length cap
# uses a generous allowance (a prompt over vLLM's max_model_len is an error); the capacity plan uses
# a tight upper bound of what the templates add (memory estimates).
PROMPT_ALLOWANCE = 512
TEMPLATE_TOKENS = 128


def rollout_max_len(cfg) -> int:
    """The longest sequence a rollout engine must hold: the student sees the question only (no
    reference), and evaluation during training may generate longer than the rollout."""
    new_tokens = max(cfg.rollout.max_new_tokens, cfg.eval.max_new_tokens if cfg.eval.every else 0)
    return cfg.data.max_question_tokens + PROMPT_ALLOWANCE + new_tokens


HUB_DOWN = ("ConnectionError", "ConnectError", "ConnectTimeout", "Timeout", "NameResolutionError", "MaxRetryError",
            "LocalEntryNotFoundError", "OfflineModeIsEnabled")


def hub_unreachable(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) says the Hugging Face Hub could not be reached."""
    seen = 0
    while error is not None and seen < 20:
        text = str(error).lower()
        if type(error).__name__ in HUB_DOWN or "couldn't connect" in text or "offline mode" in text or \
                "failed to resolve" in text or "cannot reach" in text:
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def cache_dir() -> Path:
    """Root of the opsd_ray cache: `$OPSD_RAY_CACHE` or `~/.cache/opsd_ray` (built-in models, sampled data)."""
    env = os.environ.get("OPSD_RAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "opsd_ray"


def atomic_folder(final: Path, fill: Callable[[Path], None]) -> Path:
    """Fill a hidden temporary folder beside `final`, then rename it into place (replacing an older
    `final`): a reader sees the old folder or the whole new one. On any failure nothing is left."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        fill(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a hidden temporary file beside it and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def jsonl_records(text: str) -> list[dict]:
    """One record per line. A last line without its newline that does not parse is what a writer
    killed mid-line left (files written before line appends were atomic): dropped; any other bad line
    is an error."""
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: unfinished
                break
            raise
    return records
