"""CRAM-MD5 and SCRAM through the SMTP session on a StringTransport: base64 framing, the
extra ``334 v=...`` step and its empty answer, ``*`` cancel, and 535 after the throttle."""

from __future__ import annotations

import base64
import smtplib
from pathlib import Path

import pytest
from scramp import ScramClient
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from fakes import SessionHarness, run_now
from smarthost.auth import sasl
from smarthost.auth.cred import PortalLogin, build_portal
from smarthost.auth.users import UsersFile, set_password
from smarthost.smtpd.session import Session

MECHANISMS = ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"]


class LineClient:
    """Drives a Session on a StringTransport line by line; AUTH answers decoded."""

    session: Session
    transport: StringTransport
    clock: Clock

    def send(self, line: str) -> None:
        self.session.dataReceived(line.encode("ascii") + b"\r\n")

    def read(self) -> list[str]:
        for _ in range(40):  # the failed-AUTH throttle (and a verifier's limit), virtually
            if self.transport.value():
                break
            self.clock.advance(1)
        lines: list[str] = self.transport.value().decode().split("\r\n")[:-1]
        self.transport.clear()
        return lines

    def step(self, line: str) -> tuple[int, bytes]:
        self.send(line)
        [reply] = self.read()
        code, text = int(reply[:3]), reply[4:]
        return code, base64.b64decode(text) if code == 334 else text.encode()


class Client(LineClient):
    def __init__(self, tmp: Path) -> None:
        self.users_path = path = tmp / "users"
        set_password(path, "alice", "correct horse", rounds=4)
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        users = UsersFile(path)
        harness = SessionHarness(
            tmp, max_size=10000, local_domains=(), clock=self.clock,
            mechanisms=sasl.build_mechanisms(MECHANISMS, users=users,
                                             hostname="mx.smarthost.test", clock=self.clock),
            login=PortalLogin(build_portal(users, run_now)),
        )
        self.session, self.transport = harness.session, harness.transport
        self.read()
        self.send("EHLO client.test")
        self.ehlo = self.read()


@pytest.fixture
def client(tmp_path: Path) -> Client:
    return Client(tmp_path)


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def test_ehlo_advertises_in_the_configured_order(client: Client) -> None:
    assert "250-AUTH " + " ".join(MECHANISMS) in client.ehlo


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
@pytest.mark.parametrize("initial", [True, False])
def test_scram(client: Client, mechanism: str, initial: bool) -> None:
    scram = ScramClient([mechanism], "alice", "correct horse")
    if initial:
        code, server_first = client.step(f"AUTH {mechanism} {b64(scram.get_client_first())}")
    else:
        assert client.step(f"AUTH {mechanism}") == (334, b"")
        code, server_first = client.step(b64(scram.get_client_first()))
    assert code == 334
    scram.set_server_first(server_first.decode())
    code, server_final = client.step(b64(scram.get_client_final()))
    assert code == 334 and server_final.startswith(b"v=")
    scram.set_server_final(server_final.decode())  # the server proved it knows ServerKey
    code, _ = client.step("")  # RFC 4954 4: an empty answer to the last challenge
    assert code == 235


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_wrong_password_is_535(client: Client, mechanism: str) -> None:
    scram = ScramClient([mechanism], "alice", "battery staple")
    code, server_first = client.step(f"AUTH {mechanism} {b64(scram.get_client_first())}")
    assert code == 334
    scram.set_server_first(server_first.decode())
    assert client.step(b64(scram.get_client_final()))[0] == 535


def test_scram_cancel_after_the_server_signature(client: Client) -> None:
    scram = ScramClient(["SCRAM-SHA-256"], "alice", "correct horse")
    _, server_first = client.step(f"AUTH SCRAM-SHA-256 {b64(scram.get_client_first())}")
    scram.set_server_first(server_first.decode())
    client.step(b64(scram.get_client_final()))
    assert client.step("*")[0] == 501
    # Not logged in: AUTH is still possible.
    assert client.step("AUTH SCRAM-SHA-256")[0] == 334


def test_cram_md5_with_smtplibs_client(client: Client) -> None:
    code, challenge = client.step("AUTH CRAM-MD5")
    assert code == 334 and challenge.endswith(b".1700000000@mx.smarthost.test>")
    smtp = smtplib.SMTP()
    smtp.user, smtp.password = "alice", "correct horse"
    assert client.step(b64(smtp.auth_cram_md5(challenge)))[0] == 235


def test_cram_md5_wrong_password_and_initial_response(client: Client) -> None:
    _, challenge = client.step("AUTH CRAM-MD5")
    smtp = smtplib.SMTP()
    smtp.user, smtp.password = "alice", "wrong"
    assert client.step(b64(smtp.auth_cram_md5(challenge)))[0] == 535
    assert client.step(f"AUTH CRAM-MD5 {b64('alice 0123')}")[0] == 501


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "CRAM-MD5"])
def test_unreadable_users_file_is_454_not_535(client: Client, mechanism: str) -> None:
    client.users_path.unlink()
    client.users_path.mkdir()  # open() now fails with IsADirectoryError
    if mechanism == "CRAM-MD5":
        assert client.step("AUTH CRAM-MD5")[0] == 334
        code, _ = client.step(b64("alice " + "0" * 32))
    else:
        code, _ = client.step(f"AUTH {mechanism} {b64('n,,n=alice,r=abc')}")
    assert code == 454
