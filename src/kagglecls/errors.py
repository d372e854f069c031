"""The one base of every error a user can cause. Imports nothing of ours."""


class UserError(Exception):
    """Bad params, data, credentials or files: the stage prints this one line and exits 2, no traceback."""
