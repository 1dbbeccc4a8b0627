"""User-facing errors. The CLI prints their one-line message and exits with code 2."""


class ParetoqError(Exception):
    """Bad input from the user: the message names the problem and the fix, on one line."""
