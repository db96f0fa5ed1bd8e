"""Training data: read a source, validate every row up front, shuffle deterministically.

Sources: jsonl, parquet, a saved Hugging Face dataset folder (read with pyarrow), a Hub id
(needs the `datasets` package and a network), or `builtin:<file>` shipped in opsd_ray/assets/data.
Which columns hold the question, the reference solution and the final answer is configuration.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from opsd_ray.common import ConfigError, cache_dir, hub_unreachable

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "data"
CALCULATOR_NOTE = re.compile(r"<<[^<>]*>>")


@dataclass
class Example:
    id: int  # row index in the source, stable across shuffles
    question: str
    reference: str
    answer: str | None


@dataclass
class DataReport:
    source: str
    rows_read: int = 0
    valid: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    without_answer: int = 0
    sample: dict | None = None  # data.sample: how the rows were drawn
    note: str | None = None  # data.note: how the data set was made
    cache: str | None = None  # where a sampled data set is cached
    contexts: dict | None = None  # the context windows each variant must fit, and the rows over them

    def add_contexts(self, limits: dict[str, int], new_tokens: int, over: dict[str, int], dropped: int) -> None:
        """Rows skipped because a variant's prompt plus `new_tokens` does not fit its context window."""
        self.contexts = {"limits": limits, "max_new_tokens": new_tokens, "over": over, "rows_skipped": dropped}
        if dropped:
            self.skipped["context_over_window"] = dropped
            self.valid -= dropped

    def summary(self) -> str:
        if self.sample:
            s = self.sample
            parts = [f"data: {self.valid} rows sampled from {self.rows_read} in {self.source} (seeded hash of the text, "
                     f"seed {s['seed']}; {s['examined']} rows examined)"]
        else:
            parts = [f"data: {self.valid}/{self.rows_read} rows valid from {self.source}"]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items())))
        if self.without_answer:
            parts.append(f"{self.without_answer} valid rows have no final answer")
        if self.contexts:
            c = self.contexts
            over = ", ".join(f"{v} {n}" for v, n in c["over"].items()) or "none"
            parts.append(f"contexts (prompt + up to {c['max_new_tokens']} new tokens) must fit "
                         + ", ".join(f"{v} {n}" for v, n in c["limits"].items()) + f" tokens; rows over, per variant: {over}")
        if self.cache:
            parts.append(f"cached in {self.cache}")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())


# ----------------------------------------------------------------------------- reading
def resolve_path(path: str) -> str:
    if path.startswith("builtin:"):
        local = ASSETS / path.removeprefix("builtin:")
        if not local.exists():
            known = sorted(p.name for p in ASSETS.glob("*.jsonl"))
            raise ConfigError(f"no built-in data file '{local.name}'; built-in files: {', '.join(known)}")
        return str(local)
    return path


def detect_format(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_dir():
        return "hf_disk"
    if p.suffix in (".jsonl", ".json"):
        return "jsonl"
    if p.suffix == ".parquet":
        return "parquet"
    if p.exists():
        raise ConfigError(f"data.path={path}: cannot tell the format from the name; set data.format")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        return "hub"
    raise ConfigError(f"data.path: no such file or folder: {path}")


def read_rows(path: str, fmt: str = "auto", split: str = "train",
              hub_config: str | None = None) -> tuple[list[Any], dict[str, int]]:
    """All rows of a source as Python objects, plus the lines that could not be read, by reason."""
    path = resolve_path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    local = Path(path).expanduser()
    if fmt in ("jsonl", "parquet") and local.is_dir():
        raise ConfigError(f"data.path={path} is a folder but data.format={fmt} reads a file; pass the file, or "
                          "data.format=hf_disk for a dataset saved with save_to_disk")
    if fmt == "jsonl":
        return _read_jsonl(local)
    if fmt == "parquet":
        try:
            return pq.read_table(local).to_pylist(), {}
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"data.path={path}: not a readable parquet file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]})") from None
    if fmt == "hf_disk":
        return _read_hf_disk(local, split), {}
    if fmt == "hub":
        return _read_hub(path, split, hub_config), {}
    raise ConfigError(f"data.format={fmt!r} is not one of: auto, jsonl, parquet, hf_disk, hub")


def _read_jsonl(path: Path) -> tuple[list[Any], dict[str, int]]:
    """One JSON value per line; lines that are not UTF-8 or not JSON are counted, not fatal."""
    rows, bad = [], Counter()
    with path.open("rb") as f:
        for raw in f:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                bad["not_utf8"] += 1
                continue
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                bad["invalid_json"] += 1
    return rows, dict(bad)


