"""The delivering half end to end: ``twistd -n smarthost`` as a subprocess, a real DNS server
(tests/dnsserver.py, as a subprocess) and aiosmtpd MX peers (tests/mxpeer.py), all on loopback.

The MX hosts of every test domain listen on one port P at different 127.0.0.x addresses, the
way real MX hosts all listen on 25; the daemon is told ``[delivery] port = P``. Three daemons
share the scenarios, one per configuration:

- ``fast``: retry every second, lifetime 3 s (delivery, bounces, DNS failures, expiry, 20 MiB);
- ``slow``: retry after an hour, so only ``queue flush`` explains a second attempt;
- ``upstream``: everything through an authenticated upstream relay (``"*"`` route).
"""

from __future__ import annotations

import base64
import email
import hashlib
import json
import random
import re
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from email import policy
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest

from daemon import Daemon, dns_server
from mxpeer import MXPeer, Received

ZONE = """\
remote.test       MX       10 mx1.remote.test
remote.test       MX       20 mx2.remote.test
mx1.remote.test   A        127.0.0.2
mx2.remote.test   A        127.0.0.3
reject.test       MX       10 mx.reject.test
mx.reject.test    A        127.0.0.3
tempfail.test     MX       10 mx.tempfail.test
mx.tempfail.test  A        127.0.0.4
down.test         MX       10 mx.down.test
mx.down.test      A        127.0.0.6
expire.test       MX       10 mx.expire.test
mx.expire.test    A        127.0.0.7
nullmx.test       MX       0 .
servfail.test     SERVFAIL
"""
# nxdomain.test is deliberately absent: NXDOMAIN. 127.0.0.2 (mx1.remote.test) and 127.0.0.7
# never have a server; 127.0.0.6 gets one when the kill -9 scenario lets its MX "recover".

UPSTREAM_USER = "office@example.test"
UPSTREAM_PASSWORD = "Upstream-S3cret-94711"

Entries = list[dict[str, Any]]


# -- the world: DNS, MX peers, daemons -------------------------------------------------------


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The zone above, served by tests/dnsserver.py in its own process; yields its port."""
    with dns_server(ZONE, tmp_path_factory.mktemp("dns")) as port:
        yield port


class Peers:
    def __init__(self) -> None:
        # mx2.remote.test and mx.reject.test: a friendly MX that knows no "nobody".
        self.good = MXPeer("127.0.0.3", name="mx2.remote.test",
                           reject={"nobody@reject.test", "nobody@remote.test"})
        self.good.start()
        self.port = self.good.port
        self.tempfail = MXPeer("127.0.0.4", self.port, name="mx.tempfail.test", tempfail_first=2)
        self.tempfail.start()
        self.later: list[MXPeer] = []

    def start(self, address: str, name: str) -> MXPeer:
        peer = MXPeer(address, self.port, name=name)
        peer.start()
        self.later.append(peer)
        return peer

    def stop(self) -> None:
        for peer in (self.good, self.tempfail, *self.later):
            peer.stop()


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    p = Peers()
    try:
        yield p
    finally:
        p.stop()


def delivery_config(dns: int, port: int, retry: int, lifetime: int, extra: str = "") -> str:
    return f"""
