"""Targets, memory fit and the quality gate on the real SmolLM2-135M-Instruct (slow: `nox -s slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nomoat.converter.convert import CORRUPT_WEIGHTS_ENV
from nomoat.converter.fit import estimate_memory
from nomoat.converter.peek import peek_spec
from nomoat.converter.targets import load_target
from real_model import smollm2_gguf_path

pytestmark = pytest.mark.slow

NOMOAT = [sys.executable, "-m", "nomoat"]
BUNDLES = {  # name -> convert arguments
    "pixel6": ["--target", "pixel6"],
    "rpi5-8gb": ["--target", "rpi5-8gb"],
    "host": ["--target", "host"],
    "host-int8": ["--target", "host", "--quant", "int8"],
    "host-smoothing": ["--target", "host", "--smoothing"],
}

# A fresh process loads the bundle, fills its whole context (a prompt of max_context - 64
# tokens, then 64 generated ones: the case the estimate describes) and reports VmHWM.
RSS_SCRIPT = """
import sys
from nomoat.converter.verify import default_eval_text
from nomoat.runtime import Model
model = Model.load(sys.argv[1])
ids = model.encode(default_eval_text())[: model.max_context - 64]
assert len(ids) == model.max_context - 64, "the eval text is shorter than the context"
assert len(list(model.generate_tokens(ids, 64, ignore_eos=True))) == 64
print(next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")))
"""


def _run_convert(out: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*NOMOAT, "convert", "--model", str(smollm2_gguf_path()), "--out", str(out), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """name -> (bundle, the convert's stderr)."""
    root = tmp_path_factory.mktemp("targets-real")
    made = {}
    for name, args in BUNDLES.items():
        result = _run_convert(root / name, *args)
        assert result.returncode == 0, result.stderr
        made[name] = (root / name, result.stderr)
    return made


def _read(bundle: Path) -> tuple[dict, dict]:
    return json.loads((bundle / "manifest.json").read_text()), json.loads((bundle / "report.json").read_text())


def test_each_target_gets_its_recipe_and_a_computed_report(bundles):
    spec = peek_spec(smollm2_gguf_path())
    for name, (bundle, stderr) in bundles.items():
        manifest, report = _read(bundle)
        args = BUNDLES[name]
        target = load_target(args[args.index("--target") + 1])
        recipe = manifest["target"]["recipe"]
        assert manifest["target"]["name"] == target.name and recipe["accuracy_level"] == 4
        # the estimate in the manifest is the one the fit module computes for this recipe and device
        expected = estimate_memory(spec, target.recipe.with_overrides(weights=recipe["weights"]), target)
        assert manifest["target"]["memory_estimate"] == expected.to_dict() == report["memory_estimate"]
        q = report["quality"]
        assert q["passed"] and q["eval_source"] == "default" and q["eval_tokens"] >= 4000
        assert "perplexity" in stderr and "top-1 agreement" in stderr  # the table at the end


def test_the_numbers_follow_the_quantization(bundles):
    (_, int4), (_, int8) = _read(bundles["host"][0]), _read(bundles["host-int8"][0])
    q4, q8 = int4["quality"], int8["quality"]
    assert q4["ppl_reference"] == pytest.approx(q8["ppl_reference"], rel=1e-9)  # same reference, same text
    assert q8["ppl_increase_percent"] < 3 < q4["ppl_increase_percent"] < 30  # int4 costs more, both pass
    assert q8["mean_kl"] < q4["mean_kl"] / 5 and q8["top1_agreement"] > q4["top1_agreement"]
    assert int8["memory_estimate"]["weights_bytes"] > 2 * int4["memory_estimate"]["weights_bytes"]
    # the same weights on two devices: the same quality, different budgets
    (_, pixel6), (_, rpi5) = _read(bundles["pixel6"][0]), _read(bundles["rpi5-8gb"][0])
    assert pixel6["quality"]["ppl_bundle"] == pytest.approx(rpi5["quality"]["ppl_bundle"], rel=1e-3)
    assert pixel6["memory_estimate"]["budget_bytes"] < rpi5["memory_estimate"]["budget_bytes"]


def test_smoothing_brings_int4_closer_to_fp32_at_the_same_size(bundles):
    (plain_manifest, plain), (smooth_manifest, smooth) = _read(bundles["host"][0]), _read(bundles["host-smoothing"][0])
    assert smooth_manifest["quantization"]["smoothing"] and not plain_manifest["quantization"]["smoothing"]
    assert smooth["smoothing_alpha"] and any(a > 0 for a in smooth["smoothing_alpha"].values())
    # Measured 0.119 vs 0.184 and 77.5 % vs 73.0 % (README "The graph").
    assert smooth["quality"]["mean_kl"] < 0.8 * plain["quality"]["mean_kl"]
    assert smooth["quality"]["top1_agreement"] > plain["quality"]["top1_agreement"] + 0.02
    sizes = [(bundles[name][0] / "model.onnx.data").stat().st_size for name in ("host", "host-smoothing")]
    assert sizes[0] == sizes[1]  # the same tensors, scaled: not a byte more


@pytest.mark.parametrize("name", ["host", "host-int8"])
def test_host_peak_rss_is_within_25_percent_of_the_estimate(bundles, name):
    bundle = bundles[name][0]
    estimate = _read(bundle)[0]["target"]["memory_estimate"]["total_bytes"]
    result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(bundle)], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.strip().splitlines()[-1])
    print(f"{name}: peak RSS {peak / 2**20:.0f} MiB, estimate {estimate / 2**20:.0f} MiB ({estimate / peak - 1:+.1%})")
    assert 0.75 * peak <= estimate <= 1.25 * peak


def test_the_gate_fails_a_broken_export_with_the_numbers(tmp_path):
    out = tmp_path / "broken"
    result = _run_convert(out, "--target", "host", env={**os.environ, CORRUPT_WEIGHTS_ENV: "1"})
    assert result.returncode == 1
    err = result.stderr
    assert "quality gate failed: perplexity" in err and "limit +30.00% for int4" in err, err
    assert "No bundle was written" in err
    assert not out.exists() and not list(tmp_path.glob(".broken*"))
