"""Fold LoRA adapters into the fp32 weights, before any quantization.

Every update works on a weight as the linear map it is, W [out, in] (an embedding table
[vocab, hidden] is the map [hidden, vocab], so it is transposed first and back after):

    LoRA          W' = W + s (B @ A)                     s = alpha / r   (alpha / sqrt(r) with rsLoRA)
    DoRA          V = W + s (B @ A);   W' = m / ||V||_row * V    (norm over the input dim, per output row)
    replacement   W' = R                                 (modules_to_save; base layers saved in the adapter)

An adapter applied with weight w moves each weight by w times its change, W + w (W' - W),
which for LoRA is the familiar W + w s (B @ A). Several adapters are applied in order, each
to the model as merged so far.

Two sources of adapters: PEFT folders (read here) and llama.cpp LoRA GGUF files (read in
lora_gguf.py); both become the same list of updates on Hugging Face tensor names. Every
adapter is checked against the model (module names, shapes, ranks, finite values) before
a single weight changes.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePath
from typing import Any

from .errors import ConversionError
from .load import is_gguf
from .spec import Checkpoint

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
PEFT_PREFIX = "base_model.model."

# PEFT options whose adapters cannot be folded into the base weights (or need a model shape we
# do not export), with the reason given to the user.
_UNMERGEABLE_OPTIONS = {
    "alora_invocation_tokens": "an activated LoRA (aLoRA) only acts after its invocation tokens, which a merged "
                               "model cannot do",
    "layer_replication": "layer_replication changes the number of decoder layers",
    "use_qalora": "QA-LoRA pools the input of each layer, which is not a plain weight update",
    "lora_bias": "lora_bias adds a bias to layers that have none in a LLaMA model",
    "trainable_token_indices": "trainable-token adapters are not supported yet",
    "target_parameters": "LoRA on raw parameters (target_parameters) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "velora_config": "the VeLoRA variant is not supported",
    "kasa_config": "the KaSA variant is not supported",
    "monteclora_config": "the MonteCLoRA variant is not supported",
    "arrow_config": "Arrow routing picks adapters per token, which a merged model cannot do",
}
# PEFT task types that train a head the causal LM does not have (saved beside the LoRA weights).
_TASKS_WITH_A_HEAD = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
# Initialisations that rewrite the base weights when training starts: their adapters only make
# sense on that rewritten base, unless PEFT converted them back (then the config says True).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class AdapterRef:
    """`--lora PATH[:WEIGHT]`"""

    path: Path
    weight: float = 1.0

    def __post_init__(self) -> None:
        # `--lora=~/adapter` reaches us unexpanded (the shell expands ~ only at the start of a word)
        object.__setattr__(self, "path", Path(self.path).expanduser())

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        path, sep, weight = text.rpartition(":")
        if sep and not Path(text).expanduser().exists():
            try:
                value = float(weight)
            except ValueError:
                if path and Path(path).expanduser().exists():  # an adapter, then something not a weight
                    raise ConversionError(f"--lora {text}: the weight {weight!r} is not a number "
                                          f"(PATH:WEIGHT, e.g. {path}:0.5).") from None
                return cls(Path(text), 1.0)
            if not math.isfinite(value):
                raise ConversionError(f"--lora {text}: the weight {weight!r} is not a finite number.")
            return cls(Path(path), value)
        return cls(Path(text), 1.0)


@dataclass
class AdapterReport:
    """What one adapter did to the model; goes into report.json and the manifest."""

    path: str
    format: str  # "peft" | "llama.cpp-gguf"
    sha256: str
    rank: int
    alpha: float
    weight: float
    use_rslora: bool = False
    use_dora: bool = False
    base_model: str | None = None  # as the adapter names it; informational, shapes decide
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules: list[str] = field(default_factory=list)  # LoRA/DoRA-updated modules
    replaced: list[str] = field(default_factory=list)  # modules given full new weights
    notices: list[str] = field(default_factory=list)
    # The adapter folder's own chat template (TRL saves the tokenizer next to the adapter): a file the
    # merge does not use, the bundle keeping the base model's template.
    ignored_chat_template: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --- updates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraUpdate:
    """A low-rank update of one weight, in the weight's linear view [out, in]."""

    target: str  # HF tensor name
    a: Any  # [r, in]
    b: Any  # [out, r]
    scale: float
    magnitude: Any | None = None  # DoRA: one magnitude per output row
    transposed: bool = False  # the stored tensor is the linear map's transpose (an embedding table)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def delta_shape(self) -> tuple[int, int]:
        """The shape of B @ A as the tensor is stored."""
        shape = (int(self.b.shape[0]), int(self.a.shape[1]))
        return shape[::-1] if self.transposed else shape

    def apply(self, stored: Any, weight: float) -> Any:
        import torch

        w = stored.T if self.transposed else stored
        if self.magnitude is None:
            new = torch.addmm(w, self.b, self.a, alpha=weight * self.scale)  # w + weight * scale * (b @ a)
        else:
            v = torch.addmm(w, self.b, self.a, alpha=self.scale)
            dora = (self.magnitude / torch.linalg.norm(v, dim=1))[:, None] * v
            new = dora if weight == 1 else w + weight * (dora - w)
        return new.T.contiguous() if self.transposed else new


