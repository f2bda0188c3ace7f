"""Log-probabilities of generated tokens, and each token's exact bytes (for OpenAI's logprobs).

The log-probabilities are the model's own distribution: the log-softmax of the raw logits, before
the penalties, the temperature and the top-k / top-p / min-p filters, as OpenAI's API and vLLM
report them by default (a greedy token's logprob then says how sure the model was, whatever the
sampling settings).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

import numpy as np

__all__ = ["TokenLogprob", "TokenText", "token_logprob"]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its log-probability and the `top` most likely tokens at its position
    (most likely first; the generated token is among them when it ranks that high)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token_id: int, top: int = 0) -> TokenLogprob:
    """The log-softmax of one row of raw logits at token_id, and its `top` best entries."""
    row = np.asarray(logits, dtype=np.float32)
    peak = float(row.max())
    # The sum of ~50k exponentials in float64: float32 would lose the small ones' share.
    log_total = peak + float(np.log(np.exp(row - peak, dtype=np.float32).sum(dtype=np.float64)))
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        k = min(top, row.shape[0])
        ids = np.argpartition(-row, k - 1)[:k]
        ids = ids[np.argsort(-row[ids], kind="stable")]
        best = tuple((int(i), float(row[i]) - log_total) for i in ids)
    return TokenLogprob(int(token_id), float(row[token_id]) - log_total, best)


class TokenText:
    """Each token's exact bytes, and its text as OpenAI's logprobs show it.

    A byte-level BPE token (GPT-2, Llama 3, SmolLM2) or a SentencePiece byte token (<0x..>) can be
    part of a character, which tokenizers' decode turns into U+FFFD; the bytes say what it is, so
    a client can join the pieces (OpenAI's "bytes" field). Added tokens (<|im_end|>) are their text.
    """

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        decoder = tokenizer.decoder
        spec = json.loads(decoder.__getstate__()) if decoder is not None else {}
        steps = spec.get("decoders", [spec]) if spec.get("type") == "Sequence" else [spec]
        self._kinds = {step.get("type") for step in steps}
        # SentencePiece-style vocabularies write a space as U+2581 ("▁"): Replace or Metaspace says so.
        self._space = next((step["replacement"] for step in steps if step.get("type") == "Metaspace"), None)
        for step in steps:
            pattern = step.get("pattern", {})
            if step.get("type") == "Replace" and step.get("content") == " " and "String" in pattern:
                self._space = pattern["String"]
        # A token's bytes, cached for this instance: an lru_cache on the method would be one for the
        # class, whose keys hold self (and the tokenizer) after the model that made it is gone.
        self.bytes_of = functools.lru_cache(maxsize=_CACHED_TOKENS)(self._bytes_of)

    def _bytes_of(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode("utf-8")
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        if "ByteLevel" in self._kinds and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        if "ByteFallback" in self._kinds and (byte := _BYTE_TOKEN.fullmatch(piece)):
            return bytes([int(byte.group(1), 16)])
        if self._space is not None:
            return piece.replace(self._space, " ").encode("utf-8")
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")

    def text_of(self, token_id: int) -> str:
        """The token as text; a part of a character shows as U+FFFD (its bytes say which)."""
        return self.bytes_of(token_id).decode("utf-8", errors="replace")


_CACHED_TOKENS = 4096
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: the printable Latin-1
    bytes as themselves, the other 68 as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {c: b for b, c in chars.items()}


_BYTE_OF_CHAR = _byte_level_alphabet()
