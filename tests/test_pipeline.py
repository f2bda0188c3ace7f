"""The conversion pipeline end to end on tiny random LLaMA models (fast)."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from nbits import dequantize
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.errors import ConversionError
from nomoat.converter.load import load_checkpoint
from nomoat.converter.merge import AdapterRef
from nomoat.converter.reference import greedy_tokens, reference_model
from nomoat.runtime import Model
from tiny_models import make_tiny_hf_dir, write_gguf_from_hf, write_meta_from_hf


def _convert(model, out: Path, quant="fp32", loras=(), **kw) -> Path:
    return convert(ConvertOptions(model=str(model), out=out, target="host", quant=quant, loras=tuple(loras),
                                  max_context=kw.pop("max_context", 128), progress=False,
                                  skip_verify=kw.pop("skip_verify", True), **kw))


def _ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("tiny") / "hf")


@pytest.fixture(scope="module")
def fp32_bundle(tiny_dir, tmp_path_factory) -> Path:
    return _convert(tiny_dir, tmp_path_factory.mktemp("b") / "fp32")


def test_fp32_bundle_matches_transformers(tiny_dir, fp32_bundle):
    model = Model.load(fp32_bundle)
    ids = _ids(24, model.manifest.model.vocab_size)
    # Same weights, same math in fp32: only summation order differs.
    np.testing.assert_allclose(model.logits(ids), _hf_logits(tiny_dir, ids), atol=1e-4, rtol=1e-4)


def test_chunked_prefill_and_decode_equal_one_pass(fp32_bundle):
    model = Model.load(fp32_bundle)
    ids = _ids(20, model.manifest.model.vocab_size, seed=1)
    full = model.logits(ids)
    s = model.session
    s.reset()
    parts = [s.forward(ids[:7], all_logits=True), s.forward(ids[7:12], all_logits=True)]
    parts += [s.forward([t], all_logits=True) for t in ids[12:]]
    np.testing.assert_allclose(np.concatenate(parts), full, atol=1e-5)
    # The last-position path writes into the reused buffer and must agree too.
    s.reset()
    s.forward(ids[:-1])
    np.testing.assert_allclose(s.forward(ids[-1:]), full[-1], atol=1e-5)
    # logits() the way generation runs (what verify measures): chunks of 6, then 5 decode steps.
    chunked = Model.load(fp32_bundle, prefill_chunk=6)
    np.testing.assert_allclose(chunked.logits(ids, decode_tail=5), full, atol=1e-5)
    np.testing.assert_allclose(chunked.logits(ids[:3], decode_tail=5), full[:3], atol=1e-5)


def test_greedy_generation_matches_transformers(tiny_dir, fp32_bundle):
    from transformers import AutoModelForCausalLM

    model = Model.load(fp32_bundle)
    prompt = _ids(8, model.manifest.model.vocab_size, seed=2)
    ours = list(model.generate_tokens(prompt, 24, ignore_eos=True))
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    ref = greedy_tokens(hf, prompt, 24)
    assert ours == ref


@pytest.mark.parametrize("source", ["sharded", "gguf", "meta"])
def test_every_source_format_gives_identical_logits(tiny_dir, fp32_bundle, tmp_path, source):
    if source == "sharded":
        path = make_tiny_hf_dir(tmp_path / "sharded", sharded=True)
    elif source == "gguf":
        path = write_gguf_from_hf(tiny_dir, tmp_path / "tiny.gguf", qtype="F32")
    else:
        path = write_meta_from_hf(tiny_dir, tmp_path / "meta")
    bundle = _convert(path, tmp_path / "bundle")
    reference, other = Model.load(fp32_bundle), Model.load(bundle)
    ids = _ids(16, reference.manifest.model.vocab_size, seed=3)
    np.testing.assert_array_equal(other.logits(ids), reference.logits(ids))


@pytest.mark.parametrize("quant,op", [("int4", "MatMulNBits"), ("int8", "MatMulNBits")])
def test_quantized_graph_holds_the_fast_ops(tiny_dir, tmp_path, quant, op):
    import onnx

    bundle = _convert(tiny_dir, tmp_path / quant, quant=quant)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    layers = 2
    assert ops[op] == 4 * layers + 1 and ops["MatMul"] == 0
    assert ops["GroupQueryAttention"] == layers
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers
    bits = _matmul_bits(graph)
    assert bits.pop("lm_head") == int(quant[3:])  # the recipe's LM head is 4-bit; an int8 model keeps 8
    assert set(bits.values()) == {int(quant[3:])}
    if quant == "int4":
        assert ops["GatherBlockQuantized"] == 1
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["weights"] == quant
    # the manifest says what the graph holds, not the recipe's defaults an int8 model does not use
    head = {a.name: a.i for n in graph.node if n.name == "lm_head" for a in n.attribute}
    assert (manifest["quantization"]["lm_head_bits"], manifest["quantization"]["lm_head_block_size"]) == \
        (head["bits"], head["block_size"])
    assert manifest["quantization"]["quantize_embedding"] is (ops["GatherBlockQuantized"] == 1)


def test_an_int8_models_head_takes_a_larger_block_size_and_an_fp32_manifest_names_no_rounding(tiny_dir, tmp_path):
    import onnx

    bundle = _convert(tiny_dir, tmp_path / "int8", quant="int8", block_size=128)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    blocks = {n.name: {a.name: a.i for a in n.attribute}["block_size"]
              for n in graph.node if n.op_type == "MatMulNBits"}
    assert set(blocks.values()) == {128}, blocks
    fp32 = json.loads((_convert(tiny_dir, tmp_path / "fp32", quant="fp32") / "manifest.json").read_text())
    assert {k: v for k, v in fp32["quantization"].items() if v not in (None, False, [])} == {"weights": "fp32"}


def _matmul_bits(graph) -> dict[str, int]:
    return {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in graph.node if n.op_type == "MatMulNBits"}


def test_lm_head_bits_is_a_recorded_choice(tiny_dir, tmp_path):
    import onnx

    bundle = _convert(tiny_dir, tmp_path / "head8", quant="int4", lm_head_bits=8)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    attrs = {n.name: {a.name: a.i for a in n.attribute} for n in graph.node if n.op_type == "MatMulNBits"}
    assert (attrs["lm_head"]["bits"], attrs["lm_head"]["block_size"]) == (8, 64)
    assert {a["bits"] for name, a in attrs.items() if name != "lm_head"} == {4}
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["quantization"]["lm_head_bits"] == 8
    assert "lm_head_bits" in manifest["target"]["recipe"]["overrides"]
    with pytest.raises(ConversionError, match="--lm-head-bits 3"):
        _convert(tiny_dir, tmp_path / "head3", quant="int4", lm_head_bits=3)


@pytest.mark.parametrize("head_bits,symmetric,block_size", [(4, (), None), (8, (), None), (4, ("lm_head",), None),
                                                        # blocks that do not tile the hidden size of 64
                                                        (4, (), 128), (8, ("lm_head",), 128)])
def test_tied_embedding_reads_the_lm_heads_codes(tmp_path, head_bits, symmetric, block_size):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    tied = make_tiny_hf_dir(tmp_path / "tied", tie=True)
    fp32 = _convert(tied, tmp_path / "fp32")
    bundle = _convert(tied, tmp_path / "int4", quant="int4", lm_head_bits=head_bits, symmetric=symmetric,
                      block_size=block_size)
    model = onnx.load(str(bundle / "model.onnx"))
    nodes = {n.name: n for n in model.graph.node}
    assert nodes["embed_tokens"].op_type == "GatherBlockQuantized"
    assert nodes["embed_tokens"].input[0] == nodes["lm_head"].input[1]  # one copy of the table's codes
    # and of its scales: two tensors (ranks 3 and 1), the same bytes of model.onnx.data
    stored = {t.name: {e.key: e.value for e in t.external_data}
              for t in onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph.initializer}
    lookup_scales, head_scales = stored[nodes["embed_tokens"].input[2]], stored[nodes["lm_head"].input[2]]
    assert "offset" in head_scales and lookup_scales == head_scales
    assert (bundle / "model.onnx.data").stat().st_size < sum(int(s.get("length", 0)) for s in stored.values())
    # The lookup yields each token's row of the LM head exactly as MatMulNBits stores it.
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    head = {a.name: a.i for a in nodes["lm_head"].attribute}
    codes, scales, *zero_points = (inits[i] for i in nodes["lm_head"].input[1:4])
    assert len(zero_points) == (0 if "lm_head" in symmetric else 1)  # none: MatMulNBits' default
    zero_points = zero_points[0] if zero_points else None
    table = dequantize(codes, scales, zero_points, head["bits"], head["block_size"], head["K"])
    # The two lookup nodes as they are in the bundle, alone in a graph of their own.
    lookup_nodes = [n for n in model.graph.node if n.name.split(".")[0] == "embed_tokens"]
    assert [n.op_type for n in lookup_nodes][2:] == (["Slice"] if head["K"] % head["block_size"] else [])
    used = {i for n in lookup_nodes for i in n.input}
    graph = onnx.helper.make_graph(
        lookup_nodes, "lookup", [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, None])],
        [onnx.helper.make_tensor_value_info(lookup_nodes[-1].output[0], onnx.TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in used])
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    lookup = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([_ids(12, table.shape[0], seed=6)], np.int64)
    np.testing.assert_allclose(lookup.run(None, {"input_ids": ids})[0][0], table[ids[0]], rtol=1e-6, atol=1e-6)
    # And the whole bundle still tracks the fp32 model.
    ref, q = Model.load(fp32), Model.load(bundle)
    a, b = ref.logits(ids[0].tolist()), q.logits(ids[0].tolist())
    assert not np.array_equal(a, b) and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def test_int4_bundle_stays_close_to_fp32(tiny_dir, fp32_bundle, tmp_path):
    bundle = _convert(tiny_dir, tmp_path / "int4", quant="int4")
    ref, q = Model.load(fp32_bundle), Model.load(bundle)
    ids = _ids(32, ref.manifest.model.vocab_size, seed=4)
    a, b = ref.logits(ids), q.logits(ids)
    assert not np.array_equal(a, b)  # it really is quantized
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.95


def _peft_adapter(base_dir: Path, out: Path, seed: int = 0, r: int = 4, **config) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"],
                     init_lora_weights=False, **config)  # random A and B: the adapter changes the output
    peft_model = get_peft_model(base, cfg)
    peft_model.save_pretrained(out)
    return out


def test_lora_merge_equals_peft_merge_and_unload(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = _peft_adapter(tiny_dir, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    bundle = _convert(tiny_dir, tmp_path / "bundle", loras=[AdapterRef(adapter)])
    model = Model.load(bundle)
    ids = _ids(16, model.manifest.model.vocab_size, seed=5)
    with torch.no_grad():
        expected = merged(torch.tensor([ids])).logits[0].numpy()
    ours = model.logits(ids)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
    assert np.abs(ours - _hf_logits(tiny_dir, ids)).max() > 1e-2  # the adapter did change the model
    report = json.loads((bundle / "report.json").read_text())
    assert report["adapters"][0]["rank"] == 4 and len(report["adapters"][0]["modules"]) == 2 * 7


def test_verify_writes_a_computed_quality_report(tiny_dir, tmp_path):
    bundle = _convert(tiny_dir, tmp_path / "v", quant="int4", skip_verify=False, max_ppl_increase=1000.0)
    q = json.loads((bundle / "report.json").read_text())["quality"]
    assert q["eval_tokens"] >= 16 and q["ppl_reference"] > 1 and q["mean_kl"] > 0
    assert 0 <= q["top1_agreement"] <= 1


def test_quality_gate_refuses_and_writes_nothing(tiny_dir, tmp_path):
    out = tmp_path / "gate"
    with pytest.raises(ConversionError, match="quality gate failed"):
        # int4 raises this model's perplexity by ~0.1 %: a limit of 0 fails it (a negative one is refused up front)
        _convert(tiny_dir, out, quant="int4", skip_verify=False, max_ppl_increase=0.0)
    assert not out.exists() and not list(tmp_path.glob(".gate*"))


# -- bad input: a clear error and no bundle --------------------------------------------------


def _assert_refused(tmp_path: Path, out: Path, match: str, **kw) -> None:
    with pytest.raises(ConversionError, match=match):
        _convert(out=out, **kw)
    assert not out.exists(), "a failed conversion must not leave a bundle"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")], "temp dir left behind"


def test_a_missing_lora_path_is_refused_before_the_model_is_read(tiny_dir, tmp_path, monkeypatch):
    from nomoat.converter import load as load_module
    from nomoat.converter.cli_merge import merge_to_hf_dir

    def no_load(*args, **kwargs):
        raise AssertionError("the model was read before the adapter paths were checked")

    monkeypatch.setattr(load_module, "load_checkpoint", no_load)
    missing = AdapterRef(tmp_path / "no-such-adapter")
    refusal = f"LoRA adapter {missing.path} does not exist; pass a PEFT adapter folder .* or a llama.cpp LoRA .gguf"
    _assert_refused(tmp_path, tmp_path / "out", refusal, model=tiny_dir, loras=[missing])
    with pytest.raises(ConversionError, match=refusal):
        merge_to_hf_dir(str(tiny_dir), [missing], tmp_path / "merged", progress=False)


def test_missing_safetensors_is_refused(tiny_dir, tmp_path):
    broken = make_tiny_hf_dir(tmp_path / "broken")
    for f in broken.glob("*.safetensors"):
        f.unlink()
    _assert_refused(tmp_path, tmp_path / "out", "safetensors", model=broken)


def test_corrupt_safetensors_is_refused(tmp_path):
    broken = make_tiny_hf_dir(tmp_path / "broken")
    f = next(broken.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _assert_refused(tmp_path, tmp_path / "out", "safetensors", model=broken)


def test_lora_for_another_model_is_refused(tiny_dir, tmp_path):
    other = make_tiny_hf_dir(tmp_path / "other", hidden_size=32)
    adapter = _peft_adapter(other, tmp_path / "adapter")
    _assert_refused(tmp_path, tmp_path / "out", "shape", model=tiny_dir, loras=[AdapterRef(adapter)])


def test_chat_template_that_does_not_compile_is_refused(tmp_path):
    broken = make_tiny_hf_dir(tmp_path / "broken")
    (broken / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    _assert_refused(tmp_path, tmp_path / "out", "chat template does not compile.*endfor", model=broken)


def test_unknown_target_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ConversionError, match="unknown target 'pixel99'.*pixel6"):
        convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "out", target="pixel99", progress=False))
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force_and_force_replaces_only_a_bundle(tiny_dir, fp32_bundle, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ConversionError, match=f"output {out} exists and holds other files .*choose another --out"):
        _convert(tiny_dir, out)  # not "pass --force": --force would refuse it next
    with pytest.raises(ConversionError, match=f"--force replaces only a bundle or an empty folder, and {out} holds"):
        _convert(tiny_dir, out, force=True)
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    _convert(tiny_dir, out, force=True)  # an empty folder
    assert (out / "manifest.json").is_file()
    _convert(tiny_dir, out, force=True, max_context=64)  # a bundle
    assert json.loads((out / "manifest.json").read_text())["max_context"] == 64


def test_out_that_is_holds_or_lies_in_the_model_or_an_adapter_is_refused(tmp_path, monkeypatch):
    model = make_tiny_hf_dir(tmp_path / "models" / "m")
    adapter = tmp_path / "adapter"  # checked before any adapter is read: any folder does
    adapter.mkdir()
    before = sorted(p.name for p in model.iterdir())
    for out, match in [(model, "is --model"), (model.parent, "contains --model"), (model / "onnx", "is inside --model"),
                       (adapter, "is --lora"), (tmp_path, "contains --model")]:
        with pytest.raises(ConversionError, match=f"--out {out} {match} .*Choose an --out outside it"):
            _convert(model, out, force=True, loras=[AdapterRef(adapter)])
    assert sorted(p.name for p in model.iterdir()) == before
    monkeypatch.chdir(tmp_path / "models")
    with pytest.raises(ConversionError, match="is the working directory"):
        _convert(model, Path("."), force=True)
    assert sorted(p.name for p in model.iterdir()) == before


def test_missing_parents_of_out_are_made_and_removed_again_if_the_conversion_fails(tiny_dir, tmp_path, monkeypatch):
    """`--out build/rpi5` in a fresh checkout (the README's Pi command) needs no mkdir first."""
    from nomoat.converter import convert as convert_module

    out = _convert(tiny_dir, tmp_path / "build" / "sub" / "b")
    assert (out / "manifest.json").is_file()

    def failed(*args, **kwargs):
        raise ConversionError("the export failed")

    monkeypatch.setattr(convert_module, "_package", failed)
    with pytest.raises(ConversionError, match="the export failed"):
        _convert(tiny_dir, tmp_path / "new" / "deeper" / "b")
    assert not (tmp_path / "new").exists()  # nothing left behind, not even the folders
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ConversionError, match="lies under .*file, which is a file"):
        _convert(tiny_dir, tmp_path / "file" / "b")


