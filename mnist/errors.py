"""The exception type users see: a clear paragraph naming the bad value and the fix."""


class UserError(Exception):
    """Bad input or a missing prerequisite; printed as one paragraph, exit status 2."""

    exit_code = 2


class NoSpace(UserError, OSError):
    """A file could not be written for want of disk space: a UserError for the user, and an OSError for the code
    that carries on without a file it can do without (usage.json)."""
