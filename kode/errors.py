"""The one error type that the CLI turns into a one-line message and exit code 2, and the
one way kode shortens any other exception to a line."""


class KodeError(ValueError):
    """Bad user input: a clear, single-line message; nothing was written or lost."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """``str(err)`` on one line (white space folded; the type's name when it has no text),
    cut to ``limit`` characters with an ellipsis: what a one-line error message quotes."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "…"
