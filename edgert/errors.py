"""User-facing errors. The CLI prints `edgert: <message>` and exits non-zero, without a traceback."""


class EdgertError(Exception):
    """A problem with the user's input (file, model name, option), stated in one line."""
