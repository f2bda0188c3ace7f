"""The noxfile's helpers in tests/: which torch wheel a session can take, when a cached bundle is stale, the
checkout's wheel without what an earlier build left."""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import bundle_cache
import pytest
from find_links import cpu_torch_wheel
from packaging import tags

CP311_X86 = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def _tags(python: tuple[int, int], platform: str = "manylinux_2_28_x86_64") -> list[str]:
    return [str(t) for t in tags.cpython_tags(python, platforms=[platform])]


@pytest.fixture
def find_links(tmp_path) -> str:
    (tmp_path / CP311_X86).touch()
    return f"https://example.invalid/wheels {tmp_path}"


def test_a_wheel_is_taken_only_for_the_python_and_machine_it_was_built_for(find_links):
    assert cpu_torch_wheel(find_links, _tags((3, 11))).name == CP311_X86
    # For these pip would skip it and fetch PyPI's CUDA build of torch: they must use PyTorch's CPU index.
    assert cpu_torch_wheel(find_links, _tags((3, 12))) is None
    assert cpu_torch_wheel(find_links, _tags((3, 11), "manylinux_2_28_aarch64")) is None


def test_no_tags_from_the_session_means_no_local_wheel(find_links):
    assert cpu_torch_wheel(find_links, []) is None


@pytest.fixture
def checkout(tmp_path, monkeypatch) -> Path:
    """A copy of the converter's and the runtime's sources, which bundle_cache fingerprints."""
    for folder in ("converter", "runtime"):
        shutil.copytree(bundle_cache.REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(bundle_cache, "REPO", tmp_path)
    return tmp_path


def test_a_runtime_change_the_converter_imports_changes_the_fingerprint(checkout):
    before = bundle_cache.converter_fingerprint("model.gguf", "recipe")
    model = checkout / "runtime" / "model.py"
    model.write_text(model.read_text().replace("PREFILL_CHUNK =", "PREFILL_CHUNK = 1 + "))
    assert bundle_cache.converter_fingerprint("model.gguf", "recipe") != before


def test_another_torch_changes_the_fingerprint(checkout, monkeypatch):
    before = bundle_cache.converter_fingerprint("model.gguf", "recipe")
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9" if name == "torch" else real(name))
    assert bundle_cache.converter_fingerprint("model.gguf", "recipe") != before


def test_a_missing_package_is_named_absent(monkeypatch):
    def version(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert "gguf==absent" in bundle_cache.package_versions().splitlines()


def test_the_checkouts_wheel_leaves_out_what_an_earlier_build_left(tmp_path):
    """setuptools copies build/lib into every wheel: a module deleted from the checkout stayed in it."""
    import zipfile

    from checkout_wheel import REPO, build_wheel

    ghost = REPO / "build" / "lib" / "nomoat" / "runtime" / "deleted_since.py"
    ghost.parent.mkdir(parents=True, exist_ok=True)
    ghost.write_text("# a module the checkout no longer has\n")
    kept = REPO / "build" / "a-bundle-the-clean-up-keeps"  # build/ holds the bundles too
    kept.mkdir(exist_ok=True)
    try:
        names = zipfile.ZipFile(build_wheel(tmp_path / "dist")).namelist()
        assert "nomoat/runtime/model.py" in names and "nomoat/runtime/deleted_since.py" not in names
        assert not ghost.exists() and kept.is_dir()
    finally:
        kept.rmdir()
