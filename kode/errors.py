"""The one error type that the CLI turns into a one-line message and exit code 2."""


class KodeError(ValueError):
    """Bad user input: a clear, single-line message; nothing was written or lost."""
