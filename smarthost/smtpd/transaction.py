"""Per-transaction state (MAIL ... DATA or BDAT LAST), and the envelope it becomes at the end
of the message."""

from __future__ import annotations

import attrs

from smarthost.core.envelope import Address, Envelope, Recipient


@attrs.define
class Transaction:
    """Cleared by RSET, EHLO and after each message."""

    sender: Address | None = None
    sender_given: bool = False
    smtputf8: bool = False
    body: str | None = None
    ret: str | None = None
    envid: str | None = None
    requiretls: bool = False  # RFC 8689, given on a TLS session
    recipients: list[Recipient] = attrs.Factory(list)

    def envelope(
        self, *, client_address: str, client_name: str, user: str | None, anonymous: bool,
        received_at: float,
    ) -> Envelope:
        return Envelope(
            sender=str(self.sender) if self.sender is not None else "",
            recipients=tuple(
                restrict_dsn(r) if anonymous else r for r in self.recipients
            ),
            client_address=client_address,
            client_name=client_name,
            user=user,
            # Anonymous senders are unverified: reports to them carry headers only.
            ret="HDRS" if anonymous else self.ret,
            envid=self.envid,
            body=self.body,
            smtputf8=self.smtputf8,
            requiretls=self.requiretls,
            received_at=received_at,
        )


def restrict_dsn(recipient: Recipient) -> Recipient:
    """DSN requests from clients we do not know (neither authenticated nor trusted) are
    limited to failure reports: success and delay reports to an unverified sender would let
    anyone make us send mail to any address (Postfix's DSN_README advises the same)."""
    if recipient.notify and "FAILURE" not in recipient.notify:
        return attrs.evolve(recipient, notify=("NEVER",))
    return attrs.evolve(recipient, notify=("FAILURE",))
