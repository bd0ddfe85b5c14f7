"""No client can forge a log line or a fail2ban match for someone else (issue 18, finding 4),
checked with Debian's real ``fail2ban-regex`` over the log of a real ``twistd`` under attack.

One daemon. Attackers (each from its own loopback address) put the fail2ban line's text,
naming 10.9.9.4, everywhere a client can: quoted local parts in RCPT TO and MAIL FROM, an
SMTPUTF8 address, the EHLO name, AUTH user names (with spaces, quotes, CR/LF,
a whole twistd line after a newline) through PLAIN, LOGIN and CRAM-MD5, and a malformed AUTH.
Two remote MX hosts answer with the same text (one in a multi-line reply, one after a bare
LF). A real user without CRAM-MD5 secrets logs in with smtplib, which tries CRAM-MD5 first.

Then the shipped filter (``contrib/fail2ban/filter.d/smarthost.conf``) must find every real
AUTH failure once, with the address it came from, and nothing else: never 10.9.9.4, never
the user who fell back. The README's older, unanchored regex must do the same, and so must
the filter over the same lines as the systemd journal would present them. The shipped jail
must load. And the JSON events file holds every one of those log lines as an event.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import shutil
import smtplib
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest

from daemon import Daemon

REPO = Path(__file__).resolve().parents[2]
FILTER = REPO / "contrib" / "fail2ban" / "filter.d" / "smarthost.conf"
JAIL = REPO / "contrib" / "fail2ban" / "jail.d" / "smarthost.conf"
README_FAILREGEX = "smarthost: AUTH failed from <HOST> user="

VICTIM = "10.9.9.4"
FORGED = f"smarthost: AUTH failed from {VICTIM} user=q mechanism=PLAIN"
TWISTD_LINE = f"2026-01-01T00:00:00+0000 [smarthost#warn] {FORGED}"
PASSWORD = "correct horse battery"


def fail2ban_regex() -> str:
    found = shutil.which("fail2ban-regex")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("fail2ban-regex is missing in CI: make test-deps installs Debian's "
                        "fail2ban")
        pytest.skip("fail2ban-regex is not installed (Debian package fail2ban; "
                    "make test-deps installs it)")
    return found


class ForgingMX(socketserver.StreamRequestHandler):
    """An MX whose RCPT reply carries the fail2ban line: in a multi-line 550, or after a
    bare LF (which ends the reply line early)."""

    rcpt_reply: bytes = b""

    def handle(self) -> None:
        try:
            self.wfile.write(b"220 forge.test ESMTP\r\n")
            for raw in self.rfile:
                verb = raw[:4].upper()
                if verb == b"RCPT":
                    self.wfile.write(self.rcpt_reply)
                elif verb == b"QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return
                else:
                    self.wfile.write(b"250 forge.test\r\n")
        except OSError:
            return  # smarthost aborts a peer whose reply is malformed: as it should


def forging_mx(reply: bytes) -> socketserver.ThreadingTCPServer:
    handler = type("Handler", (ForgingMX,), {"rcpt_reply": reply})
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


MULTILINE = (f"550-5.1.1 {FORGED}\r\n550-\u2028{FORGED}\r\n550 5.1.1 {FORGED}\r\n").encode()
BARE_LF = f"550 5.1.1 no such user\n{TWISTD_LINE}\r\n".encode()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    mx1, mx2 = forging_mx(MULTILINE), forging_mx(BARE_LF)
    d = Daemon(tmp_path_factory.mktemp("forging"), f"""