def _read_hf_disk(path: Path, split: str) -> list[Any]:
    """A folder written by `Dataset.save_to_disk` (arrow stream files), or a DatasetDict of them."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split not in splits:
            raise ConfigError(f"{path}: no split '{split}' (splits: {', '.join(splits)}); set data.split")
        path = path / split
    files = sorted(path.glob("*.arrow"))
    if not files:
        raise ConfigError(f"{path}: not a saved Hugging Face dataset (no .arrow files)")
    tables = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
        except (pa.ArrowException, OSError) as e:
            raise ConfigError(f"{f}: not a readable saved dataset ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160]})") from None
    return pa.concat_tables(tables).to_pylist()


def _read_hub(repo_id: str, split: str, hub_config: str | None = None) -> list[Any]:
    try:
        import datasets  # a dependency; imported here because it is slow to import
    except ImportError:
        raise ConfigError(
            f"data.path={repo_id} looks like a Hub id, which needs the `datasets` package (`make install` installs it) "
            "and a network; "
            "offline, download it elsewhere and pass data.path=/path/to/file.parquet"
        ) from None
    try:
        return datasets.load_dataset(repo_id, hub_config, split=split).to_list()
    except Exception as e:  # network or auth problems: say what to do instead
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:240]
        if hub_unreachable(e):
            raise ConfigError(f"data.path={repo_id}: the Hugging Face Hub cannot be reached ({detail}). Offline, "
                              "download the data set where there is a network and pass data.path=/path/to/a/local/copy "
                              "(a parquet or jsonl file, or a save_to_disk folder)") from None
        raise ConfigError(f"could not load {repo_id} from the Hub ({detail}); offline, pass "
                          "data.path=/path/to/a/local/copy") from None


# ----------------------------------------------------------------------------- validation
def _text_field(row: dict, key: str, numbers: bool = False) -> tuple[str | None, str | None]:
    """(value, skip reason). With `numbers`, a number is taken as its text (public sets often store a
    final answer as 42)."""
    if key not in row or row[key] is None:
        return None, f"missing_{key}"
    value = row[key]
    if numbers and isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None, f"non_text_{key}"
    if not value.strip():
        return None, f"empty_{key}"
    return value.strip(), None


def _answer(row: dict, reference: str, data_cfg: Any) -> str | None:
    if data_cfg.answer_key:
        value, _ = _text_field(row, data_cfg.answer_key, numbers=True)
        return value
    if data_cfg.answer_pattern:
        matches = re.findall(data_cfg.answer_pattern, reference, flags=re.MULTILINE)
        return matches[-1].strip() if matches else None
    return None


def token_counter(tokenizer):
    """count_tokens(texts) -> lengths, batched (the fast tokenizer encodes a list in parallel)."""
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def tokenizer_id(model_cfg) -> str:
    """The tokenizer a data set's token budgets were counted with (part of a sampled set's cache name)."""
    return str(getattr(model_cfg, "tokenizer", None) or model_cfg.path)


def sample_key(seed: int, question: str, reference: str) -> str:
    """A row's place in a sampled data set: a hash of its text, so the rows drawn do not depend on the
    order the source lists them in."""
    return hashlib.sha256(f"{seed}\0{' '.join(question.split())}\0{reference}".encode()).hexdigest()


def validate_rows(
    rows: list[Any], data_cfg: Any, count_tokens=None, source: str = ""
) -> tuple[list[Example], DataReport]:
    """Keep rows with non-empty text question/reference within the token budgets, drop duplicates.

    `count_tokens(texts) -> list[int]` enables the token-budget checks (skipped when None). With
    `data.sample = N`, the rows are taken in the order of their `sample_key` until N are valid (only
    those are tokenized), so the same N rows come out whatever order the source has.
    """
    report = DataReport(source=source or str(data_cfg.path), rows_read=len(rows))
    skipped: Counter[str] = Counter()
    candidates: list[tuple[int, dict, str, str]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            skipped["not_an_object"] += 1
            continue
        question, why = _text_field(row, data_cfg.question_key)
        reference, why_ref = (None, None) if why else _text_field(row, data_cfg.reference_key, numbers=True)
        if why or why_ref:
            skipped[why or why_ref] += 1
            continue
        if data_cfg.strip_calculator_notes:
            reference = CALCULATOR_NOTE.sub("", reference)
        candidates.append((i, row, question, reference))
    sample = getattr(data_cfg, "sample", None)
    if sample:
        seed = getattr(data_cfg, "sample_seed", 0)
        candidates.sort(key=lambda c: sample_key(seed, c[2], c[3]))
    seen: set[str] = set()
    examples: list[Example] = []
    examined = 0
    for start in range(0, len(candidates), SAMPLE_CHUNK if sample else max(len(candidates), 1)):
        chunk = candidates[start : start + (SAMPLE_CHUNK if sample else len(candidates))]
        if count_tokens is not None:
            ref_len, q_len = count_tokens([c[3] for c in chunk]), count_tokens([c[2] for c in chunk])
        for k, (i, row, question, reference) in enumerate(chunk):
            if sample and len(examples) == sample:
                break
            examined += 1
            why = _skip_reason(data_cfg, row, question, reference, seen,
                               None if count_tokens is None else (q_len[k], ref_len[k]))
            if why:
                skipped[why] += 1
                continue
            answer = _answer(row, reference, data_cfg)
            report.without_answer += answer is None
            examples.append(Example(id=i, question=question, reference=reference, answer=answer))
        if sample and len(examples) == sample:
            break
    if sample:
        report.sample = {"size": len(examples), "asked": sample, "seed": getattr(data_cfg, "sample_seed", 0),
                         "candidates": len(candidates), "examined": examined}
    report.skipped = dict(skipped)
    report.valid = len(examples)
    return examples, report


SAMPLE_CHUNK = 2048  # rows tokenized at a time while drawing a sample


def _skip_reason(data_cfg, row: dict, question: str, reference: str, seen: set[str],
                 lengths: tuple[int, int] | None) -> str | None:
    """Why a row with text question and reference is skipped (None: kept; its question is then `seen`)."""
    if lengths is not None and lengths[1] > data_cfg.max_reference_tokens:
        return "reference_over_token_budget"
    if lengths is not None and lengths[0] > data_cfg.max_question_tokens:
        return "question_over_token_budget"
    key = " ".join(question.split())
    if key in seen:
        return "duplicate_question"
    if getattr(data_cfg, "require_answer", False) and _answer(row, reference, data_cfg) is None:
        return "no_final_answer"
    seen.add(key)
    return None


def load_examples(data_cfg: Any, count_tokens=None, seed: int = 0, tokenizer_id: str = "") -> tuple[list[Example], DataReport]:
    """Read, validate and shuffle (deterministic per seed); zero valid rows is an error. A sampled data
    set (`data.sample`) is drawn once and cached as parquet (`sample_cache`); later runs read the cache."""
    if getattr(data_cfg, "sample", None):
        examples, report = sampled_examples(data_cfg, count_tokens, tokenizer_id)
    else:
        examples, report = read_valid(data_cfg, count_tokens)
    report.note = getattr(data_cfg, "note", None)
    random.Random(seed).shuffle(examples)
    if data_cfg.limit is not None:
        examples = examples[: data_cfg.limit]
    return examples, report


def read_valid(data_cfg: Any, count_tokens) -> tuple[list[Example], DataReport]:
    """The source's valid rows and the report of what was read and skipped; zero valid rows is an error."""
    rows, unreadable = read_rows(data_cfg.path, data_cfg.format, data_cfg.split, getattr(data_cfg, "hub_config", None))
    examples, report = validate_rows(rows, data_cfg, count_tokens, source=str(data_cfg.path))
    report.rows_read += sum(unreadable.values())
    report.skipped.update(unreadable)
    if not examples:
        no_rows(data_cfg, rows, report)
    return examples, report


