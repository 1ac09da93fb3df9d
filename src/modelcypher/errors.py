"""One exception type for user mistakes: caught once by the CLI and printed as one line."""

from __future__ import annotations

import os


class UserError(Exception):
    """A mistake in the user's input (path, config, checkpoint). The message names the culprit."""


def os_error(e: OSError, path: str | os.PathLike | None = None) -> UserError:
    """An error of the user's environment (permission denied, read-only or full filesystem, ...) as one
    line naming the path: the path the system names, else ``path``."""
    where = e.filename if e.filename is not None else path
    reason = e.strerror or str(e) or type(e).__name__
    return UserError(f"{where}: {reason}" if where is not None else reason)
