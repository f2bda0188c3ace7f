"""Device side of nomoat: load a bundle and stream text.

Imports numpy, onnxruntime, tokenizers and jinja2 only; never torch or transformers.
"""

from .errors import BundleError, ContextOverflowError, NomoatError, OrtOptionsError
from .logprobs import TokenLogprob
from .model import Chat, Completion, GenerationStats, Model, StreamEvent
from .sampling import SamplingParams
from .structured import Grammar, StructuredOutputUnavailable

__all__ = [
    "BundleError",
    "Chat",
    "Completion",
    "ContextOverflowError",
    "GenerationStats",
    "Grammar",
    "Model",
    "NomoatError",
    "OrtOptionsError",
    "SamplingParams",
    "StreamEvent",
    "StructuredOutputUnavailable",
    "TokenLogprob",
]
