"""User-facing errors: one line that names the thing and the fix."""


class TensorslimError(Exception):
    """An error caused by the user's input; the CLI prints its message without a traceback."""
