"""The limit counters a process shares with the rest of the fleet (``[fleet] redis``).

Without ``[fleet] redis`` every process counts on its own, as a single node always has.
"""

from __future__ import annotations

from typing import Any

from smarthost.app.config import Config
from smarthost.app.live import Generation
from smarthost.smtpd.limits import Limits, LimitSettings


def make_limits(
    config: Config, settings: LimitSettings, reactor: Any, previous: Generation | None
) -> Limits:
    """The counters carry over a reload that leaves ``[limits]`` alone. New numbers mean new
    counters (the connections already open count against the old ones until they close)."""
    if previous is not None and previous.limits.settings == settings:
        return previous.limits
    return Limits(reactor, settings)
