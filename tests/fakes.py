"""Test doubles shared by the unit and integration tests: the synchronous stand-in for
``run_blocking``, and one SMTP session with plugins on a StringTransport."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bcrypt
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smarthost.auth import sasl
from smarthost.auth import users as auth
from smarthost.core.maillog import MailLog
from smarthost.queue.spool import Spool
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits, LimitSettings
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.session import Session, SessionSettings

HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()


def run_now(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


class PluginSession:
    """One SMTP session with ``plugins`` run through the core's Hooks, a real spool and a
    real bcrypt portal (alice@example.test / secret), in virtual time."""

    def __init__(
        self,
        tmp: Path,
        plugins: Sequence[tuple[str, object]],
        *,
        role: str = "submission",
        client: str = "192.0.2.7",
        trusted: Sequence[str] = (),
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        users = tmp / "users"
        users.write_text(f"alice@example.test:{HASH}\n")
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.spool, _ = Spool.open(tmp / "spool", clock=self.clock, run_blocking=run_now)
        portal = auth.build_portal(auth.UsersFile(users), run_now)
        settings = SessionSettings(
            role=role,
            hostname="mx.smarthost.test",
            max_size=100_000,
            max_recipients=10,
            command_timeout=300,
            allow_plaintext_auth=True,
            tls=None,
            mechanisms=() if role == "smtp" else sasl.build_mechanisms(["PLAIN"]),
        )
        policy = RelayPolicy(
            local_domains=frozenset({"example.test"}),
            trusted_networks=tuple(ipaddress.ip_network(n) for n in trusted),
            senders={},
        )
        self.session = Session(
            settings, policy, auth.PortalLogin(portal), self.spool, MailLog(self.clock),
            self.clock, Limits(self.clock, LimitSettings()), Hooks(plugins, self.clock),
        )
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", client, 4321))
        self.session.makeConnection(self.transport)

    def replies(self) -> list[str]:
        data = self.transport.value().decode("utf-8")
        self.transport.clear()
        return data.split("\r\n")[:-1] if data else []

    def send(self, *lines: str) -> list[str]:
        """Send lines (CRLF added); return every reply line that came back."""
        for line in lines:
            self.session.dataReceived(line.encode("utf-8") + b"\r\n")
        return self.replies()

    def login(self, user: str = "alice@example.test", password: str = "secret") -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        assert self.send("EHLO client.test")[-1].startswith("250 ")
        assert self.send(f"AUTH PLAIN {token}") == ["235 2.7.0 Authentication successful"]

    def message(self, sender: str, recipients: Sequence[str], body: str) -> list[str]:
        """MAIL, RCPT..., DATA and the message (``\\n`` line ends become CRLF)."""
        replies = self.send(f"MAIL FROM:<{sender}>", *(f"RCPT TO:<{r}>" for r in recipients),
                            "DATA")
        text = body.replace("\r\n", "\n").replace("\n", "\r\n")
        self.session.dataReceived(text.encode("utf-8") + b"\r\n.\r\n")
        return replies + self.replies()

    def committed(self) -> list[bytes]:
        """The bodies of every committed message, as delivery will read them."""
        bodies = []
        for entry in self.spool.entries():
            with self.spool.open_body(entry.queue_id) as f:
                bodies.append(f.read())
        return bodies


def codes(replies: Sequence[str]) -> list[int]:
    return [int(line[:3]) for line in replies if line[3:4] == " "]
