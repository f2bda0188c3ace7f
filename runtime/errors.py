"""Errors the runtime raises for problems a user can fix."""


class NomoatError(Exception):
    """Base of the runtime's own error classes (a bad argument is a plain ValueError or TypeError, a request
    on a closed model or beside this thread's open stream a RuntimeError)."""


class BundleError(NomoatError):
    """The bundle is missing, from an unknown format version, or its files do not match."""


class ContextOverflowError(NomoatError, ValueError):
    """The prompt (or the conversation so far) does not fit in the bundle's context. A ValueError too, as
    llama-cpp-python's for a prompt past its context: a value the caller gave, too long."""


class OrtOptionsError(NomoatError, ValueError):
    """A session config entry the caller gave was refused: by ONNX Runtime (a key it knows, a value it does
    not take), or by nomoat before it (a key not shaped like ONNX Runtime's, which it would ignore)."""

    def __init__(self, options: str, reason: str, refused_by: str = "ONNX Runtime"):
        super().__init__(f"{refused_by} refused the session options {options}: {reason}")
        # options: KEY=VALUE,...; reason: ONNX Runtime's message (or nomoat's) on one line
        self.options, self.reason, self.refused_by = options, reason, refused_by
