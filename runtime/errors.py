"""Errors the runtime raises for problems a user can fix."""


class BundleError(Exception):
    """The bundle is missing, from an unknown format version, or its files do not match."""


class ContextOverflowError(Exception):
    """The prompt (or the conversation so far) does not fit in the bundle's context."""


class OrtOptionsError(ValueError):
    """ONNX Runtime refused a session config entry the caller gave (a key it knows, a value it does not take)."""

    def __init__(self, options: str, reason: str):
        super().__init__(f"ONNX Runtime refused the session options {options}: {reason}")
        self.options, self.reason = options, reason  # KEY=VALUE,...; ONNX Runtime's message on one line
