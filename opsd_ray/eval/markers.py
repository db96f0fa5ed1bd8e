"""Epistemic markers (DESIGN.md §1): words of reflective reasoning, counted in generated text.

Counting rule: whole words, case-insensitive, exact form. "Wait," and "WAIT" count as `wait`;
"await", "checking", "checked", "unlikely" and "mighty" do not (substring counting would credit
"await" to `wait` and "unlikely" to `likely`). A word is delimited by regex `\\b` boundaries.
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
_MARKER_RE = re.compile(r"\b(" + "|".join(MARKERS) + r")\b", re.IGNORECASE)


def count_markers(text: str) -> dict[str, int]:
    """Occurrences of each marker in one text (every marker present, zeros included)."""
    counts = dict.fromkeys(MARKERS, 0)
    for m in _MARKER_RE.finditer(text or ""):
        counts[m.group(1).lower()] += 1
    return counts


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
    texts: Sequence[str], num_tokens: Sequence[int], prefix: str = "markers"
) -> dict[str, float]:
    """Flat metrics for a batch of generations, e.g. markers/wait/per_response, markers/total/per_1k_tokens."""
    rates = marker_rates([count_markers(t) for t in texts], num_tokens)
    return {f"{prefix}/{k}/{unit}": v for unit, values in rates.items() for k, v in values.items()}
