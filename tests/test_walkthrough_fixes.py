"""What a walk through the README found: pi_demo serve's model id for a linked bundle, deploy checking the
bundle before looking for a device, Model.load checking ort_options' keys, and the deploy flags' grammar."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # pi_demo is a folder next to the bundle on the Pi, not an installed package


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from tiny_models import tiny_fp32_bundle

    return tiny_fp32_bundle(tmp_path_factory, max_context=96, name="int4")


# -- pi_demo serve: the model id is the bundle's name as given --


def served_model_id(bundle_arg: str, monkeypatch, *extra: str) -> str:
    """The model id `python -m pi_demo serve BUNDLE_ARG` would serve (the server is made, not started)."""
    from pi_demo import serve

    seen = []

    def not_served(server, loader):
        seen.append(server.app.config.model_id)
        server.server_close()
        return 0

    monkeypatch.setattr(serve, "_serve", not_served)
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    assert serve.run(p.parse_args([bundle_arg, "--threads", "1", "--port", "0", *extra])) == 0
    return seen[0]


def test_serve_names_a_linked_bundle_by_the_links_name(bundle, tmp_path, monkeypatch):
    """README: the id is the bundle's folder name unless --model-id; with `rpi5 -> build/bench/int4` a client
    asking for model="rpi5" must find it (it got a 404: the id was the target's "int4")."""
    (tmp_path / "rpi5").symlink_to(bundle, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert served_model_id("rpi5", monkeypatch) == "rpi5"
    assert served_model_id("rpi5/", monkeypatch) == "rpi5"
    assert served_model_id("./rpi5/.", monkeypatch) == "rpi5"
    assert served_model_id(str(tmp_path / "rpi5"), monkeypatch) == "rpi5"
    assert served_model_id("rpi5", monkeypatch, "--model-id", "mine") == "mine"
    assert served_model_id(str(bundle), monkeypatch) == "int4"
    monkeypatch.chdir(bundle)
    assert served_model_id(".", monkeypatch) == "int4"  # the folder's name, not ""


# -- nomoat deploy: the bundle is checked before the device is looked for --


@pytest.fixture
def no_device(monkeypatch) -> list:
    """connect() as with no phone attached; the list records each call."""
    from nomoat.converter import cli_deploy
    from nomoat.converter.adb import AdbError

    calls = []

    def connect(args):
        calls.append(args)
        raise AdbError("no Android device found by adb. (this test's stand-in)")

    monkeypatch.setattr(cli_deploy, "connect", connect)
    return calls


def deploy(capsys, *argv: str) -> tuple[int, str]:
    from nomoat.__main__ import main

    status = main(["deploy", *argv])
    return status, capsys.readouterr().err


def test_deploy_reports_a_missing_bundle_not_a_missing_device(tmp_path, no_device, capsys):
    status, err = deploy(capsys, str(tmp_path / "nothing-here"), "--adb")
    assert status == 2 and no_device == []
    assert err.startswith("nomoat deploy: error: refusing to deploy") and "no Android device" not in err


def test_deploy_reports_a_damaged_bundle_not_a_missing_device(bundle, tmp_path, no_device, capsys):
    damaged = Path(shutil.copytree(bundle, tmp_path / "damaged"))
    data = bytearray((damaged / "model.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0x01
    (damaged / "model.onnx.data").write_bytes(bytes(data))
    for transport in (["--adb"], ["--ssh", "pi"]):
        status, err = deploy(capsys, str(damaged), *transport)
        assert status == 2 and no_device == []
        assert "refusing to deploy" in err and "model.onnx.data" in err and "sha256" in err, err


def test_deploy_refuses_a_float16_cache_bundle_for_the_app_before_looking_for_the_phone(bundle, tmp_path, no_device,
                                                                                        capsys):
    half = Path(shutil.copytree(bundle, tmp_path / "half"))
    manifest = json.loads((half / "manifest.json").read_text())
    manifest["onnx"]["kv_dtype"] = "float16"
    (half / "manifest.json").write_text(json.dumps(manifest, indent=2))
    status, err = deploy(capsys, str(half), "--adb")
    assert status == 2 and no_device == []
    assert "its KV cache is float16" in err and "no Android device" not in err
    # A board's Python runtime keeps a float16 cache: over ssh the bundle passes and the device is looked for.
    status, err = deploy(capsys, str(half), "--ssh", "pi")
    assert status == 2 and len(no_device) == 1 and "no Android device found" in err


def test_deploy_refuses_a_bad_name_before_looking_for_the_phone(bundle, no_device, capsys):
    status, err = deploy(capsys, str(bundle), "--adb", "--name", "../up")
    assert status == 2 and no_device == [] and "cannot be a folder name on the device" in err


def test_a_good_bundle_goes_on_to_the_device(bundle, no_device, capsys):
    status, err = deploy(capsys, str(bundle), "--adb")
    assert status == 2 and len(no_device) == 1
    assert err == "nomoat deploy: error: no Android device found by adb. (this test's stand-in)\n"


# -- nomoat deploy: one flag "applies ... drop it", several "apply ... drop them" --


@pytest.mark.parametrize("extra, message", [
    (["--ssh", "pi", "--serial", "X"], "--serial only applies with --adb; drop it."),
    (["--ssh", "pi", "--serial", "X", "--adb-port", "5"], "--serial, --adb-port only apply with --adb; drop them."),
    (["--adb", "--remote-python", "python3", "--bench"], "--remote-python only applies with --ssh; drop it."),
    (["--adb", "--ssh-config", "f", "--remote-python", "python3"],
     "--ssh-config, --remote-python only apply with --ssh; drop them."),
    (["--ssh", "pi", "--remote-python", "python3"],
     "--remote-python only applies with --bench; add --bench or drop it."),
    (["--adb", "--bench-timeout", "5"], "--bench-timeout only applies with --bench; add --bench or drop it."),
    (["--adb", "--rounds", "2", "--json"], "--rounds, --json only apply with --bench; add --bench or drop them."),
])
def test_a_flag_out_of_place_is_refused_in_good_grammar(bundle, extra, message, capsys, monkeypatch, no_device):
    monkeypatch.setenv("PATH", "/nonexistent")  # neither adb nor ssh may be run for these
    status, err = deploy(capsys, str(bundle), *extra)
    assert status == 2 and no_device == []
    assert err == f"nomoat deploy: error: {message}\n"


# -- Model.load checks ort_options' keys as --ort-options does --


@pytest.mark.parametrize("options, words", [
    ({"nodots": "1"}, "'nodots' is not an ONNX Runtime session config key"),
    ({"mlas.disable_kleidiai": "1", "kleidiai.": "1"}, "'kleidiai.' is not an ONNX Runtime session config key"),
    ({"session. intra_op": "1"}, "'session. intra_op' is not an ONNX Runtime session config key"),
    ({"mlas.disable_kleidiai": 1}, "the value must be a non-empty string"),
])
def test_model_load_refuses_an_ort_option_onnx_runtime_would_ignore(bundle, options, words):
    from nomoat.runtime import Model, OrtOptionsError
    from nomoat.runtime.onnx_session import format_ort_options

    with pytest.raises(OrtOptionsError) as refused:
        Model.load(bundle, ort_options=options)
    assert isinstance(refused.value, ValueError)
    assert words in refused.value.reason and refused.value.options == format_ort_options(options.items())


def test_model_load_and_the_cli_refuse_a_bad_key_in_the_same_words(bundle):
    from nomoat.runtime import Model, OrtOptionsError
    from nomoat.runtime.cli_generate import ort_options

    with pytest.raises(argparse.ArgumentTypeError) as cli:
        ort_options("nodots=1")
    with pytest.raises(OrtOptionsError) as sdk:
        Model.load(bundle, ort_options={"nodots": "1"})
    assert sdk.value.reason == str(cli.value)
    # nomoat's refusal, not ONNX Runtime's: it never saw the key
    assert str(sdk.value).startswith("nomoat refused the session options nodots=1: ")


def test_serve_refuses_a_bad_key_through_the_sdk_in_one_line(bundle, capsys, monkeypatch):
    """pi_demo's run() with options that did not come through its argparse (as a caller's own Namespace):
    the load refuses them, and the server, listening while the model loads, stops with that one line."""
    from pi_demo import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args([str(bundle), "--threads", "1", "--port", "0"])
    args.ort_options = {"nodots": "1"}
    assert serve.run(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("pi_demo serve: error: nomoat refused --ort-options nodots=1: 'nodots' is not an ONNX")


def test_deploy_names_a_linked_bundle_by_the_link(tmp_path, monkeypatch):
    from nomoat.converter.deploy import default_name

    (tmp_path / "v3").mkdir()
    (tmp_path / "current").symlink_to("v3")
    assert default_name(tmp_path / "current") == "current"  # as typed, not the link's target
    assert default_name(Path(f"{tmp_path / 'current'}/")) == "current"
    monkeypatch.chdir(tmp_path / "v3")
    assert default_name(Path(".")) == "v3"
