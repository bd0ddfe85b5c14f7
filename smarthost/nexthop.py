"""Where a recipient's mail goes next: local maildir, a static route, or the domain's MX hosts.

Resolution answers a :class:`Route` or raises :class:`PermanentRouteError` (NXDOMAIN, null
MX: bounce now) or :class:`TemporaryRouteError` (SERVFAIL, timeout: try again later).
"""

from __future__ import annotations

import attrs

SMTP, MAILDIR = "smtp", "maildir"


@attrs.frozen
class Credentials:
    username: str
    password: str = attrs.field(repr=False)  # never in repr, logs or exception text


@attrs.frozen
class Host:
    """One server to try: ``name`` for TLS verification and logs, ``address`` to connect to."""

    name: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.name}[{self.address}]:{self.port}"


@attrs.frozen
class Route:
    kind: str  # SMTP | MAILDIR
    hosts: tuple[Host, ...] = ()  # in the order to try them (SMTP)
    tls: str = "opportunistic"  # "opportunistic" | "required" | "verify"
    implicit_tls: bool = False  # port 465 routes: TLS from the first byte (RFC 8314)
    credentials: Credentials | None = None  # static routes only, never MX hosts
    maildir: str = ""  # MAILDIR: the root directory
    # A route is also the unit of connection reuse: recipients with equal routes share one
    # connection (one per next hop).


class RouteError(Exception):
    """No route now; ``reply`` is what the bounce or the queue listing says."""

    def __init__(self, reply: str, status: str) -> None:
        super().__init__(reply)
        self.reply = reply
        self.status = status


class PermanentRouteError(RouteError):
    """NXDOMAIN, null MX (RFC 7505), no address at all: bounce."""


class TemporaryRouteError(RouteError):
    """SERVFAIL, REFUSED, timeout: defer and retry."""
