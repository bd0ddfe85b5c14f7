"""Socket activation end to end: twistd started the way systemd starts it for
contrib/systemd/smarthost.socket (listening sockets from descriptor 3 on, LISTEN_PID,
LISTEN_FDS, LISTEN_FDNAMES), with the [listen] table of
contrib/systemd/listen-socket-activation.toml. Each role must answer on the socket at its
index: STARTTLS on submission, implicit TLS on submissions, plain SMTP on smtp."""

from __future__ import annotations

import smtplib
import socket
import ssl
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import daemon
from daemon import Daemon, client_tls

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = ROOT / "contrib" / "systemd" / "listen-socket-activation.toml"

# What systemd does before it runs ExecStart=, in the order of the socket unit's
# ListenStream= lines (loopback and port 0 here): the sockets at descriptors 3, 4, 5, the
# variables naming them, then exec, so that LISTEN_PID is twistd's own pid.
FAKE_SYSTEMD = """\
import fcntl, os, socket, sys
sockets = []
for _ in range(3):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    sockets.append(fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100))  # out of 3-5's way
    s.close()
for i, fd in enumerate(sockets):
    os.dup2(fd, 3 + i)  # inheritable
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="3",
                  LISTEN_FDNAMES="smarthost.socket:smarthost.socket:smarthost.socket")
os.execv(TWISTD, [TWISTD, *sys.argv[1:]])
"""


@pytest.fixture
def activated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Daemon]:
    wrapper = tmp_path / "fake-systemd"
    wrapper.write_text(f"#!{sys.executable}\nTWISTD = {daemon.TWISTD!r}\n{FAKE_SYSTEMD}")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(daemon, "TWISTD", str(wrapper))
    d = Daemon(tmp_path)
    # The socket unit's [listen] table in place of the harness's tcp:0 listeners.
    d.config_path.write_text('hostname = "mx.smarthost.test"\n' + SNIPPET.read_text())
    d.start()
    yield d
    d.stop()


def test_each_role_answers_on_the_socket_systemd_passed(activated: Daemon) -> None:
    assert set(activated.ports) == {"submission", "submissions", "smtp"}
    with smtplib.SMTP("127.0.0.1", activated.ports["submission"], timeout=30) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        client.starttls(context=client_tls())
        client.ehlo("client.test")
        assert client.has_extn("auth")
    with smtplib.SMTP_SSL("127.0.0.1", activated.ports["submissions"], timeout=30,
                          context=client_tls()) as client:
        assert isinstance(client.sock, ssl.SSLSocket)
        assert client.ehlo("client.test")[0] == 250
        assert client.has_extn("auth")
    with socket.create_connection(("127.0.0.1", activated.ports["smtp"]), timeout=30) as raw:
        assert raw.recv(512).startswith(b"220 mx.smarthost.test")