@dataclass(frozen=True)
class Replacement:
    """A full new value for one tensor (PEFT modules_to_save, or base weights the adapter carries)."""

    target: str
    value: Any

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.value.shape)

    def apply(self, stored: Any, weight: float) -> Any:
        return self.value.clone() if weight == 1 else stored + weight * (self.value - stored)


Update = LoraUpdate | Replacement


@dataclass
class ParsedAdapter:
    report: AdapterReport  # report.weight is the weight to apply
    updates: list[Update]


# --- the merge stage -------------------------------------------------------------------


def notice(message: str) -> None:
    """Something the user should know about the bundle: printed even without progress lines."""
    print(f"[nomoat] notice: {message}", file=sys.stderr, flush=True)


def merge_adapters(ckpt: Checkpoint, adapters: list[AdapterRef],
                   notify: Callable[[str], None] = notice) -> list[AdapterReport]:
    """Merge every adapter in order into ckpt (in place); return what each one did.

    All adapters are read and validated first, so a bad one fails before any weight changes.
    May untie a tied LM head (ckpt.spec is replaced then); `notify` hears why.
    """
    parsed = [read_adapter(ref, ckpt) for ref in adapters]
    for adapter in parsed:
        for message in adapter.report.notices:  # what reading found; the merge's own come as they happen
            notify(message)
    for adapter in parsed:
        _apply(ckpt, adapter, notify)
    return [adapter.report for adapter in parsed]


_ADAPTER_KINDS = "a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or a llama.cpp LoRA .gguf"


def require_adapter_paths(refs: Sequence[AdapterRef]) -> None:
    """A --lora path that does not exist, refused before the model is read (seconds to minutes)."""
    for ref in refs:
        if not ref.path.exists():
            raise ConversionError(f"LoRA adapter {ref.path} does not exist; pass {_ADAPTER_KINDS}.")


def read_adapter(ref: AdapterRef, ckpt: Checkpoint) -> ParsedAdapter:
    """Read a PEFT folder or a llama.cpp LoRA GGUF and check it fits ckpt."""
    path = ref.path
    require_adapter_paths([ref])
    if path.is_file() and is_gguf(path):
        from .lora_gguf import read_lora_gguf

        report, updates = read_lora_gguf(path, ckpt.spec)
    elif path.is_dir() or path.name in ("adapter_model.safetensors", "adapter_model.bin"):
        report, updates = _read_peft(path if path.is_dir() else path.parent, ckpt)
    else:
        raise ConversionError(f"LoRA adapter {path} is neither a PEFT adapter folder (adapter_config.json + "
                              "adapter_model.safetensors) nor a llama.cpp LoRA .gguf file.")
    report.weight = ref.weight
    _validate(updates, ckpt, report)
    return ParsedAdapter(report=report, updates=updates)


