"""The error a user's bad input raises anywhere in fastclr (kept below every module that raises it, so
that none needs the runtime to do so)."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, before any heavy work."""