[relay]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.1/32"]
[queue]
retry = [{retry}]
lifetime = {lifetime}
delay_warning = 0
[delivery]
port = {port}
nameservers = ["127.0.0.1:{dns}"]
{extra}"""


def started(directory: Path, config: str) -> Daemon:
    d = Daemon(directory, config)
    d.start()
    return d


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory, dns: int, peers: Peers) -> Iterator[Daemon]:
    d = started(tmp_path_factory.mktemp("fast"), delivery_config(dns, peers.port, 1, 3))
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def slow(tmp_path_factory: pytest.TempPathFactory, dns: int, peers: Peers) -> Iterator[Daemon]:
    d = started(tmp_path_factory.mktemp("slow"), delivery_config(dns, peers.port, 3600, 86400))
    try:
        yield d
    finally:
        d.stop()


class Upstream:
    def __init__(self) -> None:
        self.ok = MXPeer("127.0.0.1", name="upstream.test", starttls=True,
                         users={UPSTREAM_USER: UPSTREAM_PASSWORD})
        self.wrong = MXPeer("127.0.0.1", name="wrong.upstream.test", starttls=True,
                            users={UPSTREAM_USER: "not-the-configured-password"})
        self.ok.start()
        self.wrong.start()

    def stop(self) -> None:
        self.ok.stop()
        self.wrong.stop()


@pytest.fixture(scope="module")
def upstream_peers() -> Iterator[Upstream]:
    u = Upstream()
    try:
        yield u
    finally:
        u.stop()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, dns: int, peers: Peers,
             upstream_peers: Upstream) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("upstream")
    (directory / "var").mkdir()
    secret = directory / "var/upstream.secret"
    secret.write_text(UPSTREAM_PASSWORD)
    secret.chmod(0o600)
    routes = f"""[delivery.routes]
"*" = "smtp:127.0.0.1:{upstream_peers.ok.port}"
"wrongpw.test" = "smtp:127.0.0.1:{upstream_peers.wrong.port}"
[delivery.upstream]
username = "{UPSTREAM_USER}"
password_file = "var/upstream.secret"
"""
    d = started(directory, delivery_config(dns, peers.port, 1, 86400, routes))
    try:
        yield d
    finally:
        d.stop()


# -- helpers ----------------------------------------------------------------------------------


def message(subject: str, body: bytes = b"Hello.\r\n") -> bytes:
    return (
        f"From: someone@example.test\r\nTo: someone@remote.test\r\nSubject: {subject}\r\n"
        f"Message-ID: <{hashlib.sha1(subject.encode()).hexdigest()}@example.test>\r\n\r\n"
    ).encode() + body


def submit(d: Daemon, sender: str, recipients: list[str], data: bytes) -> str:
    """Submit over plain SMTP from the trusted network; returns the queue id."""
    with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=60) as s:
        s.ehlo("client.test")
        code, _ = s.mail(sender)
        assert code == 250
        for rcpt in recipients:
            code, reply = s.rcpt(rcpt)
            assert code == 250, reply
        code, reply = s.data(data)
        assert code == 250, reply
    found = re.search(rb"queued as ([0-9A-F]+)", reply)
    assert found, reply
    return found.group(1).decode()


def admin(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    result = d.admin("queue", "--config", str(d.config_path), *args)
    assert result.returncode in (0, 1), result.stderr
    return result


def queue_json(d: Daemon) -> Entries:
    entries: Entries = json.loads(admin(d, "list", "--json").stdout)
    return entries


def entry(d: Daemon, queue_id: str) -> dict[str, Any] | None:
    return next((e for e in queue_json(d) if e["id"] == queue_id), None)


def until(d: Daemon, what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Ask the queue (each ``smarthost queue`` run takes a fraction of a second) until
    ``check()`` is truthy; fail with the daemon's log at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
    raise AssertionError(f"timed out waiting for {what}:\n{d.text()}")


def attempted(d: Daemon, queue_id: str, attempts: int) -> dict[str, Any]:
    """The queue entry once ``attempts`` attempts are recorded on disk."""

    def check() -> dict[str, Any] | None:
        e = entry(d, queue_id)
        return e if e is not None and e["attempts"] >= attempts else None

    found: dict[str, Any] = until(d, f"{queue_id} attempt {attempts}", check)
    return found


def gone(d: Daemon, queue_id: str) -> None:
    until(d, f"{queue_id} to leave the queue", lambda: entry(d, queue_id) is None)


def delivery_line(d: Daemon, queue_id: str, recipient: str, result: str,
                  count: int = 1) -> str:
    """The SPEC delivery log line: queue id, recipient, next hop, result, remote reply."""
    pattern = re.compile(
        rf"{queue_id}: to=<{re.escape(recipient)}> relay=(\S+) result={result} reply=(.*)"
    )
    return d.wait_for(pattern, timeout=20, count=count)


def wait_messages(peer: MXPeer, check: Callable[[Received], bool], count: int = 1,
                  timeout: float = 30.0) -> list[Received]:
    """The peer's messages matching ``check`` once ``count`` of them arrived."""
    with peer._cond:
        ok = peer._cond.wait_for(
            lambda: len([m for m in peer.messages if check(m)]) >= count, timeout
        )
        found = [m for m in peer.messages if check(m)]
    assert ok, f"{len(found)} of {count} messages arrived at {peer.name}"
    return found


