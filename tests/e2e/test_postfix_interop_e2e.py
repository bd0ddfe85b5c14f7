"""CHUNKING interoperability with the reference MTA (issue 14): a real ``twistd -n smarthost``
and a private Postfix (tests/postfixpeer.py), both on 127.0.0.1, relaying to each other.

- smarthost -> Postfix: an authenticated submission whose body has dot-led lines, lines that
  are only dots, 8-bit octets and more than one BDAT chunk of data goes out by BDAT (Postfix's
  smtpd debug log shows the commands it received) and lands in Postfix's Maildir unchanged.
- Postfix -> smarthost: Postfix relays to smarthost's ``smtp`` listener, which delivers to its
  local Maildir unchanged. Postfix's SMTP *client* has no BDAT at all (3.4's CHUNKING is
  server-side only: "The SMTP server is the only program that knows the difference between
  mail received with BDAT or DATA", Postfix HISTORY 20180825; the 3.7 ``smtp`` binary has no
  BDAT string), so this direction checks what can be checked with it: smarthost advertises
  CHUNKING to a real client on the smtp listener and that client's DATA still works.

Both Maildirs hold lines with LF endings (Postfix keeps lines without their CRLF; smarthost
writes LF too), so "unchanged" is: after the trace headers the receiving side prepends
(Return-Path, X-Original-To, Delivered-To, Received), every octet is the submitted one, with
LF for CRLF. The BDAT byte counts, which count CRLF, are checked against the CRLF form.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from daemon import Daemon, client_tls
from postfixpeer import DOMAIN, Dialog, PostfixPeer, free_port, postfix_peer, unavailable

pytestmark = [
    pytest.mark.skipif(unavailable() is not None, reason=unavailable() or ""),
    pytest.mark.timeout(60),
]

PASSWORD = "correct horse battery"
CONFIG = """
[relay]
local_domains = ["example.test"]
trusted_networks = []
[relay.senders]
"alice" = ["alice@example.test"]
[queue]
retry = [1]
[delivery]
nameservers = ["127.0.0.1:9"]   # never a real resolver: the only remote domain is routed
[delivery.routes]
"{domain}" = "smtp:127.0.0.1:{port}"
"""
TRACE = (b"return-path:", b"x-original-to:", b"delivered-to:", b"received:")


@attrs.frozen
class World:
    smarthost: Daemon
    postfix: PostfixPeer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One smarthost routing DOMAIN to one Postfix, whose relayhost is smarthost's smtp
    listener: Postfix's port is chosen first, so each can be configured with the other's."""
    port = free_port()
    d = Daemon(Path(tmp_path_factory.mktemp("postfix-interop")),
               CONFIG.format(domain=DOMAIN, port=port))
    d.add_user("alice", PASSWORD)
    try:
        d.start()
        with postfix_peer(relayhost=f"[127.0.0.1]:{d.ports['smtp']}", port=port,
                          mailboxes=("bob", "frank")) as pf:
            yield World(d, pf)
    finally:
        d.stop()


def tricky_message(sender: str, recipient: str, subject: str) -> bytes:
    """A message that DATA and BDAT each get wrong in their own way when done carelessly:
    dot-led lines and dot-only lines (dot-stuffing), 8-bit octets (8BITMIME), a 998-octet
    line, a last line that is only "." (what ends DATA), and over 200 KB (several chunks)."""
    head = (
        f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject}\r\n"
        f"Date: Sun, 06 Dec 2026 08:00:00 +0000\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.test>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode()
    tricky = [
        b".a line led by a dot",
        b"..x",
        b".",
        b"..",
        b"caf\xc3\xa9 \xe2\x82\xac and raw octets \x80\xfe\xff",
        b"From the start of a line (an mbox writer would quote it)",
        b"trailing blanks \t ",
        b"",
        b"." + b"y" * 997,  # 998 octets, the longest line RFC 5321 4.5.3.1.6 allows
    ]
    bulk = [(b"." if i % 7 == 0 else b"") + b"%05d " % i + b"x" * 64 for i in range(3000)]
    return head + b"".join(line + b"\r\n" for line in [*tricky, *bulk, *tricky, b"."])


