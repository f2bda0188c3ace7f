"""One ONNX Runtime session over the decoder graph, with a static KV cache.

The KV cache of every layer is one preallocated buffer of `max_context` positions that is
bound once, with IOBinding, as both the past input and the present output: the
GroupQueryAttention kernel writes the new positions in place, so no step copies the cache.
The cache is indexed by position (gpt-fast style): rewinding a conversation is setting
`length`, nothing is moved.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BundleError, ContextOverflowError
from .manifest import GRAPH_IO, KV_IO, Manifest

# The element type ONNX Runtime reports for a KV cache kept in each of manifest.KV_DTYPES.
_ORT_TENSOR_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)"}
# The graph's inputs besides the KV cache: GRAPH_IO without its one output and the KV names.
_GRAPH_INPUTS = tuple(key for key in GRAPH_IO if key not in KV_IO and key != "logits")


@dataclass(frozen=True)
class SessionOptions:
    threads: int | None = None  # intra-op threads; None = ONNX Runtime's default (all cores)
    spin: bool = True  # busy-wait between ops: lower latency per token, more CPU while generating
    release_file_pages: bool = True  # hand back the weight-file pages read while loading (pages.py)
    huge_pages: bool = True  # move the pre-packed weights into huge pages (huge_pages.py)
    # ONNX Runtime session config entries, applied after nomoat's own (so they can override them):
    # a kernel choice to A/B on a device, e.g. (("mlas.disable_kleidiai", "1"),). See parse_ort_options.
    ort_config: tuple[tuple[str, str], ...] = ()


def parse_ort_options(spec: str) -> dict[str, str]:
    """`KEY=VALUE[,KEY=VALUE...]` (ONNX Runtime session config entries) as a dict; '' or 'none'
    is no entry. ONNX Runtime accepts any key without a word, so a misspelt one does nothing:
    the keys are checked here for the shape ONNX Runtime's all have (dotted words)."""
    entries: dict[str, str] = {}
    if spec.strip().lower() in ("", "none"):
        return entries
    for item in spec.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not value:
            raise ValueError(f"ONNX Runtime option {item.strip()!r} is not KEY=VALUE; write e.g. "
                             "mlas.disable_kleidiai=1 (several: separated by commas)")
        check_ort_option(key, value)
        if key in entries:
            raise ValueError(f"ONNX Runtime option {key!r} is given twice")
        entries[key] = value
    return entries


def check_ort_option(key: str, value: str) -> None:
    """Refuse (ValueError) an entry ONNX Runtime would ignore or choke on: a key not of the dotted shape all
    of its keys have (it takes any key without a word), a value that is not a non-empty string. Shared by
    --ort-options (parse_ort_options) and Model.load's ort_options."""
    if not isinstance(key, str) or "." not in key or any(c.isspace() for c in key) or key.startswith(".") \
            or key.endswith("."):
        raise ValueError(f"{key!r} is not an ONNX Runtime session config key (they are dotted "
                         "names such as session.intra_op.allow_spinning or mlas.disable_kleidiai; "
                         "see onnxruntime_session_options_config_keys.h)")
    if not isinstance(value, str) or not value:
        raise ValueError(f"ONNX Runtime option {key}={value!r}: the value must be a non-empty string, "
                         "e.g. mlas.disable_kleidiai='1'")


def format_ort_options(entries: Iterable[tuple[str, str]]) -> str:
    """The `KEY=VALUE,...` form parse_ort_options reads."""
    return ",".join(f"{key}={value}" for key, value in entries)


