"""The fp32 Hugging Face transformers model of a Checkpoint: the reference every export is checked against."""

from __future__ import annotations

import inspect

from .spec import Checkpoint


def reference_model(ckpt: Checkpoint):
    """A transformers *ForCausalLM in fp32 eval mode holding exactly ckpt's tensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_dict = ckpt.spec.to_hf_config()
    config = AutoConfig.for_model(**cfg_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    state = dict(ckpt.tensors)
    if ckpt.spec.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (ckpt.spec.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"reference model mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if ckpt.spec.tie_word_embeddings:
        model.tie_weights()
    # Buffers (rotary inv_freq) were created on the meta device: rebuild the rotary module on the CPU.
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    return model.eval()


def greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from a transformers model, never stopping at an end-of-sequence token.

    generate(min_new_tokens=...) would mask the EOS logit instead, which changes the argmax;
    a plain loop over the KV cache compares like with like.
    """
    import torch
    from transformers import DynamicCache

    # One cache object, updated in place by every call, so the loop never reads it back from the
    # outputs. transformers 5 renamed the argument `past_key_values` to `cache` (the old name goes
    # in 5.40); 4.x knows only the old one.
    cache = DynamicCache()
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out_ids: list[int] = []
    with torch.no_grad():
        step = torch.tensor([ids])
        for _ in range(n):
            logits = model(step, use_cache=True, **{cache_arg: cache}).logits
            token = int(logits[0, -1].argmax())
            out_ids.append(token)
            step = torch.tensor([[token]])
    return out_ids