def to(address: str) -> Callable[[Received], bool]:
    return lambda m: address in m.rcpt_tos


def bounces(d: Daemon, local: str, count: int) -> list[EmailMessage]:
    """The reports delivered to ``local``@example.test's maildir, once ``count`` arrived."""
    d.wait_for(
        re.compile(rf"to=<{re.escape(local)}@example\.test> relay=maildir result=delivered"),
        timeout=20, count=count,
    )
    new = d.directory / "var/maildir/example.test" / local / "new"
    files = sorted(new.iterdir())
    assert len(files) == count, files
    return [email.message_from_bytes(f.read_bytes(), policy=policy.default) for f in files]


def dsn_fields(report: EmailMessage) -> list[Message]:
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = list(report.iter_parts())
    assert [p.get_content_type() for p in parts][:2] == ["text/plain", "message/delivery-status"]
    fields: list[Message] = parts[1].get_payload()  # type: ignore[assignment]
    return fields


def returned(report: EmailMessage) -> bytes:
    part = list(report.iter_parts())[2]
    assert part.get_content_type() in ("message/rfc822", "text/rfc822-headers")
    if part.get_content_type() == "message/rfc822":
        payload: Any = part.get_payload()
        inner: Message = payload[0]
        return inner.as_bytes()
    return part.get_payload(decode=True)  # type: ignore[return-value]


# -- (a) MX order, one connection for a domain's recipients; (j) the log line ------------------


