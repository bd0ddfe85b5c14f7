"""sd_notify: the datagrams systemd reads from $NOTIFY_SOCKET, read here from a real unix
datagram socket."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator

import pytest

from smarthost.app.notify import SystemdNotify, monotonic_usec


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    # A short directory of its own: a unix socket path holds at most 107 bytes.
    directory = tempfile.mkdtemp(prefix="notify-", dir="/tmp")
    path = os.path.join(directory, "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(5)
        yield s, path
    shutil.rmtree(directory)


def test_ready_reloading_stopping_in_order(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    warnings: list[str] = []
    notify = SystemdNotify.from_environment({"NOTIFY_SOCKET": path}, warnings.append)
    notify.ready()
    notify.reloading()
    notify.ready()
    notify.stopping()
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got[0] == "READY=1"
    first, usec = got[1].split("\n")
    assert first == "RELOADING=1"
    # systemd >= 253 compares it with CLOCK_MONOTONIC when the reload was asked for.
    assert usec.startswith("MONOTONIC_USEC=")
    assert 0 < int(usec.removeprefix("MONOTONIC_USEC=")) <= monotonic_usec()
    assert got[2:] == ["READY=1", "STOPPING=1"]
    assert warnings == []


def test_abstract_socket_name() -> None:
    name = f"smarthost-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        SystemdNotify("@" + name, lambda text: None).ready()
        assert s.recv(4096) == b"READY=1"


def test_status_is_one_line(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    SystemdNotify(path, lambda text: None).status("cannot start:\nlisten.smtp[0]: in use")
    assert sock.recv(4096) == b"STATUS=cannot start: listen.smtp[0]: in use"


def test_without_notify_socket_nothing_is_sent() -> None:
    notify = SystemdNotify.from_environment({}, lambda text: pytest.fail(text))
    assert not notify.enabled
    notify.ready()
    notify.stopping()


def test_a_socket_nobody_listens_on_is_a_warning_not_a_crash() -> None:
    directory = tempfile.mkdtemp(prefix="notify-", dir="/tmp")
    try:
        warnings: list[str] = []
        SystemdNotify(os.path.join(directory, "gone.sock"), warnings.append).ready()
        assert len(warnings) == 1 and "READY=1" in warnings[0]
    finally:
        shutil.rmtree(directory)
