"""manifest.json: the one contract between the converter, this runtime and the Android app.

The converter writes it, the runtimes read it; a runtime refuses a format_version it does
not know and files whose sha256 does not match, with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KV_DTYPES = ("float32", "float16")  # the KV cache's element types, as numpy names
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


def version_tuple(version: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a release string: "1.23.0", "1.24.0.dev20250601", "1.22.1+cpu"."""
    match = _VERSION.match(version.strip())
    if match is None:
        raise ValueError(f"{version!r} is not a version like 1.23.0")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


@dataclass(frozen=True)
class ModelInfo:
    """The decoder's shape, as the runtime needs it (KV buffers, vocab)."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    parameters: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass(frozen=True)
class OnnxBackend:
    """Which files hold the graph and what its inputs and outputs are called."""

    model_file: str
    data_file: str | None
    io: dict[str, str]  # GraphIO names; KV names carry a {layer} placeholder
    kv_dtype: str = "float32"
    # The oldest ONNX Runtime whose kernels run the graph (converter/ort_floor.py); bundles
    # written before the converter recorded it leave it out.
    min_onnxruntime: str | None = None
    # Bytes of weights one decode step reads, as ONNX Runtime holds them (converter/weight_bytes.py):
    # what `nomoat bench` sets against the device's read bandwidth. Absent in older bundles.
    weight_bytes_per_token: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OnnxBackend:
        floor = d.get("min_onnxruntime")
        if floor is not None and not _VERSION.match(str(floor)):
            raise ValueError(f"onnx.min_onnxruntime {floor!r} is not a version like 1.23.0")
        per_token = d.get("weight_bytes_per_token")
        if per_token is not None and (isinstance(per_token, bool) or not isinstance(per_token, int) or per_token < 1):
            raise ValueError(f"onnx.weight_bytes_per_token {per_token!r} is not a positive number of bytes")
        kv_dtype = d.get("kv_dtype", "float32")
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"onnx.kv_dtype {kv_dtype!r} is not one this runtime keeps a cache in "
                             f"({', '.join(KV_DTYPES)})")
        return cls(model_file=d["model_file"], data_file=d.get("data_file"), io=dict(d["io"]),
                   kv_dtype=kv_dtype, min_onnxruntime=floor, weight_bytes_per_token=per_token)

    def check_onnxruntime(self, installed: str) -> None:
        """Refuse to run on an ONNX Runtime older than the graph needs, naming the fix."""
        if self.min_onnxruntime and version_tuple(installed) < version_tuple(self.min_onnxruntime):
            raise BundleError(
                f"this bundle's graph needs onnxruntime >= {self.min_onnxruntime}, and {installed} is installed "
                "(older kernels fail on this graph or compute it wrong). "
                f"Upgrade: pip install 'onnxruntime>={self.min_onnxruntime}'."
            )


@dataclass(frozen=True)
class TokenizerFiles:
    tokenizer_file: str
    chat_template_file: str | None
    bos_token_id: int | None
    add_bos_token: bool
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerFiles:
        return cls(tokenizer_file=d["tokenizer_file"], chat_template_file=d.get("chat_template_file"),
                   bos_token_id=d.get("bos_token_id"), add_bos_token=bool(d.get("add_bos_token", False)),
                   special_tokens=dict(d.get("special_tokens", {})))


@dataclass(frozen=True)
class Manifest:
    format_version: int
    model: ModelInfo
    onnx: OnnxBackend | None
    tokenizer: TokenizerFiles
    max_context: int
    stop_token_ids: list[int]
    generation_defaults: dict[str, Any]
    quantization: dict[str, Any]
    target: dict[str, Any]
    files: dict[str, str]  # file name -> sha256
    source: dict[str, Any] = field(default_factory=dict)
    created_by: str = "nomoat"
    # The chat template as text pieces for runtimes without Jinja (converter/chat_format.py);
    # None when the template cannot be written that way. The Python runtime renders the template.
    chat_format: dict[str, list[str]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format_version {version!r} is not supported by this nomoat runtime "
                f"(it reads version {FORMAT_VERSION}). Re-convert the model with a matching "
                "`nomoat convert`, or install the nomoat version that wrote the bundle."
            )
        try:
            return cls(
                format_version=version,
                model=ModelInfo.from_dict(d["model"]),
                onnx=OnnxBackend.from_dict(d["onnx"]) if d.get("onnx") else None,
                tokenizer=TokenizerFiles.from_dict(d["tokenizer"]),
                max_context=int(d["max_context"]),
                stop_token_ids=[int(t) for t in d["stop_token_ids"]],
                generation_defaults=dict(d.get("generation_defaults", {})),
                quantization=dict(d.get("quantization", {})),
                target=dict(d.get("target", {})),
                files=dict(d["files"]),
                source=dict(d.get("source", {})),
                created_by=d.get("created_by", "nomoat"),
                chat_format=d.get("chat_format"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.json is malformed ({type(e).__name__}: {e}); re-convert the model.") from e


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(bundle: Path, verify_files: bool = True) -> Manifest:
    """Read and check a bundle's manifest; with verify_files, every file's sha256 too."""
    bundle = Path(bundle)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a directory; pass the folder `nomoat convert --out` wrote.")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_NAME}; it is not a nomoat bundle (run `nomoat convert`).")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is damaged, re-convert or re-copy it.") from e
    manifest = Manifest.from_dict(raw)
    if verify_files:
        check_files(bundle, manifest.files)
    return manifest


def check_files(bundle: Path, files: dict[str, str]) -> None:
    for name, expected in files.items():
        f = bundle / name
        if not f.is_file():
            raise BundleError(f"bundle file {name} is missing from {bundle}; copy the whole bundle folder again.")
        if sha256_file(f) != expected:
            raise BundleError(
                f"bundle file {name} does not match its sha256 in manifest.json (damaged or partly copied); "
                "copy the bundle again or re-convert."
            )
