"""The one exception type for mistakes a user can make (config, paths, input files, hub access).

The command line prints such an error as one line and exits 2; every other exception is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what to do, in one line."""
