"""The ExecuTorch peer's pure-Python parts: checkpoint conversion, export command, engine loop.

The real export takes minutes, so the engine runs here on a stand-in for the loaded method
that records its calls; benchmarks/run.py checks the real .pte's answer before timing it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("executorch")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peer_executorch as pe  # noqa: E402

CONFIG = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
          "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_parameters": {"rope_theta": 100000.0},
          "vocab_size": 10, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True}


def test_meta_names_of_hf_tensors():
    assert pe.meta_name("model.layers.12.self_attn.k_proj.weight") == "layers.12.attention.wk.weight"
    assert pe.meta_name("model.layers.3.mlp.up_proj.weight") == "layers.3.feed_forward.w3.weight"
    assert pe.meta_name("model.embed_tokens.weight") == "tok_embeddings.weight"
    with pytest.raises(ValueError):
        pe.meta_name("model.layers.0.self_attn.rotary_emb.inv_freq")


def _hf_rope(x, pos, theta):
    """Hugging Face's rotate-half RoPE on [heads, head_dim] at one position."""
    half = x.shape[-1] // 2
    freqs = pos / theta ** (torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    cos, sin = torch.cat([freqs.cos(), freqs.cos()]), torch.cat([freqs.sin(), freqs.sin()])
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _meta_rope(x, pos, theta):
    """Meta's interleaved-pairs RoPE (what ExecuTorch runs with use_hf_rope=false)."""
    half = x.shape[-1] // 2
    freqs = pos / theta ** (torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    pairs = torch.view_as_complex(x.reshape(*x.shape[:-1], half, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(freqs), freqs)).flatten(-2)


def test_unpermuted_q_k_give_the_same_attention_scores():
    heads, head_dim, dim, theta = 2, 8, 16, 10000.0
    gen = torch.Generator().manual_seed(0)
    wq, wk = (torch.randn(heads * head_dim, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    xq, xk = torch.randn(dim, generator=gen, dtype=torch.float64), torch.randn(dim, generator=gen,
                                                                                 dtype=torch.float64)

    def scores(rope, q_w, k_w):
        q = rope((q_w @ xq).view(heads, head_dim), 5.0, theta)
        k = rope((k_w @ xk).view(heads, head_dim), 2.0, theta)
        return (q * k).sum(-1)

    hf = scores(_hf_rope, wq, wk)
    meta = scores(_meta_rope, pe.unpermute_rope(wq, heads), pe.unpermute_rope(wk, heads))
    assert torch.allclose(hf, meta)
    # Without the permutation the scores differ: the test can tell.
    assert not torch.allclose(hf, scores(_meta_rope, wq, wk))


def test_meta_state_dict_ties_the_output_layer(tmp_path):
    from safetensors.torch import save_file

    names = {"model.embed_tokens.weight": (10, 16), "model.norm.weight": (16,),
             "model.layers.0.self_attn.q_proj.weight": (16, 16), "model.layers.0.self_attn.k_proj.weight": (8, 16)}
    save_file({n: torch.randn(shape) for n, shape in names.items()}, str(tmp_path / "model.safetensors"))
    state = pe.meta_state_dict(tmp_path, CONFIG)
    assert set(state) == {"tok_embeddings.weight", "norm.weight", "output.weight",
                          "layers.0.attention.wq.weight", "layers.0.attention.wk.weight"}
    assert torch.equal(state["output.weight"], state["tok_embeddings.weight"])


def test_params_and_command_follow_the_hf_config():
    params = pe.meta_params(CONFIG)
    assert (params["dim"], params["n_heads"], params["n_kv_heads"], params["rope_theta"]) == (16, 2, 1, 100000.0)
    cmd = pe.export_command(CONFIG)
    assert "quantization.qmode=8da4w" in cmd and "backend.xnnpack.enabled=True" in cmd
    assert f"quantization.group_size={pe.GROUP_SIZE}" in cmd
    # The checkpoint path must stay relative: a path containing "8da4w" changes how it loads.
    assert "base.checkpoint=checkpoint.pth" in cmd
    metadata = next(a for a in cmd if a.startswith("base.metadata="))
    assert json.loads(metadata.split("=", 1)[1].strip("'")) == {"get_bos_id": 1, "get_eos_ids": [2]}


class _Method:
    """Stands in for a loaded `forward`: logits favour (last token + 1) % vocab."""

    def __init__(self, vocab=10):
        self.vocab = vocab
        self.calls = []

    def execute(self, inputs):
        tokens, input_pos = inputs
        self.calls.append((tokens.tolist()[0], int(input_pos[0])))
        logits = torch.zeros(1, self.vocab)
        logits[0, (int(tokens[0, -1]) + 1) % self.vocab] = 1.0
        return [logits]


def _engine(context=64):
    engine = pe.ExecuTorchEngine("unused.pte", threads=1, context=context)
    engine.method = _Method()
    return engine


def test_engine_prefills_once_then_decodes_one_token_per_call():
    engine = _engine()
    tokens = list(engine.run([3, 4, 5], 4))
    assert tokens == [6, 7, 8, 9]
    assert engine.method.calls == [([3, 4, 5], 0), ([6], 3), ([7], 4), ([8], 5)]


def test_engine_runs_the_full_count_past_end_of_sequence():
    # Token 2 is end-of-sequence in CONFIG; the engine must not stop there.
    assert list(_engine().run([0], 5)) == [1, 2, 3, 4, 5]


def test_reset_starts_the_next_prefill_at_position_zero():
    engine = _engine()
    list(engine.run([1, 2], 3))
    engine.reset()
    engine.method.calls.clear()
    list(engine.run([7], 1))
    assert engine.method.calls == [([7], 0)]


def test_engine_refuses_more_than_its_context():
    with pytest.raises(ValueError):
        list(_engine(context=8).run([1] * 6, 3))


def test_argmax_takes_the_last_position():
    logits = torch.tensor([[[0.0, 9.0, 0.0], [0.0, 0.0, 1.0]]])
    assert pe.argmax(logits) == 2