def test_swaks_delivery_to_the_second_mx_in_one_transaction(fast: Daemon, peers: Peers) -> None:
    out = subprocess.run(
        ["swaks", "--to", "bob@remote.test,carol@remote.test", "--from", "a@example.test",
         "--server", f"127.0.0.1:{fast.ports['submission']}", "--header", "Subject: swaks a"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stdout
    queue_id = re.search(r"queued as ([0-9A-F]+)", out.stdout)
    assert queue_id, out.stdout
    qid = queue_id.group(1)
    # mx1 (127.0.0.2, preference 10) refuses connections; mx2 took both recipients at once.
    [received] = wait_messages(peers.good, lambda m: b"Subject: swaks a" in m.data)
    assert received.rcpt_tos == ("bob@remote.test", "carol@remote.test")
    assert received.mail_from == "a@example.test"
    assert received.ehlo == "mx.smarthost.test"
    for rcpt in ("bob@remote.test", "carol@remote.test"):
        line = delivery_line(fast, qid, rcpt, "delivered")
        assert "relay=mx2.remote.test[127.0.0.3] result=delivered reply=250 2.0.0 OK" in line
    gone(fast, qid)


# -- (c) 550: one RFC 3464 bounce with the null sender -----------------------------------------


def test_550_bounces_once_to_the_sender(fast: Daemon, peers: Peers) -> None:
    original = message("doomed c")
    qid = submit(fast, "c-sender@example.test", ["nobody@reject.test"], original)
    line = delivery_line(fast, qid, "nobody@reject.test", "bounced")
    assert "relay=mx.reject.test[127.0.0.3]" in line and "reply=550 5.1.1" in line
    [report] = bounces(fast, "c-sender", 1)
    assert report["Return-Path"] == "<>"  # sent with the null sender
    assert report["To"] == "c-sender@example.test"
    assert report["Auto-Submitted"] == "auto-replied"
    per_message, per_rcpt = dsn_fields(report)
    assert per_message["Reporting-MTA"] == "dns; mx.smarthost.test"
    assert per_rcpt["Final-Recipient"] == "rfc822;nobody@reject.test"
    assert per_rcpt["Action"] == "failed"
    assert re.fullmatch(r"5\.\d+\.\d+", per_rcpt["Status"])
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user here"
    assert per_rcpt["Remote-MTA"] == "dns; mx.reject.test"
    back = returned(report)
    assert b"Subject: doomed c" in back and b"Message-ID: <" in back
    assert b"Hello." in back  # a failure report returns the whole (small) message
    gone(fast, qid)
    assert [m for m in peers.good.messages if "nobody@reject.test" in m.rcpt_tos] == []


def test_a_bounce_for_one_recipient_does_not_stop_the_other(fast: Daemon, peers: Peers) -> None:
    qid = submit(fast, "c2-sender@example.test", ["nobody@remote.test", "dave@remote.test"],
                 message("half c2"))
    delivery_line(fast, qid, "nobody@remote.test", "bounced")
    delivery_line(fast, qid, "dave@remote.test", "delivered")
    [received] = wait_messages(peers.good, to("dave@remote.test"))
    assert received.rcpt_tos == ("dave@remote.test",)
    [report] = bounces(fast, "c2-sender", 1)
    [_, per_rcpt] = dsn_fields(report)
    assert per_rcpt["Final-Recipient"] == "rfc822;nobody@remote.test"
    gone(fast, qid)


# -- (d) null MX and NXDOMAIN bounce at once; SERVFAIL defers ----------------------------------


def test_null_mx_and_nxdomain_bounce_immediately(fast: Daemon) -> None:
    qid = submit(fast, "d-sender@example.test", ["x@nullmx.test", "y@nxdomain.test"],
                 message("nowhere d"))
    null = delivery_line(fast, qid, "x@nullmx.test", "bounced")
    assert "relay=none" in null and "null MX" in null
    nx = delivery_line(fast, qid, "y@nxdomain.test", "bounced")
    assert "does not exist" in nx
    [report] = bounces(fast, "d-sender", 1)  # one report for both recipients
    statuses = {f["Final-Recipient"]: f["Status"] for f in dsn_fields(report)[1:]}
    assert statuses == {"rfc822;x@nullmx.test": "5.1.10", "rfc822;y@nxdomain.test": "5.1.2"}
    gone(fast, qid)


def test_servfail_defers_then_the_lifetime_bounces_once(fast: Daemon) -> None:
    qid = submit(fast, "e-sender@example.test", ["x@servfail.test"], message("servfail e"))
    line = delivery_line(fast, qid, "x@servfail.test", "deferred")
    assert "SERVFAIL" in line
    # The "fast" daemon's lifetime is 3 s: after a few retries it gives up with one bounce.
    [report] = bounces(fast, "e-sender", 1)
    [_, per_rcpt] = dsn_fields(report)
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "4.4.7"  # delivery time expired
    assert "SERVFAIL" in per_rcpt["Diagnostic-Code"]
    gone(fast, qid)
    assert len(re.findall(rf"{qid}: to=<x@servfail\.test> .*result=deferred", fast.text())) >= 2


# -- (e) lifetime expiry after connection failures --------------------------------------------


def test_lifetime_expiry_bounces_once(fast: Daemon) -> None:
    qid = submit(fast, "f-sender@example.test", ["x@expire.test"], message("expiring f"))
    deferred = delivery_line(fast, qid, "x@expire.test", "deferred")
    assert "relay=mx.expire.test[127.0.0.7]" in deferred and "refused" in deferred
    [report] = bounces(fast, "f-sender", 1)
    [_, per_rcpt] = dsn_fields(report)
    assert (per_rcpt["Action"], per_rcpt["Status"]) == ("failed", "4.4.7")
    assert per_rcpt["Remote-MTA"] == "dns; mx.expire.test"
    expired = delivery_line(fast, qid, "x@expire.test", "bounced")
    assert "lifetime expired" in expired
    gone(fast, qid)
    # Still exactly one report once the message is gone for good.
    assert len(list((fast.directory / "var/maildir/example.test/f-sender/new").iterdir())) == 1


# -- (h) 20 MiB, byte for byte ---------------------------------------------------------------


def test_20_mib_arrive_byte_identical(fast: Daemon, peers: Peers) -> None:
    text = base64.b64encode(random.Random(20).randbytes(15 * 1024 * 1024))
    lines = [text[i : i + 76] for i in range(0, len(text), 76)]
    # Lines that start with "." (and a lone ".") exercise dot-stuffing both ways.
    lines[::7] = [b"." + line for line in lines[::7]]
    lines[1000] = b"."
    body = message("big h", b"\r\n".join(lines) + b"\r\n")
    assert len(body) > 20 * 1024 * 1024
    qid = submit(fast, "h-sender@example.test", ["big@remote.test"], body)
    [received] = wait_messages(peers.good, to("big@remote.test"), timeout=60)
    assert received.data.endswith(body)
    trace = received.data[: -len(body)]
    assert trace.startswith(b"Received: from client.test ([127.0.0.1])")
    assert trace.count(b"\r\n") == trace.count(b"\r\n\t") + 1  # one header, folded
    assert hashlib.sha256(received.data[len(trace):]).digest() == hashlib.sha256(body).digest()
    delivery_line(fast, qid, "big@remote.test", "delivered")
    gone(fast, qid)


# -- (b) 451: deferred, listed, flushed, delivered -------------------------------------------


def test_tempfail_is_listed_and_flush_retries_now(slow: Daemon, peers: Peers) -> None:
    qid = submit(slow, "b-sender@example.test", ["ann@tempfail.test"], message("tempfail b"))
    line = delivery_line(slow, qid, "ann@tempfail.test", "deferred")
    assert "relay=mx.tempfail.test[127.0.0.4]" in line and "reply=451 4.3.0" in line
    first = attempted(slow, qid, 1)
    assert first["status"] == "deferred"
    assert first["last_error"] == "451 4.3.0 Try again later"
    [rcpt] = first["recipients"]
    assert rcpt == {
        "address": "ann@tempfail.test", "status": "pending", "attempts": 1,
        "last_reply": "451 4.3.0 Try again later", "remote": "mx.tempfail.test[127.0.0.4]",
    }
    assert first["next_attempt"] is not None
    text = admin(slow, "list").stdout
    [listed] = [x for x in text.splitlines() if x.startswith(qid)]
    assert "<b-sender@example.test>" in listed and "ann@tempfail.test" in listed
    assert "deferred attempts=1" in listed and "451 4.3.0 Try again later" in listed

    # Retry is an hour away: only a flush explains the next attempts.
    flushed = admin(slow, "flush")
    assert flushed.returncode == 0 and "flushed" in flushed.stdout
    assert attempted(slow, qid, 2)["status"] == "deferred"  # the MX tempfails twice
    assert peers.tempfail.messages == []
    assert admin(slow, "flush").returncode == 0
    [received] = wait_messages(peers.tempfail, to("ann@tempfail.test"))
    assert received.mail_from == "b-sender@example.test"
    delivery_line(slow, qid, "ann@tempfail.test", "delivered")
    gone(slow, qid)
    assert not (slow.directory / "var/maildir/example.test/b-sender").exists()  # no report


# -- (g) queue show / delete ------------------------------------------------------------------


def test_queue_show_and_delete(slow: Daemon) -> None:
    qid = submit(slow, "g-sender@example.test", ["x@servfail.test"], message("show me g"))
    attempted(slow, qid, 1)
    shown = admin(slow, "show", qid)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert f"id: {qid}" in out
    assert "sender: <g-sender@example.test>" in out
    assert "recipient: <x@servfail.test> pending attempts=1" in out and "SERVFAIL" in out
    assert "client: 127.0.0.1 (client.test)" in out
    assert "Subject: show me g" in out and out.count("Received: from client.test") == 1
    assert "Hello." not in out  # headers only

    # The daemon is running, so the admin tool asks it (control socket) to delete.
    deleted = admin(slow, "delete", qid)
    assert deleted.returncode == 0 and deleted.stdout.strip() == "deleted 1", deleted
    slow.wait_for(f"{qid}: removed (deleted by the operator)", timeout=10)
    assert entry(slow, qid) is None
    missing = slow.admin("queue", "--config", str(slow.config_path), "show", qid)
    assert missing.returncode == 2 and "no message" in missing.stderr
    # The daemon forgets it: a flush does not try it again.
    before = len(re.findall(rf"{qid}: to=", slow.text()))
    assert admin(slow, "flush").returncode == 0
    marker = submit(slow, "g-sender@example.test", ["y@servfail.test"], message("marker g"))
    delivery_line(slow, marker, "y@servfail.test", "deferred")
    assert len(re.findall(rf"{qid}: to=", slow.text())) == before
    assert admin(slow, "delete", marker).returncode == 0


# -- (f) kill -9 while deferred, restart, recovery --------------------------------------------


def test_kill_9_keeps_the_retry_state(slow: Daemon, peers: Peers) -> None:
    qid = submit(slow, "k-sender@example.test", ["kim@down.test"], message("survivor f"))
    before = attempted(slow, qid, 1)
    assert before["status"] == "deferred" and "refused" in before["last_error"]
    slow.kill9()
    log = slow.log
    slow.log = []  # Daemon.start waits for "ready": only the new process's lines count
    slow.start()
    after = entry(slow, qid)
    assert after is not None
    for key in ("attempts", "next_attempt", "last_error", "queued_at", "recipients"):
        assert after[key] == before[key], key
    slow.wait_for("scheduler started with")
    recovered = peers.start("127.0.0.6", "mx.down.test")
    assert admin(slow, "flush").returncode == 0
    [received] = wait_messages(recovered, to("kim@down.test"))
    assert b"Subject: survivor f" in received.data
    line = delivery_line(slow, qid, "kim@down.test", "delivered")
    assert "relay=mx.down.test[127.0.0.6]" in line
    gone(slow, qid)
    # The restarted daemon kept the hour's wait: the flush made its only attempt.
    assert len([x for x in slow.log if f"{qid}: to=" in x]) == 1
    slow.log = log + slow.log


# -- (i) upstream relay with STARTTLS + AUTH ----------------------------------------------------


def test_upstream_route_with_credentials(upstream: Daemon, upstream_peers: Upstream) -> None:
    qid = submit(upstream, "i-sender@example.test", ["bob@anywhere.test"], message("via i"))
    [received] = wait_messages(upstream_peers.ok, to("bob@anywhere.test"))
    assert received.tls and received.user == UPSTREAM_USER
    line = delivery_line(upstream, qid, "bob@anywhere.test", "delivered")
    assert "relay=127.0.0.1[127.0.0.1]" in line
    gone(upstream, qid)


def test_upstream_wrong_password_defers_and_never_leaks(upstream: Daemon,
                                                        upstream_peers: Upstream) -> None:
    qid = submit(upstream, "i2-sender@example.test", ["x@wrongpw.test"], message("denied i2"))
    line = delivery_line(upstream, qid, "x@wrongpw.test", "deferred", count=2)
    assert "refused authentication" in line and "535" in line
    state = attempted(upstream, qid, 2)
    assert state["status"] == "deferred" and state["recipients"][0]["status"] == "pending"
    assert upstream_peers.wrong.messages == []
    assert not (upstream.directory / "var/maildir/example.test/i2-sender").exists()
    assert "bounced" not in "".join(x for x in upstream.log if qid in x)
    # The password (and its AUTH encodings) never reach the log or the queue listing.
    token = base64.b64encode(f"\0{UPSTREAM_USER}\0{UPSTREAM_PASSWORD}".encode()).decode()
    secret_forms = (UPSTREAM_PASSWORD, token,
                    base64.b64encode(UPSTREAM_PASSWORD.encode()).decode())
    listing = admin(upstream, "list", "--json").stdout + admin(upstream, "show", qid).stdout
    for secret in secret_forms:
        assert secret not in upstream.text()
        assert secret not in listing
