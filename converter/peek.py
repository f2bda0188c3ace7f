"""Read a model's shape without reading its weights, so the fit check can run first.

Refusing a 7B model for a 2 GB Raspberry Pi must not first load (and dequantize) 28 GB
of fp32 tensors. This reads only config.json, a GGUF file's header (memory-mapped), or a
Meta params.json and the tensor shapes of its first shard. Anything it cannot read cheaply
returns None: the load stage then reports the real problem, and the fit check runs after it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .spec import ModelSpec


def peek_spec(path: str | Path) -> ModelSpec | None:
    """The ModelSpec of the model at path, from its metadata only; None when that is not possible.

    A ConversionError (an unsupported architecture, say) propagates: the full load would
    raise the same one, only later.
    """
    from .load import folder_kind, is_gguf

    p = Path(path).expanduser()
    if p.is_file():
        return _gguf_spec(p) if p.suffix.lower() == ".gguf" or is_gguf(p) else None
    if not p.is_dir():
        return None  # a hub id or a missing path: the load stage resolves or refuses it
    kind, model = folder_kind(p)  # the loader's own reading of the folder
    if kind in ("hf", "hf-config"):  # config.json alone: a model too big is refused before its download ends
        return _hf_spec(model / "config.json")
    if kind == "gguf":
        return _gguf_spec(model)
    if kind == "meta":
        return _meta_spec(model)
    return None  # an adapter or an unknown folder: the load stage refuses it


def _hf_spec(config: Path) -> ModelSpec | None:
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    # ValueError: not JSON or not UTF-8; RecursionError: nested too deep for json. The load says which.
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(cfg, dict):
        return None
    return ModelSpec.from_hf_config(cfg, source=str(config))


def _gguf_spec(path: Path) -> ModelSpec | None:
    from gguf import GGUFReader

    from .load_gguf import _architecture, read_metadata, spec_from_gguf

    try:
        reader = GGUFReader(path)  # memory-maps the file; tensor data is not read
    except (ValueError, OSError, IndexError):
        return None
    meta = read_metadata(reader, path)
    arch = _architecture(meta, path)
    return spec_from_gguf(meta, arch, {t.name: t for t in reader.tensors}, path)


def _meta_spec(folder: Path) -> ModelSpec | None:
    """params.json plus the shapes in the first shard (torch memory-maps it: no tensor data is read).

    The load's own checks run on what is read (shard names and count, the layers params.json says), so
    the fit check sizes the model the load would build, or the folder is refused with the load's words.
    """
    import torch

    from .load_meta import (
        _load_shard,
        _split_axis,
        check_layers,
        check_params,
        check_shard_count,
        is_zip_format,
        shard_files,
        spec_from_params,
    )
    from .spec import ConfigFile

    params_file = folder / "params.json"
    try:
        params: dict[str, Any] = json.loads(params_file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(params, dict):
        return None
    check_params(params, params_file)  # the messages the load would give, before the shard is opened
    shards = shard_files(folder)
    if not shards or not is_zip_format(shards[0]):
        return None  # a file in torch's pre-1.6 format cannot be memory-mapped: only the load reads it whole
    p = ConfigFile(params, str(params_file))
    dim = p.int("dim")
    first = _load_shard(shards[0])
    check_shard_count(shards, first)
    check_layers(first, p)
    shapes = {}
    for name in ("tok_embeddings.weight", "layers.0.feed_forward.w1.weight", "output.weight"):
        if name in first:
            shape = list(first[name].shape)
            axis = _split_axis(name, first[name], dim) if len(shards) > 1 else None
            if axis is not None:
                shape[axis] *= len(shards)
            shapes[name] = torch.empty(shape, device="meta")
    return spec_from_params(params, shapes, source=str(params_file))
