"""One exception type for problems the user can fix (bad input, missing files, unknown names).

The command-line entry points print such an error as one line and exit non-zero; anything else is
a bug and keeps its traceback.
"""


class SamnnuError(Exception):
    """A user-facing problem. The message names the file or value and what is wrong with it."""
