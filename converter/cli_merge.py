"""Merge LoRA adapters into a model in fp32 and write the result as a Hugging Face safetensors
folder (config.json, model.safetensors, tokenizer files, generation_config.json), for users who
want the merged model itself: to load it with transformers, or to convert it later."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from .errors import ConversionError
from .load_hf import PENALTY_KEYS
from .merge import AdapterRef
from .spec import Checkpoint

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # the Hugging Face hub's usual shard size
REPORT_FILE = "nomoat_merge.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH",
                   help="HF model folder, a .gguf file, or a Meta folder (as for `nomoat convert`)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="PEFT adapter folder or llama.cpp LoRA .gguf to merge; repeat to apply several in order, each "
                        "with an optional weight (default 1.0). Without any, the model is written as it was loaded "
                        "(e.g. a GGUF dequantized to fp32)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to write")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="split model.safetensors into shards of at most this size (e.g. 500MB, 2GB)")
    p.add_argument("--force", action="store_true",
                   help=f"replace --out if it is an earlier merge's folder (holds {REPORT_FILE}) or empty")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def run(args: argparse.Namespace) -> int:
    try:
        merge_to_hf_dir(args.model, [AdapterRef.parse(x) for x in args.lora], args.out, force=args.force,
                        max_shard_bytes=parse_size(args.max_shard_size), progress=not args.quiet)
    except ConversionError as e:
        print(f"nomoat merge: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM/SIGHUP (bundle.Interrupted): the staging folder is gone
        from .bundle import report_interrupt

        return report_interrupt("merge", e)
    return 0


def parse_size(text: str) -> int:
    # transformers' save_pretrained units: KB/MB/GB decimal, KiB/MiB/GiB binary
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConversionError(f"--max-shard-size {text!r} is not a size like 500MB, 2GB or 2GiB.")
    unit = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[(m[2] or "").upper()]
    return max(1, int(float(m[1]) * unit))


def merge_to_hf_dir(model: str | Path, loras: list[AdapterRef], out: Path, force: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Load, merge, and write the HF folder atomically (temp folder beside `out`, then one rename)."""
    from .bundle import (
        check_destination,
        move_into_place,
        remove_stale_staging,
        signals_interrupt,
        staging_dir,
        write_json,
    )
    from .load import load_checkpoint
    from .merge import merge_adapters, require_adapter_paths

    # The model and the adapters are what --force would otherwise delete when --out names them.
    sources = [("--model", model), *(("--lora", ref.path) for ref in loras)]
    out = check_destination(Path(out), force, sources=sources, replaces=(REPORT_FILE, "an earlier merge's folder"))
    require_adapter_paths(loras)
    with signals_interrupt():  # SIGTERM/SIGHUP unwind like Ctrl-C: the staging folder goes with them
        for stale in remove_stale_staging(out):
            _progress(f"removed {stale.name}, left by a merge that was killed", progress)
        _progress(f"load {model}", progress)
        ckpt = load_checkpoint(model)
        reports = []
        if loras:
            _progress(f"merge {len(loras)} LoRA adapter(s) in fp32", progress)
            reports = merge_adapters(ckpt, loras)
        try:
            with staging_dir(out) as staging:
                _progress(f"write {out}", progress)
                write_hf_dir(ckpt, staging, max_shard_bytes)
                write_json(staging / REPORT_FILE, {"source": ckpt.source, "adapters": [r.to_dict() for r in reports]})
                move_into_place(staging, out, force)
        except Exception as e:  # a full disk, a quota, a folder made read-only: staging_dir removed what was staged
            said = _write_failure(e, out, ckpt)
            if said is None:
                raise
            raise ConversionError(said) from e
    return out


