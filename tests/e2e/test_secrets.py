"""Secrets never reach a log line, an event, the queue, the spool, ``repr`` or exception text.

One daemon: users log in with a known password (right and wrong, PLAIN and LOGIN, some
malformed), submit mail, and the mail goes to an upstream route whose password file holds a
known secret; the upstream (an aiosmtpd MX with STARTTLS and AUTH) refuses that password, so
delivery defers and the failure is recorded everywhere an operator looks. Then every one of
those places is searched for the secrets, in clear and in base64.
"""

from __future__ import annotations

import base64
import json
import os
import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from twisted.cred.credentials import UsernamePassword

from daemon import Daemon
from mxpeer import MXPeer
from smarthost.app.config import load_config
from smarthost.auth import sasl
from smarthost.auth.users import UserEntry
from smarthost.delivery.routing import SMTP, Credentials, Host, Route

USER_SECRET = "Corr3ct-H0rse-7f3a9"
WRONG_SECRET = "Wr0ng-Batt3ry-c41e2"
UPSTREAM_SECRET = "Upstr3am-St4ple-88d1"
SECRETS = (USER_SECRET, WRONG_SECRET, UPSTREAM_SECRET)
UPSTREAM_USER = "office@example.test"

MESSAGE = b"From: alice@example.test\r\nSubject: secrets test\r\n\r\nHello.\r\n"


def forms(secret: str) -> list[bytes]:
    """How a secret could show up: as text, and inside the base64 that AUTH sends."""
    raw = secret.encode()
    out = [raw, base64.b64encode(raw)]
    for user in (b"alice", UPSTREAM_USER.encode(), b""):
        out.append(base64.b64encode(b"\0" + user + b"\0" + raw))
    return out


def assert_no_secret(where: str, data: bytes | str) -> None:
    blob = data.encode("utf-8", "replace") if isinstance(data, str) else data
    for secret in SECRETS:
        for form in forms(secret):
            assert form not in blob, f"{where} contains a secret ({form!r})"


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@attrs.define
class World:
    daemon: Daemon
    upstream: MXPeer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("secrets")
    # The upstream knows another password for us: every delivery attempt is refused (535).
    upstream = MXPeer("127.0.0.1", name="upstream.test", starttls=True,
                      users={UPSTREAM_USER: "not-" + UPSTREAM_SECRET[::-1]})
    upstream.start()
    (tmp / "var").mkdir()
    (tmp / "var/upstream.secret").write_text(UPSTREAM_SECRET + "\n")
    daemon = Daemon(tmp, f"""
[auth]
mechanisms = ["PLAIN", "LOGIN"]
[relay]
local_domains = ["example.test"]
trusted_networks = []
[relay.senders]
"alice" = ["alice@example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
[delivery.routes]
"*" = "smtp:127.0.0.1:{upstream.port}"
[delivery.upstream]
username = "{UPSTREAM_USER}"
password_file = "var/upstream.secret"
[log]
events = "var/log/events.jsonl"
""")
    daemon.add_user("alice", USER_SECRET)
    # Readable by everyone: the daemon must warn at start-up.
    os.chmod(tmp / "var/users", 0o644)
    try:
        daemon.start()
        yield World(daemon, upstream)
    finally:
        daemon.stop()
        upstream.stop()


def test_world_readable_users_file_is_warned_about(world: World) -> None:
    line = world.daemon.wait_for("readable by other users")
    assert "var/users" in line


def raw_auth(port: int, *lines: bytes) -> list[int]:
    """Send AUTH lines on submissions (implicit TLS) and collect each reply code."""
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=tls_context()) as s:
        s.ehlo()
        codes = []
        for line in lines:
            s.send(line + b"\r\n")
            codes.append(s.getreply()[0])
            if codes[-1] == 421:
                break
        return codes