def no_rows(data_cfg: Any, rows: list[Any], report: DataReport) -> None:
    columns = sorted({k for r in rows[:100] if isinstance(r, dict) for k in r})
    raise ConfigError(
        f"no valid rows in {data_cfg.path} ({report.summary()}); check data.question_key="
        f"{data_cfg.question_key} and data.reference_key={data_cfg.reference_key}"
        + (f" (the rows have columns: {', '.join(columns)})" if columns else "")
    )


SAMPLE_KEYS = ("path", "format", "split", "hub_config", "question_key", "reference_key", "answer_key", "answer_pattern",
               "strip_calculator_notes", "max_reference_tokens", "max_question_tokens", "require_answer", "sample",
               "sample_seed")


def sample_cache(data_cfg: Any, tokenizer_id: str) -> Path:
    """Where a sampled data set is cached: named by everything that decides which rows it holds."""
    what = {k: getattr(data_cfg, k, None) for k in SAMPLE_KEYS} | {"tokenizer": tokenizer_id}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "data" / f"{data_cfg.name}-{digest}.parquet"


def sampled_examples(data_cfg: Any, count_tokens, tokenizer_id: str) -> tuple[list[Example], DataReport]:
    """The sampled data set from its cache, or drawn from the source (then cached)."""
    cached = sample_cache(data_cfg, tokenizer_id)
    report_file = cached.with_suffix(".report.json")
    if cached.exists() and report_file.exists():
        report = DataReport(**json.loads(report_file.read_text()))
        report.cache = str(cached)
        return [Example(**r) for r in pq.read_table(cached).to_pylist()], report
    examples, report = read_valid(data_cfg, count_tokens)
    examples.sort(key=lambda e: e.id)  # the source's order: the cache reads like the source
    write_parquet(examples, cached)
    report.cache = str(cached)
    report.save(report_file)
    return examples, report


def write_parquet(examples: list[Example], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist([asdict(e) for e in examples])
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    tmp.replace(path)


# ----------------------------------------------------------------------------- sampling
@dataclass
class PromptSampler:
    """Batches of examples without replacement; each epoch is a fresh seeded permutation.

    The state (epoch, position) goes into checkpoints so a resumed run sees the same prompts.
    """

    examples: list[Example]
    batch_size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def _order(self) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[Example]:
        batch: list[Example] = []
        order = self._order()
        while len(batch) < self.batch_size:
            if self.position >= len(order):
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            batch.append(self.examples[order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
