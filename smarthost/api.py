"""The seams of smarthost, as zope.interface interfaces.

Internal seams (the spool, delivery agents) let a faster or different implementation replace
one part without touching the others. The plugin API (checks per SMTP stage) lives here too,
so a third-party package needs to import nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, IResolver
from zope.interface import Attribute, Interface, implementer

from smarthost.core.envelope import Client, Envelope, Outcome, QueueEntry, QueueId
from smarthost.core.replies import Reply

# The plugin API in one import: the values plugins receive and return come along.
__all__ = [
    "PLUGIN_TIMEOUT",
    "Client",
    "Context",
    "Envelope",
    "IConnectCheck",
    "IDataCheck",
    "IDeliveryObserver",
    "IHeaderAdder",
    "IHeloCheck",
    "IIncomingMessage",
    "IMailCheck",
    "IRcptCheck",
    "ISmarthostPlugin",
    "ISpool",
    "ITokenVerifier",
    "MessageView",
    "Outcome",
    "PluginContext",
    "QueueEntry",
    "QueueId",
    "Reply",
]

# Seconds the core waits for any plugin call (a check, a header adder, a token verifier)
# before it answers 451 4.3.0 (454 4.7.0 for AUTH); a plugin that waits on the network should
# give up earlier on its own.
PLUGIN_TIMEOUT = 30.0


class IIncomingMessage(Interface):
    """A message being received: bytes go to disk as they arrive, then commit or abort."""

    queue_id: QueueId = Attribute("The id this message will have once committed.")

    def write(data: bytes) -> None:
        """Append message bytes (header and body, CRLF line endings, dot-unstuffed)."""

    def commit(envelope: Envelope) -> Deferred[QueueEntry]:
        """Make the message durable. Fires only once data and envelope are fsynced: the
        session answers 250 after this, never before."""

    def abort() -> None:
        """Throw the partial message away (client vanished, size exceeded, bad data)."""

    def read() -> bytes:
        """Everything written so far (for content checks and signers before commit)."""

    def prepend(data: bytes) -> None:
        """Put ``data`` (header lines) before everything written so far."""


class ISpool(Interface):
    """The durable queue: the only bridge from receiving to delivering."""

    def receive() -> IIncomingMessage:
        """Start receiving one message."""

    def entries() -> Iterator[QueueEntry]:
        """Every committed message, in arrival order (start-up, ``queue list``)."""

    def load(queue_id: QueueId) -> QueueEntry:
        """One committed message's state; KeyError when it is not (or no longer) queued."""

    def open_body(queue_id: QueueId) -> BinaryIO:
        """The committed message bytes, for delivery or bounces."""

    def update(entry: QueueEntry) -> Deferred[None]:
        """Durably replace the state of a queued message (attempts, recipient status)."""

    def remove(queue_id: QueueId) -> Deferred[None]:
        """Durably delete a message that is fully delivered, bounced or deleted."""


# -- the plugin API ------------------------------------------------------------------------
#
# A plugin is a Twisted plugin (found with twisted.plugin.getPlugins over the
# ``smarthost.plugins`` package namespace) providing ISmarthostPlugin. When it is named in
# ``[plugins] enabled``, its ``build`` is called once at start with its ``[plugins.NAME]``
# table; the object returned provides one or more of the stage interfaces below.
#
# Plugins can only say no: a check returns None (no objection) or a Reply to send instead.
# Relay permission belongs to the core. A check that raises, or does not answer within its
# time limit, makes the session answer 451 4.3.0 (fail closed).


class PluginContext(Interface):
    """What a plugin may use: injected, so a plugin is as testable as the core."""

    clock: IReactorTime = Attribute("The reactor's clock (callLater, seconds).")
    hostname: str = Attribute("Our host name.")
    resolver: IResolver = Attribute("DNS lookups (twisted.names), per [delivery] nameservers.")
    run_blocking: Callable[..., Deferred[Any]] = Attribute(
        "Run a blocking callable off the reactor thread: run_blocking(f, *args)."
    )
    base_dir: Path = Attribute(
        "The directory of the config file: relative paths in plugin settings start here."
    )


@implementer(PluginContext)
@attrs.frozen
class Context:
    """The PluginContext the daemon builds; a plugin's tests build one from test doubles."""

    clock: IReactorTime
    hostname: str
    resolver: Any  # IResolver's lookup methods (twisted.names client), see PluginContext
    run_blocking: Callable[..., Deferred[Any]]
    base_dir: Path = attrs.field(factory=Path.cwd)


class ISmarthostPlugin(Interface):
    """What ``twisted.plugin.getPlugins(ISmarthostPlugin, smarthost.plugins)`` finds."""

    name: str = Attribute("The name used in [plugins] enabled.")

    def build(settings: Mapping[str, Any], context: PluginContext) -> object:
        """Validate ``settings`` (raise ValueError naming the bad setting) and return the
        object that provides the stage interfaces."""


class IConnectCheck(Interface):
    def check_connect(client: Client) -> Awaitable[Reply | None]:
        """When the client connects, before the banner (a refusal is sent instead of it)."""


class IHeloCheck(Interface):
    def check_helo(client: Client, helo: str) -> Awaitable[Reply | None]:
        """At EHLO/HELO."""


class IMailCheck(Interface):
    def check_mail(client: Client, sender: str) -> Awaitable[Reply | None]:
        """At MAIL FROM, after the core's own checks passed ("" is the null sender)."""


class IRcptCheck(Interface):
    def check_rcpt(client: Client, sender: str, recipient: str) -> Awaitable[Reply | None]:
        """At RCPT TO, after the relay rule accepted the recipient."""


class IDataCheck(Interface):
    def check_data(client: Client, message: MessageView) -> Awaitable[Reply | None]:
        """At the end of DATA, before the spool commit: the last chance to refuse."""


class IHeaderAdder(Interface):
    def add_headers(
        client: Client, message: MessageView
    ) -> Awaitable[Sequence[tuple[str, str]]]:
        """Headers to put on top of the message before it is committed (e.g. a
        DKIM-Signature); after every IDataCheck has passed."""


class IDeliveryObserver(Interface):
    def delivery(entry: QueueEntry, outcome: Outcome) -> None:
        """Called for every recipient's result (delivered, deferred or bounced). Must not
        block; exceptions are logged and ignored (delivery goes on)."""


class ITokenVerifier(Interface):
    """Says whose an OAuth 2.0 bearer token is, for AUTH OAUTHBEARER and XOAUTH2.

    The one stage that can let someone in: a verifier only speaks for the tokens of its
    authorization server, and the core still applies every relay and sender rule to the user
    it names. Used when its plugin is in ``[plugins] enabled``; those mechanisms refuse to
    start without one.
    """

    def verify(token: str, user: str | None) -> Awaitable[str | None]:
        """The user name the token belongs to, or None when it is not valid (expired,
        revoked, unknown: the client gets 535). ``user`` is the name the client gave, if
        any; the core checks it against the answer, the verifier need not. Raise when the
        answer cannot be known (the authorization server is down): the client gets 454.
        Never put the token in an exception or a log line."""


@attrs.frozen
class MessageView:
    """A message at the end of DATA, before commit: its envelope, its header block, its size
    and a way to read all of it (for signers and content scanners)."""

    envelope: Envelope
    headers: bytes = attrs.field(repr=False)  # the header section as received (CRLF lines)
    size: int
    read: Callable[[], bytes] = attrs.field(repr=False)  # the whole message (blocking)
