"""User-facing errors. The CLI prints `edgert: <message>` and exits non-zero, without a traceback."""

MAX_CHARS = 600


class EdgertError(Exception):
    """A problem with the user's input (file, model name, option), stated in one line: control
    characters a corrupt file put into the message (a key name, a path) are escaped, and the
    message is cut at MAX_CHARS."""

    def __init__(self, message: str = ""):
        msg = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message))
        if len(msg) > MAX_CHARS:
            msg = msg[:MAX_CHARS - 3] + "..."
        super().__init__(msg)


class CorruptFile(EdgertError):
    """A model file whose contents are damaged (truncated, corrupt header, missing tensors): for an
    installed model the CLI adds how to re-pull it."""
