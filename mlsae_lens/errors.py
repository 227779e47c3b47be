"""One exception type for every problem a user can fix.

The CLI catches :class:`MLSAEError` and prints its message alone (no traceback), so each
message must name the problem *and* the fix. Library callers get an ordinary exception
they can catch; it subclasses ``ValueError`` because almost every case is a bad value.
"""


class MLSAEError(ValueError):
    """A user-facing error: the message says what is wrong and how to fix it."""
