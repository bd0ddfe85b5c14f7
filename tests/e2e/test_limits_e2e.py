"""Abuse limits over real sockets against a real daemon (the counters themselves are unit
tested in tests/unit/test_limits.py)."""

from __future__ import annotations

import smtplib
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import Daemon, client_tls

CONFIG = """
[relay]
local_domains = ["example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
[limits]
connections_per_ip = 3
auth_failures_per_ip = 3
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, CONFIG)
    d.add_user("alice@example.test", "right password")
    d.start()
    yield d
    d.stop()


def banner(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))


def test_connections_per_ip_get_421_beyond_the_limit(daemon: Daemon) -> None:
    port = daemon.ports["smtp"]
    held = [connect(port) for _ in range(3)]
    try:
        assert all(banner(s).startswith(b"220") for s in held)
        extra = connect(port)
        assert banner(extra).startswith(b"421 4.7.0")
        assert extra.recv(1024) == b""  # and closed
        # Another address is not affected.
        other = connect(port, "127.0.0.2")
        assert banner(other).startswith(b"220")
        other.close()
    finally:
        for s in held:
            s.close()


def login(port: int, source: str, password: str) -> int:
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=client_tls(),
                          source_address=(source, 0)) as s:
        s.ehlo()
        s.user, s.password = "alice@example.test", password
        # One mechanism per call: login() would fall back from PLAIN to LOGIN (two failures).
        try:
            code, _ = s.auth("PLAIN", s.auth_plain)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code
        return code


def test_brute_force_from_one_address_never_locks_out_another(daemon: Daemon) -> None:
    port = daemon.ports["submissions"]
    codes = [login(port, "127.0.0.3", "guess") for _ in range(3)]
    assert codes == [535, 535, 535]
    # The attacker's address is now refused even with the right password...
    assert login(port, "127.0.0.3", "right password") == 454
    # ...while the real user elsewhere logs in.
    assert login(port, "127.0.0.1", "right password") == 235
    daemon.wait_for("AUTH failed from 127.0.0.3 user=alice@example.test", count=3)


def test_compromised_account_brake_holds_then_release_delivers(tmp_path: Path) -> None:
    d = Daemon(tmp_path, CONFIG + "hold_user_after_per_hour = 1\n")
    d.add_user("alice@example.test", "right password")
    d.start()
    try:
        with smtplib.SMTP_SSL("127.0.0.1", d.ports["submissions"], timeout=30,
                              context=client_tls()) as s:
            s.login("alice@example.test", "right password")
            for n in range(2):
                s.sendmail("alice@example.test", ["postmaster@example.test"],
                           b"Subject: %d\r\n\r\nbody\r\n" % n)
        d.wait_for("relay=maildir result=delivered")
        d.wait_for("HELD: user alice@example.test")
        listing = d.admin("queue", "--config", str(d.config_path), "list")
        assert " held " in listing.stdout, listing.stdout
        released = d.admin("queue", "--config", str(d.config_path), "release", "--user",
                           "alice@example.test")
        assert released.returncode == 0 and "released 1" in released.stdout, released
        d.wait_for("relay=maildir result=delivered", count=2)
    finally:
        d.stop()