def _write_failure(e: Exception, out: Path, ckpt: Checkpoint) -> str | None:
    """One line for a failed write: OSError, or safetensors' own error (not an OSError), which gives
    the OS's reason as text ("I/O error: No space left on device (os error 28)"). None: not a write's."""
    import errno

    from safetensors import SafetensorError

    if isinstance(e, OSError):
        code, what = e.errno, e.strerror or str(e)
    elif isinstance(e, SafetensorError):
        found = re.search(r"\(os error (\d+)\)", str(e))
        code, what = (int(found[1]) if found else None), str(e)
    else:
        return None
    if code in (errno.ENOSPC, errno.EDQUOT):
        need = sum(t.numel() * t.element_size() for t in ckpt.tensors.values()) / 10**6
        fix = f"free at least {need:,.0f} MB on that disk (the merged fp32 weights), or choose another --out"
    elif code == errno.EFBIG:  # FAT32 (a USB stick, an SD card) takes files of at most 4 GB
        fix = "the file system there takes no file this large: pass a smaller --max-shard-size, or choose another --out"
    else:
        fix = "check that the folder of --out is writable, or choose another --out"
    return f"{what} (writing beside {out}); {fix}. Nothing was written."


def _progress(message: str, enabled: bool) -> None:
    if enabled:
        print(f"[nomoat merge] {message}", file=sys.stderr, flush=True)


def write_hf_dir(ckpt: Checkpoint, folder: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """The checkpoint as a Hugging Face model folder that transformers and `nomoat convert` load."""
    from .bundle import write_json

    tok = ckpt.tokenizer
    eos: int | list[int] = tok.eos_token_ids[0] if len(tok.eos_token_ids) == 1 else list(tok.eos_token_ids)
    config = {**ckpt.spec.to_hf_config(), "bos_token_id": tok.bos_token_id, "eos_token_id": eos}
    write_json(folder / "config.json", config)
    _write_safetensors(ckpt, folder, max_shard_bytes)
    (folder / "tokenizer.json").write_text(_tokenizer_json_adding_bos(tok), encoding="utf-8")
    _write_tokenizer_config(ckpt, folder)
    # Greedy (no temperature, or 0) is do_sample false, which tells loaders (ours included) to ignore
    # the sampling keys; a repetition penalty (and its window) applies either way.
    defaults = ckpt.generation_defaults
    if defaults.get("temperature", 0.0) > 0:
        # top_k 0 unless set: transformers would otherwise filter to its default 50, which a
        # GGUF's settings (llama.cpp's general.sampling.*) never asked for
        sampling = {"do_sample": True, "top_k": 0, **defaults}
    else:
        sampling = {"do_sample": False, **{k: v for k, v in defaults.items() if k in PENALTY_KEYS}}
    write_json(folder / "generation_config.json", {"bos_token_id": tok.bos_token_id, "eos_token_id": eos, **sampling})


def _tokenizer_json_adding_bos(tok) -> str:
    """tokenizer.json with a post-processor that puts the BOS first when the model wants one.

    transformers' PreTrainedTokenizerFast ignores tokenizer_config.json's add_bos_token: the BOS
    comes from tokenizer.json's post-processor, as in Hugging Face's own Llama files. A GGUF or
    Meta tokenizer has none, so without it transformers would give a Llama-2-style model no <s>.
    (nomoat reads add_bos_token and encodes without the post-processor: unchanged for convert.)
    """
    import json

    bos = tok.special_tokens.get("bos")
    data = json.loads(tok.tokenizer_json)
    if not (tok.add_bos_token and tok.bos_token_id is not None and bos) or _adds_a_prefix(data.get("post_processor")):
        return tok.tokenizer_json
    template = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [tok.bos_token_id], "tokens": [bos]}}}
    # A template that adds nothing (nomoat's GGUF tokenizers have one) is replaced; another processor
    # (ByteLevel's offsets) is kept, first, as in Llama 3's tokenizer.json.
    kept = [p for p in _processors(data.get("post_processor")) if p.get("type") != "TemplateProcessing"]
    data["post_processor"] = {"type": "Sequence", "processors": [*kept, template]} if kept else template
    return json.dumps(data, ensure_ascii=False)