def _validate(updates: list[Update], ckpt: Checkpoint, report: AdapterReport) -> None:
    """Every update must land on a tensor of this model, with its shape and finite values."""
    import torch

    if not updates:
        raise ConversionError(f"{report.path}: the adapter holds no LoRA weights and no replacement weights.")
    # In the model's own order, so "the first bad module" is the one nearest the input.
    order = {name: i for i, name in enumerate([*ckpt.spec.expected_shapes(), LM_HEAD])}
    for u in updates:  # a resized vocabulary first: its message says what to do, a shape mismatch would not
        _check_vocabulary(u.target, u.delta_shape(), ckpt, report.path)
    for u in sorted(updates, key=lambda u: order.get(u.target, len(order))):
        module = u.target.removesuffix(".weight")
        current = _current(ckpt, u.target)
        if current is None:
            raise ConversionError(
                f"{report.path}: adapter module {module!r} matches no weight of this {ckpt.spec.architecture} model "
                f"(unknown target module); the adapter was made for another model"
                f"{_base_hint(report)}."
            )
        if tuple(current.shape) != u.delta_shape():
            raise ConversionError(
                f"{report.path}: {module} has shape {tuple(current.shape)} in the model but the adapter's "
                f"{'update' if isinstance(u, LoraUpdate) else 'weight'} has shape {u.delta_shape()}; the adapter "
                f"was trained for another model{_base_hint(report)}."
            )
        if not all(bool(torch.isfinite(t).all()) for t in _tensors_of(u)):
            raise ConversionError(f"{report.path}: {module} holds NaN or Inf values; the adapter is corrupt.")


def _tensors_of(u: Update) -> list[Any]:
    if isinstance(u, Replacement):
        return [u.value]
    return [u.a, u.b] + ([u.magnitude] if u.magnitude is not None else [])


def _base_hint(report: AdapterReport) -> str:
    return f" (it names its base model {report.base_model!r})" if report.base_model else ""


def _current(ckpt: Checkpoint, name: str) -> Any | None:
    """The tensor an update applies to; a tied LM head is the embedding."""
    if name in ckpt.tensors:
        return ckpt.tensors[name]
    if name == LM_HEAD and ckpt.spec.tie_word_embeddings:
        return ckpt.tensors[EMBED]
    return None


def _apply(ckpt: Checkpoint, adapter: ParsedAdapter, notify: Callable[[str], None]) -> None:
    by_target: dict[str, list[Update]] = {}
    # Replacements first: a LoRA on a module whose base weight the adapter carries applies to that weight.
    for u in sorted(adapter.updates, key=lambda u: isinstance(u, LoraUpdate)):
        by_target.setdefault(u.target, []).append(u)
    new = {}
    for target, updates in by_target.items():
        current = _current(ckpt, target)
        value = _updated(current, updates, adapter.report.weight)
        if all(isinstance(u, Replacement) for u in updates) and _same(value, current):
            continue  # e.g. PEFT saves the unchanged base embedding next to an embedding LoRA
        new[target] = value
        listing = adapter.report.modules if any(isinstance(u, LoraUpdate) for u in updates) else adapter.report.replaced
        listing.append(target.removesuffix(".weight"))
    if ckpt.spec.tie_word_embeddings and (EMBED in new or LM_HEAD in new):
        _settle_tied_pair(ckpt, new, adapter.report, notify)
    ckpt.tensors.update(new)


def _updated(current: Any, updates: list[Update], weight: float) -> Any:
    if len(updates) == 1:
        return updates[0].apply(current, weight)
    value = current
    for u in updates:
        value = u.apply(value, 1.0)
    return value if weight == 1 else current + weight * (value - current)


def _same(a: Any, b: Any) -> bool:
    """Equal up to fp32 rounding: such differences are no adapter's intent."""
    return bool((a - b).abs().max() <= 1e-6 * b.abs().max())


