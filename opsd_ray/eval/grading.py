"""Math answer grading: extract the final answer of a response, compare it with the gold answer.

Extraction (first rule that finds something wins; within a rule the last occurrence wins):
  1. the last top-level `\\boxed{...}` / `\\fbox{...}` (nested braces; a box inside a box is unwrapped;
     an unclosed box, i.e. a truncated response, is ignored);
  2. a `#### X` line (GSM8K style);
  3. "The (final) answer is X";
  4. a line starting with "Answer:", "Final answer:" or "A:";
  5. the last number in the response, only when `last_number=True` (benchmarks whose answers are numbers).
Equivalence: math-verify (symbolic and numeric), with a normalised string / exact-number comparison as
fallback when math-verify fails or cannot parse. A grading error never raises: it counts as wrong.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

log = logging.getLogger(__name__)

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def _balanced(text: str, start: int) -> int | None:
    """Index just past the brace group opening at text[start] == '{', or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def boxed_contents(text: str) -> list[str]:
    """Contents of the top-level, closed \\boxed{} / \\fbox{} groups, in order (also `\\boxed 5`)."""
    out, pos = [], 0
    while (m := _BOX_RE.search(text, pos)) is not None:
        i = m.end()
        if i < len(text) and text[i] == "{":
            end = _balanced(text, i)
            if end is None:  # unclosed (truncated): skip it
                pos = i + 1
                continue
            out.append(text[i + 1 : end - 1])
            pos = end
        else:  # `\boxed 5`: the next token
            tok = re.match(r"[^\s$]+", text[i:])
            if tok and m.group(0) != m.group(0).rstrip():
                out.append(tok.group(0))
            pos = i
    return out


def last_boxed(text: str) -> str | None:
    boxes = boxed_contents(text)
    if not boxes:
        return None
    inner = boxes[-1].strip()
    while (nested := boxed_contents(inner)) and _BOX_RE.match(inner) and len(nested) == 1:
        inner = nested[0].strip()  # \boxed{\boxed{5}} -> 5
    return inner


_HASH_RE = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS_RE = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]+)", re.IGNORECASE)
_ANSWER_LINE_RE = re.compile(
    r"^\s*\**\s*(?:final\s+answer|answer|a)\s*\**\s*[:：]\s*\**\s*([^\n]+)", re.IGNORECASE | re.MULTILINE
)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _clean_phrase(s: str) -> str:
    """An answer taken from running text: drop surrounding $, bold and the closing period."""
    while (cleaned := s.strip(" *$").rstrip(".")) != s:
        s = cleaned
    return s


def extract_answer(response: str, *, last_number: bool = True) -> str | None:
    """The final answer of a response as a string, or None when it gives none."""
    if not response:
        return None
    boxed = last_boxed(response)
    if boxed:
        return boxed
    for pattern in (_HASH_RE, _ANSWER_IS_RE, _ANSWER_LINE_RE):
        found = pattern.findall(response)
        if found and (ans := _clean_phrase(found[-1])):
            return ans
    if last_number:
        numbers = _NUMBER_RE.findall(response)
        if numbers:
            return numbers[-1].replace(",", "")
    return None


# ----------------------------------------------------------------------------- normalisation
_UNITS = (
    "square units|sq units|units?|cm\\^?2?|mm|km|m\\^?2?|meters?|metres?|centimeters?|inches|inch|in|feet|foot|ft|"
    "miles?|mph|yards?|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|dollars?|cents?|"
    "degrees?|pounds?|lbs?|kg|grams?|g|liters?|litres?|ml|gallons?|ounces?|oz|people|students|apples"
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")


def normalize(answer: str) -> str:
    """A canonical string for comparing answers that math-verify could not decide."""
    s = answer.strip()
    s = s.replace("\u2212", "-").replace("\u2013", "-")  # unicode minus / en dash
    s = re.sub(r"^\$+|\$+$", "", s)
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s).strip()
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]|~", " ", s)  # LaTeX spacing
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree", "", s)  # degrees
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")  # percent, dollars
    s = s.replace("{,}", ",")
    # units: `10\text{ cm}`, `10 cm`, `5 \mbox{ dollars}` -> the number
    s = re.sub(
        r"^(-?[\d.,/]+)\s*(?:\\(?:text|mbox|mathrm)\s*\{\s*(?:" + _UNITS + r")\s*\}|(?:" + _UNITS + r"))$",
        r"\1",
        s,
    )
    s = _TEXT_CMD_RE.sub(r"\1", s)
    s = re.sub(r"^[a-zA-Z]\s*=\s*(?=[^=]+$)", "", s)  # "x = 5" -> "5"
    s = s.rstrip(".").strip()
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d+)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # thousands separators
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    number = as_number(s)
    if number is not None:
        return _format_number(number)
    return s


def as_number(s: str) -> Fraction | None:
    """An exact number for '025', '-3.50', '1/2', '\\frac{1}{2}', '-\\frac{3}{4}', else None."""
    s = s.strip()
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s) or re.fullmatch(r"(-?)(\d+)/(\d+)", s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _format_number(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


# ----------------------------------------------------------------------------- equivalence
def _math_verify_equal(pred: str, gold: str) -> bool | None:
    """math-verify's verdict, or None when it cannot parse one side or fails."""
    from math_verify import parse, verify

    # its timeouts use SIGALRM, which only the main thread may set (Ray actors may run in threads)
    main = threading.current_thread() is threading.main_thread()
    timeout = 5 if main else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
    pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return None
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


MAX_VERIFY_CHARS = 500  # longer "answers" are garbage; sympy could spend seconds on them


@dataclass
class Grade:
    answer: str | None  # the extracted final answer (None: the response gives none)
    correct: bool
    error: str | None = None  # a grading stage that failed (logged; the sample may still be graded)


def _match(pred: str | None, gold: str) -> tuple[bool, str | None]:
    if pred is None or not pred.strip():
        return False, None
    error = None
    verdict = None
    if len(pred) <= MAX_VERIFY_CHARS:
        try:
            verdict = _math_verify_equal(pred, gold)
        except Exception as e:  # a grader failure must not stop an evaluation
            error = f"math-verify: {type(e).__name__}: {e}"
            log.warning("math-verify failed on pred=%r gold=%r: %s", pred[:200], gold, e)
    if verdict:
        return True, error
    try:
        a, b = normalize(pred), normalize(gold)
        x, y = as_number(a), as_number(b)
        return a == b or (x is not None and x == y), error
    except Exception as e:
        log.warning("normalised comparison failed on pred=%r gold=%r: %s", pred[:200], gold, e)
        return False, f"normalise: {type(e).__name__}: {e}"


def grade(response: str, gold: str, *, last_number: bool = True) -> Grade:
    """Extract and compare; never raises (a failure is a wrong answer with `error` set)."""
    try:
        answer = extract_answer(response, last_number=last_number)
    except Exception as e:
        log.warning("answer extraction failed (counted as wrong): %s", e)
        return Grade(None, False, f"extract: {type(e).__name__}: {e}")
    correct, error = _match(answer, gold)
    return Grade(answer, correct, error)


def is_correct(response: str, gold: str, *, last_number: bool = True) -> bool:
    """Does the response's final answer equal the gold answer? A grading error counts as wrong."""
    return grade(response, gold, last_number=last_number).correct
