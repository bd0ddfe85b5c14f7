"""A blocking SMTP client on a raw socket, for tests that must send bytes no library would:
several ``BDAT`` chunks and their octets pipelined in one write, octets that would mean
something in DATA inside a chunk (``smtplib`` and swaks have no BDAT; aiosmtpd neither).

Every read has a timeout; run it in a thread beside a reactor that serves it.
"""

from __future__ import annotations

import socket
import ssl

TIMEOUT = 15.0  # seconds any one read may take


class Wire:
    """One connection: send any bytes, read whole replies."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock: socket.socket = socket.create_connection((host, port), timeout=TIMEOUT)
        self.file = self.sock.makefile("rb")

    def starttls(self) -> None:
        """STARTTLS without checking the server's certificate (the server side is tested)."""
        assert self.command(b"STARTTLS")[0].startswith(b"220 ")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        self.sock = context.wrap_socket(self.sock, server_hostname="mx.smarthost.test")
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> list[bytes]:
        """One reply, every line of it (CRLF removed)."""
        lines: list[bytes] = []
        while True:
            line = self.file.readline()
            assert line.endswith(b"\r\n"), f"connection ended mid-reply: {[*lines, line]}"
            lines.append(line[:-2])
            if line[3:4] == b" ":
                return lines

    def replies(self, n: int) -> list[bytes]:
        """The last line of each of the next ``n`` replies."""
        return [self.reply()[-1] for _ in range(n)]

    def command(self, line: bytes) -> list[bytes]:
        self.send(line + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        return self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def bdat(*chunks: bytes, last: bool = True) -> bytes:
    """The chunks as pipelined ``BDAT`` commands with their octets, the final one ``LAST``."""
    out = b""
    for i, chunk in enumerate(chunks):
        marker = b" LAST" if last and i == len(chunks) - 1 else b""
        out += b"BDAT %d%s\r\n" % (len(chunk), marker) + chunk
    return out


def without_trace(message: bytes) -> bytes:
    """The message as the client sent it: the first Received: header (its first line and its
    tab-indented continuations) removed."""
    lines = message.splitlines(keepends=True)
    assert lines and lines[0].startswith(b"Received: "), message[:200]
    i = 1
    while i < len(lines) and lines[i].startswith(b"\t"):
        i += 1
    return b"".join(lines[i:])