def _settle_tied_pair(ckpt: Checkpoint, new: dict[str, Any], report: AdapterReport,
                      notify: Callable[[str], None]) -> None:
    """A tied model whose embedding or LM head the adapter changes: keep them tied only if both stay equal.

    The adapter was trained with the two as separate modules (PEFT wraps each one); folding an
    LM-head update into the shared tensor would also change every input embedding, and the
    other way round. So the pair is untied on purpose, each keeping what it had in training,
    unless both end up equal (PEFT's ensure_weight_tying, or unchanged copies).
    """
    embed = new.get(EMBED, ckpt.tensors[EMBED])
    head = new.pop(LM_HEAD, ckpt.tensors[EMBED])
    new[EMBED] = embed
    if _same(head, embed):
        return
    new[LM_HEAD] = head
    ckpt.spec = replace(ckpt.spec, tie_word_embeddings=False)
    changed = [name for name, t in (("token embedding", embed), ("LM head", head))
               if t is not ckpt.tensors[EMBED]]
    kept = "the LM head keeps the original embedding" if changed == ["token embedding"] else (
        "the token embedding is unchanged" if changed == ["LM head"] else "each gets its own update")
    message = (f"{report.path}: the model ties its LM head to the token embedding and this adapter changes the "
               f"{' and the '.join(changed)}; untied on purpose: lm_head.weight is now its own tensor and {kept} "
               f"(the bundle stores one more [{ckpt.spec.vocab_size} x {ckpt.spec.hidden_size}] matrix).")
    report.notices.append(message)
    notify(message)


# --- PEFT folders ----------------------------------------------------------------------

_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!weight$|bias$)[^.]+)?(?:\.weight)?$"
)
# Copies of whole layers: base_layer (the base weight under a LoRA), modules_to_save (the trained full
# weight; PEFT drops the adapter's name from `modules_to_save.default` when the embedding layers are saved
# whole, as after resize_token_embeddings), original_module (the base weight the training started from).
_SAVED_COPY = re.compile(r"^(?P<module>.+)\.(?P<kind>base_layer|modules_to_save(?:\.[^.]+)?|original_module)"
                         r"\.(?P<param>weight|bias)$")


def _read_peft(path: Path, ckpt: Checkpoint) -> tuple[AdapterReport, list[Update]]:
    config, tensors, weights_file = _read_peft_files(path)
    _refuse_unmergeable(config, path)
    report = AdapterReport(
        path=str(path), format="peft", sha256=_sha256(weights_file),
        rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)), weight=1.0,
        use_rslora=bool(config.get("use_rslora")), use_dora=bool(config.get("use_dora")),
        base_model=config.get("base_model_name_or_path") or None,
        rank_pattern=dict(config.get("rank_pattern") or {}), alpha_pattern=dict(config.get("alpha_pattern") or {}),
    )
    if config.get("fan_in_fan_out"):
        # The flag transposes the update for GPT-2's Conv1D, whose weight is stored [in, out]; lora_A/lora_B
        # themselves are [r, in]/[out, r] either way. LLaMA's layers are nn.Linear, and PEFT resets the flag.
        report.notices.append("fan_in_fan_out=true ignored: it only applies to Conv1D layers (GPT-2), and PEFT "
                              "ignores it for LLaMA's nn.Linear layers too.")
    lora, replacements = _group_peft_keys(tensors, ckpt, path)
    # PEFT applied to the inner LlamaModel names its modules without "model.", and its config's
    # target_modules regex and rank/alpha patterns were matched against those names.
    inner = not any(key.removeprefix(PEFT_PREFIX).startswith("model.") for key in tensors)
    _check_config_targets(config, ckpt, path, report, inner)
    _note_chat_template(path, ckpt, report)
    _note_added_tokens(path, ckpt, report)
    _note_base_model(path, ckpt, report)
    updates: list[Update] = [_lora_update(module, parts, config, report, path, inner)
                             for module, parts in lora.items()]
    return report, updates + replacements


