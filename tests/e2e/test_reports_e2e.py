"""Hardening II, finding 5, end to end: a report that could not be built made the delivered
recipient get the message again at every retry, forever.

The sender is an SMTPUTF8 quoted local part holding U+2028 (LINE SEPARATOR) and U+0085 (NEXT
LINE), which the email package refuses in a header. One message goes to three recipients:
``ok@dest.test`` (an aiosmtpd MX, tests/mxpeer.py, accepts it), ``nobody@dest.test`` (the MX
answers 550: a bounce is due at once) and ``kim@broken.test`` (SERVFAIL from the test DNS
server: deferred at every retry until the lifetime, 4 s, expires and a second bounce is due).
``twistd -n smarthost`` retries every second. Before the fix the first bounce raised, the
attempt's outcomes were never saved, ``ok@dest.test`` received the message at every retry and
expiry never ended it. Now the MX gets it exactly once, both bounces reach the sender's maildir
and the message leaves the queue.
"""

from __future__ import annotations

import email
import re
import smtplib
from collections.abc import Iterator
from email import policy
from pathlib import Path

import pytest

from daemon import Daemon, dns_server
from mxpeer import MXPeer
from smarthost.delivery.maildir import mailbox_path

MX_ADDRESS = "127.0.0.12"  # an address of its own, so no other test's server is in the way
ZONE = f"""\
dest.test       MX   10 mx.dest.test
mx.dest.test    A    {MX_ADDRESS}
broken.test     SERVFAIL
"""
SENDER = '"line\u2028sep\u0085nel"@example.test'
DELIVERED, REJECTED, DEFERRED = "ok@dest.test", "nobody@dest.test", "kim@broken.test"
MESSAGE = (
    b"From: sender@example.test\r\nTo: ok@dest.test\r\nSubject: once only\r\n\r\nHello.\r\n"
)


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The zone above, served by tests/dnsserver.py in its own process; yields its port."""
    with dns_server(ZONE, tmp_path_factory.mktemp("dns")) as port:
        yield port


@pytest.fixture
def mx() -> Iterator[MXPeer]:
    peer = MXPeer(MX_ADDRESS, name="mx.dest.test", reject={REJECTED})
    peer.start()
    try:
        yield peer
    finally:
        peer.stop()


def submit(d: Daemon) -> str:
    """Submit over plain SMTP with SMTPUTF8 from the trusted network; returns the queue id."""
    with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=30) as s:
        s.ehlo("client.test")
        code, reply = s.mail(SENDER, ["SMTPUTF8"])
        assert code == 250, reply
        for rcpt in (DELIVERED, REJECTED, DEFERRED):
            assert s.rcpt(rcpt)[0] == 250
        code, reply = s.data(MESSAGE)
        assert code == 250, reply
    found = re.search(rb"queued as ([0-9A-F]+)", reply)
    assert found, reply
    return found.group(1).decode()


def test_a_sender_no_header_can_hold_gets_its_reports_and_nobody_gets_mail_twice(
    tmp_path: Path, dns: int, mx: MXPeer
) -> None:
    daemon = Daemon(tmp_path, f"""
[relay]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.1/32"]
[queue]
retry = [1]
lifetime = 4
delay_warning = 0
[delivery]
port = {mx.port}
nameservers = ["127.0.0.1:{dns}"]
local = "maildir:var/maildir"
""")
    daemon.start()
    try:
        queue_id = submit(daemon)
        # Several retry intervals of real attempts for the deferred recipient, then expiry.
        daemon.wait_for(re.compile(rf"{queue_id}: to=<{DEFERRED}> .*result=deferred"),
                        timeout=20, count=3)
        daemon.wait_for(f"{queue_id}: removed (done)", timeout=20)
        reports = re.findall(rf"{queue_id}: failure report to sender queued as ([0-9A-F]+)",
                             daemon.text())
        assert len(reports) == 2, daemon.text()  # the 550 at once, the expiry at the end
        for report_id in reports:
            daemon.wait_for(re.compile(rf"{report_id}: to=<.*relay=maildir result=delivered"),
                            timeout=10)
    finally:
        daemon.stop()
    with mx._cond:
        received = [m.rcpt_tos for m in mx.messages]
    assert received == [(DELIVERED,)], received
    assert len(re.findall(rf"{queue_id}: to=<{DELIVERED}> .*result=delivered",
                          daemon.text())) == 1
    assert "Header values may not contain" not in daemon.text()
    mailbox = mailbox_path(tmp_path / "var" / "maildir", SENDER) / "new"
    bounced = [email.message_from_bytes(path.read_bytes(), policy=policy.SMTPUTF8)
               for path in mailbox.iterdir()]
    assert len(bounced) == 2
    for report in bounced:
        assert report.get_content_type() == "multipart/report"
        assert "\u2028" not in str(report["To"]) and "\u0085" not in str(report["To"])
