"""A model's recommended sampling settings, as a bundle keeps them (manifest generation_defaults)."""

from __future__ import annotations

from typing import Any

from .errors import ConversionError


def checked_generation_defaults(defaults: dict[str, Any], where: str) -> dict[str, Any]:
    """The defaults with a top_k below 0 read as off (0: llama.cpp takes any top_k <= 0 so, vLLM
    writes -1), and refused now, naming `where` they came from, if the runtime would refuse them:
    the runtime checks a bundle's defaults when it loads it, after minutes of conversion."""
    from nomoat.runtime.sampling import SamplingParams

    out = dict(defaults)
    top_k = out.get("top_k")
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k < 0:
        out["top_k"] = 0
    sampling = {k: v for k, v in out.items() if k in SamplingParams.__dataclass_fields__ and v is not None}
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise ConversionError(f"{where} holds a sampling setting nomoat cannot use ({e}); correct or remove "
                              "that key (without sampling keys the bundle decodes greedily).") from e
    return out
