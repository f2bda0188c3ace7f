"""manifest.json: the one contract between the converter, this runtime and the Android app.

The converter writes it, the runtimes read it; a runtime refuses a format_version it does
not know and files whose sha256 does not match, with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
KV_DTYPES = ("float32", "float16")  # the KV cache's element types, as numpy names
# The graph inputs and outputs the runtime binds; the KV names hold a {layer} placeholder.
GRAPH_IO = ("input_ids", "seqlens_k", "total_sequence_length", "logits_index", "logits",
            "past_key", "past_value", "present_key", "present_value")
KV_IO = ("past_key", "past_value", "present_key", "present_value")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.(\d+))?")


# What this runtime needs of ONNX Runtime whatever a bundle's manifest says: it runs several new
# tokens on a filled cache (a prompt past one chunk, a chat's next turn, prompt lookup), which
# GroupQueryAttention computes wrong before 1.20 (converter/ort_floor.py, BASE_FLOOR).
RUNTIME_ONNXRUNTIME_FLOOR = "1.20.0"


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
    # Mistral's sliding attention window, for people and tools reading the bundle (the graph applies
    # it as GroupQueryAttention's local_window_size when it is shorter than max_context; a longer
    # one changes nothing). None: full attention.
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        _check_type("model", d, dict)
        info = cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        _check_type("model.architecture", info.architecture, str)
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "vocab_size"):
            _check_count(f"model.{name}", getattr(info, name))
        _check_count("model.parameters", info.parameters, minimum=0)
        if isinstance(info.rope_theta, bool) or not isinstance(info.rope_theta, (int, float)) \
                or not math.isfinite(info.rope_theta) or info.rope_theta <= 0:
            raise ValueError(f"model.rope_theta {info.rope_theta!r} is not a positive number")
        _check_type("model.rope_scaling", info.rope_scaling, (dict, type(None)))
        if info.sliding_window is not None:
            _check_count("model.sliding_window", info.sliding_window)
        return info


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
        _check_type("onnx", d, dict)
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
        data_file = d.get("data_file")
        return cls(model_file=_bundle_file_name("onnx.model_file", d["model_file"]),
                   data_file=None if data_file is None else _bundle_file_name("onnx.data_file", data_file),
                   io=_graph_io(d["io"]), kv_dtype=kv_dtype, min_onnxruntime=floor,
                   weight_bytes_per_token=per_token)

    @property
    def files(self) -> list[str]:
        """The bundle files ONNX Runtime opens: the graph and its external weights."""
        return [self.model_file, *([self.data_file] if self.data_file else [])]

    def check_onnxruntime(self, installed: str) -> None:
        """Refuse to run on an ONNX Runtime older than the graph needs, naming the fix."""
        floor = self.required_onnxruntime()
        if version_tuple(installed) < version_tuple(floor):
            raise BundleError(
                f"this bundle's graph needs onnxruntime >= {floor}, and {installed} is installed "
                "(older kernels fail on this graph or compute it wrong). "
                f"Upgrade: pip install 'onnxruntime>={floor}'."
            )

    def required_onnxruntime(self) -> str:
        """The manifest's floor, and never below RUNTIME_ONNXRUNTIME_FLOOR: bundles converted before
        2026-12-07 name 1.18.0, on which this runtime's multi-token steps compute wrong."""
        floors = [RUNTIME_ONNXRUNTIME_FLOOR, *([self.min_onnxruntime] if self.min_onnxruntime else [])]
        return max(floors, key=version_tuple)


