import json
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opsd_ray.config.recipes import ConfigError, load_train_config
from opsd_ray.data.prompts import build_prompt_ids
from opsd_ray.data.sources import PromptSampler, load_examples, read_rows, validate_rows


def data_cfg(path, **kw):
    base = dict(path=str(path), format="auto", split="train", question_key="question", reference_key="solution",
                answer_key=None, answer_pattern=None, strip_calculator_notes=False, max_reference_tokens=10,
                max_question_tokens=100, limit=None)
    base.update(kw)
    return SimpleNamespace(**base)


BAD_ROWS = [
    {"question": "What is 1+1?", "solution": "1+1=2. \\boxed{2}"},
    {"question": "What is 2+2?"},  # missing reference
    {"question": "", "solution": "x"},  # empty question
    {"question": "What is 3+3?", "solution": [6]},  # non-text reference (a number would be its text)
    {"question": "What is 1+1?", "solution": "again"},  # duplicate question
    {"question": "Long?", "solution": "word " * 50},  # over the token budget
    ["not", "an", "object"],
    {"question": "What is 4+4?", "solution": "   "},  # blank reference
]


def write_jsonl(path, rows, extra_lines=()):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")


def count_words(texts):
    return [len(t.split()) for t in texts]


def test_bad_rows_are_skipped_and_counted_by_reason(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, BAD_ROWS, extra_lines=["{not json"])
    examples, report = load_examples(data_cfg(path, answer_pattern=r"\\boxed\{([^}]*)\}"), count_words)
    assert [e.question for e in examples] == ["What is 1+1?"]
    assert examples[0].answer == "2"
    assert report.rows_read == len(BAD_ROWS) + 1 and report.valid == 1
    assert report.skipped == {
        "missing_solution": 1, "empty_question": 1, "non_text_solution": 1, "duplicate_question": 1,
        "reference_over_token_budget": 1, "not_an_object": 1, "empty_solution": 1, "invalid_json": 1,
    }
    assert "skipped" in report.summary()


def test_zero_valid_rows_is_an_error_naming_the_columns(tmp_path):
    path = tmp_path / "empty.jsonl"
    write_jsonl(path, [{"q": "a", "s": "b"}])
    with pytest.raises(ConfigError, match="question_key"):
        load_examples(data_cfg(path))


def test_gsm8k_preset_strips_calculator_notes_and_reads_the_answer():
    cfg = load_train_config(["data=gsm8k"])
    examples, report = load_examples(cfg.data, seed=0)
    assert report.valid > 7000 and report.rows_read == 7473
    first = next(e for e in examples if e.question.startswith("Natalia sold clips"))
    assert "<<" not in first.reference and "48/2 = 24 clips" in first.reference
    assert first.answer == "72"
    assert all(e.answer for e in examples)


def test_parquet_and_saved_hf_dataset_read_the_same_rows(tmp_path):
    rows = [{"question": f"q{i}", "solution": f"s{i}", "answer": str(i)} for i in range(5)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "d.parquet")
    folder = tmp_path / "hf" / "train"
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (tmp_path / "hf" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert read_rows(str(tmp_path / "d.parquet"))[0] == rows
    assert read_rows(str(tmp_path / "hf"))[0] == rows
    with pytest.raises(ConfigError, match="no split 'test'"):
        read_rows(str(tmp_path / "hf"), split="test")
    examples, _ = validate_rows(rows, data_cfg(tmp_path, answer_key="answer"))
    assert [e.answer for e in examples] == ["0", "1", "2", "3", "4"]


def test_shuffle_is_deterministic_per_seed(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"question": f"q{i}", "solution": "s"} for i in range(50)])
    a, _ = load_examples(data_cfg(path), seed=1)
    b, _ = load_examples(data_cfg(path), seed=1)
    c, _ = load_examples(data_cfg(path), seed=2)
    assert [e.id for e in a] == [e.id for e in b] != [e.id for e in c]


