"""The one error class for bad input: a flag, a file or a row the user gave.

The CLI prints an InputError as one line and exits 2, keeping what was written; any other
exception is a bug and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input from the user; the message names the flag, file or line and what to do."""
