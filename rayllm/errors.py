"""User-facing errors: one small family, each message names the file / line / field and the fix.

The CLI prints these in one line and exits 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RayllmError(Exception):
    """Base of every error that is the user's to fix (bad config, bad input, missing files).

    ``str()`` is the message it was raised with: Ray Data appends retry advice to the arguments of
    exceptions it re-raises, which would turn the one line into four.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(RayllmError):
    """A config value is unknown, of the wrong type or impossible."""


class DataError(RayllmError):
    """Input data cannot be read as configured: names the file and line."""


class RunDirError(RayllmError):
    """A stage needs an artifact of an earlier stage that is not in the run directory."""


def find_user_error(exc: BaseException) -> RayllmError | None:
    """Return the RayllmError behind ``exc``, looking through Ray's task/actor wrappers and causes.

    Ray re-raises a remote exception as ``RayTaskError`` whose ``cause`` holds the original, and Ray
    Train/Tune wrap worker errors again; the user should still see one clear line.
    """
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, RayllmError):
            # Ray's RayTaskError(DataError) prints the remote traceback; the original prints one line.
            inner = getattr(cur, "cause", None)
            return inner if isinstance(inner, RayllmError) else cur
        stack.extend([getattr(cur, "cause", None), cur.__cause__, cur.__context__])
        for attr in ("worker_failures", "errors"):
            more = getattr(cur, attr, None)
            if isinstance(more, dict):
                stack.extend(v for v in more.values() if isinstance(v, BaseException))
            elif isinstance(more, list | tuple):
                stack.extend(v for v in more if isinstance(v, BaseException))
    return None


def one_line(err: BaseException) -> str:
    """The message on one line (a wrapped library message may span several)."""
    return " ".join(line.strip() for line in str(err).splitlines() if line.strip())