[auth]
mechanisms = ["CRAM-MD5", "PLAIN", "LOGIN"]
allow_plaintext = true
[relay]
local_domains = ["example.test"]
[relay.senders]
"alice" = ["alice@example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
[delivery.routes]
"forge.test" = "smtp:127.0.0.1:{mx1.server_address[1]}"
"forge2.test" = "smtp:127.0.0.1:{mx2.server_address[1]}"
[log]
events = "var/log/events.jsonl"
""")
    d.add_user("alice", PASSWORD)
    # carol as htpasswd -B writes her: no CRAM-MD5 secret.
    with open(d.directory / "var/users", "ab") as f:
        f.write(b"carol:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)) + b"\n")
    d.start()
    try:
        yield d
    finally:
        d.stop()
        mx1.shutdown()
        mx2.shutdown()


class Raw:
    """One SMTP connection from ``source``, line by line, replies read whole."""

    def __init__(self, port: int, source: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        self.reply()

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = self.file.readline().decode("utf-8", "replace")
            assert line, "connection closed"
            lines.append(line[4:].rstrip("\r\n"))
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    def command(self, line: str | bytes) -> tuple[int, str]:
        data = line.encode("utf-8") if isinstance(line, str) else line
        self.sock.sendall(data + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode("utf-8") if isinstance(data, str) else data).decode()


def envelope_attacks(d: Daemon) -> None:
    """No AUTH needed: the text goes into addresses and the EHLO name (smtp listener)."""
    port = d.ports["smtp"]
    quoted = '"' + FORGED + '"'
    c = Raw(port, "127.0.3.1")
    assert c.command(f"EHLO {FORGED}")[0] == 250
    assert c.command("MAIL FROM:<someone@elsewhere.test>")[0] == 250
    assert c.command(f"RCPT TO:<{quoted}@elsewhere.test>")[0] in (550, 554)  # not relayed
    assert c.command("QUIT")[0] == 221
    c.close()
    c = Raw(port, "127.0.3.2")
    c.command("EHLO client.test")
    assert c.command(f"MAIL FROM:<{quoted}@elsewhere.test>")[0] == 250
    assert c.command(f"RCPT TO:<{quoted}@example.test>")[0] in (250, 550, 553)
    assert c.command("RCPT TO:<postmaster@example.test>")[0] == 250
    assert c.command("DATA")[0] == 354
    assert c.command(b"Subject: forged\r\n\r\nhi\r\n.")[0] == 250
    # SMTPUTF8: non-ASCII, a right-to-left override among it (U+2028 and U+0085 are refused).
    assert c.command("MAIL FROM:<j\u00f6ran\u202egnp.exe@elsewhere.test> SMTPUTF8")[0] == 250
    assert c.command("RCPT TO:<postmaster@example.test>")[0] == 250
    assert c.command("DATA")[0] == 354
    assert c.command(b"Subject: utf8\r\n\r\nhi\r\n.")[0] == 250
    c.command("QUIT")
    c.close()


# Real AUTH failures: (source address, what is sent after EHLO). Each must match once, with
# that address, whatever user name it carries.
def auth_attempts() -> list[tuple[str, list[str]]]:
    plain = [f"x {FORGED}", f"x\n{TWISTD_LINE}", f'x" {FORGED}', f"x\u2028{FORGED}",
             f"x\r{TWISTD_LINE}"]
    attempts = [(f"127.0.4.{n}", [f"AUTH PLAIN {b64(chr(0) + name + chr(0) + 'wrong')}"])
                for n, name in enumerate(plain, start=1)]
    attempts.append(("127.0.4.20", [f"AUTH LOGIN {b64(FORGED + chr(10) + TWISTD_LINE)}",
                                    b64("wrong")]))
    attempts.append(("127.0.4.21", ["AUTH CRAM-MD5", "cram"]))  # a forged name, spaces and all
    attempts.append(("127.0.4.22", [f"AUTH PLAIN {b64(FORGED)}"]))  # malformed: no NULs
    attempts.append(("127.0.4.23", [f"AUTH PLAIN {b64(chr(0) + 'alice' + chr(0) + 'wrong')}"]))
    return attempts


def attempt_auth(d: Daemon, source: str, lines: list[str]) -> int:
    c = Raw(d.ports["submission"], source)
    try:
        c.command("EHLO client.test")
        code, text = c.command(lines[0])
        for line in lines[1:]:
            if line == "cram":
                digest = hmac.new(b"wrong", base64.b64decode(text), "md5").hexdigest()
                line = b64(f"{FORGED} {digest}")
            code, text = c.command(line)
        return code
    finally:
        c.close()


def legitimate_traffic(d: Daemon) -> None:
    # carol has no CRAM-MD5 secret: smtplib tries CRAM-MD5 first, then PLAIN.
    with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=20,
                      source_address=("127.0.5.1", 0)) as s:
        s.ehlo()
        assert s.login("carol", PASSWORD)[0] == 235
    # A trusted client mails the forging MX hosts: their replies reach our log.
    with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=20) as s:
        s.sendmail("postmaster@example.test", ["bob@forge.test", "carol@forge2.test"],
                   b"Subject: to the forgers\r\n\r\nhi\r\n")


@pytest.fixture(scope="module")
def attacked(daemon: Daemon) -> tuple[Daemon, list[str]]:
    """Every attack run once; the daemon's log then holds all their lines."""
    envelope_attacks(daemon)
    attempts = auth_attempts()
    with ThreadPoolExecutor(len(attempts)) as pool:  # each waits out the throttle's 1 s
        codes = list(pool.map(lambda a: attempt_auth(daemon, *a), attempts))
    assert codes == [535] * 7 + [501, 535], codes
    legitimate_traffic(daemon)
    sources = [source for source, _ in attempts]
    daemon.wait_for("AUTH failed from", count=len(sources))
    daemon.wait_for("AUTH ok from 127.0.5.1 user=carol mechanism=PLAIN")
    daemon.wait_for("to=<bob@forge.test>")
    daemon.wait_for("to=<carol@forge2.test>")
    daemon.wait_for("accepted from 127.0.3.2", count=2)
    return daemon, sources


def run_regex(log: Path, regex: str | Path) -> list[str]:
    """The addresses fail2ban-regex finds, one per matched line."""
    result = subprocess.run([fail2ban_regex(), "--raw", "--out", "ip", str(log), str(regex)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return sorted(result.stdout.split())


def test_the_attacks_reached_the_log(attacked: tuple[Daemon, list[str]]) -> None:
    daemon, _ = attacked
    lines = [line for line in daemon.log if VICTIM in line]
    # Escaped, but there: the refused RCPT, the accepted sender, its local delivery, the
    # seven failed AUTHs whose names hold it, the forging MX's reply.
    assert len(lines) >= 11, "\n".join(lines)
    assert all("\u2028" not in line and "\r" not in line for line in daemon.log)


def test_the_shipped_filter_matches_real_failures_only(
    attacked: tuple[Daemon, list[str]], tmp_path: Path
) -> None:
    daemon, sources = attacked
    log = tmp_path / "smarthost.log"
    log.write_text("\n".join(daemon.log) + "\n")
    assert run_regex(log, FILTER) == sorted(sources)


def test_the_readme_regex_is_safe_now_too(
    attacked: tuple[Daemon, list[str]], tmp_path: Path
) -> None:
    """The README's regex is not anchored: before, the RCPT attack alone made it ban
    10.9.9.4."""
    daemon, sources = attacked
    log = tmp_path / "smarthost.log"
    log.write_text("\n".join(daemon.log) + "\n")
    assert run_regex(log, README_FAILREGEX) == sorted(sources)


def test_the_filter_reads_the_journal_form_too(
    attacked: tuple[Daemon, list[str]], tmp_path: Path
) -> None:
    """Under systemd (backend = systemd) fail2ban sees "HOST IDENT[PID]: " and twistd's
    line, each continuation line of a traceback as an entry of its own."""
    daemon, sources = attacked
    log = tmp_path / "journal.txt"
    log.write_text("".join(f"mail twistd[4242]: {line}\n" for line in daemon.log))
    assert run_regex(log, FILTER) == sorted(sources)


def test_the_shipped_jail_loads(attacked: tuple[Daemon, list[str]], tmp_path: Path) -> None:
    fail2ban_regex()
    client = shutil.which("fail2ban-client")
    if client is None or not Path("/etc/fail2ban/jail.conf").exists():
        pytest.skip("fail2ban-client or /etc/fail2ban is missing (Debian package fail2ban)")
    daemon, _ = attacked
    log = tmp_path / "smarthost.log"
    log.write_text("\n".join(daemon.log) + "\n")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    for extra in (conf / "jail.d").iterdir():
        extra.unlink()  # the distribution's own jails (sshd) need their own logs
    shutil.copy(FILTER, conf / "filter.d")
    shutil.copy(JAIL, conf / "jail.d")
    (conf / "jail.local").write_text(f"[smarthost]\nlogpath = {log}\n")
    result = subprocess.run([client, "-c", str(conf), "-t"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "OK" in result.stdout + result.stderr, (
        result.stdout + result.stderr)
    dump = subprocess.run([client, "-c", str(conf), "-d"], capture_output=True, text=True,
                          timeout=60).stdout
    assert "['add', 'smarthost', 'auto']" in dump
    assert "'maxretry', 5" in dump


TEXT_LINE = re.compile(r"^\S+ \[smarthost#\w+\] (.*)$")


def test_every_log_line_is_also_an_event(attacked: tuple[Daemon, list[str]]) -> None:
    """Issue 11, finding 9: each line smarthost logs is an event with its text and fields;
    the attackers' values are there unescaped, as JSON strings."""
    daemon, sources = attacked
    events = [json.loads(line) for line in
              (daemon.directory / "var/log/events.jsonl").read_text("ascii").splitlines()]
    texts = {event["text"] for event in events}
    for line in daemon.log:
        m = TEXT_LINE.match(line)
        if m:
            assert m.group(1) in texts, line
    failed = [e for e in events if e["event"] == "auth_failed"]
    assert sorted(e["client"] for e in failed) == sorted(sources)
    assert f"x\n{TWISTD_LINE}" in {e["user"] for e in failed}
    [fallback] = [e for e in events if e["event"] == "auth_without_secret"]
    assert (fallback["client"], fallback["user"], fallback["mechanism"]) == (
        "127.0.5.1", "carol", "CRAM-MD5")
