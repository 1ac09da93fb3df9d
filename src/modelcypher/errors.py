"""One exception type for user mistakes: caught once by the CLI and printed as one line."""


class UserError(Exception):
    """A mistake in the user's input (path, config, checkpoint). The message names the culprit."""