def _read_peft_files(path: Path) -> tuple[dict[str, Any], dict[str, Any], Path]:
    config_file = path / "adapter_config.json"
    named = sorted(p.parent.name for p in path.glob("*/adapter_config.json")) if path.is_dir() else []
    if not config_file.is_file() and named:
        # PEFT's save_pretrained puts an adapter not called "default" in a subfolder of its name.
        raise ConversionError(f"{path} holds adapters in subfolders ({', '.join(named)}), as PEFT saves named "
                              f"adapters: pass one of them, e.g. --lora {path / named[0]}")
    if not config_file.is_file():
        raise ConversionError(f"{path} has no adapter_config.json; it is not a PEFT adapter folder (or the config "
                              "was not copied with the weights). Pass the folder PEFT's save_pretrained wrote, or "
                              "a llama.cpp LoRA .gguf file.")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # json recurses per bracket
        raise ConversionError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file} should hold a JSON object.")
    _check_rank_alpha(config, config_file)
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{path}: peft_type {config.get('peft_type')!r} is not LoRA; only LoRA merges.")
    task = config.get("task_type")
    if task in _TASKS_WITH_A_HEAD:
        raise ConversionError(f"{path}: the adapter was trained for task_type {task!r}, with a head of its own "
                              "that a text-generating model lacks; CAUSAL_LM adapters merge.")
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        return config, _load_safetensors(st), st
    if binf.is_file():
        return config, _load_bin(binf), binf
    raise ConversionError(f"{path} has neither adapter_model.safetensors nor adapter_model.bin.")


def _check_rank_alpha(config: dict[str, Any], config_file: Path) -> None:
    """r, lora_alpha and their per-module patterns as numbers the merge can use: the file is hand-editable, and
    a string or list there crashed int()/float(), and a NaN alpha was merged without a word."""
    from .verify import is_number

    def refuse(key: str, value: Any, want: str) -> None:
        raise ConversionError(f"{config_file}: {key} is {json.dumps(value)[:60]}, not {want}; set it to the value "
                              "the adapter was trained with (PEFT writes it when it saves the adapter).")

    def check_rank(key: str, value: Any) -> None:
        # bool is an int to Python but not a rank; 4.0 is (JSON written by hand or by another tool)
        if not is_number(value) or not math.isfinite(value) or value != int(value) or value < 1:
            refuse(key, value, "a whole number >= 1 (the LoRA rank)")

    def check_alpha(key: str, value: Any) -> None:
        if not is_number(value) or not math.isfinite(value):
            refuse(key, value, "a finite number (the LoRA alpha)")

    if "r" in config:
        check_rank("r", config["r"])
    if "lora_alpha" in config:
        check_alpha("lora_alpha", config["lora_alpha"])
    for key, check in (("rank_pattern", check_rank), ("alpha_pattern", check_alpha)):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict):
            refuse(key, patterns, "an object of module-name patterns to numbers")
        for pattern, value in patterns.items():
            check(f"{key}[{json.dumps(pattern)}]", value)


def _load_safetensors(f: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(f))
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{f} cannot be read ({e}); the adapter file is damaged.") from e


