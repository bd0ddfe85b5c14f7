"""The accepting half end to end: ``twistd -n smarthost`` as a subprocess on loopback, real
TLS, real clients (swaks, msmtp, smtplib), kill -9 after 250, HAProxy's PROXY protocol."""

from __future__ import annotations

import json
import os
import smtplib
import socket
import ssl
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import task

from daemon import SMARTHOST, TWISTD, Daemon, client_tls
from fakes import run_now
from smarthost.core.envelope import QueueId
from smarthost.queue.spool import Spool

# Delivery must never reach a real resolver or MX: the only nameserver is a closed loopback port.
CONFIG = """
[relay]
local_domains = ["example.test"]
trusted_networks = ["192.0.2.99/32"]
[relay.senders]
"alice" = ["alice@example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
"""

MESSAGE = b"From: alice@example.test\r\nTo: bob@elsewhere.test\r\nSubject: e2e\r\n\r\nHello.\r\n"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, CONFIG)
    d.add_user("alice", "correct horse")
    d.start()
    yield d
    d.stop()


def queued(d: Daemon) -> list[dict[str, object]]:
    result = d.admin("queue", "--config", str(d.config_path), "list", "--json")
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, object]] = json.loads(result.stdout)
    return entries


def spooled_body(spool: Path, queue_id: object) -> bytes:
    """A message's bytes as the spool holds them, read as the admin tool reads a live spool."""
    reader = Spool(spool, clock=task.Clock(), run_blocking=run_now)
    with reader.open_body(QueueId(str(queue_id))) as f:
        return f.read()


