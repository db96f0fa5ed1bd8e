import pytest
from conftest import sequences

from opsd_ray.config.recipes import load_train_config
from opsd_ray.data.prompts import (
    QUESTION_SEPARATOR,
    build_prompt_ids,
    reference_only_text,
    student_text,
    teacher_text,
)
from opsd_ray.models.loading import load_tokenizer

Q = "Natalia sold 48 clips in April and half as many in May. How many in total?"
R = "In May she sold 48/2 = 24 clips.\nIn total 48 + 24 = 72.\n#### 72"


@pytest.fixture(scope="module")
def cfg():
    return load_train_config(["model=tiny"])


@pytest.fixture(scope="module")
def tok(cfg):
    return load_tokenizer(cfg.model)


def test_reference_only_is_the_teacher_prompt_without_the_question(cfg):
    teacher, ref_only = teacher_text(Q, R, cfg.prompt), reference_only_text(R, cfg.prompt)
    assert teacher == Q + QUESTION_SEPARATOR + ref_only
    assert Q not in ref_only and R in ref_only and R in teacher
    assert cfg.prompt.answer_instruction in ref_only and cfg.prompt.teacher_instruction in ref_only
    # the reference is clearly delimited
    assert ref_only.index(cfg.prompt.reference_begin) < ref_only.index(R) < ref_only.index(cfg.prompt.reference_end)


def test_student_prompt_has_the_answer_format_once(cfg):
    s = student_text(Q, cfg.prompt)
    assert s.startswith(Q) and s.endswith(cfg.prompt.answer_instruction) and R not in s
    assert student_text(s, cfg.prompt) == s  # benchmark problems already carry it


def test_response_ids_sit_at_the_same_relative_offsets_in_all_four_sequences(cfg, tok):
    prompts = build_prompt_ids(tok, Q, R, cfg.model, cfg.prompt)
    response = tok("<think>\nhmm, wait: 48/2 = 24</think>\n\nThe answer is \\boxed{72}.", add_special_tokens=False)[
        "input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    seqs = sequences(prompts, response)
    assert set(seqs) == {"student", "teacher", "ref", "base"}
    assert seqs["student"].ids == seqs["base"].ids  # the base reads exactly what the student wrote after q
    for s in seqs.values():
        assert s.ids[s.start :] == response  # ids appended, never re-tokenised
        predicted = s.ids[s.predict_slice.start + 1 : s.predict_slice.stop + 1]
        assert predicted == response and s.predict_slice.stop - s.predict_slice.start == len(response)
    lengths = {k: len(s.ids) - s.start for k, s in seqs.items()}
    assert set(lengths.values()) == {len(response)}


def test_chat_template_and_thinking_settings(cfg, tok):
    prompts = build_prompt_ids(tok, Q, R, cfg.model, cfg.prompt)
    student = tok.decode(prompts.student)
    assert student.startswith("<|im_start|>user\n" + Q)
    assert student.endswith("<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")  # thinking off
    cfg2 = load_train_config(["model=tiny", "model.enable_thinking=true", "model.teacher_enable_thinking=false"])
    p2 = build_prompt_ids(tok, Q, R, cfg2.model, cfg2.prompt)
    assert tok.decode(p2.student).endswith("<|im_start|>assistant\n")  # thinking on: nothing appended
    assert tok.decode(p2.teacher).endswith("<think>\n\n</think>\n\n")
    assert tok.decode(p2.ref).endswith("<think>\n\n</think>\n\n")
    cfg3 = load_train_config(["model=tiny", "model.enable_thinking=true"])
    p3 = build_prompt_ids(tok, Q, R, cfg3.model, cfg3.prompt)
    assert tok.decode(p3.teacher).endswith("<|im_start|>assistant\n")  # teacher follows the student by default
