"""What several modules share, with no imports of the package's own (a leaf: it cannot form a cycle)."""

from __future__ import annotations


def pad_id_of(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token (padded
    positions are masked out, so which id it is changes no result)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
