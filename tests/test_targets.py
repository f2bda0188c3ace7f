"""The device registry (fast): facts, recipes, overrides, a valid bundle for every target, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from nomoat.__main__ import main as nomoat_main
from nomoat.converter import targets as targets_module
from nomoat.converter.convert import ConvertOptions, convert
from nomoat.converter.errors import ConversionError
from nomoat.converter.targets import ALIASES, INT8_DOT_FEATURES, detect_host, load_target, registry_names
from nomoat.runtime import Model
from tiny_models import make_tiny_hf_dir

# The facts the registry must hold, from the SoC makers' public spec sheets:
# target -> (SoC, {core: count}, ISA has int8 dot product, RAM GB).
FACTS = {
    "pixel6": ("Google Tensor G1", {"Cortex-X1": 2, "Cortex-A76": 2, "Cortex-A55": 4}, True, 8),
    "pixel7": ("Google Tensor G2", {"Cortex-X1": 2, "Cortex-A78": 2, "Cortex-A55": 4}, True, 8),
    "pixel8": ("Google Tensor G3", {"Cortex-X3": 1, "Cortex-A715": 4, "Cortex-A510": 4}, True, 8),
    "galaxy-s22": ("Exynos 2200 / Snapdragon 8 Gen 1", {"Cortex-X2": 1, "Cortex-A710": 3, "Cortex-A510": 4}, True, 8),
    "android-arm64": ("generic ARMv8.0-A (e.g. 8x Cortex-A53)", {"Cortex-A53": 8}, False, 4),
    **{f"rpi4-{r}gb": ("Broadcom BCM2711", {"Cortex-A72": 4}, False, r) for r in (2, 4, 8)},
    **{f"rpi5-{r}gb": ("Broadcom BCM2712", {"Cortex-A76": 4}, True, r) for r in (2, 4, 8, 16)},
}
# Which Arm cores execute int8 dot products (SDOT, Armv8.2-A's dotprod; all Armv9 cores have it too).
CORE_HAS_DOTPROD = {
    "Cortex-A53": False, "Cortex-A72": False, "Cortex-A55": True, "Cortex-A76": True, "Cortex-A78": True,
    "Cortex-X1": True, "Cortex-X2": True, "Cortex-X3": True, "Cortex-A510": True, "Cortex-A710": True,
    "Cortex-A715": True,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_hf_dir(tmp_path_factory.mktemp("targets") / "tiny")


def _cores(target) -> dict[str, int]:
    counts: dict[str, int] = {}
    for names in target.cores.values():
        for name in names:
            counts[name] = counts.get(name, 0) + 1
    return counts


def _graph_accuracy_levels(bundle: Path) -> set[int]:
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
            if a.name == "accuracy_level"}


# -- facts and recipes --------------------------------------------------------------------------


def test_the_registry_lists_every_device():
    assert set(registry_names()) == set(FACTS) | {"host"}


@pytest.mark.parametrize("name", sorted(FACTS))
def test_device_facts(name):
    soc, cores, int8_dot, ram = FACTS[name]
    t = load_target(name)
    assert (t.soc, _cores(t), t.has_int8_dot, t.ram_gb) == (soc, cores, int8_dot, ram)
    # the ISA line agrees with the cores: dot products exactly when every core has them
    assert t.has_int8_dot == all(CORE_HAS_DOTPROD[c] for c in _cores(t))
    assert ("i8mm" in t.isa) == t.isa[0].startswith("armv9")  # i8mm: every Armv9 core here, no Armv8 one
    assert 0 < t.app_memory_share < 1 and t.recipe.kv_dtype == "float32" and t.recipe.formats == ("onnx",)
    assert t.recipe.threads <= sum(len(v) for k, v in t.cores.items() if k != "little")


def test_recipes_differ_where_the_hardware_differs():
    pixel6, rpi4, rpi5 = load_target("pixel6"), load_target("rpi4"), load_target("rpi5")
    assert pixel6.recipe.accuracy_level == 4 and rpi5.recipe.accuracy_level == 4
    assert rpi4.recipe.accuracy_level == 0  # Cortex-A72: no int8 dot products
    assert load_target("android-arm64").recipe.accuracy_level == 0  # Cortex-A53: neither
    # same SoC, less RAM: a smaller context and a smaller budget
    small, big = load_target("rpi5-2gb"), load_target("rpi5-8gb")
    assert small.recipe.max_context < big.recipe.max_context and small.memory_budget_bytes < big.memory_budget_bytes
    # phones keep a smaller share of RAM for one app than a dedicated Pi
    assert pixel6.app_memory_share < rpi5.app_memory_share


def test_aliases_point_at_the_common_variant():
    assert ALIASES == {"rpi4": "rpi4-4gb", "rpi5": "rpi5-8gb"}
    assert load_target("rpi4").name == "rpi4-4gb" and load_target("rpi5").name == "rpi5-8gb"


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ConversionError, match="unknown target 'pixel99'.*pixel6.*rpi5=rpi5-8gb"):
        load_target("pixel99")


# -- host detection -------------------------------------------------------------------------------

PI4_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"
PI5_CPUINFO = ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
               "asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n")
X86_CPUINFO = "model name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512_vnni\n"


@pytest.mark.parametrize("cpuinfo,features,level", [
    (PI4_CPUINFO, {"neon"}, 0),
    (PI5_CPUINFO, {"neon", "fp16", "dotprod"}, 4),
    (X86_CPUINFO, {"avx2", "avx512f", "avx512vnni", "fma", "f16c"}, 4),
])
def test_host_reads_its_isa_from_cpuinfo(monkeypatch, cpuinfo, features, level):
    monkeypatch.setattr(targets_module, "_cpuinfo", lambda: cpuinfo)
    host = detect_host()
    assert set(host.isa[1:]) == features and host.recipe.accuracy_level == level
    assert host.recipe.kv_dtype == "float32"  # float16 decoded slower at 2 threads, even with F16C
    assert host.recipe.threads == len(host.cores["big"]) >= 1 and host.ram_gb > 0


def test_int8_dot_features_are_the_ones_cpuinfo_maps_to():
    mapped = set(targets_module._CPUINFO_FEATURES.values())
    assert INT8_DOT_FEATURES <= mapped  # otherwise a host could never get accuracy level 4 from that feature


# -- every target builds a bundle -----------------------------------------------------------------


@pytest.mark.parametrize("name", registry_names())
def test_every_target_produces_a_valid_bundle(tiny_dir, tmp_path, name):
    target = load_target(name)
    out = convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / name, target=name, progress=False,
                                 skip_verify=True))
    model = Model.load(out)  # checks format version and every sha256
    assert len(list(model.generate_tokens(model.prompt_ids("Hi"), 4, ignore_eos=True))) == 4
    m = json.loads((out / "manifest.json").read_text())
    recipe = m["target"]["recipe"]
    assert m["target"]["name"] == target.name and recipe["overrides"] == []
    assert _graph_accuracy_levels(out) == {target.recipe.accuracy_level} == {recipe["accuracy_level"]}
    assert m["target"]["threads"] == target.recipe.threads
    # the tiny model was trained for 256 positions: the recipe's context is clamped, and that is recorded
    assert m["max_context"] == min(target.recipe.max_context, 256)
    assert recipe["adjustments"] == [f"max_context {target.recipe.max_context} -> 256: the model was trained for "
                                     "256 positions"]
    est = m["target"]["memory_estimate"]
    assert est["budget_bytes"] == target.memory_budget_bytes and est["total_bytes"] <= est["budget_bytes"]


# -- overrides and inspect ------------------------------------------------------------------------


def test_overrides_land_in_the_manifest_and_inspect_shows_them(tiny_dir, tmp_path, capsys):
    out = convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", target="pixel6", quant="int8",
                                 block_size=64, max_context=128, threads=2, progress=False, skip_verify=True))
    m = json.loads((out / "manifest.json").read_text())
    recipe = m["target"]["recipe"]
    assert recipe["overrides"] == ["block_size", "max_context", "threads", "weights"]
    assert (recipe["weights"], recipe["block_size"], recipe["max_context"], recipe["threads"]) == ("int8", 64, 128, 2)
    assert m["quantization"]["weights"] == "int8" and m["quantization"]["block_size"] == 64
    assert m["max_context"] == 128 and m["target"]["threads"] == 2 and recipe["adjustments"] == []

    assert nomoat_main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "overrides  block_size=64, max_context=128, threads=2, weights=int8" in text
    assert "target     pixel6: Google Pixel 6" in text and "sha256 ok" in text
    assert "memory     peak ~" in text and "at 128 tokens" in text
    assert "int8 weights (imatrix) in blocks of 64, LM head 8-bit, no zero points in gate_up, embedding" in text
    assert "chat       template as text pieces too" in text

    assert nomoat_main(["inspect", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"]["target"]["recipe"]["overrides"] == recipe["overrides"] and data["files_ok"] is True
    assert data["report"]["quality"] == {"skipped": True}


@pytest.mark.parametrize("flags,match", [
    ({"quant": "int8", "smoothing": True}, r"--smoothing has no effect with --quant int8: .* Drop --smoothing, or use "
                                           r"--quant int4"),
    ({"algorithm": "mse", "smoothing": True}, r"--smoothing has no effect with --algorithm mse: .* Drop --smoothing, "
                                              r"or use --algorithm imatrix"),
    ({"algorithm": "rtn", "smoothing": True}, r"--smoothing has no effect with --algorithm rtn"),
    ({"quant": "int8", "lm_head_bits": 4}, r"--lm-head-bits 4 has no effect with --quant int8: an int8 model's LM "
                                           r"head is never below 8 bits. Drop --lm-head-bits, or use --quant int4"),
    ({"quant": "fp32", "algorithm": "gptq"}, r"--algorithm gptq has no effect with --quant fp32: nothing is rounded. "
                                             r"Drop --algorithm, or choose --quant int8 or int4"),
    ({"quant": "fp32", "symmetric": ("qkv",)}, r"--symmetric qkv has no effect with --quant fp32"),
    ({"quant": "fp32", "lm_head_bits": 8, "block_size": 64},
     r"--block-size 64 and --lm-head-bits 8 have no effect with --quant fp32: .* Drop --block-size and --lm-head-bits"),
    ({"quant": "fp32", "smoothing": True}, r"--smoothing has no effect with --quant fp32"),
])
def test_flags_that_would_do_nothing_are_refused_before_any_work(tmp_path, flags, match):
    with pytest.raises(ConversionError, match=match):
        convert(ConvertOptions(model=str(tmp_path / "never-read"), out=tmp_path / "b", progress=False, **flags))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("flags", [
    {"quant": "int8", "lm_head_bits": 8}, {"quant": "int8", "smoothing": False}, {"quant": "fp32", "symmetric": ()},
    {"quant": "int4", "algorithm": "gptq", "smoothing": True}, {"quant": "int8", "algorithm": "mse"},
])
def test_flags_that_take_effect_or_say_off_are_accepted(flags):
    from nomoat.converter.convert import plan

    for name in registry_names():
        _, recipe = plan(ConvertOptions(model="m", out=Path("b"), target=name, **flags))
        assert set(recipe.overrides) == {"weights" if k == "quant" else k for k in flags}


def test_inspect_flags_a_damaged_bundle_and_refuses_a_non_bundle(tiny_dir, tmp_path, capsys):
    out = convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", quant="fp32", max_context=64,
                                 progress=False, skip_verify=True))
    with open(out / "tokenizer.json", "a") as f:
        f.write(" ")
    assert nomoat_main(["inspect", str(out)]) == 1  # shown, and an exit status a script can test
    text, err = capsys.readouterr()
    assert "SHA256 MISMATCH" in text
    assert err == (f"nomoat inspect: error: {out} is damaged: bundle file tokenizer.json does not match its sha256 "
                   "in manifest.json (damaged or partly copied); copy the bundle again or re-convert.\n")
    assert nomoat_main(["inspect", str(out), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["files_ok"] is False
    assert nomoat_main(["inspect", str(out), "--no-check"]) == 0  # not checked: nothing known to be wrong
    assert nomoat_main(["inspect", str(tmp_path)]) == 1
    assert "not a nomoat bundle" in capsys.readouterr().err


def test_inspect_flags_a_file_the_runtime_opens_but_no_sha256_covers(tiny_dir, tmp_path, capsys):
    out = convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", quant="fp32", max_context=64,
                                 progress=False, skip_verify=True))
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["files"]["tokenizer.json"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert nomoat_main(["inspect", str(out)]) == 1
    assert "files has no sha256 for tokenizer.json" in capsys.readouterr().err


def test_inspect_reports_a_truncated_report_json_as_damage(tiny_dir, tmp_path, capsys):
    """report.json is a listed file: cut short (a partial copy), it is a sha256 mismatch, not a JSON traceback."""
    out = convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", quant="fp32", max_context=64,
                                 progress=False, skip_verify=True))
    (out / "report.json").write_text((out / "report.json").read_text()[:20])
    assert nomoat_main(["inspect", str(out)]) == 1
    text, err = capsys.readouterr()
    assert "SHA256 MISMATCH" in text.splitlines()[0] and "model      llama" in text
    assert err.startswith(f"nomoat inspect: error: {out} is damaged: bundle file report.json does not match")
    assert "report.json cannot be read (" in err and len(err.splitlines()) == 1
    assert nomoat_main(["inspect", str(out), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["files_ok"] is False and data["report"] == {}
    # Unchecked, report.json that does not parse is damage all the same.
    assert nomoat_main(["inspect", str(out), "--no-check"]) == 1
    text, err = capsys.readouterr()
    assert "DAMAGED: report.json unreadable" in text.splitlines()[0]
    assert "report.json cannot be read (" in err and "copy the bundle again or re-convert." in err


def test_inspect_reports_a_report_json_nested_too_deep_as_damage(tiny_dir, tmp_path, capsys):
    """json.loads' RecursionError (200,000 brackets) was a traceback."""
    out = convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", quant="fp32", max_context=64,
                                 progress=False, skip_verify=True))
    (out / "report.json").write_text("[" * 200_000 + "]" * 200_000)
    assert nomoat_main(["inspect", str(out), "--no-check"]) == 1
    text, err = capsys.readouterr()
    assert "DAMAGED: report.json unreadable" in text.splitlines()[0]
    assert "report.json cannot be read (maximum recursion depth exceeded" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def skip_verified_bundle(tiny_dir, tmp_path_factory) -> Path:
    return convert(ConvertOptions(model=str(tiny_dir), out=tmp_path_factory.mktemp("inspect") / "b", quant="fp32",
                                  max_context=64, progress=False, skip_verify=True))


