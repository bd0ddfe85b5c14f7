"""Errors that cross rooms: raised in one part, caught in another."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; ``key`` is the dotted name of the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key


class CorruptEntry(ValueError):
    """A spool record's entry exists but does not hold a QueueEntry for its id. Raised by the
    spool, caught by delivery (which then leaves the message alone for the operator)."""


class SpoolFull(OSError):
    """The spool's file system is full (ENOSPC) or its quota is used up (EDQUOT): nothing of
    the batch was acknowledged. Raised by the spool, answered ``452 4.3.1`` by the session
    (RFC 3463 X.3.1, "mail system full"); the spool writes again once space is back."""
