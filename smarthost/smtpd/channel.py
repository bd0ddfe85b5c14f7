"""The seam between the two halves of an SMTP connection.

:mod:`smarthost.smtpd.transport` owns the bytes (buffering, line splitting, reply order,
STARTTLS, timers); :mod:`smarthost.smtpd.commands` owns the SMTP dialog (EHLO..QUIT and the
state they build). Each side sees the other only through the small interface here, so the
commands can be tested against a fake channel and the transport against a fake handler.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from smarthost.core.replies import Reply
from smarthost.smtpd.dotreader import DataResult


class DataSink(Protocol):
    """Takes the message bytes after ``354`` (the DATA reader, through
    :class:`~smarthost.smtpd.reception.Reception`) or a BDAT chunk's octets
    (:class:`~smarthost.smtpd.bdat.ChunkReader`).

    A sink that takes a known number of bytes (a chunk) has an int attribute ``remaining``
    and is handed no more than that: a stream of small pipelined chunks then never copies the
    rest of the buffer back and forth for each one."""

    def feed(self, data: bytes) -> DataResult | None:
        """Bytes from the client; a result once the end of data (or a fatal error) is seen,
        with the bytes after it in ``leftover``."""

    def abort(self) -> None:
        """The connection ended first: drop the half-received message."""


class Channel(Protocol):
    """What the commands ask of the transport."""

    @property
    def peer_address(self) -> str:
        """The client's IP address as text (an IPv4-mapped IPv6 address as plain IPv4)."""

    @property
    def encrypted(self) -> bool:
        """TLS is on: implicit (port 465) or after STARTTLS."""

    def can_start_tls(self) -> bool:
        """STARTTLS is possible now: not yet encrypted, and a certificate is configured."""

    def tls_details(self) -> tuple[str, str] | None:
        """(protocol version, cipher) when encrypted, for the Received: header."""

    def send(self, r: Reply) -> None:
        """Answer now. A 421 closes the connection (RFC 5321 3.8); other errors count
        towards the error limits (but a ``repeated`` one)."""

    def answer_later(self, work: Coroutine[Any, Any, Reply | None]) -> None:
        """Answer with what ``work`` returns (nothing for None); until then, later pipelined
        commands wait. A crash in ``work`` is logged and answered 451."""

    def close(self, r: Reply | None = None) -> None:
        """Send a last reply (if any) and close; nothing more is read or sent."""

    def start_tls(self) -> None:
        """Start the TLS handshake now, forgetting every byte received before it."""

    def read_data(self, sink: DataSink, done: Callable[[DataResult], None]) -> None:
        """Give the following bytes to ``sink`` instead of splitting them into command
        lines, until it returns a result; then hand that to ``done``."""


class Handler(Protocol):
    """What the transport asks of the commands."""

    def connected(self) -> None:
        """The connection is up: greet (or refuse and close)."""

    def line_received(self, line: bytes) -> None:
        """One command line, its CRLF (or bare LF) removed. The next one comes only after
        this one is answered."""

    def connection_lost(self) -> None:
        """The connection is gone; release what it held."""
