"""User errors: one clear line for the user, exit code 2, never a traceback."""


class UserError(Exception):
    """Bad input from the user (a file, an option, a name). The message is the whole story."""

    exit_code = 2
