"""Errors the runtime raises for problems a user can fix."""


class BundleError(Exception):
    """The bundle is missing, from an unknown format version, or its files do not match."""


class ContextOverflowError(Exception):
    """The prompt (or the conversation so far) does not fit in the bundle's context."""
