"""The one user-facing error type: a single line saying what is wrong, where, and what to do."""


class OnnxqError(Exception):
    """A user error (bad input, bad option, unwritable output); the CLI prints it as one line and exits 2."""
