"""One exception type for mistakes a user can fix; the CLI prints it as one line, without a traceback."""


class UserError(Exception):
    """A problem with the user's input (recipe, data, paths) that names what is wrong and how to fix it."""


class DataError(UserError):
    """A data source that cannot be read or whose rows cannot be used."""


class Interrupted(Exception):
    """Ctrl-C during a command: the message says what was kept and how to go on; the CLI exits 130."""
