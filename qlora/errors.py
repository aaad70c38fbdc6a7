"""One exception type for problems with what the user handed us (files, keys, values).

The CLI prints such an error as one line on stderr and exits with status 2; the message must name
the file/line/key and say what to do. Bugs stay ordinary exceptions with tracebacks.
"""


class QloraError(Exception):
    """A user-facing, one-line, actionable error."""
