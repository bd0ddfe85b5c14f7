"""The probe's relay tests and its logins (sessions 2 and 3 of :mod:`smarthost.app.
probecheck`).

Relay tests never send DATA: a recipient the server accepts is already the proof, and
whatever happens the transaction is reset (RSET) and the session ends with QUIT, so nothing
is ever queued for an outside address by the test itself.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from smarthost.app import probeauth
from smarthost.app.probecheck import (
    FAIL,
    PASS,
    WARN,
    Checklist,
    FirstSession,
    ProbeOptions,
    greeted,
    quit_politely,
    starttls,
)
from smarthost.app.probesmtp import ProbeError, SMTPDialog

# The open-relay test and the classic address tricks relay checkers have always tried: each
# names an outside mailbox in a way a sloppy server might route off-site. {host} is the
# probed server itself (by name, or as an address literal).
TRICKS = (
    ("open-relay", "<{local}@{domain}>"),
    ("relay-percent-hack", "<{local}%{domain}@{host}>"),
    ("relay-bang-path", "<{domain}!{local}@{host}>"),
    ("relay-bang-path-bare", "<{domain}!{local}>"),
    ("relay-source-route", "<@{host}:{local}@{domain}>"),
    ("relay-quoted-local-part", '<"{local}@{domain}">'),
    ("relay-quoted-at-host", '<"{local}@{domain}"@{host}>'),
)


def _host_part(host: str) -> str:
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return bare
    return f"[IPv6:{ip}]" if ip.version == 6 else f"[{ip}]"


async def relay_session(reactor: Any, address: str, options: ProbeOptions, checks: Checklist,
                        tls: bool) -> None:
    local, _, domain = options.recipient.rpartition("@")
    host = _host_part(options.host)
    # Over loopback the probe is a local client, which servers often trust to relay
    # (smarthost's default trusted_networks does): say so next to a failure.
    hint = (" (over loopback: a trusted network? probe from another machine to see what "
            "the Internet sees)" if ipaddress.ip_address(address).is_loopback else "")
    try:
        dialog, _ = await greeted(reactor, address, options, None)
    except ProbeError as e:
        checks.add("open-relay", FAIL, f"could not be tested: {e}")
        return
    check = "open-relay"
    try:
        if tls and not options.implicit_tls:
            await starttls(dialog, options)
        for check, template in TRICKS:
            recipient = template.format(local=local, domain=domain, host=host)
            await _relay_attempt(dialog, options, check, recipient, checks, hint)
        await quit_politely(dialog)
    except ProbeError as e:
        checks.add(check, FAIL, f"could not be tested: {e}")
    finally:
        dialog.close()


async def _relay_attempt(dialog: SMTPDialog, options: ProbeOptions, check: str,
                         recipient: str, checks: Checklist, hint: str) -> None:
    mail = await dialog.command(f"MAIL FROM:<{options.sender}>")
    if mail.code >= 400:
        checks.add(check, PASS, f"MAIL FROM:<{options.sender}> refused: {mail.first}")
    else:
        rcpt = await dialog.command(f"RCPT TO:{recipient}")
        if rcpt.code >= 400:
            checks.add(check, PASS, f"RCPT TO:{recipient} refused: {rcpt.first}")
        else:
            checks.add(check, FAIL,
                       f"RCPT TO:{recipient} accepted without AUTH: {rcpt.first}{hint}")
    await dialog.command("RSET")


async def credential_sessions(reactor: Any, address: str, options: ProbeOptions,
                              checks: Checklist, first: FirstSession) -> None:
    """AUTH with each mechanism offered after TLS; the sender check in the first login."""
    if not first.tls:
        checks.add("auth", FAIL, "not tried: no TLS, and the probe never sends a password "
                                 "in the clear")
        return
    if not first.mechanisms:
        checks.add("auth", FAIL if options.submission else WARN,
                   "AUTH is not offered after STARTTLS")
        return
    owned = False
    for mechanism in first.mechanisms:
        check = f"auth:{mechanism}"
        if mechanism not in probeauth.SUPPORTED:
            checks.add(check, WARN,
                       f"not tried: the probe speaks {', '.join(probeauth.SUPPORTED)}")
            continue
        owned = await _login(reactor, address, options, checks, mechanism, owned) or owned
    if not owned:
        checks.add("sender-ownership", WARN, "not tested: no login succeeded")


async def _login(reactor: Any, address: str, options: ProbeOptions, checks: Checklist,
                 mechanism: str, owned: bool) -> bool:
    """One session logging in with ``mechanism``; True when it tested sender ownership."""
    assert options.user is not None and options.password is not None
    check = f"auth:{mechanism}"
    try:
        dialog, _ = await greeted(reactor, address, options, None)
    except ProbeError as e:
        checks.add(check, FAIL, str(e))
        return False
    try:
        if not options.implicit_tls:
            await starttls(dialog, options)
        reply = await probeauth.authenticate(dialog, mechanism, options.user, options.password)
        if reply.code != 235:
            checks.add(check, FAIL, f"{options.user} not logged in: {reply.first}")
            return False
        checks.add(check, PASS, f"{reply.first} (as {options.user})")
        tested = False
        if not owned:
            check = "sender-ownership"
            await _sender_not_owned(dialog, options, checks)
            tested = True
        await quit_politely(dialog)
        return tested
    except ProbeError as e:
        checks.add(check, FAIL, str(e))
        return False
    finally:
        dialog.close()


async def _sender_not_owned(dialog: SMTPDialog, options: ProbeOptions, checks: Checklist
                            ) -> None:
    sender, user = options.sender, options.user
    mail = await dialog.command(f"MAIL FROM:<{sender}>")
    if mail.code >= 400:
        checks.add("sender-ownership", PASS,
                   f"MAIL FROM:<{sender}> as {user} refused: {mail.first}")
    else:
        rcpt = await dialog.command(f"RCPT TO:<{options.recipient}>")
        if rcpt.code >= 400:
            checks.add("sender-ownership", PASS,
                       f"<{sender}> as {user}: RCPT TO:<{options.recipient}> refused: "
                       f"{rcpt.first}")
        else:
            checks.add("sender-ownership", FAIL,
                       f"{user} may send as <{sender}>: {mail.first}; {rcpt.first}")
    await dialog.command("RSET")