def ort_session(path: Path, options: SessionOptions):
    """An ONNX Runtime CPU session with nomoat's settings (also what benchmarks/peers.py's
    GenAIGraphEngine runs ONNX Runtime GenAI's graph with)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    # A memory pattern is one block per input shape (a prefill chunk, a decode step) planned ahead
    # and kept; without it the arena serves each tensor and reuses the blocks across shapes: ~5 MB
    # less at the peak, at the same speed (measured, README "Memory").
    so.enable_mem_pattern = False
    if options.threads:
        so.intra_op_num_threads = options.threads
    # The user's entries replace nomoat's (each key set once: ONNX Runtime warns on a second).
    config = {"session.intra_op.allow_spinning": "1" if options.spin else "0", **dict(options.ort_config)}
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    if options.ort_config:
        # A value ONNX Runtime refuses fails the session with an exception that nomoat reports in one
        # line (OrtOptionsError); ONNX Runtime would first log the same text in red at ERROR level.
        so.log_severity_level = 4  # FATAL only, while the user's entries are in play
    # No fallback: with the CPU provider alone its retry creates the same failing session a second
    # time, after printing "EP Error" banners on stdout (the generated text's stream).
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"], enable_fallback=0)


def is_onnxruntime_error(error: BaseException) -> bool:
    """An exception ONNX Runtime raised: its pybind11 classes (Fail, InvalidArgument, ...), or the plain
    RuntimeError its ORT_ENFORCE checks become (e.g. session.intra_op_thread_affinities=abc), told
    apart by the innermost frame of its traceback lying in the onnxruntime package."""
    if type(error).__module__.startswith("onnxruntime"):
        return True
    if not isinstance(error, RuntimeError) or error.__traceback__ is None:
        return False
    import onnxruntime

    package = Path(onnxruntime.__file__).parent
    innermost = traceback.extract_tb(error.__traceback__)[-1]
    return Path(innermost.filename).is_relative_to(package)


class _Mismatch(Exception):
    """One manifest field the graph contradicts: the field, the manifest's value, the graph's."""


def check_graph_matches_manifest(session, manifest: Manifest) -> None:
    """Refuse (BundleError) a manifest.json that contradicts model.onnx's inputs and outputs. No sha256
    covers manifest.json, so an edited field (a kv_dtype, num_layers, vocab_size) would otherwise pass
    every check and fail the first forward pass with ONNX Runtime's multi-line error. Reads only the
    session's declared inputs and outputs: no forward pass. Symbolic dims (batch, positions) match any."""
    try:
        _check_graph_io(session, manifest)
    except _Mismatch as e:
        field, ours, theirs = e.args
        raise BundleError(f"manifest.json says {field} is {ours!r}, but {manifest.onnx.model_file} has "
                          f"{theirs}; re-convert the bundle, or undo the edit to manifest.json.") from None


def _check_graph_io(session, manifest: Manifest) -> None:
    io, m = manifest.onnx.io, manifest.model
    inputs = {arg.name: arg for arg in session.get_inputs()}
    outputs = {arg.name: arg for arg in session.get_outputs()}
    for key in _GRAPH_INPUTS:
        _graph_arg(inputs, f"onnx.io.{key}", io[key], "input")
    logits = _graph_arg(outputs, "onnx.io.logits", io["logits"], "output")
    _check_dim(logits, -1, "model.vocab_size", m.vocab_size, "a vocabulary of {}")
    layers = 0  # the graph's layers, counted as the manifest's name pattern numbers them
    while io["past_key"].format(layer=layers) in inputs:
        layers += 1
    # No layer 0 is a wrong name pattern, not a graph without layers.
    _graph_arg(inputs, "onnx.io.past_key", io["past_key"].format(layer=0), "input")
    if layers != m.num_layers:
        raise _Mismatch("model.num_layers", m.num_layers, f"{layers} layers of KV cache inputs")
    for layer in range(layers):
        for key, side, names in (("past_key", "input", inputs), ("past_value", "input", inputs),
                                 ("present_key", "output", outputs), ("present_value", "output", outputs)):
            arg = _graph_arg(names, f"onnx.io.{key}", io[key].format(layer=layer), side)
            _check_kv(arg, key, manifest)


def _graph_arg(args: dict, field: str, name: str, side: str):
    if name not in args:
        raise _Mismatch(field, name, f"no {side} of that name (its {side}s: {', '.join(args)[:200]})")
    return args[name]


def _check_kv(arg, key: str, manifest: Manifest) -> None:
    """A KV cache input or output is [batch, kv heads, positions, head_dim] of the manifest's kv_dtype."""
    if arg.type != _ORT_TENSOR_TYPES[manifest.onnx.kv_dtype]:
        raise _Mismatch("onnx.kv_dtype", manifest.onnx.kv_dtype, f"{arg.name} of type {arg.type}")
    if len(arg.shape) != 4:
        raise _Mismatch(f"onnx.io.{key}", arg.name, f"{arg.name} of shape {arg.shape}, not a KV cache's "
                        "[batch, kv heads, positions, head_dim]")
    _check_dim(arg, 1, "model.num_kv_heads", manifest.model.num_kv_heads, "{} KV heads")
    _check_dim(arg, 3, "model.head_dim", manifest.model.head_dim, "a head_dim of {}")


def _check_dim(arg, axis: int, field: str, expected: int, phrase: str) -> None:
    dim = arg.shape[axis] if arg.shape else None
    if isinstance(dim, int) and dim != expected:  # a str (or None) is a symbolic dim: any size fits
        raise _Mismatch(field, expected, f"{phrase.format(dim)} in {arg.name} {arg.shape}")