def test_swaks_starttls_auth_login_is_queued(daemon: Daemon) -> None:
    result = subprocess.run(
        ["swaks", "--to", "bob@elsewhere.test", "--from", "alice@example.test",
         "--server", f"127.0.0.1:{daemon.ports['submission']}", "--tls",
         "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", "correct horse"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout
    assert "250 2.0.0 Ok: queued as" in result.stdout
    [entry] = queued(daemon)
    assert entry["sender"] == "alice@example.test"
    assert entry["user"] == "alice"
    line = daemon.wait_for(f"{entry['id']}: accepted from 127.0.0.1 as alice")
    assert "recipients=1" in line
    # The body is on disk with our trace header: TLS, authenticated (RFC 3848 ESMTPSA).
    body = spooled_body(daemon.directory / "var/spool", entry["id"])
    assert b"with ESMTPSA id" in body and b"using TLSv1." in body


def test_swaks_without_auth_is_refused_at_rcpt(daemon: Daemon) -> None:
    result = subprocess.run(
        ["swaks", "--to", "bob@elsewhere.test", "--from", "x@remote.test",
         "--server", f"127.0.0.1:{daemon.ports['submission']}", "--tls"],
        capture_output=True, text=True, timeout=60,
    )
    assert "554 5.7.1" in result.stdout
    assert queued(daemon) == []


def test_msmtp_submissions_implicit_tls_auth_plain(daemon: Daemon, tmp_path: Path) -> None:
    rc = tmp_path / "msmtprc"
    rc.write_text(
        f"account default\nhost 127.0.0.1\nport {daemon.ports['submissions']}\n"
        "tls on\ntls_starttls off\ntls_certcheck off\nauth plain\nuser alice\n"
        "password correct horse\nfrom alice@example.test\n"
    )
    rc.chmod(0o600)
    result = subprocess.run(
        ["msmtp", "-C", str(rc), "bob@elsewhere.test"], input=MESSAGE,
        capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [entry] = queued(daemon)
    assert entry["user"] == "alice"


def test_smtplib_local_domain_from_anyone_on_every_listener(daemon: Daemon) -> None:
    for role in ("submission", "smtp"):
        with smtplib.SMTP("127.0.0.1", daemon.ports[role], timeout=30) as s:
            s.sendmail("someone@remote.test", ["postmaster@example.test"], MESSAGE)
    with smtplib.SMTP_SSL("127.0.0.1", daemon.ports["submissions"], timeout=30,
                          context=client_tls()) as s:
        s.sendmail("someone@remote.test", ["postmaster@example.test"], MESSAGE)
    # Local domains go to the maildir at once.
    daemon.wait_for("to=<postmaster@example.test> relay=maildir result=delivered", count=3)
    mailbox = daemon.directory / "var/maildir/example.test/postmaster/new"
    assert len(list(mailbox.iterdir())) == 3


def test_smtp_listener_never_relays_even_authenticated_style(daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.ports["smtp"], timeout=30) as s:
        s.ehlo()
        assert not s.has_extn("auth")
        s.starttls(context=client_tls())
        s.ehlo()
        assert not s.has_extn("auth")
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            s.sendmail("x@remote.test", ["bob@elsewhere.test"], MESSAGE)
        assert refused.value.recipients["bob@elsewhere.test"][0] == 554


def test_auth_not_offered_before_starttls(daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.ports["submission"], timeout=30) as s:
        s.ehlo()
        assert s.has_extn("starttls") and not s.has_extn("auth")
        code, _ = s.docmd("AUTH", "PLAIN AGFsaWNlAGNvcnJlY3QgaG9yc2U=")
        assert code == 538
        s.starttls(context=client_tls())
        s.ehlo()
        assert s.has_extn("auth") and not s.has_extn("starttls")
        s.login("alice", "correct horse")


def test_bad_password_is_535_and_logged_for_fail2ban(daemon: Daemon) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", daemon.ports["submissions"], timeout=30,
                          context=client_tls()) as s:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            s.login("alice", "wrong password")
        assert failed.value.smtp_code == 535
    line = daemon.wait_for("AUTH failed from 127.0.0.1 user=alice")
    assert "wrong password" not in daemon.text()
    assert "mechanism=" in line


def read_reply(sock: socket.socket | ssl.SSLSocket) -> bytes:
    data = b""
    while not data.endswith(b"\r\n") or data.split(b"\r\n")[-2][3:4] == b"-":
        chunk = sock.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    return data


def test_starttls_injection_is_discarded(daemon: Daemon) -> None:
    """CVE-2011-0411: commands pipelined behind STARTTLS in plaintext must never run."""
    raw = socket.create_connection(("127.0.0.1", daemon.ports["submission"]), timeout=30)
    assert read_reply(raw).startswith(b"220")
    raw.sendall(b"EHLO attacker\r\n")
    read_reply(raw)
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@example.test>\r\n")
    assert read_reply(raw).startswith(b"220 2.0.0")
    tls = client_tls().wrap_socket(raw)
    # Had the injected MAIL survived, the next reply would be its "250 2.1.0" (or a 503 for
    # a nested MAIL below); instead the session was reset and wants EHLO first.
    tls.sendall(b"MAIL FROM:<a@example.test>\r\n")
    assert read_reply(tls).startswith(b"503 5.5.1")
    tls.sendall(b"QUIT\r\n")
    tls.close()


def test_kill_9_right_after_250_loses_nothing(tmp_path: Path) -> None:
    d = Daemon(tmp_path, CONFIG.replace('"192.0.2.99/32"', '"127.0.0.1/32"'))
    d.start()
    ids = []
    try:
        with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=30) as s:
            for i in range(5):
                # A remote recipient with no reachable DNS: it stays queued (deferred).
                s.sendmail("x@example.test", ["bob@remote.test"], MESSAGE + b"%d\r\n" % i)
        d.kill9()  # the moment the last 250 has been read
        d.start()
        entries = queued(d)
        ids = [e["id"] for e in entries]
        assert len(ids) == 5
        bodies = [spooled_body(tmp_path / "var/spool", i) for i in ids]
        assert all(b.endswith(MESSAGE + b"%d\r\n" % n) for n, b in enumerate(bodies))
    finally:
        d.stop()


def test_haproxy_proxy_v1_uses_the_proxied_address(tmp_path: Path) -> None:
    d = Daemon(tmp_path, CONFIG)
    d.config_path.write_text(
        d.config_path.read_text().replace(
            'submission = ["tcp:', 'submission = ["haproxy:tcp:'
        )
    )
    d.start()
    try:
        port = d.ports["submission"]
        # 192.0.2.99 is a trusted network: relaying works only if the proxied address is seen.
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        s.sendall(b"PROXY TCP4 192.0.2.99 127.0.0.1 40000 587\r\n")
        assert read_reply(s).startswith(b"220")
        s.sendall(b"HELO printer\r\nMAIL FROM:<scan@example.test>\r\n"
                  b"RCPT TO:<bob@elsewhere.test>\r\nDATA\r\n")
        replies = b""
        while replies.count(b"\r\n") < 4:
            replies += s.recv(4096)
        assert replies.split(b"\r\n")[2].startswith(b"250 2.1.5"), replies
        s.sendall(b"Subject: scan\r\n\r\n.\r\nQUIT\r\n")
        assert b"queued as" in read_reply(s)
        d.wait_for("accepted from 192.0.2.99 as trusted-network")
        # Without the header the connection is dropped: not HAProxy talking.
        s2 = socket.create_connection(("127.0.0.1", port), timeout=30)
        s2.sendall(b"EHLO direct\r\n")
        assert s2.recv(4096) == b""
    finally:
        d.stop()


def test_passwd_stores_no_plaintext_and_deletes(tmp_path: Path) -> None:
    users = tmp_path / "users"
    run = subprocess.run([SMARTHOST, "passwd", "--users", str(users), "carol"],
                         input="pa55 word\n", capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = users.read_text()
    assert text.startswith("carol:$2b$") and "pa55" not in text
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o600
    run = subprocess.run([SMARTHOST, "passwd", "--users", str(users), "--delete", "carol"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "carol" not in users.read_text()
    run = subprocess.run([SMARTHOST, "passwd", "--users", str(users), "bad:name"],
                         input="x\n", capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[relay]\nlocal_domains = ["example.test"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[relay]\ntrusted_networks = ["10.0.0.300/8"]\n')
    ok = subprocess.run([SMARTHOST, "check-config", "--config", str(good)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([SMARTHOST, "check-config", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert fail.returncode == 2
    assert "relay.trusted_networks[0]" in fail.stderr and "Traceback" not in fail.stderr


def test_twistd_lists_the_plugin_from_any_directory(tmp_path: Path) -> None:
    out = subprocess.run([TWISTD, "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    assert "smarthost" in out.stdout


def test_python_m_smarthost(tmp_path: Path) -> None:
    import sys

    out = subprocess.run([sys.executable, "-m", "smarthost", "--help"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "check-config" in out.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_twistd_uid_gid_drop_leaves_the_spool_to_the_daemon_user() -> None:
    import pwd
    import shutil
    import tempfile

    nobody = pwd.getpwnam("nobody")
    # pytest's tmp_path lives under a root-only directory the daemon user could not enter.
    tmp_path = Path(tempfile.mkdtemp(prefix="smarthost-uid-", dir="/tmp"))
    tmp_path.chmod(0o755)
    (tmp_path / "var").mkdir()
    os.chown(tmp_path / "var", nobody.pw_uid, nobody.pw_gid)
    d = Daemon(tmp_path, CONFIG)
    d.extra_args = ["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)]
    d.start()
    try:
        with smtplib.SMTP("127.0.0.1", d.ports["smtp"], timeout=30) as s:
            s.sendmail("x@remote.test", ["postmaster@example.test"], MESSAGE)
        d.wait_for("relay=maildir result=delivered")
        for made in ("var/spool/log", "var/maildir/example.test/postmaster/new"):
            assert (tmp_path / made).stat().st_uid == nobody.pw_uid, made
    finally:
        d.stop()
        shutil.rmtree(tmp_path)


def test_a_second_daemon_on_the_same_spool_stops_with_a_clear_error(
    daemon: Daemon, tmp_path: Path
) -> None:
    spool = daemon.directory / "var/spool"
    other = tmp_path / "second"
    other.mkdir()
    second = Daemon(other, f'[queue]\ndirectory = "{spool}"\n')
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "--logfile=-", "smarthost", "--config",
         str(second.config_path)],
        cwd=other, capture_output=True, text=True, timeout=60,
    )
    assert f"cannot use the spool {spool}" in result.stdout, result.stdout[-2000:]
    assert "holds" in result.stdout and "stopping" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    # The first daemon keeps its spool and goes on accepting (and delivering).
    with smtplib.SMTP("127.0.0.1", daemon.ports["smtp"], timeout=30) as s:
        s.sendmail("x@client.test", ["postmaster@example.test"], MESSAGE)
    daemon.wait_for("to=<postmaster@example.test> relay=maildir result=delivered")
