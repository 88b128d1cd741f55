"""Which modules stay unquantized under quantization_keep_modules: the same rule in every format."""

from __future__ import annotations

import re

__all__ = ["kept_module"]


def kept_module(patterns: list[str], name: str, tied: bool = False) -> bool:
    """Whether module ``name`` (weight names work too) stays unquantized under quantization_keep_modules; with a tied
    head the embedding and the head are one matrix, so a pattern matching either name keeps it."""
    stem = name.removesuffix(".weight")
    names = [stem]
    if tied and stem in ("model.embed_tokens", "lm_head"):
        names = ["model.embed_tokens", "lm_head"]
    return any(re.search(pattern, n) for pattern in patterns for n in names)
