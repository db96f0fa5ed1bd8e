"""Epistemic markers: whole words, case-insensitive; totals, per response and per 1k tokens."""

import pytest

from opsd_ray.eval.markers import MARKERS, count_markers, marker_rates, marker_record, sum_counts


def test_the_design_list():
    assert MARKERS == ("wait", "hmm", "perhaps", "maybe", "actually", "alternatively", "seems", "might", "likely",
                       "check")


def test_counts_whole_words_case_insensitive():
    text = "Wait, WAIT... hmm. Maybe it seems right; actually, let me check. Alternatively, perhaps it might be likely."
    c = count_markers(text)
    assert c == {"wait": 2, "hmm": 1, "perhaps": 1, "maybe": 1, "actually": 1, "alternatively": 1, "seems": 1,
                 "might": 1, "likely": 1, "check": 1}


@pytest.mark.parametrize("text", ["await the result", "checking, checked, checks", "unlikely", "mighty",
                                  "hmmm", "seem", "waiting", "recheck"])
def test_substrings_do_not_count(text):
    assert sum(count_markers(text).values()) == 0


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