def split_trace(delivered: bytes) -> tuple[list[bytes], bytes]:
    """The trace header fields the receiving side prepended (each with its folded lines), and
    the rest of the Maildir file."""
    fields: list[bytes] = []
    rest = delivered
    while True:
        continued = fields and rest[:1] in (b" ", b"\t")
        if not (continued or rest.lower().startswith(TRACE)):
            return fields, rest
        line, _, rest = rest.partition(b"\n")
        if continued:
            fields[-1] += line + b"\n"
        else:
            fields.append(line + b"\n")


def lf(message: bytes) -> bytes:
    return message.replace(b"\r\n", b"\n")


def submit(world: World, sender: str, recipient: str, message: bytes) -> None:
    """As alice, over STARTTLS on the submission port, by DATA: a real authenticated relay."""
    with smtplib.SMTP("127.0.0.1", world.smarthost.ports["submission"], timeout=30) as s:
        s.starttls(context=client_tls())
        s.login("alice", PASSWORD)
        s.sendmail(sender, [recipient], message, mail_options=["BODY=8BITMIME"])


def submit_bdat(world: World, sender: str, recipient: str, chunks: list[bytes]) -> None:
    """As :func:`submit`, but by BDAT, one chunk at a time (smtplib knows no BDAT: its
    socket carries our commands and chunks, and it reads the replies)."""
    with smtplib.SMTP("127.0.0.1", world.smarthost.ports["submission"], timeout=30) as s:
        s.starttls(context=client_tls())
        s.login("alice", PASSWORD)
        assert s.has_extn("chunking"), s.esmtp_features
        assert s.mail(sender, ["BODY=8BITMIME"])[0] == 250
        assert s.rcpt(recipient)[0] == 250
        for i, chunk in enumerate(chunks):
            last = " LAST" if i == len(chunks) - 1 else ""
            s.send(f"BDAT {len(chunk)}{last}\r\n".encode() + chunk)
            code, reply = s.getreply()
            assert code == 250, reply


def assert_bdat_to_postfix(world: World, local: str, sent: bytes) -> None:
    """``sent`` went from smarthost to Postfix by BDAT, in more than one chunk, and arrived
    in ``local``'s Maildir byte for byte."""
    recipient = f"{local}@{DOMAIN}"
    delivered = world.postfix.wait_message(local)
    world.smarthost.wait_for(re.compile(
        rf"to=<{re.escape(recipient)}> relay=\S+ result=delivered"), timeout=30)

    trace, rest = split_trace(delivered)
    assert rest == lf(sent)
    # Postfix's own Received comes first, then smarthost's (the first hop), then nothing else.
    names = [f.split(b":", 1)[0].lower() for f in trace]
    assert names == [b"return-path", b"x-original-to", b"delivered-to", b"received",
                     b"received"]
    assert b"by mx.smarthost.test" in trace[-1]

    dialog = world.postfix.session("smtpd", recipient).transaction(recipient)
    assert "DATA" not in dialog.verbs(), dialog.client
    [mail] = [line for line in dialog.client if line.upper().startswith("MAIL FROM:")]
    assert "BODY=8BITMIME" in mail.upper()
    chunks = dialog.bdat_sizes()
    assert len(chunks) > 1, dialog.client  # 200 KB is more than one chunk
    assert [last for _, last in chunks] == [False] * (len(chunks) - 1) + [True]
    # BDAT counts octets on the wire, CRLF included: exactly smarthost's Received field and
    # the submitted message, so nothing was dot-stuffed, unstuffed or re-encoded on the way.
    wire = trace[-1].replace(b"\n", b"\r\n") + sent
    total = sum(size for size, _ in chunks)
    assert total == len(wire)
    assert any(re.match(rf"250 2\.0\.0 Ok: {total} bytes queued as ", line)
               for line in dialog.server), dialog.server