def test_no_secret_in_logs_events_queue_or_spool(world: World) -> None:
    daemon = world.daemon
    port = daemon.ports["submissions"]
    b64 = base64.b64encode
    # Wrong passwords and malformed exchanges, each on its own connection (the per-connection
    # failure limit would close it): PLAIN, LOGIN, a password alone, a password as the name.
    # The well-formed ones first: the throttle's delay grows with each failure, and only they
    # wait for it.
    assert raw_auth(port, b"AUTH PLAIN " + b64(b"\0alice\0" + WRONG_SECRET.encode())) == [535]
    assert raw_auth(port, b"AUTH LOGIN", b64(b"alice"), b64(WRONG_SECRET.encode())) == [
        334, 334, 535]
    assert raw_auth(port, b"AUTH PLAIN " + b64(WRONG_SECRET.encode()))[0] == 501
    assert raw_auth(port, b"AUTH PLAIN " + b64(b"alice\0" + WRONG_SECRET.encode()))[0] == 501
    assert raw_auth(port, b"AUTH PLAIN " + b64(b"\xff\0alice\0" + WRONG_SECRET.encode()))[0] \
        in (501, 535)
    assert raw_auth(port, b"AUTH LOGIN " + b64(b"alice"), b64(WRONG_SECRET.encode() + b"\xff"))[
        -1] in (501, 535)
    daemon.wait_for("AUTH failed from 127.0.0.1 user=alice", count=2)

    # The right password, on both submission listeners; the mail goes upstream and locally.
    with smtplib.SMTP_SSL("127.0.0.1", port, timeout=30, context=tls_context()) as s:
        s.login("alice", USER_SECRET)
        s.sendmail("alice@example.test", ["bob@remote.test", "carol@example.test"], MESSAGE)
    with smtplib.SMTP("127.0.0.1", daemon.ports["submission"], timeout=30) as s:
        s.starttls(context=tls_context())
        s.ehlo()
        s.esmtp_features["auth"] = "LOGIN"  # smtplib prefers CRAM-MD5/PLAIN: force LOGIN
        s.login("alice", USER_SECRET)
        s.sendmail("alice@example.test", ["dave@remote.test"], MESSAGE)
    daemon.wait_for("AUTH ok from 127.0.0.1 user=alice", count=2)
    # Both upstream deliveries were tried with the upstream secret, refused and deferred.
    daemon.wait_for("result=deferred", count=2)
    daemon.wait_for("to=<carol@example.test> relay=maildir result=delivered")
    assert world.upstream.connections >= 1 and world.upstream.messages == []

    # Every place an operator (or an attacker with read access to them) could look.
    places: dict[str, bytes | str] = {"daemon log": daemon.text()}
    places["events"] = (daemon.directory / "var/log/events.jsonl").read_bytes()
    listing = daemon.admin("queue", "--config", str(daemon.config_path), "list", "--json")
    assert listing.returncode == 0, listing.stderr
    entries = json.loads(listing.stdout)
    assert len(entries) == 2 and all(e["last_error"] or e["recipients"][0]["last_reply"]
                                     for e in entries), entries
    places["queue list --json"] = listing.stdout
    plain = daemon.admin("queue", "--config", str(daemon.config_path), "list")
    places["queue list"] = plain.stdout + plain.stderr
    for entry in entries:
        shown = daemon.admin("queue", "--config", str(daemon.config_path), "show", entry["id"])
        places[f"queue show {entry['id']}"] = shown.stdout + shown.stderr
    spool = daemon.directory / "var/spool"
    for path in sorted(spool.rglob("*")):
        if path.is_file():
            places[str(path.relative_to(daemon.directory))] = path.read_bytes()
    maildir = daemon.directory / "var/maildir"
    for path in sorted(maildir.rglob("*")):
        if path.is_file():
            places[str(path.relative_to(daemon.directory))] = path.read_bytes()
    check = daemon.admin("check-config", "--config", str(daemon.config_path))
    places["check-config"] = check.stdout + check.stderr
    assert any("spool/log/" in name for name in places), sorted(places)
    for where, data in places.items():
        assert_no_secret(where, data)

    # And after a clean shutdown, the whole log once more (shutdown messages included).
    daemon.stop()
    assert_no_secret("daemon log after stop", daemon.text())
    assert "refused authentication" in daemon.text() or "535" in daemon.text()


def test_repr_of_credentials_config_and_routes(tmp_path: Path) -> None:
    upstream = Credentials(UPSTREAM_USER, UPSTREAM_SECRET)
    route = Route(SMTP, hosts=(Host("up.test", "127.0.0.1", 587),), credentials=upstream)
    up = UsernamePassword(b"alice", USER_SECRET.encode())
    step = sasl.PlainMechanism().new().step(b"\0alice\0" + USER_SECRET.encode())
    assert isinstance(step, sasl.Credentials)
    exchange = sasl.LoginMechanism().new()
    exchange.step(None)
    exchange.step(b"alice")
    login_step = exchange.step(USER_SECRET.encode())
    entry = UserEntry("alice", b"$2b$04$" + b"x" * 53)
    (tmp_path / "var").mkdir()
    (tmp_path / "var/upstream.secret").write_text(UPSTREAM_SECRET)
    config_path = tmp_path / "smarthost.toml"
    config_path.write_text(
        '[delivery.upstream]\nusername = "office@example.test"\n'
        'password_file = "var/upstream.secret"\n'
    )
    config = load_config(config_path)
    for value in (upstream, route, sasl.Credentials(up, "alice"), step, login_step, config,
                  config.delivery, config.delivery.upstream, entry):
        assert_no_secret(f"repr of {type(value).__name__}", repr(value))
        assert_no_secret(f"str of {type(value).__name__}", str(value))
    assert "$2b$" not in repr(entry)
