"""The load stage: turn whatever the user points at into a Checkpoint.

Three source layouts are accepted, recognised by the files present (never by the
path's name):

- a Hugging Face directory: config.json + *.safetensors (+ tokenizer.json, ...)
- a GGUF file (or a directory holding exactly one)
- a Meta directory: params.json + consolidated*.pth (+ an HF tokenizer.json)

A Hugging Face hub id is accepted only if it is already in the local cache: the
converter never downloads.

Contract of the TokenizerInfo every loader returns: `tokenizer_json` is used to
encode *without* special-token post-processing (like transformers' chat templates
and llama.cpp do), and the runtime prepends `bos_token_id` itself when
`add_bos_token` is true. `eos_token_ids` holds every token that ends generation,
including the end-of-turn token the chat template writes.
"""

from __future__ import annotations

from pathlib import Path

from nomoat.runtime.manifest import check_path_encoding

from .errors import ConversionError
from .spec import Checkpoint

ACCEPTED = (
    "a Hugging Face model directory (config.json + *.safetensors), "
    "a .gguf file, or a Meta checkpoint directory (params.json + consolidated*.pth)"
)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a model from a local directory, a .gguf file, or a locally cached hub id."""
    p = Path(path).expanduser()
    check_path_encoding(p, "--model", ConversionError)
    if not p.exists():
        p = _cached_hub_snapshot(str(path))
    if p.is_file():
        return _load_file(p)
    return _load_dir(p)


def _load_file(p: Path) -> Checkpoint:
    if p.suffix.lower() == ".gguf" or is_gguf(p):
        from .load_gguf import load_gguf

        return load_gguf(p)
    if p.name.startswith("adapter_model."):  # PEFT's weights file: the adapter is its folder
        raise ConversionError(adapter_given_as_model(p.parent))
    if p.suffix.lower() in (".safetensors", ".pth", ".bin", ".pt"):
        raise ConversionError(
            f"{p} is a bare weights file; nomoat needs the config next to it. "
            f"Point at its directory instead: {ACCEPTED}."
        )
    raise ConversionError(f"{p} is not a model file nomoat reads. Accepted: {ACCEPTED}.")


def is_gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic bytes. Its name need not say so: Ollama stores its models
    as blobs named `sha256-...`, and a download may be saved as plain `model`."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise ConversionError(f"{path} cannot be read ({e.strerror or e}); check that it is a file you may "
                              "read.") from e


def _load_dir(p: Path) -> Checkpoint:
    kind, model = folder_kind(p)
    if kind == "hf":
        from .load_hf import load_hf_dir

        return load_hf_dir(model)
    if kind == "meta":
        from .load_meta import load_meta_dir

        return load_meta_dir(model)
    if kind == "gguf":
        from .load_gguf import load_gguf

        return load_gguf(model)
    if kind == "adapter":
        raise ConversionError(adapter_given_as_model(p))
    names = sorted(child.name for child in p.iterdir())
    raise ConversionError(_unrecognised_dir_message(p, names, [n for n in names if n.lower().endswith(".gguf")]))


def folder_kind(p: Path) -> tuple[str | None, Path]:
    """What the folder holds, by its files: ("hf", p), ("meta", p), ("gguf", its one .gguf file), ("adapter", p),
    ("hf-config", p) for a config.json without weights, or (None, p). The load and the fit pre-check (peek.py)
    both ask here, so they cannot read one folder as two different things."""
    from .load_meta import is_shard_name  # the loader's own shard names: a folder found Meta has weights

    names = sorted(child.name for child in p.iterdir())
    # adapter_model.safetensors is no model weight: a training run's output folder holds it next to a
    # config.json (the base model's), and is still only an adapter
    if "config.json" in names and any(n.endswith(".safetensors") and not n.startswith("adapter_") for n in names):
        return "hf", p
    if "params.json" in names and any(is_shard_name(n) for n in names):
        return "meta", p
    ggufs = [n for n in names if n.lower().endswith(".gguf")]
    if len(ggufs) == 1:
        return "gguf", p / ggufs[0]
    other_weights = any(n.endswith((".bin", ".pth")) and not n.startswith("adapter_") for n in names)
    if not other_weights and ("adapter_config.json" in names or any(n.startswith("adapter_model.") for n in names)):
        return "adapter", p
    if "config.json" in names:  # its weights are missing: the fit check can still read it, the load asks for them
        return "hf-config", p
    return None, p


def adapter_given_as_model(path: Path | str) -> str:
    """The one-line refusal of a LoRA adapter (PEFT folder or llama.cpp LoRA .gguf) passed as --model."""
    return f"{path} is a LoRA adapter, not a model: pass it with --lora and its base model with --model."


def _unrecognised_dir_message(p: Path, names: list[str], ggufs: list[str]) -> str:
    if len(ggufs) > 1:
        return f"{p} holds several GGUF files ({', '.join(ggufs)}); point at the one to convert."
    if "config.json" in names and any(n.endswith(".bin") for n in names):
        return (
            f"{p} has config.json but only PyTorch .bin weights, and nomoat reads safetensors only "
            "(pickled .bin files can run code). Download the *.safetensors files of the model, or "
            "re-save it with `model.save_pretrained(dir, safe_serialization=True)`."
        )
    if "config.json" in names:
        if (p / "original" / "params.json").is_file():  # `hf download REPO --include 'original/*' ...`
            return (f"{p} has config.json but no *.safetensors weights; its Meta weights are in original/: "
                    f"point --model at {p / 'original'}, or fetch the safetensors.")
        return f"{p} has config.json but no *.safetensors weights; the download is incomplete: fetch them."
    if any(n.startswith("consolidated") and n.endswith(".safetensors") for n in names):
        return (
            f"{p} is in Mistral's native layout (params.json + consolidated.safetensors), which nomoat does not "
            "read. Download the model's Hugging Face files instead (config.json, model*.safetensors and the "
            "tokenizer files, e.g. `hf download REPO --include 'config.json' 'model*.safetensors' 'tokenizer*' "
            "--local-dir DIR`) and point --model at that folder."
        )
    if "params.json" in names:
        return f"{p} has params.json but no consolidated*.pth weights; copy the Meta weights next to it."
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "nothing"
    return f"{p} is not a model directory nomoat recognises (it holds: {shown}). Accepted: {ACCEPTED}."


def _cached_hub_snapshot(ref: str) -> Path:
    """The local snapshot of a hub id, if the Hugging Face cache already holds it."""
    if not _looks_like_hub_id(ref):
        raise ConversionError(f"{ref} does not exist. Point at {ACCEPTED}.")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        # local_files_only: this is the workstation's converter, and it must not reach the
        # network behind the user's back; a cached snapshot is fine to use.
        return Path(snapshot_download(ref, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as e:
        raise ConversionError(
            f"{ref!r} is not a local path and is not in the Hugging Face cache on this machine; "
            "nomoat does not download models. Download it first (e.g. `hf download "
            f"{ref} --local-dir ./{ref.split('/')[-1]}`) and point --model at that directory or .gguf file."
        ) from e


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return len(parts) == 2 and all(parts) and not ref.startswith((".", "~")) and "\\" not in ref
