"""Test doubles shared by the unit and integration tests: the synchronous stand-in for
``run_blocking``, and the one builder of an SMTP session on a StringTransport."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import bcrypt
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from smarthost.api import PLUGIN_TIMEOUT
from smarthost.auth import sasl
from smarthost.auth.cred import PortalLogin, build_portal
from smarthost.auth.sasl import ISASLMechanism
from smarthost.auth.users import UsersFile
from smarthost.core.enums import Role
from smarthost.core.maillog import EventFile, MailLog
from smarthost.queue.spool import Spool
from smarthost.smtpd.authdialog import Login
from smarthost.smtpd.hooks import Hooks
from smarthost.smtpd.limits import Limits, LimitSettings
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.session import Session, SessionSettings

HASH = bcrypt.hashpw(b"secret", bcrypt.gensalt(4)).decode()


def run_now(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


class SessionHarness:
    """One SMTP session on a StringTransport, the way every unit test builds one: a real spool
    and, unless ``login`` is given, a real bcrypt portal over ``users`` (each with password
    ``secret``), in virtual time. ``plugins`` run through the core's Hooks (or pass ``hooks``).
    Keyword defaults describe a submission listener for ``example.test``."""

    def __init__(
        self,
        tmp: Path,
        plugins: Sequence[tuple[str, object]] = (),
        *,
        role: str = "submission",
        client: str = "192.0.2.7",
        port: int = 4321,
        trusted: Sequence[str] = (),
        local_domains: Sequence[str] = ("example.test",),
        senders: Mapping[str, frozenset[str]] | None = None,
        hostname: str = "mx.smarthost.test",
        max_size: int = 100_000,
        max_recipients: int = 10,
        command_timeout: float = 300,
        allow_plaintext_auth: bool = True,
        mechanisms: Sequence[ISASLMechanism] | None = None,  # None: PLAIN, none for "smtp"
        users: Sequence[str] = ("alice@example.test",),
        login: Login | None = None,
        limits: LimitSettings | None = None,
        hooks: Hooks | None = None,
        plugin_timeout: float = PLUGIN_TIMEOUT,
        clock: Clock | None = None,
        events: EventFile | None = None,
    ) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        if clock is None:
            clock = Clock()
            clock.advance(1_700_000_000)
        self.clock = clock
        self.spool, _ = Spool.open(tmp / "spool", clock=clock, run_blocking=run_now)
        if login is None:
            (tmp / "users").write_text("".join(f"{user}:{HASH}\n" for user in users))
            login = PortalLogin(build_portal(UsersFile(tmp / "users"), run_now))
        if mechanisms is None:
            mechanisms = () if role == "smtp" else sasl.build_mechanisms(["PLAIN"])
        settings = SessionSettings(
            role=Role(role),
            hostname=hostname,
            max_size=max_size,
            max_recipients=max_recipients,
            command_timeout=command_timeout,
            allow_plaintext_auth=allow_plaintext_auth,
            tls=None,
            mechanisms=mechanisms,
        )
        policy = RelayPolicy(
            local_domains=frozenset(local_domains),
            trusted_networks=tuple(ipaddress.ip_network(n) for n in trusted),
            senders=dict(senders or {}),
        )
        self.hooks = hooks if hooks is not None else Hooks(plugins, clock, plugin_timeout)
        self.maillog = MailLog(clock, events)
        self.session = Session(
            settings, policy, login, self.spool, self.maillog, clock,
            Limits(clock, limits or LimitSettings()), self.hooks,
        )
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", client, port))
        self.session.makeConnection(self.transport)

    def replies(self) -> list[str]:
        """Every reply line written since the last call."""
        data = self.transport.value().decode("utf-8")
        self.transport.clear()
        return data.split("\r\n")[:-1] if data else []

    def feed(self, data: bytes) -> list[str]:
        """Send raw bytes; return every reply line that came back."""
        self.session.dataReceived(data)
        return self.replies()

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


PluginSession = SessionHarness  # the name the plugin tests know it by


def codes(replies: Sequence[str]) -> list[int]:
    return [int(line[:3]) for line in replies if line[3:4] == " "]
