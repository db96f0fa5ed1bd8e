"""The grader on hard cases: extraction rules and answer equivalence."""

import pytest

from opsd_ray.eval.grading import as_number, extract_answer, grade, is_correct, last_boxed, normalize


@pytest.mark.parametrize("response,expected", [
    (r"so \boxed{\frac{1}{\sqrt{2}}}.", r"\frac{1}{\sqrt{2}}"),  # nested braces
    (r"\boxed{1} first, then \boxed{\boxed{7}}", "7"),  # the last box, a box in a box unwrapped
    (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}"),
    (r"\fbox{12}", "12"),
    (r"so \boxed 5", "5"),
    (r"\boxed{2} and then \boxed{3", "2"),  # an unclosed (truncated) box is ignored
    ("work...\n#### 1,234", "1,234"),
    ("So the answer is $42$.", "42"),
    ("The final answer is: **$\\frac{1}{2}$**.", r"\frac{1}{2}"),
    ("blah\nAnswer: 17\n", "17"),
    ("**Final answer:** -3", "-3"),
    ("Q: ...\nA: 9", "9"),
    ("I got 12 and then 15 apples", "15"),  # the last number
    ("it costs 1,500 dollars", "1500"),
])
def test_extract(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("response", ["", "I do not know.", "ééé no answer here"])
def test_no_answer(response):
    assert extract_answer(response) is None
    assert not is_correct(response, "5")
    g = grade(response, "5")
    assert g.answer is None and not g.correct and g.error is None


def test_last_number_only_when_allowed():
    assert extract_answer("we get 12", last_number=False) is None
    assert not is_correct("we get 12", "12", last_number=False)
    assert is_correct("we get 12", "12", last_number=True)


@pytest.mark.parametrize("pred,gold", [
    # fractions in every spelling
    (r"\frac{1}{2}", r"\frac12"), (r"\dfrac{1}{2}", "1/2"), (r"\tfrac12", r"\frac{1}{2}"), ("0.5", r"\frac{1}{2}"),
    (r"\dfrac{-3}{4}", r"-\frac{3}{4}"), (r"\frac{6}{4}", r"\frac{3}{2}"), (r"{1 \over 2}", r"\frac{1}{2}"),
    # AIME's zero-padded answers, negatives, decimals
    ("025", "25"), ("25", "025"), ("-7", "-7"), ("\u22127", "-7"), ("5.0", "5"), ("5.00", "5"),
    # intervals, tuples, \left/\right and spacing
    ("(1, 2]", "(1,2]"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"), (r"[-1,\ 3)", "[-1,3)"),
    # units, degrees, money, percent, thousands separators, text
    (r"10\text{ cm}", "10"), ("10 cm", "10"), (r"30^\circ", "30"), (r"30^{\circ}", "30"), ("30°", "30"),
    (r"\$18", "18"), ("18 dollars", "18"), (r"50\%", "50"), ("50%", "50"), ("1,000", "1000"), ("1{,}000", "1000"),
    (r"\text{Evelyn}", r"\text{Evelyn}"), ("x = 4", "4"),
    # expressions
    (r"\frac{9\sqrt{23}}{23}", r"\frac{9 \sqrt{23}}{23}"), (r"1 - \frac{2}{\pi}", r"1-\frac{2}{\pi}"),
    (r"2^{25} \cdot 26!", r"2^{25} \cdot 26!"), ("1+x^2", "x^2+1"), (r"3\sqrt{13}", r"3 \sqrt{13}"),
])
def test_equivalent(pred, gold):
    assert is_correct(f"Thus \\boxed{{{pred}}}.", gold), (pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("7", "-7"), ("-7", "7"), ("[1,2]", "(1,2]"), ("(1,2)", "(1,2]"), (r"\frac{1}{3}", r"\frac{1}{2}"),
    ("0.33", r"\frac{1}{3}"), ("24", "25"), ("250", "25"), ("2.5", "25"), (r"\sqrt{2}", "2"),
])
def test_not_equivalent(pred, gold):
    assert not is_correct(f"\\boxed{{{pred}}}", gold), (pred, gold)


def test_normalize_and_numbers():
    assert normalize(r"\left( 1 , 2 \right)") == "(1,2)"
    assert normalize("025") == "25" and normalize("-0.50") == "-1/2" and normalize(r"\dfrac{2}{4}") == "1/2"
    assert as_number(r"-\frac{3}{4}") == as_number("-0.75")
    assert as_number("x") is None and as_number(r"\frac{1}{0}") is None
    assert last_boxed("no box") is None


def test_grading_errors_never_raise(monkeypatch):
    """A math-verify crash is logged and the normalised comparison decides; never an exception."""
    import opsd_ray.eval.grading as grading

    def boom(pred, gold):
        raise RuntimeError("sympy exploded")

    monkeypatch.setattr(grading, "_math_verify_equal", boom)
    g = grade(r"\boxed{025}", "25")
    assert g.correct and g.error and "sympy exploded" in g.error
    assert not is_correct(r"\boxed{x^2}", "4")

    monkeypatch.setattr(grading, "extract_answer", lambda *a, **k: 1 / 0)
    g = grade(r"\boxed{4}", "4")
    assert not g.correct and g.error.startswith("extract")


def test_grading_off_the_main_thread():
    """Ray actors may call the grader from a thread: math-verify's SIGALRM timeout must not break it."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(is_correct, r"\boxed{\dfrac{1}{2}}", "0.5").result()
