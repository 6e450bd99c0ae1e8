"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class DfmError(Exception):
    """A problem the user can act on; the message says what to do."""
