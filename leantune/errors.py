"""Errors a user can cause. Entry points catch `UserError`, print its message and exit non-zero."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """Something the user can fix (config, data, paths); the message says what and how."""


class DataError(UserError):
    """The data cannot be used: no rows, too many rejected, a source that cannot be read."""


class NoSpaceLeft(UserError):
    """The disk filled up while the run wrote to it; the last complete checkpoint is intact, so the run
    resumes exactly once space is freed."""


# How a full disk reads when it is not an OSError: safetensors (Rust) and torch's zip writer.
_NO_SPACE_TEXT = ("No space left on device", "StorageFull", "os error 28")


def no_space_left(error: BaseException, where: Path | str, run_name: str | None = None) -> NoSpaceLeft | None:
    """NoSpaceLeft when `error`, or an error it arose from, is a full disk (ENOSPC), else None.

    Its message names the file (or `where`) and the way out: free space, then --resume `run_name` (without
    a run name: run the command again)."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC or any(t in str(seen) for t in _NO_SPACE_TEXT):
            path = getattr(seen, "filename", None) or where
            then = f"resume with --resume {run_name}" if run_name else "run the command again"
            return NoSpaceLeft(f"no space left on device at {path}; free space and {then}")
        seen = seen.__cause__ or seen.__context__
    return None
