"""Write-through: our SMTP protocols' output goes to the socket at once when nothing waits.

Why: Twisted's ``transport.write`` only buffers. It arms the socket for writing (an
``epoll_ctl`` MOD), the reactor's next turn calls ``doWrite``, which sends and disarms it
(another MOD). An SMTP reply or command is a few dozen bytes that a socket with an empty
buffer takes whole, so that round costs more than the send itself: in a profile of the accept
path each of a message's 4 replies cost one send, two ``epoll.modify`` and one extra reactor
dispatch. :func:`write_through` sends at once when the connection's buffer is empty, and hands
what the kernel did not take (all of it on EAGAIN, an error or any doubt) to the transport's
own ``write``, which then does what it always does: the peer sees the same bytes in the same
order either way, and a send error ends the connection as Twisted ends it (its ``doWrite``
meets the same error).

Callers batch: one call per batch of replies (or of pipelined commands), never one per line.

The direct send happens only on a plain ``twisted.internet.tcp.Connection`` (no TLS: STARTTLS
sets its ``TLS``; implicit TLS is a ``TLSMemoryBIOProtocol`` above it, whose ``write``
encrypts) reached through wrappers that pass ``write`` on unchanged (``ProtocolWrapper``: the
PROXY-protocol reader, the connection counter), and only while it is connected, not closing,
aborting or half-closed, has nothing buffered, and has no producer that expects to hear from
``doWrite`` (a pull producer, or a push producer it paused). Those are Twisted's private
attributes: tests/unit/test_writethrough.py pins the ones this reads, so an upgrade that
changes them fails there loudly rather than here quietly.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport
from twisted.protocols.policies import ProtocolWrapper


def write_through(transport: ITransport, data: bytes) -> None:
    """Write ``data`` to ``transport``: straight to its socket when that is safe and the
    socket's buffer is empty, otherwise (or whatever the kernel did not take) with
    ``transport.write``."""
    if not data:
        return
    connection = _plain_tcp(transport)
    if connection is not None:
        sent = connection.writeSomeData(data)  # an int, or ConnectionLost on an error
        if isinstance(sent, int) and sent > 0:
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)


def can_write_through(transport: ITransport | None) -> bool:
    """Whether :func:`write_through` to ``transport`` would send straight away now (a caller
    that holds output back to write it in one go holds it only then)."""
    return _plain_tcp(transport) is not None


def _plain_tcp(transport: Any) -> tcp.Connection | None:
    """The TCP connection under ``transport`` if a direct send to it is safe now, else None."""
    while isinstance(transport, ProtocolWrapper):
        if type(transport).write is not ProtocolWrapper.write or transport.disconnecting:
            return None  # TLS (or any wrapper that changes the bytes), or closing
        transport = transport.transport
    if not isinstance(transport, tcp.Connection):
        return None
    kind = type(transport)
    if kind.write is not tcp.Connection.write or kind.writeSomeData is not (
        tcp.Connection.writeSomeData
    ):
        return None
    producer = transport.producer
    if (
        transport.TLS
        or not transport.connected
        or transport.disconnecting
        or transport._aborting
        or transport._writeDisconnecting
        or transport._writeDisconnected
        or transport.dataBuffer
        or transport._tempDataLen
        or (producer is not None and (not transport.streamingProducer
                                      or transport.producerPaused))
    ):
        return None
    return transport
