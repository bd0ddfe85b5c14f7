"""The issue's bug end to end: after the MX refused a connection, its mail stayed "temporarily
suspended" for a minute whatever ``[queue] retry`` said. Here ``twistd -n smarthost`` runs with
``retry = [1, 1, 2]``, the test DNS server (tests/dnsserver.py) points the domain at a loopback
port where nothing listens, and once the first attempt was refused an aiosmtpd MX
(tests/mxpeer.py) starts there: the configured schedule must win, so the message arrives
within a few seconds, and no attempt of it is deferred untried.
"""

from __future__ import annotations

import re
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import Daemon, dns_server
from mxpeer import MXPeer

MX_ADDRESS = "127.0.0.9"  # an address of its own, so no other test's server is in the way
ZONE = f"""\
down.test       MX   10 mx.down.test
mx.down.test    A    {MX_ADDRESS}
"""
MESSAGE = (
    b"From: sender@example.test\r\nTo: kim@down.test\r\nSubject: refused first\r\n\r\n"
    b"Hello.\r\n"
)


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The zone above, served by tests/dnsserver.py in its own process; yields its port."""
    with dns_server(ZONE, tmp_path_factory.mktemp("dns")) as port:
        yield port


def closed_port(address: str) -> int:
    """A port with nothing listening on ``address``: connections to it are refused."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def submit(d: Daemon, recipient: str) -> str:
    """Submit over plain SMTP from the trusted network; returns the queue id."""
    with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=30) as s:
        s.ehlo("client.test")
        assert s.mail("sender@example.test")[0] == 250
        assert s.rcpt(recipient)[0] == 250
        code, reply = s.data(MESSAGE)
        assert code == 250, reply
    found = re.search(rb"queued as ([0-9A-F]+)", reply)
    assert found, reply
    return found.group(1).decode()


def attempt_line(queue_id: str, result: str) -> re.Pattern[str]:
    return re.compile(rf"{queue_id}: to=<kim@down\.test> relay=(\S+) result={result} reply=(.*)")


def test_a_refused_mx_is_retried_on_the_configured_schedule(
    tmp_path: Path, dns: int
) -> None:
    port = closed_port(MX_ADDRESS)
    daemon = Daemon(tmp_path, f"""
[relay]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.1/32"]
[queue]
retry = [1, 1, 2]
lifetime = 600
delay_warning = 0
[delivery]
port = {port}
nameservers = ["127.0.0.1:{dns}"]
""")
    daemon.start()
    peer = MXPeer(MX_ADDRESS, port, name="mx.down.test")
    try:
        queue_id = submit(daemon, "kim@down.test")
        refused = daemon.wait_for(attempt_line(queue_id, "deferred"), timeout=20)
        assert "connection refused" in refused, refused
        peer.start()  # the MX is back
        back = time.monotonic()
        delivered = daemon.wait_for(attempt_line(queue_id, "delivered"), timeout=15)
        took = time.monotonic() - back
        assert f"relay=mx.down.test[{MX_ADDRESS}]" in delivered
        with peer._cond:
            assert peer._cond.wait_for(lambda: len(peer.messages) == 1, 10), "no message"
        assert peer.messages[0].rcpt_tos == ("kim@down.test",)
        # At most the longest interval of the schedule (2 s) after the MX came back, plus the
        # delivery itself; the old 60 s suspension would still be running.
        assert took < 8, f"delivered {took:.1f} s after the MX came back"
        attempts = [line for line in daemon.log if attempt_line(queue_id, r"\w+").search(line)]
        assert not [line for line in attempts if "temporarily suspended" in line], attempts
    finally:
        peer.stop()
        daemon.stop()
