"""Verify stage: run the exported bundle through nomoat.runtime against the fp32 reference.

Measures on an evaluation text: perplexity of both and the delta, mean KL divergence of
the next-token distributions, top-1 agreement; and greedy agreement over generated tokens
on a few prompts. Over the threshold, the conversion fails and no bundle is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import ConversionError

# Relative perplexity increase (in %) a quantization may cost before the gate fails.
DEFAULT_MAX_PPL_INCREASE = {"fp32": 0.5, "int8": 5.0, "int4": 25.0}

GREEDY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
)


@dataclass
class QualityReport:
    eval_tokens: int
    ppl_reference: float
    ppl_bundle: float
    ppl_increase_percent: float
    mean_kl: float
    top1_agreement: float
    greedy_tokens_per_prompt: int
    greedy_agreement: float  # share of prompts whose greedy continuation matches exactly
    greedy_first_divergence: list[int]  # per prompt: index of the first differing token (-1 = none)
    max_ppl_increase_percent: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def default_eval_text() -> str:
    return (resources.files("nomoat.converter") / "data" / "eval.txt").read_text()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> tuple[float, float, float, float]:
    """(ppl_ref, ppl_got, mean KL(ref || got), top-1 agreement) over aligned positions."""
    lr, lg = _log_softmax(ref), _log_softmax(got)
    idx = np.arange(len(targets))
    ppl_ref = float(np.exp(-lr[idx, targets].mean()))
    ppl_got = float(np.exp(-lg[idx, targets].mean()))
    kl = float((np.exp(lr) * (lr - lg)).sum(axis=-1).mean())
    top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
    return ppl_ref, ppl_got, kl, top1


def verify_bundle(bundle_dir: Path, reference, quant: str, eval_text: str | None = None, eval_tokens: int = 512,
                  greedy_tokens: int = 32, max_ppl_increase: float | None = None) -> QualityReport:
    """Compare the bundle in bundle_dir with the torch reference model; raise if over the gate."""
    import torch
    from nomoat.runtime import Model

    from .reference import greedy_tokens as reference_greedy

    model = Model.load(bundle_dir, verify_checksums=False)
    ids = model.encode(eval_text or default_eval_text(), add_bos=None)[: min(eval_tokens, model.max_context)]
    if len(ids) < 16:
        raise ConversionError(f"the evaluation text is only {len(ids)} tokens; give at least a paragraph.")
    with torch.no_grad():
        ref_logits = reference(torch.tensor([ids])).logits[0].float().numpy()
    got_logits = model.logits(ids)
    targets = np.asarray(ids[1:])
    ppl_ref, ppl_got, kl, top1 = compare_logits(ref_logits[:-1], got_logits[:-1], targets)

    divergences = []
    for prompt in GREEDY_PROMPTS:
        prompt_ids = model.prompt_ids(prompt)
        ref_out = reference_greedy(reference, prompt_ids, greedy_tokens)
        got = list(model.generate_tokens(prompt_ids, greedy_tokens, ignore_eos=True))
        divergences.append(next((i for i, (a, b) in enumerate(zip(ref_out, got, strict=False)) if a != b), -1))

    limit = DEFAULT_MAX_PPL_INCREASE[quant] if max_ppl_increase is None else max_ppl_increase
    increase = 100.0 * (ppl_got - ppl_ref) / ppl_ref
    report = QualityReport(
        eval_tokens=len(ids), ppl_reference=ppl_ref, ppl_bundle=ppl_got, ppl_increase_percent=increase,
        mean_kl=kl, top1_agreement=top1, greedy_tokens_per_prompt=greedy_tokens,
        greedy_agreement=sum(d == -1 for d in divergences) / len(divergences),
        greedy_first_divergence=divergences, max_ppl_increase_percent=limit, passed=increase <= limit,
    )
    if not report.passed or not np.isfinite(ppl_got):
        raise ConversionError(
            f"quality gate failed: perplexity {ppl_got:.3f} vs fp32 reference {ppl_ref:.3f} (+{increase:.2f}%, "
            f"limit +{limit:.2f}%), mean KL {kl:.4f}, top-1 agreement {top1:.1%}. No bundle was written. Try "
            "a higher-precision --quant, a smaller --block-size, or raise --max-ppl-increase if this is expected."
        )
    return report
