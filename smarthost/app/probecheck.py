"""The checklist of ``smarthost probe`` (SPEC "Probing a server"), the admin's telnet test
done for them: each check is PASS, WARN or FAIL with its evidence, the reply that proved it.

The probe opens a few short sessions, each starting from a clean state so that one test's
errors cannot colour the next (a server counts errors per connection):

1. the first: banner, EHLO, what is offered before TLS (AUTH must not be, and AUTH PLAIN or
   LOGIN with made-up credentials must be refused), STARTTLS, the TLS version and the
   certificate (port 465: TLS from the first byte);
2. the relay tests, unauthenticated (after STARTTLS when there is one): MAIL FROM an outside
   sender, RCPT TO an outside recipient and the classic address tricks, each in its own
   transaction, never DATA (RSET after each, then QUIT);
3. with credentials, one session per mechanism offered after TLS (a password never goes out
   before TLS), and in the first that logs in, MAIL FROM a sender the user does not own.

The DNS checks come first: the host's address, its PTR naming the host again, DNSBLs.
This module has the checks up to the first session; :mod:`smarthost.app.proberelay` the
relay and credential sessions; :mod:`smarthost.app.probe` runs them in order.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from OpenSSL import crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)

from smarthost.app import probeauth, probedns
from smarthost.app.probesmtp import ProbeError, Reply, SMTPDialog, TLSFacts, connect, shown

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"
EXPIRY_WARNING_DAYS = 14
# Refusals of AUTH before TLS: RFC 3207 4 and RFC 4954 6 (530, 538) or "not offered" (5xx
# syntax and sequence replies). Anything else means the server took part in the exchange.
_AUTH_REFUSED = frozenset({500, 501, 502, 503, 504, 530, 538})


@attrs.frozen
class Result:
    check: str
    result: str
    detail: str


@attrs.frozen
class ProbeOptions:
    host: str
    port: int = 587
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    sender: str = "relay-probe@example.org"  # outside addresses (RFC 2606 names)
    recipient: str = "relay-probe@example.net"
    nameserver: str | None = None
    dnsbl: Sequence[str] = ()
    cafile: Path | None = None
    timeout: float = 15.0
    helo: str = attrs.field(factory=lambda: _local_name())
    # Port 465 speaks TLS from the first byte (RFC 8314); the tests say so for other ports.
    implicit_tls: bool = attrs.field(
        default=attrs.Factory(lambda self: self.port == 465, takes_self=True))

    @property
    def submission(self) -> bool:
        return self.port != 25


def _local_name() -> str:
    name = socket.getfqdn()
    return name if "." in name and not name.endswith(".") else "probe.invalid"


class Checklist:
    def __init__(self) -> None:
        self.results: list[Result] = []

    def add(self, check: str, result: str, detail: str) -> None:
        self.results.append(Result(check, result, detail))


@attrs.frozen
class FirstSession:
    """What the first session learnt."""

    tls: bool  # TLS was negotiated
    mechanisms: tuple[str, ...]  # AUTH offered after TLS


# -- DNS ------------------------------------------------------------------------------------


async def dns_checks(dns: probedns.Resolver, options: ProbeOptions, checks: Checklist
                     ) -> str | None:
    """The address to connect to, after the DNS checks; None when HOST has none."""
    host = options.host.strip("[]")
    literal = _is_ip(host)
    if literal:
        address = host
    else:
        found = await probedns.addresses(dns, host)
        if not found.values:
            why = "no such name" if found.nxdomain else (found.problem or "no A or AAAA record")
            checks.add("dns-address", FAIL, f"{host}: {why}")
            return None
        address = found.values[0]
        checks.add("dns-address", PASS, f"{host} has {', '.join(found.values)}")
    await _ptr(dns, host, address, literal, checks)
    for zone in options.dnsbl:
        await _dnsbl(dns, address, zone, checks)
    return address


async def _ptr(dns: probedns.Resolver, host: str, address: str, literal: bool,
               checks: Checklist) -> None:
    names = await probedns.pointer_names(dns, address)
    if not names.values:
        why = "no PTR record" if names.nxdomain or not names.problem else names.problem
        checks.add("dns-ptr", FAIL, f"{address}: {why}")
        return
    if literal:
        # HOST is an address: its PTR name must lead back to it.
        for name in names.values:
            if address in (await probedns.addresses(dns, name)).values:
                checks.add("dns-ptr", PASS, f"{address} is {name}, which has {address}")
                return
        checks.add("dns-ptr", FAIL,
                   f"{address} is {', '.join(names.values)}, which does not lead back to it")
        return
    if host.lower().rstrip(".") in names.values:
        checks.add("dns-ptr", PASS, f"{address} is {host}")
    else:
        checks.add("dns-ptr", FAIL, f"{address} is {', '.join(names.values)}, not {host}")


async def _dnsbl(dns: probedns.Resolver, address: str, zone: str, checks: Checklist) -> None:
    check = f"dnsbl:{zone}"
    found = await probedns.dnsbl(dns, address, zone)
    name = probedns.dnsbl_name(address, zone)
    if found.values:
        codes = ", ".join(found.values)
        if all(code.startswith("127.255.255.") for code in found.values):
            checks.add(check, WARN, f"{name}: {codes}: the list refused the query")
        else:
            checks.add(check, FAIL, f"{address} is listed: {name} has {codes}")
    elif found.problem:
        checks.add(check, WARN, f"{name}: no answer ({found.problem})")
    else:
        checks.add(check, PASS, f"{address} is not listed ({name}: no such name)")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# -- sessions -------------------------------------------------------------------------------


async def greeted(reactor: Any, address: str, options: ProbeOptions, checks: Checklist | None
                   ) -> tuple[SMTPDialog, Reply]:
    """Connect, read the banner, say EHLO; with ``checks``, each step is a check."""
    dialog = await connect(reactor, address, options.port, implicit_tls=options.implicit_tls,
                           server_name=options.host.strip("[]"), timeout=options.timeout)
    try:
        if checks is not None:
            how = "implicit TLS" if options.implicit_tls else "TCP"
            checks.add("connect", PASS, f"connected to {dialog.connected_to} ({how})")
        banner = await dialog.reply("greeting")
        if banner.code != 220:
            raise ProbeError(f"the greeting is not 220: {banner}")
        if checks is not None:
            checks.add("banner", PASS, banner.first)
        ehlo = await dialog.command(f"EHLO {options.helo}")
        if ehlo.code != 250:
            raise ProbeError(f"EHLO refused: {ehlo}")
    except ProbeError:
        dialog.close()
        raise
    return dialog, ehlo


def extensions(ehlo: Reply) -> dict[str, tuple[str, ...]]:
    found = {}
    for line in ehlo.lines[1:]:
        keyword, *params = line.replace("=", " ").split()
        found[keyword.upper()] = tuple(p.upper() for p in params)
    return found


async def starttls(dialog: SMTPDialog, options: ProbeOptions) -> Reply:
    """STARTTLS, then EHLO again (RFC 3207 4.2: the session starts over)."""
    reply = await dialog.command("STARTTLS")
    if reply.code != 220:
        raise ProbeError(f"STARTTLS refused: {reply}")
    await dialog.starttls(options.host.strip("[]"))
    ehlo = await dialog.command(f"EHLO {options.helo}")
    if ehlo.code != 250:
        raise ProbeError(f"EHLO after STARTTLS refused: {ehlo}")
    return ehlo


async def first_session(reactor: Any, address: str, options: ProbeOptions, checks: Checklist
                        ) -> FirstSession | None:
    """None when the server could not even be greeted (nothing more is tried then)."""
    try:
        dialog, ehlo = await greeted(reactor, address, options, checks)
    except ProbeError as e:
        done = {r.check for r in checks.results}
        step = "ehlo" if "banner" in done else ("banner" if "connect" in done else "connect")
        checks.add(step, FAIL, str(e))
        return None
    checks.add("ehlo", PASS, ehlo.first + f" ({len(ehlo.lines) - 1} extensions)")
    try:
        if options.implicit_tls:
            after = ehlo
        else:
            step = "auth-before-tls"
            await _before_tls(dialog, options, extensions(ehlo), checks)
            step = "starttls"
            if "STARTTLS" not in extensions(ehlo):
                checks.add("starttls", FAIL, f"not offered: {ehlo}")
                return FirstSession(False, ())
            after = await starttls(dialog, options)
            checks.add("starttls", PASS, "220 and a TLS handshake")
        step = "tls"
        _judge_tls(dialog.tls_facts(), options, checks)
        mechanisms = extensions(after).get("AUTH", ())
        if not options.submission and mechanisms:
            checks.add("auth-on-port-25", WARN,
                       f"AUTH {' '.join(mechanisms)} offered on port 25 (an MX port)")
        await quit_politely(dialog)
        return FirstSession(True, mechanisms)
    except ProbeError as e:
        checks.add(step, FAIL, str(e))
        return FirstSession(False, ())
    finally:
        dialog.close()


async def _before_tls(dialog: SMTPDialog, options: ProbeOptions,
                      extensions: dict[str, tuple[str, ...]], checks: Checklist) -> None:
    offered = extensions.get("AUTH")
    if offered is not None:
        checks.add("auth-offered-before-tls", FAIL,
                   f"EHLO before TLS offers AUTH {' '.join(offered)}")
    else:
        checks.add("auth-offered-before-tls", PASS, "EHLO before TLS offers no AUTH")
    # LOGIN first, cancelled at its first challenge: after a PLAIN that worked, a second
    # AUTH would only be refused as "already authenticated".
    login = await dialog.command("AUTH LOGIN")
    if login.code == 334:
        await dialog.command("*")  # RFC 4954 4: cancel the exchange
    _judge_auth_before_tls("auth-login-before-tls", "AUTH LOGIN", login, checks)
    # Made-up credentials: the real password never goes out before TLS.
    decoy_user, decoy_password = f"probe-{secrets.token_hex(4)}", secrets.token_urlsafe(12)
    plain = await probeauth.authenticate(dialog, "PLAIN", decoy_user, decoy_password)
    _judge_auth_before_tls("auth-plain-before-tls", "AUTH PLAIN", plain, checks)


def _judge_auth_before_tls(check: str, what: str, reply: Reply, checks: Checklist) -> None:
    if reply.code in _AUTH_REFUSED:
        checks.add(check, PASS, f"{what} before TLS refused: {reply.first}")
    elif reply.code == 235:
        checks.add(check, FAIL, f"{what} before TLS logged in a made-up user: {reply.first}")
    else:
        checks.add(check, FAIL,
                   f"{what} before TLS was taken up (a password would travel in the clear): "
                   f"{reply.first}")


def _judge_tls(facts: TLSFacts, options: ProbeOptions, checks: Checklist) -> None:
    modern = facts.version in ("TLSv1.2", "TLSv1.3")
    checks.add("tls-version", PASS if modern else FAIL, f"{facts.version}, {facts.cipher}")
    if not facts.chain:
        checks.add("certificate", FAIL, "the server sent no certificate")
        return
    leaf = facts.chain[0]
    host = options.host.strip("[]")
    problem = _untrusted(facts.chain, options.cafile) or _wrong_name(leaf, host)
    subject = leaf.subject.rfc4514_string()
    if problem:
        checks.add("certificate", FAIL, f"{subject}: {problem}")
    else:
        checks.add("certificate", PASS,
                   f"{subject}, issued by {leaf.issuer.rfc4514_string()}: valid for {host}")
    now = datetime.datetime.now(datetime.UTC)
    left = leaf.not_valid_after_utc - now
    until = f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if left.total_seconds() < 0:
        checks.add("certificate-expiry", FAIL, f"expired {until}")
    elif left.days < EXPIRY_WARNING_DAYS:
        checks.add("certificate-expiry", WARN, f"expires {until}, in {left.days} days")
    else:
        checks.add("certificate-expiry", PASS, f"valid until {until} ({left.days} days)")


def _untrusted(chain: Sequence[x509.Certificate], cafile: Path | None) -> str:
    store = crypto.X509Store()
    if cafile is not None:
        store.load_locations(str(cafile))
    else:
        # The system's CAs, as Python finds them (SSL_CERT_FILE and SSL_CERT_DIR honoured).
        paths = ssl.get_default_verify_paths()
        if paths.cafile or paths.capath:
            store.load_locations(paths.cafile, paths.capath)
    leaf, *rest = (crypto.X509.from_cryptography(c) for c in chain)
    try:
        crypto.X509StoreContext(store, leaf, rest).verify_certificate()
    except crypto.X509StoreContextError as e:
        return f"not trusted ({e})" + ("" if cafile else "; a private CA: give --cafile")
    return ""


def _wrong_name(leaf: x509.Certificate, host: str) -> str:
    try:
        if _is_ip(host):
            verify_certificate_ip_address(leaf, host)
        else:
            verify_certificate_hostname(leaf, host)
    except (VerificationError, CertificateError) as e:
        return f"not valid for {host} ({shown(str(e), 160)})"
    return ""


async def quit_politely(dialog: SMTPDialog) -> None:
    try:
        await dialog.command("QUIT")
    except ProbeError:
        pass  # a server that hangs up without a 221 has still said everything needed
