"""The one exception type the converter raises for bad input.

The CLI prints its message and exits non-zero; the message always names the problem
and what to do about it.
"""


class ConversionError(Exception):
    """User-facing conversion failure (bad input, unsupported model, over budget, ...)."""