def test_smarthost_relays_to_postfix_by_bdat_byte_identical(world: World) -> None:
    sent = tricky_message("Alice <alice@example.test>", f"bob@{DOMAIN}", "to postfix")
    submit(world, "alice@example.test", f"bob@{DOMAIN}", sent)
    assert_bdat_to_postfix(world, "bob", sent)


def test_bdat_in_bdat_out_cut_at_awkward_places(world: World) -> None:
    """Received by BDAT (chunks cut inside CRLF, inside CRLF.CRLF, before a dot-led line, and
    an empty LAST), sent on by BDAT: Postfix gets exactly what the client sent."""
    sent = tricky_message("Alice <alice@example.test>", f"frank@{DOMAIN}", "bdat both ways")
    dot_line = sent.index(b"\r\n.\r\n")
    cuts = sorted({sent.index(b"\r\n") + 1, dot_line + 1, dot_line + 3,
                   sent.index(b"\r\n..x") + 2, len(sent) // 2, len(sent)})
    chunks = [sent[a:b] for a, b in zip([0, *cuts], [*cuts, len(sent)], strict=True)]
    assert b"".join(chunks) == sent and chunks[-1] == b""
    submit_bdat(world, "alice@example.test", f"frank@{DOMAIN}", chunks)
    assert_bdat_to_postfix(world, "frank", sent)


def relay_through_postfix(world: World, local: str) -> tuple[Dialog, bytes, bytes]:
    """A message injected into Postfix for ``local``@example.test, relayed by Postfix to
    smarthost's smtp listener and delivered to its Maildir: (Postfix's client session, the
    message as sent, the Maildir file)."""
    recipient = f"{local}@example.test"
    sent = tricky_message(f"dave@{DOMAIN}", recipient, f"from postfix to {local}")
    with smtplib.SMTP("127.0.0.1", world.postfix.port, timeout=30) as s:
        s.sendmail(f"dave@{DOMAIN}", [recipient], sent, mail_options=["BODY=8BITMIME"])
    world.postfix.wait_log(rf"to=<{re.escape(recipient)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]"
                           rf":{world.smarthost.ports['smtp']}, .* status=sent ")
    world.smarthost.wait_for(re.compile(
        rf"to=<{re.escape(recipient)}> relay=maildir result=delivered"), timeout=30)
    [file] = (world.smarthost.directory / "var/maildir/example.test" / local / "new").iterdir()
    return world.postfix.session("smtp", recipient), sent, file.read_bytes()


def test_postfix_relays_to_smarthost_byte_identical(world: World) -> None:
    session, sent, delivered = relay_through_postfix(world, "carol")
    dialog = session.transaction("carol@example.test")
    trace, rest = split_trace(delivered)
    assert rest == lf(sent)
    names = [f.split(b":", 1)[0].lower() for f in trace]
    assert names == [b"return-path", b"delivered-to", b"received", b"received"]
    assert b"by mx.smarthost.test" in trace[2] and b"by mx.postfix.test" in trace[3]
    [mail] = [line for line in dialog.client if line.upper().startswith("MAIL FROM:")]
    assert "BODY=8BITMIME" in mail.upper()  # smarthost offered 8BITMIME: nothing converted
    # Postfix's client knows no BDAT: whatever smarthost offers, the message went by DATA.
    assert "DATA" in dialog.verbs() and "BDAT" not in dialog.verbs(), dialog.client


def test_smarthost_offers_chunking_to_postfix_on_the_smtp_listener(world: World) -> None:
    """SPEC: BDAT is accepted on every listener and advertised in EHLO. A client that does
    not use it (Postfix's) must be unaffected by the offer."""
    session, sent, delivered = relay_through_postfix(world, "erin")
    ehlo = [line[4:].upper() for line in session.server if line.startswith("250")]
    assert "CHUNKING" in ehlo, session.server
    assert split_trace(delivered)[1] == lf(sent)
    assert "DATA" in session.transaction("erin@example.test").verbs(), session.client
