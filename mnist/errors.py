"""The one exception type users see: a clear paragraph naming the bad value and the fix."""


class UserError(Exception):
    """Bad input or a missing prerequisite; printed as one paragraph, exit status 2."""

    exit_code = 2