def _processors(processor: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not processor:
        return []
    return processor.get("processors", []) if processor.get("type") == "Sequence" else [processor]


def _adds_a_prefix(processor: dict[str, Any] | None) -> bool:
    """Whether a post-processor already puts a special token first (a template that does, or BERT's)."""
    for p in _processors(processor):
        if p.get("type") in ("BertProcessing", "RobertaProcessing"):
            return True
        if p.get("type") == "TemplateProcessing" and "SpecialToken" in (p.get("single") or [{}])[0]:
            return True
    return False


def _write_tokenizer_config(ckpt: Checkpoint, folder: Path) -> None:
    """tokenizer_config.json: the source's (a Hugging Face or Meta folder's) with nomoat's keys over it, so
    what transformers reads there and nomoat does not (padding_side, model_max_length, a tokenizer class)
    stays as it was; and the source's named chat templates (a tool-use one beside the default) with it."""
    from .bundle import write_json
    from .load_hf import read_json_if_exists

    config = _tokenizer_config(ckpt)
    source = _source_tokenizer_dir(ckpt)
    theirs = read_json_if_exists(source / "tokenizer_config.json") if source else {}
    ours_only = {"add_bos_token", "chat_template", *(f"{role}_token" for role in ckpt.tokenizer.special_tokens)}
    config = {**config, **{k: v for k, v in theirs.items() if k not in ours_only}}
    default = ckpt.tokenizer.chat_template
    if isinstance(theirs.get("chat_template"), list) and default:  # [{"name": ..., "template": ...}, ...]
        config["chat_template"] = [{**t, "template": default} if isinstance(t, dict) and t.get("name") == "default"
                                   else t for t in theirs["chat_template"]]
    named = _named_templates(source) if source else {}
    if named and default:
        # transformers 5's layout: with named templates beside it, the default must be chat_template.jinja
        # (a tokenizer_config.json entry would be replaced by the named ones alone).
        (folder / NAMED_TEMPLATES).mkdir()
        for name, text in named.items():
            (folder / NAMED_TEMPLATES / name).write_text(text, encoding="utf-8")
        (folder / "chat_template.jinja").write_text(default, encoding="utf-8")
        config.pop("chat_template", None)
    write_json(folder / "tokenizer_config.json", config)


NAMED_TEMPLATES = "additional_chat_templates"


def _named_templates(source: Path) -> dict[str, str]:
    """The source's named chat templates (additional_chat_templates/NAME.jinja): regular .jinja files only,
    no link. A downloaded folder is not trusted: a link there to ~/.ssh was copied, keys and all, into
    the merged folder, which users publish."""
    folder = source / NAMED_TEMPLATES
    if folder.is_symlink() or not folder.is_dir():
        return {}
    return {f.name: f.read_text(encoding="utf-8") for f in sorted(folder.iterdir())
            if f.suffix == ".jinja" and not f.is_symlink() and f.is_file()}


def _source_tokenizer_dir(ckpt: Checkpoint) -> Path | None:
    """Where the checkpoint's Hugging Face tokenizer files came from; None for a GGUF (built from its metadata)."""
    path = Path(ckpt.source.get("path", ""))
    if ckpt.source.get("format") == "safetensors":
        return path
    if ckpt.source.get("format") == "meta":
        from .load_meta import find_tokenizer_dir

        return find_tokenizer_dir(path)
    return None


def _tokenizer_config(ckpt: Checkpoint) -> dict[str, Any]:
    tok = ckpt.tokenizer
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tok.add_bos_token,
        "model_max_length": ckpt.spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        **{f"{role}_token": text for role, text in tok.special_tokens.items()},
    }
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    return config


def _write_safetensors(ckpt: Checkpoint, folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index like transformers' save_pretrained."""
    from safetensors.torch import save_file

    from .bundle import write_json

    # A tied LM head is the embedding: transformers does not store it, and neither do we.
    tensors = {name: t.contiguous() for name, t in ckpt.tensors.items()}
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, file)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _shards(tensors: dict[str, Any], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into groups of at most max_bytes (a bigger tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
