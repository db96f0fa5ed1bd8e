"""Epistemic markers: Kim et al.'s substring convention (the default) and whole words; totals and rates."""

import pytest

from opsd_ray.eval.markers import MARKERS, count_markers, marker_rates, marker_record, sum_counts


def test_the_design_list():
    assert MARKERS == ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might", "likely",
                       "check")


def kim_et_al(text):
    """Kim et al.'s analysis code, as the issue quotes it: each marker a lower-cased substring."""
    return {word: text.lower().count(word) for word in MARKERS}


def test_the_default_is_kim_et_als_substring_convention():
    text = "Wait, that is unlikely. Checking: wait... Let me check again. Hmm, hmmm, it seems likely. Awaiting."
    assert count_markers(text) == kim_et_al(text)
    c = count_markers(text)
    assert c["wait"] == 3  # "Wait,", "wait...", and "Awaiting"
    assert c["likely"] == 2  # "unlikely" and "likely"
    assert c["check"] == 2  # "Checking" and "check"
    assert c["hmm"] == 2  # "Hmm," and "hmmm"
    assert count_markers(text, "word") == dict(c, wait=2, likely=1, check=1, hmm=1)


def test_an_unknown_rule_is_refused():
    with pytest.raises(ValueError, match="substring, word"):
        count_markers("wait", "words")


def test_counts_whole_words_case_insensitive():
    text = "Wait, WAIT... hmm. Maybe it seems right; actually, let me check. Alternatively, perhaps it might be likely."
    c = count_markers(text, "word")
    assert c == count_markers(text)  # no marker hides inside another word here
    assert c == {"wait": 2, "hmm": 1, "perhaps": 1, "maybe": 1, "actually": 1, "alternatively": 1, "seems": 1,
                 "might": 1, "likely": 1, "check": 1}


@pytest.mark.parametrize(("text", "as_substrings"), [
    ("await the result", 1), ("checking, checked, checks", 3), ("unlikely", 1), ("mighty", 1), ("hmmm", 1),
    ("seem", 0), ("waiting", 1), ("recheck", 1)])
def test_substrings_do_not_count_as_words(text, as_substrings):
    assert sum(count_markers(text, "word").values()) == 0
    assert sum(count_markers(text).values()) == as_substrings == sum(kim_et_al(text).values())


def test_every_marker_key_present():
    assert count_markers("") == dict.fromkeys(MARKERS, 0)
    assert count_markers(None) == dict.fromkeys(MARKERS, 0)


def test_totals_and_rates():
    counts = [count_markers("wait wait hmm"), count_markers("check"), count_markers("nothing")]
    totals = sum_counts(counts)
    assert totals["wait"] == 2 and totals["hmm"] == 1 and totals["check"] == 1 and totals["total"] == 4
    rates = marker_rates(counts, [100, 200, 100])
    assert rates["per_response"]["total"] == pytest.approx(4 / 3)
    assert rates["per_response"]["wait"] == pytest.approx(2 / 3)
    assert rates["per_1k_tokens"]["total"] == pytest.approx(1000 * 4 / 400)  # pooled over all tokens
    assert marker_rates([], [])["per_response"]["total"] == 0.0


def test_record_keys():
    rec = marker_record(["Wait, maybe.", "hmm"], [10, 5])
    expected = {f"markers/{m}/{u}" for m in (*MARKERS, "total") for u in ("per_response", "per_1k_tokens")}
    assert set(rec) == expected
    assert rec["markers/total/per_response"] == 1.5
    assert rec["markers/wait/per_1k_tokens"] == pytest.approx(1000 / 15)
    assert set(marker_record(["x"], [1], prefix="eval/markers")) == {"eval/" + k for k in expected}
    assert marker_record(["unlikely"], [1])["markers/likely/per_response"] == 1.0
    assert marker_record(["unlikely"], [1], match="word")["markers/likely/per_response"] == 0.0
