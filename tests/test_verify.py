"""The quality gate (fast): metrics, the default text, and the gate on a tiny *trained* model.

A random tiny model predicts an almost uniform distribution whatever is done to its
weights, so no gate could tell a broken export from a good one. Forty training steps on
the evaluation text (a few seconds) bring its perplexity from ~400 to ~48: then a broken
export shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nomoat.__main__ import main as nomoat_main
from nomoat.converter.convert import CORRUPT_WEIGHTS_ENV, ConvertOptions, convert
from nomoat.converter.errors import ConversionError
from nomoat.converter.verify import (
    BROKEN_TOP1,
    DEFAULT_MAX_PPL_INCREASE,
    GREEDY_PROMPTS,
    LogitStats,
    compare_logits,
    default_eval_text,
    eval_windows,
    format_quality_table,
)
from tiny_models import make_tiny_hf_dir, tokenizer_json


def _train(model_dir: Path, steps: int = 40, seed: int = 0) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(Tokenizer.from_str(tokenizer_json()).encode(default_eval_text(), add_special_tokens=False).ids)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model: threads only add synchronisation
    try:
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - 129, (8,), generator=gen).tolist()
            batch = torch.stack([ids[s:s + 128] for s in starts])
            loss = model(batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(model_dir)


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory) -> Path:
    model_dir = make_tiny_hf_dir(tmp_path_factory.mktemp("gate") / "trained", max_position_embeddings=512)
    _train(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def short_text(tmp_path_factory) -> Path:
    """~1,000 tiny-tokenizer tokens of the default text: two windows, enough for the gate and quick."""
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text(default_eval_text()[:3000])
    return path


def _convert(model: Path, out: Path, **kw) -> Path:
    return convert(ConvertOptions(model=str(model), out=out, target="host", progress=kw.pop("progress", False),
                                  max_context=kw.pop("max_context", 512), **kw))


# -- the default text ---------------------------------------------------------------------------


def test_default_eval_text_is_long_varied_prose():
    text = default_eval_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    assert len(text.split()) >= 3500  # ~4,750 SmolLM2 tokens (the slow test counts them)
    assert len(paragraphs) >= 30 and len(set(paragraphs)) == len(paragraphs)
    assert all(p.strip().isprintable() for p in paragraphs)


# -- the metrics ----------------------------------------------------------------------------------


def test_identical_logits_cost_nothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 30)).astype(np.float32)
    targets = rng.integers(0, 30, 50)
    ppl_ref, ppl_got, kl, top1 = compare_logits(logits, logits, targets)
    assert ppl_ref == ppl_got and abs(kl) < 1e-12 and top1 == 1.0


def test_metrics_match_a_hand_computation():
    ref = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    got = np.log(np.array([[0.25, 0.5, 0.25], [0.1, 0.8, 0.1]]))
    targets = np.array([0, 1])
    ppl_ref, ppl_got, kl, top1 = compare_logits(ref, got, targets)
    assert ppl_ref == pytest.approx(np.exp(-(np.log(0.5) + np.log(0.8)) / 2))
    assert ppl_got == pytest.approx(np.exp(-(np.log(0.25) + np.log(0.8)) / 2))
    assert kl == pytest.approx((0.5 * np.log(2) + 0.25 * np.log(0.5)) / 2)
    assert top1 == 0.5


def test_statistics_accumulate_over_windows_like_one_pass():
    rng = np.random.default_rng(1)
    ref, got = rng.normal(size=(2, 300, 40))
    targets = rng.integers(0, 40, 300)
    stats = LogitStats()
    for s in range(0, 300, 70):  # uneven windows, and more rows than one float64 slice
        stats.add(ref[s:s + 70], got[s:s + 70], targets[s:s + 70])
    assert stats.result() == pytest.approx(compare_logits(ref, got, targets))


def test_eval_windows_cover_the_text_and_drop_a_useless_tail():
    assert eval_windows(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert eval_windows(list(range(9)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]


# -- the gate -------------------------------------------------------------------------------------


def test_gate_passes_a_normal_export_and_fails_a_broken_one(trained_tiny, short_text, tmp_path, monkeypatch):
    good = _convert(trained_tiny, tmp_path / "good", quant="int8", eval_text=short_text)
    q = json.loads((good / "report.json").read_text())["quality"]
    assert q["passed"] and q["max_ppl_increase_percent"] == DEFAULT_MAX_PPL_INCREASE["int8"]
    assert q["ppl_reference"] < 100  # trained: far below the ~400 of a uniform guess
    assert abs(q["ppl_increase_percent"]) < 1 and q["top1_agreement"] > 0.95

    monkeypatch.setenv(CORRUPT_WEIGHTS_ENV, "1")
    out = tmp_path / "broken"
    with pytest.raises(ConversionError) as e:
        _convert(trained_tiny, out, quant="int8", eval_text=short_text)
    msg = str(e.value)
    assert msg.startswith("quality gate failed: perplexity") and "limit +3.00% for int8" in msg
    assert "No bundle was written" in msg
    increase = float(msg.split("(")[1].split("%")[0])
    assert increase > 50  # the numbers are in the message, and they are bad
    top1 = float(msg.split("top-1 agreement ")[1].split("%")[0]) / 100
    # a higher limit is suggested only for an export that is lossy, not broken
    assert ("raise --max-ppl-increase if" in msg) == (top1 >= BROKEN_TOP1), msg
    assert not out.exists() and not list(tmp_path.glob(".broken*"))


def test_gate_fails_an_export_whose_cache_path_is_wrong(trained_tiny, short_text, tmp_path, monkeypatch):
    """Right from an empty cache, wrong once the cache holds tokens: only the way generation runs shows it."""
    from nomoat.runtime.onnx_session import DecoderSession

    forward = DecoderSession.forward

    def wrong_after_the_first_run(self, ids, all_logits=False):
        logits = forward(self, ids, all_logits)
        return logits if self.length == len(ids) else np.roll(logits, 1, axis=-1)

    monkeypatch.setattr(DecoderSession, "forward", wrong_after_the_first_run)
    with pytest.raises(ConversionError, match="^quality gate failed: perplexity"):
        _convert(trained_tiny, tmp_path / "b", quant="fp32", eval_text=short_text)


def test_eval_text_option_report_and_table(trained_tiny, short_text, tmp_path, capsys):
    from tokenizers import Tokenizer

    bundle = _convert(trained_tiny, tmp_path / "b", quant="int4", eval_text=short_text, progress=True)
    q = json.loads((bundle / "report.json").read_text())["quality"]
    tokens = Tokenizer.from_str(tokenizer_json()).encode(short_text.read_text(), add_special_tokens=False).ids
    assert q["eval_source"] == str(short_text) and q["eval_tokens"] == len(tokens)
    assert q["eval_window"] == 512 and len(q["greedy_first_divergence"]) == 3
    err = capsys.readouterr().err
    table = err[err.index("quality    "):]
    for row in ("perplexity", "mean KL", "top-1 agreement", "greedy, 32 tokens", "limit +30%: passed"):
        assert row in table


def test_greedy_check_fits_the_context_and_reports_what_it_skipped(tmp_path, short_text, capsys):
    """Each prompt with its continuation must fit --max-context: the continuation is cut to the room left,
    and a prompt longer than the context is skipped and named (it was a ContextOverflowError traceback)."""
    from nomoat.runtime import Model

    model = make_tiny_hf_dir(tmp_path / "m")
    bundle = _convert(model, tmp_path / "b", quant="fp32", eval_text=short_text, max_context=48, progress=True)
    q = json.loads((bundle / "report.json").read_text())["quality"]
    lengths = [len(Model.load(bundle).prompt_ids(p)) for p in GREEDY_PROMPTS]
    fits = [n for n in lengths if n < 48]
    assert 0 < len(fits) < len(lengths)  # the tiny tokenizer's prompts: some fit, one does not
    assert q["greedy_tokens"] == [min(32, 48 - n) for n in fits] and len(q["greedy_first_divergence"]) == len(fits)
    assert len(q["greedy_skipped"]) == len(lengths) - len(fits) and "the context holds 48" in q["greedy_skipped"][0]
    assert q["greedy_agreement"] == 1.0 and q["passed"]  # fp32: the same tokens
    assert "prompt(s) longer than the context skipped" in capsys.readouterr().err


def test_an_error_inside_verify_is_a_conversion_error_that_names_it(tmp_path, short_text, monkeypatch):
    from nomoat.runtime import Model

    def broken(self, *args, **kwargs):
        raise RuntimeError("onnxruntime says no")

    monkeypatch.setattr(Model, "generate_tokens", broken)
    out = tmp_path / "b"
    with pytest.raises(ConversionError, match="quality check failed with RuntimeError: onnxruntime says no. "
                                              "No bundle was written"):
        _convert(make_tiny_hf_dir(tmp_path / "m"), out, quant="fp32", eval_text=short_text, max_context=64)
    assert not out.exists() and not list(tmp_path.glob(".b.tmp-*"))


def test_unreadable_eval_text_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConversionError, match="--eval-text .*missing.txt"):
        _convert(tmp_path / "no-model-needed", tmp_path / "out", eval_text=tmp_path / "missing.txt")


def test_skip_verify_is_recorded_and_shown(tmp_path, capsys):
    model = make_tiny_hf_dir(tmp_path / "m")
    bundle = _convert(model, tmp_path / "b", quant="int4", skip_verify=True, max_context=64)
    assert json.loads((bundle / "report.json").read_text())["quality"] == {"skipped": True}
    assert nomoat_main(["inspect", str(bundle)]) == 0
    assert "not verified (--skip-verify)" in capsys.readouterr().out


def test_the_table_marks_a_failure():
    q = {"eval_source": "default", "eval_tokens": 100, "eval_window": 64, "ppl_reference": 10.0, "ppl_bundle": 20.0,
         "ppl_increase_percent": 100.0, "mean_kl": 0.5, "top1_agreement": 0.5, "greedy_tokens_per_prompt": 8,
         "greedy_agreement": 1 / 3, "greedy_first_divergence": [-1, 0, 3], "max_ppl_increase_percent": 30.0,
         "passed": False, "seconds": 1.0}
    table = format_quality_table(q)
    assert "+100.00%" in table and "FAILED" in table and "same, differs at 0, differs at 3" in table
    # Greedy agreement is a count of prompts, its column aligned with the bundle's numbers above it.
    greedy, perplexity = table.splitlines()[-1], table.splitlines()[2]
    assert "1 of 3 same  (" in greedy
    assert greedy.index("  (") == perplexity.index("20.000") + len("20.000")


def test_reference_greedy_tokens_use_the_cache_right_and_quietly():
    # The reference's cached loop must give what recomputing the whole sequence gives, and must not
    # lean on transformers' deprecated cache argument (removed in transformers 5.40).
    import warnings

    from nomoat.converter.reference import greedy_tokens
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(config).eval()
    ids = [1, 5, 9, 22, 7]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = greedy_tokens(model, ids, 12)
    sequence, want = list(ids), []
    with torch.no_grad():
        for _ in range(12):
            want.append(int(model(torch.tensor([sequence]), use_cache=False).logits[0, -1].argmax()))
            sequence.append(want[-1])
    assert got == want and len(set(got)) > 3  # a random model that repeats one token would prove little
