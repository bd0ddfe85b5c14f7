"""Running as a service, end to end through twistd subprocesses: a start-up either opens every
listener, recovers the spool and makes the control socket, and says ``ready``, or logs one
line naming the key and exits 1; systemd hears READY/RELOADING/STOPPING on $NOTIFY_SOCKET;
SIGHUP reloads without dropping a session and refuses a config that does not load; SIGUSR1
reopens the log files after logrotate moved them."""

from __future__ import annotations

import ctypes
import os
import pwd
import re
import select
import shutil
import signal
import smtplib
import socket
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from daemon import BASE_CONFIG, Daemon, client_tls
from smarthost.app import tlscert

CONFIG = """
[relay]
local_domains = ["example.test"]
trusted_networks = []
[delivery]
nameservers = ["127.0.0.1:9"]
"""

MESSAGE = b"From: alice@example.test\r\nTo: postmaster@example.test\r\nSubject: t\r\n\r\nHi.\r\n"
READY_LINE = re.compile(r"\] ready$")
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root")


def short_directory() -> Path:
    """A directory the daemon's user may enter, with a path short enough for a unix socket
    (pytest's tmp_path is under a root-only directory and can be long)."""
    path = Path(tempfile.mkdtemp(prefix="smarthost-svc-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def home() -> Iterator[Path]:
    path = short_directory()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notify_socket(home: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(home / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(30)
        yield s, path


def failed_start(d: Daemon) -> str:
    """Launch a daemon whose start must fail: status 1, one ``cannot start`` line, no ready."""
    d.launch()
    status = d.wait_exit(timeout=30)
    assert status == 1, d.text()
    failures = [line for line in d.log if "cannot start:" in line]
    assert len(failures) == 1, d.text()
    assert not any(READY_LINE.search(line) for line in d.log), d.text()
    assert "Traceback" not in d.text()
    return failures[0]


def run_as_nobody(d: Daemon) -> pwd.struct_passwd:
    nobody = pwd.getpwnam("nobody")
    d.extra_args = ["--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid)]
    return nobody


# -- start-up is all or nothing -------------------------------------------------------------


def test_a_bad_endpoint_string_fails_the_start(home: Path) -> None:
    d = Daemon(home, CONFIG)
    d.config_path.write_text(d.config_path.read_text().replace(
        'submissions = ["tcp:0:interface=127.0.0.1"]', 'submissions = ["tcp:bogus"]'))
    line = failed_start(d)
    assert "cannot start: listen.submissions[0]: 'tcp:bogus' is not an endpoint" in line
    # The listener opened before it is closed again: nothing is left serving half the roles.
    assert "(TCP Port" in d.text() and "Closed)" in d.text()


def test_a_port_in_use_fails_the_start(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = Daemon(home, CONFIG)
        d.config_path.write_text(d.config_path.read_text().replace(
            'smtp = ["tcp:0:interface=127.0.0.1"]', f'smtp = ["tcp:{port}:interface=127.0.0.1"]'))
        line = failed_start(d)
    assert "cannot start: listen.smtp[0]: cannot listen on" in line
    assert "Address already in use" in line


def test_a_missing_key_fails_the_start(home: Path) -> None:
    pair = tlscert.issue(("mx.smarthost.test",))
    (home / "certs").mkdir()
    (home / "certs/smarthost.pem").write_bytes(pair.cert_pem)
    line = failed_start(Daemon(home, CONFIG))
    assert "cannot start: tls.key: cannot read" in line and "No such file" in line


def test_a_broken_certificate_fails_the_start(home: Path) -> None:
    pair = tlscert.issue(("mx.smarthost.test",))
    (home / "certs").mkdir()
    (home / "certs/smarthost.pem").write_bytes(b"not a certificate\n")
    (home / "certs/smarthost.key").write_bytes(pair.key_pem)
    line = failed_start(Daemon(home, CONFIG))
    assert "cannot start: tls.certificate:" in line and "holds no PEM certificate" in line


def test_no_control_socket_fails_the_start_and_systemd_never_hears_ready(
    home: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    # Something that is not a socket where the control socket goes: it cannot be made, so
    # `smarthost queue flush` could not reach this daemon.
    (home / "var/spool").mkdir(parents=True)
    (home / "var/spool/control.sock").write_text("not a socket")
    sock, path = notify_socket
    d = Daemon(home, CONFIG)
    d.env = {"NOTIFY_SOCKET": path}
    line = failed_start(d)
    assert "cannot start: queue.directory: cannot make the control socket" in line
    sent = [sock.recv(4096).decode() for _ in range(2)]
    assert sent[0].startswith("STATUS=cannot start: queue.directory:")
    assert sent[1] == "STOPPING=1"


@ROOT_ONLY
def test_a_spool_the_daemon_user_cannot_write_fails_the_start(home: Path) -> None:
    (home / "var").mkdir(mode=0o755)  # root's: nobody cannot make var/spool in it
    d = Daemon(home, CONFIG)
    run_as_nobody(d)
    line = failed_start(d)
    assert f"cannot start: queue.directory: cannot use the spool {home}/var/spool" in line
    assert "Permission denied" in line and "runs as user nobody" in line


@ROOT_ONLY
def test_a_users_file_only_root_can_read_fails_the_start(home: Path) -> None:
    d = Daemon(home, CONFIG)
    (home / "var").mkdir()
    d.add_user("alice", "correct horse")  # as root: var/users is root's, mode 0600
    nobody = run_as_nobody(d)
    os.chown(home / "var", nobody.pw_uid, nobody.pw_gid)
    line = failed_start(d)
    assert f"cannot start: auth.users: cannot read {home}/var/users" in line
    assert "Permission denied" in line and "runs as user nobody" in line


# -- systemd ---------------------------------------------------------------------------------


def test_systemd_hears_ready_reloading_ready_stopping(
    home: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    d = Daemon(home, CONFIG)
    d.env = {"NOTIFY_SOCKET": path}
    d.start()
    try:
        assert sock.recv(4096) == b"READY=1"
        d.send_signal(signal.SIGHUP)
        reloading = sock.recv(4096).decode().split("\n")
        assert reloading[0] == "RELOADING=1" and reloading[1].startswith("MONOTONIC_USEC=")
        assert sock.recv(4096) == b"READY=1"
        d.wait_for("reloaded the configuration")
    finally:
        d.stop()
    assert sock.recv(4096) == b"STOPPING=1"


# -- SIGHUP ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served() -> Iterator[Daemon]:
    """One daemon for the reload tests; each writes the config it needs and reloads."""
    path = short_directory()
    d = Daemon(path, CONFIG)
    d.add_user("alice", "correct horse")
    d.start()
    yield d
    d.stop()
    shutil.rmtree(path, ignore_errors=True)


RELOAD_BASE = BASE_CONFIG + CONFIG  # the config the served daemon started with


def reload(d: Daemon, config: str) -> str:
    """Write ``config`` (after the harness's [listen] table), send SIGHUP, wait for the
    outcome's line."""
    d.config_path.write_text(config)
    outcome = re.compile(r"reloaded the configuration|reload refused")
    seen = sum(1 for line in d.log if outcome.search(line))
    d.send_signal(signal.SIGHUP)
    return d.wait_for(outcome, count=seen + 1)


def served_subject(d: Daemon) -> str:
    """The common name of the certificate the implicit-TLS listener serves right now."""
    raw = socket.create_connection(("127.0.0.1", d.ports["submissions"]), timeout=30)
    with client_tls().wrap_socket(raw, server_hostname="mx.smarthost.test") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    name = x509.load_der_x509_certificate(der).subject
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def starttls_subject(d: Daemon) -> str:
    with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=30) as s:
        s.starttls(context=client_tls())
        assert isinstance(s.sock, ssl.SSLSocket)
        der = s.sock.getpeercert(binary_form=True)
    assert der is not None
    name = x509.load_der_x509_certificate(der).subject
    return str(name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_a_renewed_certificate_is_served_after_sighup_and_open_sessions_go_on(
    served: Daemon,
) -> None:
    before = served_subject(served)
    renewed = f"renewed-{time.monotonic_ns()}.smarthost.test"
    with smtplib.SMTP("127.0.0.1", served.ports["smtp"], timeout=30) as open_session:
        open_session.ehlo("client.test")
        # certbot's deploy hook: the new pair in place, then SIGHUP.
        tlscert.write_pair(tlscert.issue((renewed, "localhost")),
                           served.directory / "certs/smarthost.pem",
                           served.directory / "certs/smarthost.key")
        line = reload(served, RELOAD_BASE)
        assert "reloaded the configuration: changed tls certificate (CN=" + renewed in line
        # The session opened before the reload finishes its mail after it.
        open_session.sendmail("x@client.test", ["postmaster@example.test"], MESSAGE)
    assert before != renewed
    assert served_subject(served) == renewed
    assert starttls_subject(served) == renewed


def test_a_config_that_does_not_load_is_refused_and_the_old_one_serves(served: Daemon) -> None:
    subject = served_subject(served)
    line = reload(served, RELOAD_BASE + "[relay]\nbroken = \n")
    assert "reload refused: config: not valid TOML" in line
    key = served.directory / "certs/smarthost.key"
    good_key = key.read_bytes()
    key.write_bytes(tlscert.issue(("other.test",)).key_pem)  # not the certificate's key
    try:
        line = reload(served, RELOAD_BASE)
        assert "reload refused: tls.key:" in line and "is not the key of" in line
    finally:
        key.write_bytes(good_key)
    assert "the running configuration stays" in line
    assert served_subject(served) == subject
    with smtplib.SMTP("127.0.0.1", served.ports["smtp"], timeout=30) as s:
        s.sendmail("x@client.test", ["postmaster@example.test"], MESSAGE)


def test_users_relay_rules_and_listen_changes_on_sighup(served: Daemon) -> None:
    added = served.admin("passwd", "--users", "var/users2", "carol", stdin="carol's secret\n")
    assert added.returncode == 0, added.stderr
    new = RELOAD_BASE.replace("trusted_networks = []", 'trusted_networks = ["127.0.0.1/32"]')
    new = new.replace('smtp = ["tcp:0:', 'smtp = ["tcp:1:')
    line = reload(served, new + '[auth]\nusers = "var/users2"\n')
    assert "changed auth.users, relay.trusted_networks" in line
    served.wait_for("reload: listen.smtp changed; it needs a restart")
    # The users file named now is the one logins are checked against.
    with smtplib.SMTP("127.0.0.1", served.ports["submission"], timeout=30) as s:
        s.starttls(context=client_tls())
        s.login("carol", "carol's secret")
    with smtplib.SMTP("127.0.0.1", served.ports["submission"], timeout=30) as s:
        s.starttls(context=client_tls())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "correct horse")
    # 127.0.0.1 is now a trusted network: it relays without AUTH.
    with smtplib.SMTP("127.0.0.1", served.ports["submission"], timeout=30) as s:
        s.sendmail("printer@example.test", ["someone@elsewhere.test"], MESSAGE)
    reload(served, RELOAD_BASE)


# -- SIGUSR1 ---------------------------------------------------------------------------------

IN_MODIFY, IN_MOVED_TO, IN_CREATE = 0x2, 0x80, 0x100


class DirectoryWatch:
    """inotify on one directory: waits for a file there to hold a text, woken by the kernel
    at each change (never a sleep)."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd: int = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = IN_MODIFY | IN_MOVED_TO | IN_CREATE
        if libc.inotify_add_watch(self._fd, os.fsencode(directory), mask) < 0:
            raise OSError(ctypes.get_errno(), "inotify_add_watch")

    def wait_for(self, path: Path, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not (path.exists() and text in path.read_text()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{path} never held {text!r}")
            if select.select([self._fd], [], [], remaining)[0]:
                os.read(self._fd, 65536)

    def close(self) -> None:
        os.close(self._fd)


def test_sigusr1_reopens_the_log_files_logrotate_moved(
    home: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    logs = home / "logs"
    logs.mkdir()
    log, events = logs / "smarthost.log", logs / "events.jsonl"
    sock, path = notify_socket
    d = Daemon(home, CONFIG + '[log]\nevents = "logs/events.jsonl"\n')
    d.env = {"NOTIFY_SOCKET": path}
    d.extra_args = ["--logfile", str(log)]  # after the harness's --logfile=-: this one wins
    watch = DirectoryWatch(logs)
    d.launch()
    try:
        assert sock.recv(4096) == b"READY=1"
        assert "] ready" in log.read_text()
        log.rename(logs / "smarthost.log.1")
        events.rename(logs / "events.jsonl.1")
        d.send_signal(signal.SIGUSR1)
        watch.wait_for(log, "reopened the log files")
        watch.wait_for(events, "reopened the log files")
        assert "reopened the log files" not in (logs / "smarthost.log.1").read_text()
    finally:
        watch.close()
        d.stop()
    # twistd's own last lines go to the new file as well.
    assert "Server Shut Down." in log.read_text()
