"""A small asyncio MX that offers CHUNKING (RFC 3030) and records the raw dialog.

aiosmtpd has no BDAT, so outbound BDAT, REQUIRETLS and MTA-STS tests talk to this one. It runs
its own event loop in a thread, beside the Twisted reactor of the test. What it offers is
:attr:`ChunkMX.extensions` (STARTTLS when a certificate is given; REQUIRETLS only after TLS, as
RFC 8689 2 says); every command line is kept in :attr:`ChunkMX.commands` exactly as received
(BDAT's data is not a command line), and every message's bytes in :attr:`ChunkMX.messages`,
BDAT data as sent, DATA dot-unstuffed.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Sequence

import attrs
from twisted.internet import threads
from twisted.internet.defer import Deferred


@attrs.define
class Message:
    mail_from: str  # the whole MAIL command, parameters included
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    chunked: bool


class ChunkMX:
    def __init__(
        self,
        extensions: Sequence[str] = ("PIPELINING", "CHUNKING", "8BITMIME"),
        *,
        tls: ssl.SSLContext | None = None,
        requiretls: bool = False,
        host: str = "127.0.0.1",
    ) -> None:
        self.extensions = list(extensions)
        self._tls, self._requiretls, self._host = tls, requiretls, host
        self.commands: list[str] = []
        self.messages: list[Message] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def start(self) -> None:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        future.result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._session, self._host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def wait_for_messages(self, count: int, timeout: float = 20) -> Deferred[list[Message]]:
        """The first ``count`` messages, from a worker thread so the reactor keeps running."""

        def wait() -> list[Message]:
            done = threading.Event()
            for _ in range(int(timeout * 20)):
                if len(self.messages) >= count:
                    return self.messages[:count]
                done.wait(0.05)
            raise TimeoutError(f"{len(self.messages)} of {count} messages after {timeout}s")

        result: Deferred[list[Message]] = threads.deferToThread(wait)
        return result

    # -- one session --------------------------------------------------------------------------
    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tls = False

        def say(*lines: str) -> None:
            writer.write(b"".join(
                f"{line[:3]}{'-' if i < len(lines) - 1 else ' '}{line[4:]}\r\n".encode()
                for i, line in enumerate(lines)))

        say("220 chunkmx.test ESMTP")
        mail, rcpts, chunks = "", list[str](), bytearray()
        try:
            while line := await asyncio.wait_for(reader.readline(), 30):
                command = line.decode("utf-8", "replace").rstrip("\r\n")
                self.commands.append(command)
                verb = command.split(" ", 1)[0].upper()
                if verb == "EHLO":
                    offered = [e for e in self.extensions if not (tls and e == "STARTTLS")]
                    if self._tls is not None and not tls:
                        offered.append("STARTTLS")
                    if self._requiretls and tls:
                        offered.append("REQUIRETLS")
                    say("250 chunkmx.test", *(f"250 {e}" for e in offered))
                elif verb == "STARTTLS" and self._tls is not None and not tls:
                    say("220 go ahead")
                    await writer.drain()
                    await writer.start_tls(self._tls)
                    tls = True
                    mail, rcpts = "", []
                elif verb == "MAIL":
                    mail, rcpts, chunks = command, [], bytearray()
                    say("250 2.1.0 ok")
                elif verb == "RCPT":
                    rcpts.append(command)
                    say("250 2.1.5 ok")
                elif verb == "BDAT":
                    size, _, last = command[5:].partition(" ")
                    chunks += await reader.readexactly(int(size))
                    if last.upper() == "LAST":
                        self.messages.append(Message(mail, rcpts, bytes(chunks), tls, True))
                        say("250 2.0.0 queued as chunked")
                        mail, rcpts, chunks = "", [], bytearray()
                    else:
                        say(f"250 2.0.0 {size} octets received")
                elif verb == "DATA":
                    say("354 go on")
                    data = bytearray()
                    while (body_line := await reader.readline()) != b".\r\n":
                        if not body_line:
                            return
                        data += body_line[1:] if body_line.startswith(b".") else body_line
                    self.messages.append(Message(mail, rcpts, bytes(data), tls, False))
                    say("250 2.0.0 queued")
                elif verb in ("RSET", "NOOP"):
                    say("250 2.0.0 ok")
                elif verb == "QUIT":
                    say("221 2.0.0 bye")
                    await writer.drain()
                    break
                else:
                    say("502 5.5.2 not implemented")
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
            pass
        finally:
            writer.close()
