"""A private Postfix instance for interoperability tests: the reference MTA as a real peer.

``with postfix_peer(relayhost=...) as pf:`` starts Postfix from its own main.cf/master.cf in a
fresh temporary directory, listening on 127.0.0.1 only at a port the kernel picked, and stops
and removes everything on the way out, whatever happened. Nothing under /etc/postfix is
written and the system's own instance (port 25) is never touched.

- As an MX, it accepts mail for :data:`DOMAIN` and delivers it with the ``virtual`` agent into
  one Maildir per recipient (:meth:`PostfixPeer.wait_message`). Postfix keeps lines without
  their CRLF in its queue and writes them with LF: that is the only change it makes to a
  message's bytes, besides the trace headers it prepends (Return-Path, X-Original-To,
  Delivered-To, Received).
- As a client, it relays everything else to ``relayhost`` (mail injected into its port from
  127.0.0.1, which is in ``mynetworks``).
- It logs to a file of its own (``maillog_file``, Postfix >= 3.4) with ``debug_peer_list``
  covering 127.0.0.1, so smtpd logs every command it receives (``< ...: BDAT 4711 LAST``) and
  the smtp client every command it sends (``> ...: DATA``): :meth:`PostfixPeer.session` shows
  which verbs carried a message, the proof that BDAT was (or was not) used.

Postfix's master must start as root (it binds the port, then its daemons drop to the
``postfix`` user); tests skip themselves with :func:`unavailable` elsewhere.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
LOOPBACK = "127.0.0.1"
DOMAIN = "postfix.test"  # the domain this Postfix delivers into its Maildirs
HOSTNAME = "mx.postfix.test"
GREETING = f"220 {HOSTNAME} ESMTP".encode()
MAILBOX_USER = "nobody"  # owner of the Maildirs: virtual(8) refuses uids below 100 and root

# Only the services a single-host relay needs, none chrooted (a chroot needs a prepared copy
# of /etc). {listen} is this instance's smtpd address.
MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


# A line smtpd or smtp logs under debug_peer_list: "< peer[addr]: line" for what it read,
# "> peer[addr]: line" for what it wrote (smtp adds ":port" to the peer).
_CHAT = re.compile(
    r"postfix/(?P<program>smtpd?)\[(?P<pid>\d+)\]: (?P<arrow>[<>]) \S+\[127\.0\.0\.1\]"
    r"(?::\d+)?: (?P<line>.*)$",
    re.M,
)


@dataclass
class Dialog:
    """An SMTP session, or a part of one, as Postfix logged it: command and reply lines in
    log order (message data is not logged, neither DATA's nor BDAT's)."""

    program: str  # "smtpd" or "smtp"
    pid: int
    lines: list[tuple[bool, str]] = field(default_factory=list)  # (from the client, line)

    @property
    def client(self) -> list[str]:
        return [line for from_client, line in self.lines if from_client]

    @property
    def server(self) -> list[str]:
        return [line for from_client, line in self.lines if not from_client]

    def names(self, recipient: str) -> bool:
        rcpt = f"RCPT TO:<{recipient}>".upper()
        return any(line.upper().startswith(rcpt) for line in self.client)

    def transaction(self, recipient: str) -> Dialog:
        """The transaction for ``recipient``: from its MAIL to the next MAIL or the end (a
        reused connection carries several)."""
        starts = [i for i, (from_client, line) in enumerate(self.lines)
                  if from_client and line.upper().startswith("MAIL FROM:")]
        for start, end in zip(starts, [*starts[1:], len(self.lines)], strict=True):
            part = Dialog(self.program, self.pid, self.lines[start:end])
            if part.names(recipient):
                return part
        raise LookupError(f"no transaction for {recipient} in {self.lines}")

    def verbs(self) -> list[str]:
        return [line.split(" ", 1)[0].upper() for line in self.client]

    def bdat_sizes(self) -> list[tuple[int, bool]]:
        """(chunk size, LAST) of every BDAT command."""
        chunks = [line.split() for line in self.client if line.upper().startswith("BDAT ")]
        return [(int(c[1]), c[2:] == ["LAST"]) for c in chunks]


def _greeting(current: Dialog | None, reply: str) -> bool:
    """Whether ``reply`` opens a new session: a 220 that neither continues a multi-line
    greeting nor answers STARTTLS."""
    if not reply.startswith("220"):
        return False
    if current is None:
        return True
    continued = bool(current.server) and current.server[-1].startswith("220-")
    return not (continued or current.client[-1:] == ["STARTTLS"])


def unavailable() -> str | None:
    """Why a private Postfix cannot run here (for ``pytest.mark.skipif``), or None."""
    if not os.path.exists(POSTFIX):
        return f"{POSTFIX} is not installed"
    if os.geteuid() != 0:
        return "Postfix's master must start as root"
    return None


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for port 0). Another process
    could take it before Postfix binds it; on loopback in a test run that race is remote, and
    a lost race fails loudly at start-up rather than silently."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class PostfixPeer:
    """One private Postfix in ``directory`` (config in etc/, queue/, data/, mail/, maillog)."""

    def __init__(
        self,
        directory: Path,
        relayhost: str = "",
        mailboxes: tuple[str, ...] = ("bob",),
        port: int | None = None,
    ) -> None:
        self.directory = directory
        self.relayhost = relayhost
        self.mailboxes = mailboxes  # local parts of DOMAIN with a Maildir; others are unknown
        self.port = free_port() if port is None else port
        self.config_dir = directory / "etc"
        self.queue_dir = directory / "queue"
        self.data_dir = directory / "data"
        self.mail_dir = directory / "mail"
        self.logfile = directory / "maillog"
        self.started = False

    def settings(self) -> dict[str, str]:
        mailbox = pwd.getpwnam(MAILBOX_USER)
        return {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.logfile),
            "maillog_file_prefixes": str(self.directory),
            "myhostname": HOSTNAME,
            "mydomain": DOMAIN,
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup": "no",  # no reverse DNS for 127.0.0.1
            # CHUNKING is on by default since 3.4; say so, in case a default ever changes.
            "smtpd_discard_ehlo_keywords": "",
            # Headers from 127.0.0.1 (an inet_interfaces address, so "local" by default) are
            # left as they are: no address rewriting, no Message-ID or Date added.
            "local_header_rewrite_clients": "",
            "virtual_mailbox_domains": DOMAIN,
            "virtual_mailbox_base": str(self.mail_dir),
            # texthash needs no postmap; virtual(8) allows no regexp substitution here.
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'mailboxes'}",
            "virtual_uid_maps": f"static:{mailbox.pw_uid}",
            "virtual_gid_maps": f"static:{mailbox.pw_gid}",
            "relayhost": self.relayhost,
            "smtp_dns_support_level": "disabled",
            "smtputf8_enable": "yes",
            "biff": "no",
            # smtpd and the smtp client log each command line to and from 127.0.0.1.
            "debug_peer_list": LOOPBACK,
            "debug_peer_level": "2",
        }

    def start(self, timeout: float = 30.0) -> PostfixPeer:
        self.config_dir.mkdir(parents=True)
        for d in (self.queue_dir, self.data_dir, self.mail_dir):
            d.mkdir()
        # DOMAIN/<local part>/: the trailing slash makes each a Maildir.
        (self.config_dir / "mailboxes").write_text(
            "".join(f"{name}@{DOMAIN} {DOMAIN}/{name}/\n" for name in self.mailboxes))
        (self.config_dir / "main.cf").write_text("")
        (self.config_dir / "master.cf").write_text(
            MASTER_CF.format(listen=f"{LOOPBACK}:{self.port}"))
        subprocess.run(
            [POSTCONF, "-c", str(self.config_dir),
             *(f"{k}={v}" for k, v in self.settings().items())],
            check=True, capture_output=True, timeout=30,
        )
        postfix = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix.pw_uid, postfix.pw_gid)  # verify/scache databases
        mailbox = pwd.getpwnam(MAILBOX_USER)
        os.chown(self.mail_dir, mailbox.pw_uid, mailbox.pw_gid)  # virtual(8) writes as them
        self.started = True
        result = subprocess.run(self.postfix("start"), capture_output=True, text=True,
                                timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"postfix start failed: {result.stderr}\n{self.log_text()}")
        self._wait_greeting(timeout)
        return self

    def postfix(self, command: str) -> list[str]:
        return [POSTFIX, "-c", str(self.config_dir), command]

    def _wait_greeting(self, timeout: float) -> None:
        """Until a connection to the port gets this instance's 220 (not some other server's
        that took the port first). master gives no readiness signal to its caller, so this
        polls, bounded by ``timeout``; a fatal error in the log ends the wait at once."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=5) as s:
                    if s.recv(512).startswith(GREETING):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if " fatal: " in self.log_text():
                raise RuntimeError(f"Postfix failed to start:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Postfix gave no greeting on port {self.port}:\n"
                                   + self.log_text())
            time.sleep(0.05)

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        """The first match of ``pattern`` in the maillog. postlogd writes the file and tells
        nobody, so this polls it, bounded by ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_text())
            if found:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} in Postfix's log:\n{self.log_text()}")
            time.sleep(0.05)

    def dialogs(self, program: str) -> list[Dialog]:
        """Every SMTP session ``program`` ("smtpd": this Postfix as server, "smtp": as
        client) had with 127.0.0.1, from the debug log, in order of their greetings."""
        sessions: dict[int, list[Dialog]] = {}
        ordered: list[Dialog] = []
        for m in _CHAT.finditer(self.log_text()):
            if m["program"] != program:
                continue
            pid, arrow, line = int(m["pid"]), m["arrow"], m["line"]
            # The client's lines are the ones smtpd received ("<") or smtp sent (">").
            from_client = arrow == ("<" if program == "smtpd" else ">")
            mine = sessions.setdefault(pid, [])
            if not from_client and _greeting(mine[-1] if mine else None, line):
                mine.append(Dialog(program, pid))
                ordered.append(mine[-1])
            if mine:
                mine[-1].lines.append((from_client, line))
        return ordered

    def session(self, program: str, recipient: str) -> Dialog:
        """The one session of ``program`` that carried mail for ``recipient`` (see
        :meth:`Dialog.transaction` for that message's part of it)."""
        found = [d for d in self.dialogs(program) if d.names(recipient)]
        assert len(found) == 1, f"{len(found)} {program} sessions for {recipient}"
        return found[0]

    def maildir(self, local: str) -> Path:
        return self.mail_dir / DOMAIN / local

    def wait_message(self, local: str, timeout: float = 30.0) -> bytes:
        """The one message delivered to ``local``@DOMAIN, once it is in the Maildir's new/
        (virtual(8) writes it in tmp/ and renames it there: it is complete when seen)."""
        new = self.maildir(local) / "new"
        deadline = time.monotonic() + timeout
        while True:  # no event to wait on: virtual(8) tells nobody but the log
            files = sorted(new.iterdir()) if new.is_dir() else []
            if files:
                assert len(files) == 1, files
                return files[0].read_bytes()
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing delivered to {local}@{DOMAIN}:\n"
                                   + self.log_text())
            time.sleep(0.05)

    def stop(self) -> None:
        """``postfix stop``, then SIGKILL whatever of this instance is left (every process of
        it carries MAIL_CONFIG=<our etc/> in its environment). Idempotent."""
        if not self.started:
            return
        self.started = False
        subprocess.run(self.postfix("stop"), capture_output=True, timeout=60, check=False)
        deadline = time.monotonic() + 15
        while (left := self.processes()) and time.monotonic() < deadline:
            time.sleep(0.05)  # `postfix stop` returns once master has the signal
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def processes(self) -> list[int]:
        """The live processes of this instance, found by their MAIL_CONFIG."""
        marker = f"MAIL_CONFIG={self.config_dir}".encode()
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
                with open(f"/proc/{name}/stat", "rb") as f:
                    zombie = b") Z " in f.read()
            except OSError:
                continue
            if marker in environ and not zombie:
                found.append(int(name))
        return found


@contextmanager
def postfix_peer(
    relayhost: str = "", mailboxes: tuple[str, ...] = ("bob",), port: int | None = None
) -> Iterator[PostfixPeer]:
    """A started :class:`PostfixPeer` in a new temporary directory; stopped and removed after.

    The directory is made here rather than under pytest's tmp_path: the ``postfix`` and
    ``nobody`` users must traverse it, and pytest's base directory is private to root.
    """
    directory = Path(tempfile.mkdtemp(prefix="postfixpeer-"))
    os.chmod(directory, 0o711)
    peer = PostfixPeer(directory, relayhost, mailboxes, port)
    try:
        yield peer.start()
    finally:
        try:
            peer.stop()
        finally:
            shutil.rmtree(directory, ignore_errors=True)
