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
