"""The tokenizer.json a bundle ships: the same tokenizer, in the form that loads with less memory.

Hugging Face `tokenizers` writes BPE merges as pairs (`[["Ġ", "t"], ...]`, since 0.20) so that
tokens may contain spaces. Reading that form goes through serde's untagged-enum buffering: for
SmolLM2's 48,900 merges, `Tokenizer.from_file` peaks 39 MB above where it started and keeps
15 MB; the older `"Ġ t"` strings peak at 20 MB and keep 13 MB (measured; README, "Memory"). On a
device this is the load's peak, so the bundle carries the string form whenever it is exact: no
token in a merge contains a space (true of every byte-level BPE, where a space is "Ġ").
"""

from __future__ import annotations

import json
from typing import Any


def bundle_tokenizer_json(tokenizer_json: str) -> str:
    """tokenizer_json with pair merges written as "left right" strings where that is lossless;
    otherwise unchanged."""
    data: dict[str, Any] = json.loads(tokenizer_json)
    model = data.get("model") or {}
    merges = model.get("merges")
    if model.get("type") != "BPE" or not merges or not all(_is_plain_pair(m) for m in merges):
        return tokenizer_json
    model["merges"] = [f"{left} {right}" for left, right in merges]
    return json.dumps(data, ensure_ascii=False)


def _is_plain_pair(merge: Any) -> bool:
    return (isinstance(merge, list) and len(merge) == 2
            and all(isinstance(part, str) and part and " " not in part for part in merge))
