"""The one exception type a user sees: a one-line message that says what is wrong and what to do."""


class UserError(Exception):
    """Bad input or an unmet requirement. The CLI prints `error: <message>` and exits 1."""