@dataclass(frozen=True)
class TokenizerFiles:
    tokenizer_file: str
    chat_template_file: str | None
    bos_token_id: int | None
    add_bos_token: bool
    special_tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenizerFiles:
        _check_type("tokenizer", d, dict)
        template = d.get("chat_template_file")
        bos = d.get("bos_token_id")
        if bos is not None:
            _check_count("tokenizer.bos_token_id", bos, minimum=0)
        special_tokens = d.get("special_tokens", {})
        _check_type("tokenizer.special_tokens", special_tokens, dict)
        return cls(tokenizer_file=_bundle_file_name("tokenizer.tokenizer_file", d["tokenizer_file"]),
                   chat_template_file=None if template is None else
                   _bundle_file_name("tokenizer.chat_template_file", template),
                   bos_token_id=bos, add_bos_token=bool(d.get("add_bos_token", False)),
                   special_tokens=dict(special_tokens))

    @property
    def files(self) -> list[str]:
        """The bundle files the runtime reads for text: the tokenizer and the chat template."""
        return [self.tokenizer_file, *([self.chat_template_file] if self.chat_template_file else [])]


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
    chat_format: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def runtime_files(self) -> list[str]:
        """Every bundle file a runtime opens besides manifest.json: each must be listed in `files`."""
        return [*(self.onnx.files if self.onnx else []), *self.tokenizer.files]

    def check_runtime_files_listed(self) -> None:
        """Refuse a manifest whose `files` leaves out a file the runtime opens: its sha256 would
        never be checked (a truncated weight file would reach ONNX Runtime)."""
        unlisted = [name for name in self.runtime_files if name not in self.files]
        if unlisted:
            raise BundleError(f"manifest.json is malformed (files has no sha256 for {', '.join(unlisted)}, "
                              "which the runtime loads); re-convert the model.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        if not isinstance(d, dict):
            raise BundleError(f"manifest.json is malformed (a JSON {type(d).__name__}, not an object); "
                              "re-convert the model.")
        version = d.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise BundleError(
                f"bundle format_version {version!r} is not supported by this nomoat runtime "
                f"(it reads version {FORMAT_VERSION}). Re-convert the model with a matching "
                "`nomoat convert`, or install the nomoat version that wrote the bundle."
            )
        try:
            model = ModelInfo.from_dict(d["model"])
            for name in ("generation_defaults", "quantization", "target", "source"):
                _check_type(name, d.get(name, {}), dict)
            _check_type("chat_format", d.get("chat_format"), (dict, type(None)))
            return cls(
                format_version=version,
                model=model,
                onnx=OnnxBackend.from_dict(d["onnx"]) if d.get("onnx") else None,
                tokenizer=TokenizerFiles.from_dict(d["tokenizer"]),
                max_context=_check_count("max_context", d["max_context"]),
                stop_token_ids=_token_ids("stop_token_ids", d["stop_token_ids"], model.vocab_size),
                generation_defaults=_generation_defaults(d.get("generation_defaults", {})),
                quantization=dict(d.get("quantization", {})),
                target=_target(d.get("target", {})),
                files=_file_hashes(d["files"]),
                source=dict(d.get("source", {})),
                created_by=d.get("created_by", "nomoat"),
                chat_format=d.get("chat_format"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BundleError(f"manifest.json is malformed ({type(e).__name__}: {e}); re-convert the model.") from e


# -- checks of single fields (a ValueError here becomes Manifest.from_dict's "malformed" BundleError) --


def _check_type(name: str, value: object, kind: type | tuple[type, ...]) -> None:
    if not isinstance(value, kind):
        raise ValueError(f"{name} is {value!r}, not {_kind_name(kind)}")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {dict: "an object", str: "a string", list: "a list", type(None): "null"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    """An integer (JSON's, not "30" nor true) of at least minimum; returned for chaining."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} is {value!r}, not an integer >= {minimum}")
    return value


def _bundle_file_name(name: str, value: object) -> str:
    """A file name in the bundle folder itself: never a path that leads elsewhere ("../x",
    "/etc/passwd"), whose contents the bundle's checksums could not vouch for."""
    _check_type(name, value, str)
    if value in ("", ".", "..") or "/" in value or "\\" in value or "\0" in value:
        raise ValueError(f"{name} {value!r} is not the name of a file in the bundle folder")
    return value


def _graph_io(io: object) -> dict[str, str]:
    _check_type("onnx.io", io, dict)
    missing = [key for key in GRAPH_IO if key not in io]
    if missing:
        raise ValueError(f"onnx.io has no name for {', '.join(missing)}")
    for key in GRAPH_IO:
        _check_type(f"onnx.io.{key}", io[key], str)
    for key in KV_IO:
        _check_layer_pattern(f"onnx.io.{key}", io[key])
    return dict(io)


def _check_layer_pattern(name: str, pattern: str) -> None:
    """A KV input/output name with bare {layer} placeholders, as the runtime formats it per layer: no
    other field, and no format spec or conversion ("{layer:02d}"), which the Android app's filling
    of the name would not reproduce."""
    try:
        fields = [(field, spec, conversion) for _, field, spec, conversion in string.Formatter().parse(pattern)
                  if field is not None]
    except ValueError:  # a lone "{" or "}"
        fields = []
    if not fields or any(f != ("layer", "", None) for f in fields):
        raise ValueError(f"{name} {pattern!r} is not a name with a {{layer}} placeholder")


def _token_ids(name: str, ids: object, vocab_size: int) -> list[int]:
    _check_type(name, ids, list)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"{name} holds {token!r}, not a token id of the vocabulary (0 to {vocab_size - 1})")
    return list(ids)


def _generation_defaults(defaults: dict[str, Any]) -> dict[str, Any]:
    """The converter's sampling defaults, checked now rather than at the first answer."""
    from .sampling import SamplingParams

    sampling = {k: v for k, v in defaults.items() if k in SamplingParams.__dataclass_fields__ and v is not None}
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise ValueError(f"generation_defaults: {e}") from None
    if defaults.get("max_new_tokens") is not None:
        _check_count("generation_defaults.max_new_tokens", defaults["max_new_tokens"])
    return dict(defaults)


def _target(target: dict[str, Any]) -> dict[str, Any]:
    if target.get("threads") is not None:  # the thread count Model.load uses when given none
        _check_count("target.threads", target["threads"])
    return dict(target)


def _file_hashes(files: object) -> dict[str, str]:
    _check_type("files", files, dict)
    for name, digest in files.items():
        _bundle_file_name("files key", name)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ValueError(f"files[{name!r}] {digest!r} is not a sha256 (64 hex digits)")
    return dict(files)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_path_encoding(path: Path, what: str, error: type[Exception]) -> None:
    """Refuse a path that is not UTF-8 (a folder named in Latin-1): ONNX Runtime's and tokenizers' bindings
    take UTF-8 paths only, and failed with a TypeError traceback or advice to re-download the files."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        shown = raw.decode("utf-8", "backslashreplace")
        raise error(f"{what} '{shown}' has the byte 0x{raw[e.start]:02x}, which is not UTF-8 (ONNX Runtime and "
                    "tokenizers take UTF-8 paths only): rename the folder, e.g. `convmv -f latin1 -t utf8`") from None


def read_manifest(bundle: Path, verify_files: bool = True) -> Manifest:
    """Read and check a bundle's manifest; with verify_files, every file's sha256 too."""
    bundle = Path(bundle).expanduser()  # a quoted "~/bundles/x" (a unit's ExecStart, a script), as convert reads it
    check_path_encoding(bundle, "the bundle's path", BundleError)
    path = bundle / MANIFEST_NAME
    if not bundle.is_dir():
        raise BundleError(f"{bundle} is not a directory; pass the folder `nomoat convert --out` wrote.")
    if not path.is_file():
        raise BundleError(f"{bundle} has no {MANIFEST_NAME}; it is not a nomoat bundle (run `nomoat convert`).")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BundleError(f"manifest.json is malformed (not UTF-8 text: {e}); re-convert the model.") from e
    except (json.JSONDecodeError, RecursionError) as e:  # json recurses per bracket: a deep nest passes the limit
        raise BundleError(f"{path} is not valid JSON ({e}); the bundle is damaged, re-convert or re-copy it.") from e
    manifest = Manifest.from_dict(raw)
    if verify_files:
        manifest.check_runtime_files_listed()
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
