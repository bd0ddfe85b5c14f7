"""Who may send what through us: the relay rule and sender ownership.

Checked in a fixed order and failing closed: a recipient is accepted only when one rule
positively allows it. Plugins (later) may refuse on top of this, never grant.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Container, Mapping

from smarthost.core import replies as reply
from smarthost.core.envelope import Address, Client
from smarthost.core.replies import USER_UNKNOWN, Reply
from smarthost.core.types import Network
from smarthost.smtpd.headerfrom import HeaderError, claimed_senders

SMTP_ROLE = "smtp"


class RelayPolicy:
    def __init__(
        self,
        local_domains: frozenset[str],
        trusted_networks: tuple[Network, ...],
        senders: Mapping[str, frozenset[str]],
        local_recipients: Container[str] | None = None,
        *,
        check_header_from: bool = True,
    ) -> None:
        self._local_domains = local_domains
        self._check_header_from = check_header_from
        self._trusted = trusted_networks
        self._senders = senders
        self._local_recipients = local_recipients
        # Parsing an address costs more than the whole relay check: recent clients' answers
        # are kept (the networks never change for this object).
        self._trusted_answer = functools.lru_cache(maxsize=4096)(self._in_trusted)

    def is_local(self, address: Address) -> bool:
        return not address.is_literal and address.domain_key in self._local_domains

    def is_trusted(self, client_address: str) -> bool:
        return self._trusted_answer(client_address)

    def _in_trusted(self, client_address: str) -> bool:
        try:
            ip = ipaddress.ip_address(client_address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._trusted)

    def check_sender(self, client: Client, sender: Address | None) -> Reply | None:
        """An authenticated user may only use envelope senders it owns (SPEC [relay.senders]).

        The null sender is always allowed: a downstream server relaying its own bounces
        through us authenticates and sends them with ``<>``.
        """
        if client.user is None or sender is None:
            return None
        if self.owns(client.user, sender):
            return None
        return reply.SENDER_NOT_OWNED

    def owns(self, user: str, sender: Address) -> bool:
        wanted = f"{sender.local}@{sender.domain_key}".lower()
        if user.lower() == wanted:
            return True
        allowed = self._senders.get(user, frozenset())
        # "@domain" entries allow every address of that domain (like Postfix's
        # smtpd_sender_login_maps with a domain key).
        return wanted in allowed or f"@{sender.domain_key}" in allowed

    def check_header_from(self, client: Client, header_section: bytes | None) -> Reply | None:
        """An authenticated user may only put addresses it owns in ``From:`` and ``Sender:``
        (SPEC ``[relay] check_header_from``), by the same rule as the envelope sender: the
        reader sees these, so owning the envelope alone would still let a user forge its boss.
        ``header_section`` None: the section was too long to keep, so it cannot be checked."""
        if not self._check_header_from or client.user is None:
            return None
        if header_section is None:
            return reply.HEADER_FROM_INVALID
        try:
            claimed = claimed_senders(header_section)
        except HeaderError:
            return reply.HEADER_FROM_INVALID
        for text in claimed:
            local, _, domain = text.rpartition("@")
            if not self.owns(client.user, Address(local, domain)):
                return reply.HEADER_FROM_NOT_OWNED
        return None

    def check_recipient(self, client: Client, recipient: Address) -> Reply | None:
        """The relay rule, in order: local domain; never relay on the MX listener;
        authenticated; trusted network; otherwise refuse."""
        if self.is_local(recipient):
            if self._local_recipients is not None:
                key = f"{recipient.local}@{recipient.domain_key}".lower()
                if key not in self._local_recipients:
                    return USER_UNKNOWN
            return None
        if client.role == SMTP_ROLE:
            return reply.RELAY_DENIED
        if client.user is not None:
            return None
        if self.is_trusted(client.address):
            return None
        return reply.RELAY_DENIED

    def describe(self, client: Client) -> str:
        """How the accept log names the sender: the user, or why it was let in."""
        if client.user is not None:
            return client.user
        if self.is_trusted(client.address):
            return "trusted-network"
        return "anonymous"
