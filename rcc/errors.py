"""The one exception type for user mistakes.

Entry points (CLI, server) print ``str(err)`` as a one-line message and exit
non-zero / answer 4xx; library callers can catch :class:`RCCError`.
"""


class RCCError(ValueError):
    """A user mistake: bad input, a missing or corrupt file, a mismatched model.

    The message says what was wrong and what to do about it.
    """
