"""User-facing errors.

Anything a user can cause (a config typo, a missing file, a malformed prompt line, an unknown reward
name, a NaN reward) is raised as :class:`UserError`. The CLI prints its message on one line and exits
with code 2, without a traceback. Library code never prints.
"""


class UserError(Exception):
    """An error caused by the user's input; the message alone must say what to fix."""

    exit_code = 2