def _load_bin(f: Path) -> dict[str, Any]:
    import pickle
    import zipfile

    import torch

    try:
        # weights_only: a .bin is a pickle, and only plain tensors may come out of it.
        state = torch.load(f, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise ConversionError(f"{f} cannot be read as a PyTorch file of plain tensors ({e}); it is damaged or "
                              "holds pickled objects. Re-save the adapter with safetensors.") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{f} does not hold a dict of tensors; it is not a PEFT adapter.")
    return state


def _refuse_unmergeable(config: dict[str, Any], path: Path) -> None:
    for option, reason in _UNMERGEABLE_OPTIONS.items():
        if config.get(option):
            raise ConversionError(f"{path}: cannot merge this adapter: {reason} ({option} is set).")
    init = config.get("init_lora_weights")
    # PEFT reads the name in any case ("OLoRA" runs OLoRA).
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        if init.lower().startswith("loftq"):
            raise ConversionError(
                f"{path}: the adapter was initialised with {init!r}, which trains against a LoftQ-quantized base; it "
                "only fits that base. Pass the base PEFT saved for it as --model and set init_lora_weights to true "
                "in adapter_config.json (PEFT's path_initial_model_for_weight_conversion does not convert LoftQ)."
            )
        raise ConversionError(
            f"{path}: the adapter was initialised with {init!r}, which rewrites the base weights; it only fits that "
            "rewritten base. Save it with PEFT's path_initial_model_for_weight_conversion to get a plain LoRA, or, "
            "if --model already is the residual model PEFT saved, set init_lora_weights to true in "
            "adapter_config.json."
        )


def _group_peft_keys(tensors: dict[str, Any], ckpt: Checkpoint,
                     path: Path) -> tuple[dict[str, dict[str, Any]], list[Update]]:
    """({module: {kind: tensor}} for LoRA parts, [Replacement]) from PEFT's saved keys."""
    lora: dict[str, dict[str, Any]] = {}
    replacements: list[Update] = []
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if re.search(r"\.lora_(?:A|B)\.bias$", name):
            raise ConversionError(f"{path}: cannot merge this adapter: {_UNMERGEABLE_OPTIONS['lora_bias']} "
                                  f"(key {key!r}).")
        if "trainable_tokens" in name:
            raise ConversionError(f"{path}: cannot merge this adapter: "
                                  f"{_UNMERGEABLE_OPTIONS['trainable_token_indices']} (key {key!r}).")
        m = _LORA_KEY.match(name)
        if m:
            target = _resolve_tensor(f"{m['module']}.weight", ckpt)
            if target is None:
                raise ConversionError(
                    f"{path}: adapter module {m['module']!r} matches no weight of this {ckpt.spec.architecture} "
                    "model (unknown target module); the adapter was made for another model."
                )
            lora.setdefault(target.removesuffix(".weight"), {})[m["kind"]] = value.float()
            continue
        m = _SAVED_COPY.match(name)
        target = _resolve_tensor(f"{m['module']}.{m['param']}" if m else name, ckpt)
        if target is None:
            raise ConversionError(
                f"{path}: adapter key {key!r} matches no weight of this {ckpt.spec.architecture} model and is not a "
                "LoRA weight; the adapter was made for another model or by a tool nomoat does not know."
            )
        if m and m["kind"] == "original_module":
            _check_vocabulary(target, tuple(value.shape), ckpt, path)  # the base it started from: its size tells
            continue
        replacements.append(Replacement(target, value.float()))
    return lora, replacements


def _check_vocabulary(target: str, shape: tuple[int, ...], ckpt: Checkpoint, path: Path | str) -> None:
    """An embedding or LM head of another row count than the model's (`shape` as the tensor is stored):
    the adapter was trained after resize_token_embeddings, with a tokenizer of its own."""
    current = _current(ckpt, target)
    if target not in (EMBED, LM_HEAD) or current is None or len(shape) != 2:
        return
    rows, cols = (int(d) for d in shape)
    if cols == current.shape[1] and rows != current.shape[0]:
        raise ConversionError(
            f"{path}: the adapter changed the vocabulary ({current.shape[0]} -> {rows} rows of "
            f"{target.removesuffix('.weight')}): merge it with PEFT together with its tokenizer (merge_and_unload, "
            "save_pretrained) and convert that folder."
        )


def _resolve_tensor(name: str, ckpt: Checkpoint) -> str | None:
    """The HF tensor name; adapters saved from the inner LlamaModel lack the leading 'model.'."""
    for candidate in (name, f"model.{name}"):
        if _current(ckpt, candidate) is not None:
            return candidate
    return None


def _lora_update(module: str, parts: dict[str, Any], config: dict[str, Any], report: AdapterReport,
                 path: Path, inner: bool) -> LoraUpdate:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a = parts.get("lora_embedding_A" if embedding else "lora_A")
    b = parts.get("lora_embedding_B" if embedding else "lora_B")
    if a is None or b is None or (embedding and ("lora_A" in parts or "lora_B" in parts)):
        raise ConversionError(f"{path}: {module} has {', '.join(sorted(parts))} but not a matching lora_A/lora_B "
                              "pair; the adapter file is incomplete.")
    if embedding != (f"{module}.weight" == EMBED):
        raise ConversionError(f"{path}: {module} holds {'embedding' if embedding else 'linear'} LoRA weights, "
                              "which do not fit that module.")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ConversionError(f"{path}: {module} has lora_A of shape {tuple(a.shape)} and lora_B of shape "
                              f"{tuple(b.shape)}; their ranks disagree.")
    r, alpha = _rank_alpha(config, _as_peft_named_it(module, inner))
    if a.shape[0] != r:
        raise ConversionError(
            f"{path}: {module} has rank {a.shape[0]} in its weights but {r} in adapter_config.json "
            f"(r / rank_pattern); the config and weights do not belong together."
        )
    magnitude = parts.get("lora_magnitude_vector")
    if report.use_dora != (magnitude is not None):
        raise ConversionError(
            f"{path}: {module} {'lacks' if report.use_dora else 'has'} a DoRA magnitude vector but adapter_config.json "
            f"says use_dora={str(report.use_dora).lower()}; the config and weights do not belong together."
        )
    if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
        raise ConversionError(f"{path}: {module} has a DoRA magnitude of shape {tuple(magnitude.shape)}; "
                              f"its update has {b.shape[0]} output rows.")
    scale = alpha / (math.sqrt(r) if report.use_rslora else r)
    return LoraUpdate(target=f"{module}.weight", a=a, b=b, scale=scale, magnitude=magnitude, transposed=embedding)


def _as_peft_named_it(module: str, inner: bool) -> str:
    """The module's name as PEFT matched patterns against it (without "model." for the inner LlamaModel)."""
    return module.removeprefix("model.") if inner else module


def _rank_alpha(config: dict[str, Any], module: str) -> tuple[int, float]:
    """Per-module rank/alpha: rank_pattern/alpha_pattern keys match a suffix of the module name, as in PEFT."""
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    pattern = _pattern_key(config.get("rank_pattern") or {}, module)
    if pattern is not None:
        r = int(config["rank_pattern"][pattern])
    pattern = _pattern_key(config.get("alpha_pattern") or {}, module)
    if pattern is not None:
        alpha = float(config["alpha_pattern"][pattern])
    return r, alpha


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """PEFT's get_pattern_key: the first key whose regex matches the end of the module name."""
    return next((key for key in patterns if re.match(rf"(.*\.)?({key})$", module)), None)


def _note_chat_template(path: Path, ckpt: Checkpoint, report: AdapterReport) -> None:
    """An adapter folder with a chat template of its own (TRL's SFTTrainer saves the tokenizer it trained
    with next to the adapter): a merge moves weights only, so say that the bundle keeps the base's."""
    from .load_hf import read_chat_template

    try:
        config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        config = {}
    template = read_chat_template(path, config if isinstance(config, dict) else {})
    if not template or template == ckpt.tokenizer.chat_template:
        return
    name = "chat_template.jinja" if (path / "chat_template.jinja").exists() else "tokenizer_config.json"
    report.ignored_chat_template = str(path / name)
    kept = "the base model's chat template" if ckpt.tokenizer.chat_template else \
        "the base model's tokenizer, which has no chat template (ChatML at run time)"
    report.notices.append(
        f"{path / name} holds a chat template of its own, unlike the base model's; the merge uses only the "
        f"adapter's weights, so the bundle keeps {kept}. To ship the adapter's template, `nomoat merge` the "
        "adapter, copy its tokenizer files into the merged folder and convert that folder."
    )


def _note_added_tokens(path: Path, ckpt: Checkpoint, report: AdapterReport) -> None:
    """An adapter folder whose tokenizer has tokens the base's lacks (special tokens added without
    resizing, on a model with spare embedding rows, their rows trained via modules_to_save): the
    bundle keeps the base tokenizer, which can neither encode nor produce them, so say so."""
    from tokenizers import Tokenizer

    if not (path / "tokenizer.json").is_file():
        return
    try:
        theirs = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab(with_added_tokens=True)
    except Exception:  # tokenizers raises plain Exception for a file it cannot read: nothing to compare
        return
    ours = Tokenizer.from_str(ckpt.tokenizer.tokenizer_json).get_vocab(with_added_tokens=True)
    new = sorted((t for t in theirs if t not in ours), key=theirs.get)
    if not new:
        return
    shown = ", ".join(map(repr, new[:5])) + (f" and {len(new) - 5} more" if len(new) > 5 else "")
    report.notices.append(
        f"{path / 'tokenizer.json'} has {len(new)} token(s) the base model's tokenizer lacks ({shown}); the bundle "
        "keeps the base's, which can neither encode nor produce them. To ship them, `nomoat merge` the adapter, "
        "copy its tokenizer files into the merged folder and convert that folder."
    )


def _note_base_model(path: Path, ckpt: Checkpoint, report: AdapterReport) -> None:
    """adapter_config.json naming another base model than the one converted: worth a word, not a refusal
    (the same model sits at different local paths, and a fine-tune of it fits as well)."""
    named, model_path = report.base_model, ckpt.source.get("path")
    if not named or not model_path:
        return
    theirs = _loose_name(PurePath(str(named).rstrip("/\\")).name)
    ours = _model_names(Path(str(model_path)))
    if not theirs or not ours or any(_names_match(theirs, name) for name in ours):
        return
    report.notices.append(
        f"{path}: adapter_config.json says the adapter was trained on {named!r}, but the model converted is "
        f"{model_path}; if that is another model, the merged weights fit by shape but are wrong."
    )


def _model_names(path: Path) -> set[str]:
    """Loose names of the model at `path`: its folder or file name (the repo's, for the Meta weights in
    a repo's original/), and the repo of a Hugging Face cache snapshot (hub/models--ORG--NAME/snapshots/<commit>)."""
    names = {path.stem if path.suffix.lower() == ".gguf" else path.name}
    if path.name == "original":  # a Hugging Face repo's Meta checkpoint: REPO/original
        names.add(path.parent.name)
    names |= {part.split("--")[-1] for part in path.parts if part.startswith("models--")}
    return {n for n in map(_loose_name, names) if n}


def _loose_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


# What a GGUF's or a converted copy's name adds to the model's (loose names: lowercase letters and
# digits): its quantization (q80, q41, q4km, iq4xs), its dtype, "gguf".
_FILE_TAGS = re.compile(r"(?:q\d(?:\d|k[sml]?)?|iq\d(?:xxs|xs|nl|s|m)?|bf16|fp16|fp32|f16|f32|gguf)+$")


def _names_match(a: str, b: str) -> bool:
    """The same model's names once a file's tags are dropped (smollm2135minstructq80 is smollm2135minstruct).
    Not one inside the other: a base model's name is inside its Instruct model's, the commonest mix-up."""
    return (_FILE_TAGS.sub("", a) or a) == (_FILE_TAGS.sub("", b) or b)


def _check_config_targets(config: dict[str, Any], ckpt: Checkpoint, path: Path, report: AdapterReport,
                          inner: bool) -> None:
    """target_modules of which no name is a module of this model mean the adapter is for another architecture.

    Some names missing is not enough: training scripts pass one list for several architectures
    ("q_proj", "query_key_value", "c_attn", ...), and PEFT trains such an adapter on the modules that
    exist. The weights' own names are checked one by one (_group_peft_keys)."""
    targets = config.get("target_modules")
    modules = [name.removesuffix(".weight") for name, t in ckpt.tensors.items() if t.dim() == 2]
    if ckpt.spec.tie_word_embeddings:
        modules.append(LM_HEAD.removesuffix(".weight"))
    modules = [_as_peft_named_it(m, inner) for m in modules]
    if isinstance(targets, str):
        if targets != "all-linear" and not any(re.fullmatch(targets, m) for m in modules):
            raise ConversionError(f"{path}: target_modules {targets!r} matches no module of this "
                                  f"{ckpt.spec.architecture} model; the adapter is for another architecture.")
        return
    targets = list(targets or [])
    missing = [t for t in targets if not any(m == t or m.endswith(f".{t}") for m in modules)]
    if targets and len(missing) == len(targets):
        raise ConversionError(
            f"{path}: unknown target modules {', '.join(map(repr, missing))} in adapter_config.json: this "
            f"{ckpt.spec.architecture} model has none of them (it has q_proj, k_proj, v_proj, o_proj, gate_proj, "
            "up_proj, down_proj, embed_tokens, lm_head); the adapter is for another architecture."
        )
    if missing:
        report.notices.append(f"target_modules names {', '.join(map(repr, missing))}, which this "
                              f"{ckpt.spec.architecture} model does not have; PEFT trained the others, which merge.")


def _sha256(path: Path) -> str:
    from nomoat.runtime.manifest import sha256_file

    return sha256_file(path)