def test_out_parents_that_cannot_be_made_are_refused_before_the_model_is_read(tiny_dir, tmp_path, monkeypatch):
    from nomoat.converter import bundle as bundle_module
    from nomoat.converter import load as load_module

    def no_load(*args, **kwargs):
        raise AssertionError("the model was read before --out was checked")

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with monkeypatch.context() as m:
        m.setattr(load_module, "load_checkpoint", no_load)
        with pytest.raises(ConversionError, match="dangling, a symbolic link to a path that does not exist"):
            _convert(tiny_dir, tmp_path / "dangling" / "sub" / "b")

    def refused(*args, **kwargs):  # what a file system that changed under us, or refuses, does late
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(bundle_module.tempfile, "mkdtemp", refused)
    with pytest.raises(ConversionError, match="cannot write beside --out .*Permission denied; choose another"):
        _convert(tiny_dir, tmp_path / "late" / "b")
    assert not (tmp_path / "late").exists()


def test_bundle_is_readable_by_other_users(tiny_dir, tmp_path):
    """mkdtemp makes the staging folder 0700: the bundle gets what mkdir and open give (0777/0666 less umask)."""
    import os
    import stat

    old = os.umask(0o027)
    try:
        out = _convert(tiny_dir, tmp_path / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {p.name: 0o640 for p in out.iterdir()}


def test_sigterm_unwinds_like_ctrl_c_and_removes_the_staging_folder(tiny_dir, fp32_bundle, tmp_path, monkeypatch):
    import os
    import shutil
    import signal
    import time

    from nomoat.converter import convert as convert_module
    from nomoat.converter.bundle import Interrupted

    out = Path(shutil.copytree(fp32_bundle, tmp_path / "b"))
    files = {p.name: p.read_bytes() for p in out.iterdir()}

    def killed(*args, **kwargs):  # SIGTERM arrives when the bundle is staged, just before it replaces the old one
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler runs at once and raises out of the sleep
        raise AssertionError("SIGTERM did not interrupt the conversion")

    monkeypatch.setattr(convert_module, "_package", killed)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as e:
        _convert(tiny_dir, out, force=True)
    assert isinstance(e.value, KeyboardInterrupt) and e.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is handler  # restored after the conversion
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging folder left
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # the old bundle untouched


def test_interrupted_cli_prints_one_line_and_exits_128_plus_the_signal(tmp_path, monkeypatch, capsys):
    import signal

    from nomoat.__main__ import main as nomoat_main
    from nomoat.converter import convert as convert_module
    from nomoat.converter.bundle import Interrupted

    for error, code, line in [(KeyboardInterrupt(), 130, "nomoat convert: interrupted; nothing was written"),
                              (Interrupted(signal.SIGTERM), 143, "nomoat convert: stopped by SIGTERM; nothing was "
                                                                 "written")]:
        def interrupted(opts, error=error):
            raise error

        monkeypatch.setattr(convert_module, "convert", interrupted)
        assert nomoat_main(["convert", "--model", "m", "--out", str(tmp_path / "b")]) == code
        assert capsys.readouterr().err.strip() == line


def test_staging_folders_of_killed_conversions_are_removed(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".b.tmp-{int(dead.stdout)}-x1y2"  # its process is gone: SIGKILL, a power cut
    live = tmp_path / f".b.tmp-{os.getppid()}-a3b4"  # a conversion still running
    other = tmp_path / ".b.tmp-abc123"  # no process id: not ours to judge
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "model.onnx.data").write_bytes(b"x" * 100)
    _convert(tiny_dir, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["b", live.name, other.name])


def test_head_dim_onnx_runtime_cannot_run_is_refused_before_the_weights_are_read(tmp_path):
    model = make_tiny_hf_dir(tmp_path / "hd24", head_dim=24)  # GroupQueryAttention wants multiples of 16
    (model / "model.safetensors").unlink()
    _assert_refused(tmp_path, tmp_path / "out", r"head_dim 24 is not supported: .* multiples of 16 only \(16, 32, 48",
                    model=model)


def test_unsupported_gguf_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _assert_refused(tmp_path, tmp_path / "out", "gpt2", model=path)


def test_reference_model_matches_checkpoint(tiny_dir):
    ckpt = load_checkpoint(tiny_dir)
    ids = _ids(10, ckpt.spec.vocab_size, seed=6)
    with torch.no_grad():
        ours = reference_model(ckpt)(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, _hf_logits(tiny_dir, ids), atol=1e-5)


@pytest.mark.parametrize("quant, tie", [("int4", False), ("int4", True), ("int8", False), ("fp32", False)])
def test_export_makes_each_fp32_weight_while_no_other_is_held(tmp_path, monkeypatch, quant, tie):
    """The export's memory bound, by structure instead of RSS: the graph is built with its large
    weights as placeholders, and each weight's fp32 array is made only when no other one is alive
    (beyond the one just used) and no fp32 weight's data sits in the graph. Building the fp32 graph
    eagerly again, or making all weights before rounding them, fails here."""
    import weakref

    import nomoat.converter.export_onnx as export
    from nomoat.converter.quantize import QuantRecipe

    made: list[tuple[str, weakref.ref]] = []
    names: set[str] = set()
    build = export.build_graph

    def spying_build(*args, **kwargs):
        model, weights = build(*args, **kwargs)
        names.update(weights)

        def spy(name, make):
            def wrapped():
                held = [t.name for t in model.graph.initializer if t.name in names and t.HasField("raw_data")]
                assert not held, f"fp32 data of {held} is in the graph while {name} is made"
                alive = [n for n, ref in made if ref() is not None]
                assert len(alive) <= 1, f"the fp32 arrays of {alive} are alive while {name} is made"
                array = make()
                made.append((name, weakref.ref(array)))
                return array
            return wrapped

        for name, make in list(weights.items()):
            weights[name] = spy(name, make)
        return model, weights

    monkeypatch.setattr(export, "build_graph", spying_build)
    ckpt = load_checkpoint(make_tiny_hf_dir(tmp_path / "hf", tie=tie))
    export.export_onnx(ckpt, tmp_path, QuantRecipe(weights=quant, algorithm="rtn"), max_context=64)
    # 4 linears per layer, the LM head and the embedding table, all placeholders, all made.
    assert len(names) == 4 * ckpt.spec.num_layers + 2
    assert {n for n, _ in made} == names
