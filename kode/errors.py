"""The one error type that the CLI turns into a one-line message and exit code 2, and the
one way kode shortens any other exception to a line."""

import numbers
import os

#: The ``kode`` command's exit code for bad input.
EXIT_USAGE = 2


class KodeError(ValueError):
    """Bad user input: a clear, single-line message; nothing was written or lost."""


def error_line(err: BaseException | str) -> str:
    """The one line the ``kode`` command prints on stderr for bad input (then it exits with
    :data:`EXIT_USAGE`)."""
    return f"kode: error: {err}"


def one_line(err: BaseException, limit: int = 300) -> str:
    """``str(err)`` on one line (white space folded; the type's name when it has no text),
    cut to ``limit`` characters with an ellipsis: what a one-line error message quotes."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "…"


#: What a simple annotation asks for: the test, and the words a message uses for it.
_KINDS = {
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool),
            "an integer"),
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str | os.PathLike), "a string"),
}


def check_argument_types(arguments: dict, annotations: dict, owner: str = "") -> None:
    """Raise :class:`KodeError` "``name`` must be <kind>, got <value>" for an argument whose
    annotation is one simple kind, optionally ``| None`` (``bool``, ``int``, ``float`` (an int
    too), ``str`` (a path too)) and whose value is not of it; other annotations are left to
    the code that uses the argument. ``owner`` prefixes the message (e.g. a model name)."""
    for name, value in arguments.items():
        annotation = annotations.get(name)
        if value is None or not isinstance(annotation, str):
            continue
        kinds = [part.strip() for part in annotation.split("|")]
        optional = "None" in kinds
        kinds = [kind for kind in kinds if kind != "None"]
        if len(kinds) != 1 or kinds[0] not in _KINDS:
            continue
        test, words = _KINDS[kinds[0]]
        if test(value):
            continue
        prefix = f"{owner}: " if owner else ""
        raise KodeError(f"{prefix}{name} must be {words}{' or None' if optional else ''}, "
                        f"got {value!r}")
