"""Epistemic markers (the paper, Sec. 2.3 and 4.4): words of reflective reasoning, counted in generated text.

Two counting rules (`markers.match`):
- `substring` (default): the convention of Kim et al.'s analysis code, which the paper follows:
  `text.lower().count(marker)`. "Wait," counts as `wait`, and so do "await" and "waiting";
  "unlikely" counts as `likely`, "checking" as `check`. Counts set beside the paper's Figures 2 and 5.
- `word`: whole words only, case-insensitive (regex `\\b` boundaries): "Wait," and "WAIT" count as
  `wait`; "await", "checking" and "unlikely" do not. Stricter, but not the paper's numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MARKERS = (
    "wait",
    "hmm",
    "perhaps",
    "maybe",
    "actually",
    "alternatively",
    "seems",
    "might",
    "likely",
    "check",
)
MATCHES = ("substring", "word")
_WORD_RE = re.compile(r"\b(" + "|".join(MARKERS) + r")\b", re.IGNORECASE)


def count_markers(text: str | None, match: str = "substring") -> dict[str, int]:
    """Occurrences of each marker in one text (every marker present, zeros included)."""
    if match == "substring":
        low = (text or "").lower()
        return {m: low.count(m) for m in MARKERS}
    if match != "word":
        raise ValueError(f"markers.match={match!r} is not one of: {', '.join(MATCHES)}")
    counts = dict.fromkeys(MARKERS, 0)
    for m in _WORD_RE.finditer(text or ""):
        counts[m.group(1).lower()] += 1
    return counts


def describe(match: str) -> str:
    """How markers were counted, for plot titles and tables."""
    return "substrings of the lower-cased text, as Kim et al." if match == "substring" else "whole words"


def sum_counts(counts: Sequence[dict[str, int]]) -> dict[str, int]:
    """Per-marker totals over many responses, plus `total` (all markers together)."""
    out = dict.fromkeys(MARKERS, 0)
    for c in counts:
        for k in MARKERS:
            out[k] += c.get(k, 0)
    out["total"] = sum(out[k] for k in MARKERS)
    return out


def marker_rates(counts: Sequence[dict[str, int]], num_tokens: Sequence[int]) -> dict[str, dict[str, float]]:
    """{"per_response": {marker|total: mean count per response},
    "per_1k_tokens": {marker|total: count per 1,000 response tokens, pooled over all responses}}."""
    totals = sum_counts(counts)
    n, tokens = len(counts), sum(num_tokens)
    return {
        "per_response": {k: v / n if n else 0.0 for k, v in totals.items()},
        "per_1k_tokens": {k: 1000.0 * v / tokens if tokens else 0.0 for k, v in totals.items()},
    }


def marker_record(
    texts: Sequence[str], num_tokens: Sequence[int], prefix: str = "markers", match: str = "substring"
) -> dict[str, float]:
    """Flat metrics for a batch of generations, e.g. markers/wait/per_response, markers/total/per_1k_tokens."""
    rates = marker_rates([count_markers(t, match) for t in texts], num_tokens)
    return {f"{prefix}/{k}/{unit}": v for unit, values in rates.items() for k, v in values.items()}
