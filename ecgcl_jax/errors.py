"""User-facing errors: one line naming the file or field and the problem."""


class UserError(Exception):
    """An error caused by the user's input (config, data, workdir); printed as one line, no traceback."""
