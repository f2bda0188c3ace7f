"""Calibrate stage: how much each input channel of each linear layer matters (an importance matrix).

The quantizer weighs each weight's rounding error by the mean square of the activation it
multiplies (the diagonal of X^T X, what llama.cpp calls an imatrix): an error on a channel
that carries large activations costs more output error than one on a quiet channel. Small
models have a few loud channels after each RMSNorm, so this is where 4-bit loses least.

The calibration text is written by the model itself (seeded sampling from a fixed set of
requests, in its own chat template when it has one), so
- it needs no dataset and no download, and matches what the model will be asked to do;
- it never overlaps the verify stage's eval text, so the quality report is not flattered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .spec import Checkpoint

# Varied requests: prose, explanation, code, lists, dialogue, translation, numbers.
PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "Write a Python function that merges two sorted lists, with a docstring and a test.",
    "What are the advantages and disadvantages of working from home?",
    "Summarize the history of the printing press in a few paragraphs.",
    "Give me a recipe for pancakes with the quantities for four people.",
    "How do you say 'good morning, how are you?' in French, Spanish and German?",
    "A train leaves at 9:40 and arrives at 13:15. How long is the journey? Show your work.",
)
NEW_TOKENS = 96  # per request: ~1,000 calibration tokens in all
SEED = 0
# GPTQ fits a K x K matrix per layer (K up to the MLP width): with fewer calibration tokens than
# K it fits the calibration text instead of the model (measured: +19 % perplexity with ~1,100
# tokens vs +12 % for imatrix). Four samples of 192 tokens per request give it ~6,000.
GPTQ_SAMPLES, GPTQ_NEW_TOKENS = 4, 192

# Which activation each quantized MatMul of the ONNX graph multiplies, by the HF module it
# reads: packed q|k|v reads q_proj's input, packed gate|up reads gate_proj's.
_HF_MODULE_FOR_NODE = {"attn.qkv_proj": "self_attn.q_proj", "attn.o_proj": "self_attn.o_proj",
                       "mlp.gate_up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}


@dataclass(frozen=True)
class Importance:
    """Mean squared activation per input channel, keyed by ONNX MatMul node name."""

    channels: dict[str, np.ndarray]
    tokens: int
    grams: dict[str, np.ndarray] = field(default_factory=dict)  # X^T X / tokens, for GPTQ

    def for_node(self, node_name: str) -> np.ndarray | None:
        return self.channels.get(node_name)

    def gram_for(self, node_name: str) -> np.ndarray | None:
        return self.grams.get(node_name)


def calibration_sequences(ckpt: Checkpoint, model, new_tokens: int = NEW_TOKENS, seed: int = SEED,
                          samples: int = 1) -> list[list[int]]:
    """Token ids of each request followed by the model's own sampled continuation (up to its end token).

    samples: continuations per request (different draws from the same seeded generator).
    """
    import torch

    prompts = [p for p in _prompt_ids(ckpt) for _ in range(samples)]
    width = max(len(p) for p in prompts)
    pad = ckpt.tokenizer.eos_token_ids[0] if ckpt.tokenizer.eos_token_ids else 0
    # All requests in one batch, left-padded: one forward pass per new token instead of one per request.
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        # Plain temperature-1 sampling: the model's own distribution, not its mode.
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                             top_p=1.0, max_new_tokens=new_tokens, pad_token_id=pad,
                             eos_token_id=ckpt.tokenizer.eos_token_ids or None)
    sequences = []
    stops = set(ckpt.tokenizer.eos_token_ids)
    for prompt, row in zip(prompts, out[:, width:].tolist(), strict=True):
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))  # keep the end token itself
        sequences.append(prompt + row[:cut])
    return sequences


def _prompt_ids(ckpt: Checkpoint) -> list[list[int]]:
    from nomoat.runtime.chat_template import ChatTemplate
    from tokenizers import Tokenizer

    tok = ckpt.tokenizer
    tokenizer = Tokenizer.from_str(tok.tokenizer_json)
    bos = [tok.bos_token_id] if tok.add_bos_token and tok.bos_token_id is not None else []
    if tok.chat_template:
        template = ChatTemplate.for_tokenizer(tok.chat_template, tok.special_tokens)
        texts = [template.render([{"role": "user", "content": p}], add_generation_prompt=True) for p in PROMPTS]
        # A rendered template carries its own BOS text when the model wants one.
        return [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    return [bos + tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]


def activation_importance(ckpt: Checkpoint, model, sequences: list[list[int]], grams: bool = False) -> Importance:
    """Run the fp32 model over the sequences and average x^2 per input channel of every linear.

    grams: also keep the whole X^T X of each decoder linear's input (GPTQ's weighting); the LM
    head keeps only its diagonal, because a tied table shares its codes with the embedding
    lookup, whose error is per row, not per output.
    """
    import torch

    wanted = {f"model.layers.{i}.{hf}": f"layers.{i}.{node}"
              for i in range(ckpt.spec.num_layers) for node, hf in _HF_MODULE_FOR_NODE.items()}
    wanted["lm_head"] = "lm_head"
    sums: dict[str, torch.Tensor] = {}
    products: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(node_name):
        def record(_module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[node_name] = sums.get(node_name, 0) + x.pow(2).sum(0)
            if grams and node_name != "lm_head":
                xf = x.float()  # fp32 products per sequence, summed in fp64: 2x faster, same result to 1e-6
                products[node_name] = products.get(node_name, 0) + (xf.T @ xf).double()
        return record

    for name, module in model.named_modules():
        if name in wanted:
            hooks.append(module.register_forward_pre_hook(hook(wanted[name])))
    tokens = 0
    try:
        with torch.no_grad():
            for ids in sequences:
                model(torch.tensor([ids]))
                tokens += len(ids)
    finally:
        for h in hooks:
            h.remove()
    return Importance({k: (v / tokens).float().numpy() for k, v in sums.items()}, tokens,
                      {k: (v / tokens).numpy() for k, v in products.items()})


def calibrate(ckpt: Checkpoint, model, grams: bool = False) -> Importance:
    if grams:
        sequences = calibration_sequences(ckpt, model, new_tokens=GPTQ_NEW_TOKENS, samples=GPTQ_SAMPLES)
    else:
        sequences = calibration_sequences(ckpt, model)
    return activation_importance(ckpt, model, sequences, grams=grams)
