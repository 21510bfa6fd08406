"""The two kinds of failure the CLI reports: the user's input (exit 2) and the run itself (exit 1)."""


class NpftError(Exception):
    """A failure with a one-line message that says what went wrong and what to do."""

    exit_code = 1


class UsageError(NpftError):
    """Bad input: a path, an option or a model that cannot be used as given."""

    exit_code = 2