_MEASURED = {"eval_source": "default", "eval_tokens": 100, "eval_window": 64, "ppl_reference": 10.0,
             "ppl_bundle": 10.1, "ppl_increase_percent": 1.0, "mean_kl": 0.01, "top1_agreement": 0.9,
             "greedy_tokens_per_prompt": 8, "greedy_agreement": 1.0, "greedy_first_divergence": [-1],
             "max_ppl_increase_percent": 30.0, "passed": True, "seconds": 1.0}


@pytest.mark.parametrize(("field", "value", "said"), [
    ("quality", None, "report.json's quality is null, not an object"),
    ("quality", "passed", "report.json's quality is a string, not an object"),
    ("quality", {**_MEASURED, "ppl_bundle": "10.1"}, "report.json's quality.ppl_bundle is a string, not a number"),
    ("quality", {**_MEASURED, "greedy_first_divergence": None},
     "report.json's quality.greedy_first_divergence is null, not a list of whole numbers"),
    ("quality", {k: v for k, v in _MEASURED.items() if k != "passed"}, "report.json's quality has no passed"),
    ("ops", "MatMul", "report.json's ops is a string, not an object of op counts"),
    ("memory_estimate", [1], "report.json's memory_estimate is a list, not an object of byte counts (total_bytes, "
                             "budget_bytes, weights_bytes, kv_cache_bytes, activations_bytes)"),
])
def test_inspect_reports_a_report_field_of_the_wrong_type_as_damage(skip_verified_bundle, tmp_path, capsys,
                                                                     field, value, said):
    """report.json from another nomoat version, or edited: a field of another type is damage named, not an
    AttributeError."""
    import hashlib
    import shutil

    out = Path(shutil.copytree(skip_verified_bundle, tmp_path / "b"))
    report = json.loads((out / "report.json").read_text())
    report[field] = value
    (out / "report.json").write_text(json.dumps(report))
    assert nomoat_main(["inspect", str(out), "--no-check"]) == 1
    text, err = capsys.readouterr()
    assert "DAMAGED: report.json unreadable" in text.splitlines()[0] and "model      llama" in text
    assert err == f"nomoat inspect: error: {out} is damaged: {said}; copy the bundle again or re-convert.\n"
    assert nomoat_main(["inspect", str(out)]) == 1  # checked: its sha256 differs too, both said
    text, err = capsys.readouterr()
    assert "SHA256 MISMATCH" in text.splitlines()[0] and "does not match its sha256" in err and said in err
    # With its sha256 in manifest.json (a report.json another nomoat version wrote): damaged all the same.
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["report.json"] = hashlib.sha256((out / "report.json").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert nomoat_main(["inspect", str(out)]) == 1
    text, err = capsys.readouterr()
    assert "DAMAGED: report.json unreadable, copy the bundle again or re-convert" in text.splitlines()[0]
    assert err == f"nomoat inspect: error: {out} is damaged: {said}; copy the bundle again or re-convert.\n"
    if field == "quality":
        assert "quality    not shown: report.json is damaged" in text
    assert nomoat_main(["inspect", str(out), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["files_ok"] is False and field not in data["report"]


@pytest.mark.parametrize(("section", "field", "value", "said"), [
    ("target", "memory_estimate", "big", "target.memory_estimate is a string, not an object of byte counts"),
    ("target", "memory_budget_bytes", "lots", "target.memory_budget_bytes is a string, not a number"),
    ("target", "isa", "neon", "target.isa is a string, not a list of strings"),
    ("target", "recipe", {"overrides": "abc"}, "target.recipe.overrides is a string, not a list of strings"),
    ("target", "recipe", {"adjustments": "xyz"}, "target.recipe.adjustments is a string, not a list of strings"),
    ("source", "loras", [{"weight": "heavy"}],
     "source.loras is a list, not a list of adapters, each an object with a number as its weight"),
])
def test_inspect_reports_a_manifest_field_it_shows_of_the_wrong_type_as_damage(skip_verified_bundle, tmp_path,
                                                                              capsys, section, field, value, said):
    """Fields only inspect reads (no sha256 covers manifest.json): damage named, not a TypeError, nor
    "overrides a=None, b=None, c=None"."""
    import shutil

    out = Path(shutil.copytree(skip_verified_bundle, tmp_path / "b"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest[section][field] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert nomoat_main(["inspect", str(out)]) == 1
    text, err = capsys.readouterr()
    assert "DAMAGED: manifest.json's target or source fields" in text.splitlines()[0] and "model      llama" in text
    assert err == f"nomoat inspect: error: {out} is damaged: manifest.json's {said}; re-convert the model.\n"
    assert nomoat_main(["inspect", str(out), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["files_ok"] is False and field not in data["manifest"][section]


def test_inspect_says_a_missing_report_json_is_missing_not_unverified(skip_verified_bundle, tmp_path, capsys):
    import shutil

    out = Path(shutil.copytree(skip_verified_bundle, tmp_path / "b"))
    (out / "report.json").unlink()
    assert nomoat_main(["inspect", str(out), "--no-check"]) == 1
    text, err = capsys.readouterr()
    assert "quality    not shown: report.json is missing" in text and "not verified" not in text
    assert err == f"nomoat inspect: error: {out} is damaged: report.json is missing; copy the bundle again.\n"


def test_targets_command(capsys):
    assert nomoat_main(["targets"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in registry_names())
    assert nomoat_main(["targets", "rpi4"]) == 0
    detail = capsys.readouterr().out
    assert "4x Cortex-A72 (big)" in detail and "int8 dot products: no" in detail and "accuracy level 0" in detail
    assert nomoat_main(["targets", "pixel6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"]["accuracy_level"] == 4
    assert nomoat_main(["targets", "pixel99"]) == 1


def test_an_fp32_bundle_is_not_described_as_blocked_and_one_thread_is_one_thread(tiny_dir, tmp_path, capsys):
    """fp32 weights are plain MatMuls: inspect and the plan line said "in blocks of 32, accuracy level 4"."""
    out = convert(ConvertOptions(model=str(tiny_dir), out=tmp_path / "b", quant="fp32", max_context=64, threads=1,
                                 skip_verify=True))
    plan = [line for line in capsys.readouterr().err.splitlines() if "plan for" in line]
    assert plan and "block" not in plan[0] and "accuracy level" not in plan[0] and "1 thread," in plan[0], plan
    assert nomoat_main(["inspect", str(out)]) == 0
    recipe = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("recipe"))
    assert "fp32 weights, embedding fp32, 1 thread, context 64" in recipe, recipe


def test_a_block_size_that_pads_rows_gets_a_notice_and_rtns_gate_failure_suggests_imatrix(capsys):
    from types import SimpleNamespace

    from nomoat.converter.convert import _notice_padded_blocks
    from nomoat.converter.verify import _gate_advice

    smollm2 = SimpleNamespace(hidden_size=576, intermediate_size=1536)
    _notice_padded_blocks(smollm2, SimpleNamespace(weights="int4", block_size=32))
    assert capsys.readouterr().err == ""
    _notice_padded_blocks(smollm2, SimpleNamespace(weights="int4", block_size=256))
    assert "--block-size 256 does not divide the model's hidden size 576: each row is padded" in capsys.readouterr().err
    _notice_padded_blocks(SimpleNamespace(hidden_size=576, intermediate_size=1000),
                          SimpleNamespace(weights="int4", block_size=128))
    assert "does not divide the model's hidden size 576 or intermediate size 1000" in capsys.readouterr().err
    assert _gate_advice(0.64, "rtn").startswith("Try --algorithm imatrix (the default: rtn weighs no activations")
    assert _gate_advice(0.64, "imatrix").startswith("Try a higher-precision --quant")