def test_sampler_covers_each_epoch_and_resumes_exactly(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl(path, [{"question": f"q{i}", "solution": "s"} for i in range(10)])
    examples, _ = load_examples(data_cfg(path))
    s = PromptSampler(examples, batch_size=4, seed=3)
    seen = [e.id for _ in range(2) for e in s.next_batch()] + [e.id for e in s.next_batch()][:2]
    assert sorted(seen) == list(range(10))  # one epoch = every example once
    state = s.state_dict()
    expected = [e.id for e in s.next_batch()]
    resumed = PromptSampler(examples, batch_size=4, seed=3)
    resumed.load_state_dict(state)
    assert [e.id for e in resumed.next_batch()] == expected


def dasd_like_rows(n=300):
    """Rows with DASD's columns: most end in a boxed answer, some do not, some repeat a question."""
    rows = []
    for i in range(n):
        output = f"Reasoning about {i}... so the answer is \\boxed{{{i % 17}}}." if i % 7 else f"No final answer for {i}."
        rows.append({"uuid": f"u{i}", "input": f"Problem {i}: compute {i} mod 17.", "output": output,
                     "domain": "math", "meta": "{}"})
    rows += [dict(rows[3], uuid="dup")]  # a repeated question
    return rows


def sampled_cfg(path, **over):
    cfg = load_train_config(["model=tiny", "data=dasd-10k", f"data.path={path}", "data.format=jsonl",
                             "data.hub_config=null", "data.sample=50"] + [f"data.{k}={v}" for k, v in over.items()])
    return cfg.data


def test_the_dasd_reconstruction_draws_the_same_rows_whatever_their_order(tmp_path, monkeypatch):
    import random

    monkeypatch.setenv("OPSD_RAY_CACHE", str(tmp_path / "cache"))
    chosen = []
    for order in range(3):
        rows = dasd_like_rows()
        random.Random(order).shuffle(rows)
        path = tmp_path / f"order{order}.jsonl"
        write_jsonl(path, rows)
        examples, report = load_examples(sampled_cfg(path), count_words)
        assert len(examples) == 50 and report.sample["size"] == 50 and report.valid == 50
        assert all(e.answer is not None for e in examples)  # require_answer: rows without \boxed{} are not drawn
        chosen.append(sorted(e.question for e in examples))
    assert chosen[0] == chosen[1] == chosen[2]
    other, _ = load_examples(sampled_cfg(tmp_path / "order0.jsonl", sample_seed=1), count_words)
    assert sorted(e.question for e in other) != chosen[0]  # the seed decides the draw
    assert "reconstruction" in report.note and "sampled from" in report.summary()


def test_a_sampled_data_set_is_drawn_once_and_read_from_its_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPSD_RAY_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.jsonl"
    write_jsonl(path, dasd_like_rows())
    first, report = load_examples(sampled_cfg(path), count_words, tokenizer_id="tok")
    assert report.cache and report.cache.startswith(str(tmp_path / "cache" / "data" / "dasd-10k-"))
    path.write_text("")  # the source is gone: the cache answers
    again, report2 = load_examples(sampled_cfg(path), count_words, tokenizer_id="tok")
    assert sorted(e.question for e in again) == sorted(e.question for e in first)
    assert report2.sample == report.sample and report2.cache == report.cache
    with pytest.raises(ConfigError, match="no valid rows"):  # another tokenizer: another draw, from the empty source
        load_examples(sampled_cfg(path), count_words, tokenizer_id="another")


def test_the_dasd_preset_is_a_hub_reconstruction_that_needs_no_path():
    cfg = load_train_config(["model=qwen3-8b", "data=dasd-10k"])
    assert cfg.data.path == "Alibaba-Apsara/Superior-Reasoning-SFT-gpt-oss-120b" and cfg.data.sample == 10000
    assert cfg.data.require_answer and "reconstruction" in cfg.data.note


def test_rows_whose_contexts_do_not_fit_the_windows_are_skipped_and_counted_per_variant():
    """The teacher context carries question and reference: a row can pass the budgets yet not fit the
    scorer's window (the tiny model has 4,096 positions). Rows that fit are kept in order."""
    from opsd_ray.data.contexts import ContextLimits, drop_unfit
    from opsd_ray.data.sources import Example
    from opsd_ray.models.loading import load_tokenizer
    from opsd_ray.workers.scoring import ContextTooLong, ScoringItem, check_context

    cfg = load_train_config(["model=tiny", "data=gsm8k", "data.max_reference_tokens=8000", "rollout.max_new_tokens=64"])
    tok = load_tokenizer(cfg.model)
    rows = [Example(0, "What is 2+2?", "2+2=4. #### 4", "4"), Example(1, "What is 1+1?", "one plus one " * 1500, "2"),
            Example(2, "What is " + "very " * 4100 + "big?", "#### 0", "0"), Example(3, "3+3?", "6", "6")]
    kept, over, limits = drop_unfit(rows, tok, cfg)
    assert [e.id for e in kept] == [0, 3]
    assert over == {"teacher": 2, "ref": 1, "student": 1, "base": 1}
    assert limits.limits["teacher"] == 4096 and limits.limits["student"] == min(4096, 2048 + 512 + 64)
    fits, none_over, _ = drop_unfit(rows[:1], tok, load_train_config(["model=tiny", "data=gsm8k"]))
    assert fits == rows[:1] and none_over == {}  # the budgets alone guarantee a fit: no prompt is built
    prompts = build_prompt_ids(tok, rows[0].question, rows[0].reference, cfg.model, cfg.prompt)
    assert ContextLimits({"teacher": len(prompts.teacher) + 10}, 11).over(prompts) == ["teacher"]
    with pytest.raises(ContextTooLong, match="longer than the scoring model's 4096 positions"):
        check_context([ScoringItem(prompts, [5] * 4096)], ("teacher",), 4096)