class DecoderSession:
    """Runs the decoder graph; remembers which tokens its KV cache holds."""

    def __init__(self, bundle: Path, manifest: Manifest, options: SessionOptions = SessionOptions()):
        import onnxruntime as ort

        if manifest.onnx is None:
            raise ValueError("this bundle has no ONNX model")
        manifest.onnx.check_onnxruntime(ort.__version__)
        self.manifest = manifest
        self.capacity = manifest.max_context
        self.vocab_size = manifest.model.vocab_size
        self._io_names = manifest.onnx.io
        self.session = ort_session(Path(bundle) / manifest.onnx.model_file, options)
        check_graph_matches_manifest(self.session, manifest)
        if options.release_file_pages and manifest.onnx.data_file:
            from .pages import release_file_pages

            # Pre-packing is done: the packed copies are on the heap, the file's pages were read once.
            release_file_pages(Path(bundle) / manifest.onnx.data_file)
        if options.huge_pages:
            from .huge_pages import collapse_resident_memory

            # Before the KV cache exists: what is fully resident now is the packed weights.
            collapse_resident_memory()
        self.tokens: list[int] = []  # what the KV cache holds, position by position

        m = manifest.model
        shape = [1, m.num_kv_heads, self.capacity, m.head_dim]
        kv_dtype = np.dtype(manifest.onnx.kv_dtype)  # float32, or float16: half the memory
        self._binding = self.session.io_binding()
        # Generation only needs the last position's logits: they go into one reused array.
        # Logits are bound first so they stay output 0 whatever is re-bound later.
        self._last_logits = np.zeros((1, 1, self.vocab_size), np.float32)
        self._last_logits_ov = ort.OrtValue.ortvalue_from_numpy(self._last_logits)
        self._binding.bind_ortvalue_output(self._io_names["logits"], self._last_logits_ov)
        self._last_index = np.zeros(1, np.int64)
        # Decode steps reuse these small inputs, updated in place. OrtValues made from numpy arrays
        # on the CPU share the arrays' memory, so once bound they need no binding call per token
        # (each costs ~10 us from Python); a prefill or all-logits pass binds other arrays and
        # clears `_decode_bound`, and the next decode step binds these again.
        self._one_id = np.zeros((1, 1), np.int64)
        self._seqlens = np.zeros(1, np.int32)
        self._total = np.zeros((), np.int32)
        self._decode_inputs = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in (
            (self._io_names["input_ids"], self._one_id), (self._io_names["seqlens_k"], self._seqlens),
            (self._io_names["total_sequence_length"], self._total),
            (self._io_names["logits_index"], self._last_index))}
        self._decode_bound = False
        self._kv = []  # keep the OrtValues alive as long as the binding uses them
        for layer in range(m.num_layers):
            for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, kv_dtype, "cpu", 0)
                self._binding.bind_ortvalue_input(self._io_names[past].format(layer=layer), buf)
                self._binding.bind_ortvalue_output(self._io_names[present].format(layer=layer), buf)
                self._kv.append(buf)

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        """Forget cached positions from `length` on (they are overwritten by the next forward)."""
        del self.tokens[length:]

    def reset(self) -> None:
        self.tokens.clear()

    def forward(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Append `ids` to the cache and return logits: [vocab] for the last position, or
        [len(ids), vocab] for every new position when all_logits is set."""
        n = len(ids)
        if n == 0:
            raise ValueError("forward needs at least one token")
        total = self.length + n
        if total > self.capacity:
            raise ContextOverflowError(
                f"{total} tokens do not fit in the bundle's context of {self.capacity}; shorten the prompt, "
                "start a new conversation, or convert with a larger --max-context."
            )
        io, b = self._io_names, self._binding
        self._seqlens[0] = total - 1
        self._total[...] = total
        if n == 1 and not all_logits:
            self._one_id[0, 0] = ids[0]
            self._last_index[0] = 0
            if not self._decode_bound:
                for name, value in self._decode_inputs.items():
                    b.bind_ortvalue_input(name, value)
                b.bind_ortvalue_output(io["logits"], self._last_logits_ov)
                self._decode_bound = True
        else:
            self._decode_bound = False
            b.bind_cpu_input(io["input_ids"], np.asarray(ids, dtype=np.int64).reshape(1, n))
            b.bind_cpu_input(io["seqlens_k"], self._seqlens)
            b.bind_cpu_input(io["total_sequence_length"], self._total)
            if all_logits:
                b.bind_cpu_input(io["logits_index"], np.arange(n, dtype=np.int64))
                b.bind_output(io["logits"], "cpu")
            else:
                self._last_index[0] = n - 1
                b.bind_cpu_input(io["logits_index"], self._last_index)
                b.bind_ortvalue_output(io["logits"], self._last_logits_ov)
        self.session.run_with_iobinding(b)
        self.tokens.extend(ids)
        if all_logits:
            return b.get_outputs()[0].numpy()[0]  # output 0 is the logits (bound first)
        return self._last_logits[0, 0]
