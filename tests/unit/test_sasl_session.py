"""CRAM-MD5 and SCRAM through the SMTP session on a StringTransport: base64 framing, the
extra ``334 v=...`` step and its empty answer, ``*`` cancel, and 535 after the throttle; a
mechanism the user has no secret for; SASLprep for every mechanism."""
# StringTransport's methods carry no annotations:
# mypy: disallow-untyped-calls=False

from __future__ import annotations

import base64
import hmac
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import bcrypt
import pytest
from scramp import ScramClient
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

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


# -- a mechanism the user has no secret for (issue 11, finding 7) -------------------------


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "smarthost":
            lines.append(formatEvent(event))

    observer = cast(ILogObserver, observe)
    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


def add_htpasswd_user(client: Client, name: str, password: str) -> None:
    """A bcrypt-only line, as ``htpasswd -B`` writes it: no CRAM-MD5 or SCRAM secret."""
    with open(client.users_path, "ab") as f:
        f.write(f"{name}:".encode() + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4))
                + b"\n")


def answer_now(client: Client, line: str) -> tuple[int, bytes]:
    """Send ``line`` and read the answer without letting virtual time pass."""
    client.send(line)
    [reply] = client.transport.value().decode().split("\r\n")[:-1]
    client.transport.clear()
    code, text = int(reply[:3]), reply[4:]
    return code, base64.b64decode(text) if code == 334 else text.encode()


def test_cram_md5_without_a_secret_falls_back_at_once(
    client: Client, log_lines: list[str]
) -> None:
    """smtplib's order: CRAM-MD5 first, then PLAIN. Before: 'AUTH failed' (the fail2ban
    line), a throttle delay, and a failure counted towards 454 for the address."""
    add_htpasswd_user(client, "carol", "correct horse")
    code, challenge = answer_now(client, "AUTH CRAM-MD5")
    assert code == 334
    smtp = smtplib.SMTP()
    smtp.user, smtp.password = "carol", "correct horse"
    assert answer_now(client, b64(smtp.auth_cram_md5(challenge)))[0] == 535  # no delay
    assert answer_now(client, f"AUTH PLAIN {b64(chr(0) + 'carol' + chr(0) + 'correct horse')}"
                      )[0] == 235
    assert log_lines == [
        "smarthost: AUTH without secret from 192.0.2.7 user=carol mechanism=CRAM-MD5: the "
        "users file has no CRAM-MD5 secret for this user (smarthost passwd derives it); not "
        "counted as a failure",
        "smarthost: AUTH ok from 192.0.2.7 user=carol mechanism=PLAIN",
    ]


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_without_a_secret_is_not_counted(
    client: Client, log_lines: list[str], mechanism: str
) -> None:
    add_htpasswd_user(client, "carol", "correct horse")
    for _ in range(5):  # more than auth_failures_per_connection (3): never closed
        scram = ScramClient([mechanism], "carol", "correct horse")
        code, server_first = answer_now(client, f"AUTH {mechanism} {b64(scram.get_client_first())}")
        assert code == 334
        scram.set_server_first(server_first.decode())
        assert answer_now(client, b64(scram.get_client_final()))[0] == 535
    assert not any("AUTH failed" in line for line in log_lines)
    # The throttle counted none of them: a real failure is this address's first (1 s).
    client.send(f"AUTH PLAIN {b64(chr(0) + 'carol' + chr(0) + 'wrong')}")
    assert client.transport.value() == b""
    client.clock.advance(1)
    assert client.read() == ["535 5.7.8 Authentication credentials invalid"]
    assert log_lines[-1] == "smarthost: AUTH failed from 192.0.2.7 user=carol mechanism=PLAIN"


def test_an_unknown_name_is_still_a_failure(client: Client, log_lines: list[str]) -> None:
    _, challenge = client.step("AUTH CRAM-MD5")
    smtp = smtplib.SMTP()
    smtp.user, smtp.password = "nobody", "correct horse"
    assert client.step(b64(smtp.auth_cram_md5(challenge)))[0] == 535
    assert log_lines == ["smarthost: AUTH failed from 192.0.2.7 user=nobody mechanism=CRAM-MD5"]


# -- SASLprep for every mechanism (issue 18, finding 9) -----------------------------------

NFC, NFD = "caf\u00e9 cr\u00e8me", "cafe\u0301 cre\u0300me"


@pytest.mark.parametrize("typed", [NFC, NFD, "caf\u00e9\u00a0cr\u00e8me"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "SCRAM-SHA-256"])
def test_any_normal_form_of_the_password_works(
    tmp_path: Path, mechanism: str, typed: str
) -> None:
    """The password was set in NFC; the client types it decomposed, or with a no-break
    space. Before: SCRAM (whose client prepares) let it in, PLAIN and LOGIN did not."""
    client = Client(tmp_path)
    set_password(client.users_path, "zoe", NFC, rounds=4)
    if mechanism == "PLAIN":
        code, _ = client.step(f"AUTH PLAIN {b64(chr(0) + 'zoe' + chr(0) + typed)}")
    elif mechanism == "LOGIN":
        client.step(f"AUTH LOGIN {b64('zoe')}")
        code, _ = client.step(b64(typed))
    else:
        scram = ScramClient([mechanism], "zoe", typed)
        _, server_first = client.step(f"AUTH {mechanism} {b64(scram.get_client_first())}")
        scram.set_server_first(server_first.decode())
        code, server_final = client.step(b64(scram.get_client_final()))
        assert code == 334
        scram.set_server_final(server_final.decode())
        code, _ = client.step("")
    assert code == 235


def test_cram_md5_takes_the_password_as_typed_at_passwd(tmp_path: Path) -> None:
    """RFC 2195 knows no preparation and CRAM-MD5 clients key the HMAC with what the user
    types: the secret is derived from the password as typed to smarthost passwd."""
    for typed, expected in ((NFD, 235), (NFC, 535)):
        client = Client(tmp_path / typed)  # a fresh session: 235 ends AUTH on this one
        set_password(client.users_path, "zoe", NFD, rounds=4)
        _, challenge = client.step("AUTH CRAM-MD5")
        digest = hmac.new(typed.encode(), challenge, "md5").hexdigest()  # smtplib: ASCII only
        assert client.step(b64(f"zoe {digest}"))[0] == expected
