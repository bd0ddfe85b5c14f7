"""CRAM-MD5 and SCRAM end to end: ``twistd -n smarthost`` with every mechanism, real TLS,
smtplib's CRAM-MD5 and a scramp-driven AUTH dialog; the users file holds no password."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bcrypt
import pytest
from scramp import ScramClient

from daemon import Daemon, client_tls

MECHANISMS = ["SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN"]
CONFIG = f"""
[auth]
mechanisms = {MECHANISMS!r}
[relay]
local_domains = ["example.test"]
[relay.senders]
"alice" = ["alice@example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
""".replace("'", '"')
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("sasl"), CONFIG)
    d.add_user("alice", PASSWORD)
    # An old, bcrypt-only line (htpasswd -B): no secrets for the challenge-response ones.
    with open(d.directory / "var/users", "ab") as f:
        f.write(b"carol:" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)) + b"\n")
    d.start()
    yield d
    d.stop()


def connect(d: Daemon, source: str = "127.0.0.1") -> smtplib.SMTP_SSL:
    return smtplib.SMTP_SSL("127.0.0.1", d.ports["submissions"], timeout=30,
                            context=client_tls(), source_address=(source, 0))


class ScramAuth:
    """An smtplib ``authobject`` speaking SCRAM through scramp, checking the server's v=."""

    def __init__(self, mechanism: str, user: str, password: str) -> None:
        self._client = ScramClient([mechanism], user, password)

    def __call__(self, challenge: bytes | None = None) -> str:
        answer: str  # scramp carries no annotations
        if challenge is None:
            answer = self._client.get_client_first()  # the initial response
            return answer
        text = challenge.decode("ascii")
        if text.startswith("v="):
            self._client.set_server_final(text)  # raises unless the server knew ServerKey
            return ""  # RFC 4954 4: the empty answer to the last challenge
        self._client.set_server_first(text)
        answer = self._client.get_client_final()
        return answer


def login(d: Daemon, mechanism: str, user: str, password: str, source: str = "127.0.0.1",
          send: bool = False) -> int:
    with connect(d, source) as s:
        s.ehlo()
        try:
            s.user, s.password = user, password
            if mechanism.startswith("SCRAM"):
                code, _ = s.auth(mechanism, ScramAuth(mechanism, user, password))
            elif mechanism == "CRAM-MD5":
                code, _ = s.auth(mechanism, s.auth_cram_md5, initial_response_ok=False)
            else:
                authobject = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login}[mechanism]
                code, _ = s.auth(mechanism, authobject)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code
        if send:
            refused = s.sendmail("alice@example.test", ["bob@elsewhere.test"],
                                 b"Subject: sasl e2e\r\n\r\nHello.\r\n")
            assert refused == {}
        return code


def test_users_file_never_holds_the_password(daemon: Daemon) -> None:
    data = (daemon.directory / "var/users").read_bytes()
    assert PASSWORD.encode() not in data and b"correct" not in data
    line = data.splitlines()[0]
    assert b":scram-sha-256=4096," in line and b":scram-sha-1=4096," in line
    assert b":cram-md5=" in line


def test_ehlo_offers_the_configured_mechanisms_in_order(daemon: Daemon) -> None:
    with connect(daemon) as s:
        s.ehlo()
        assert s.esmtp_features["auth"].split() == MECHANISMS


def test_smtplib_login_uses_cram_md5(daemon: Daemon) -> None:
    with connect(daemon) as s:
        s.login("alice", PASSWORD)  # smtplib prefers CRAM-MD5 when offered
    daemon.wait_for("AUTH ok from 127.0.0.1 user=alice mechanism=CRAM-MD5")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1"])
def test_scram_over_tls_and_then_relay(daemon: Daemon, mechanism: str) -> None:
    assert login(daemon, mechanism, "alice", PASSWORD, send=True) == 235
    daemon.wait_for(f"AUTH ok from 127.0.0.1 user=alice mechanism={mechanism}")
    daemon.wait_for("as alice sender=<alice@example.test>")


def test_wrong_passwords_and_old_users(daemon: Daemon) -> None:
    # Every failure is answered after the per-address throttle's delay: one client address
    # per attempt (127.0.0.0/8 is all loopback) and all at once keeps this test short.
    attempts = [(m, "alice", "wrong", 535) for m in MECHANISMS]
    attempts += [(m, "carol", PASSWORD, 535) for m in ("SCRAM-SHA-256", "SCRAM-SHA-1",
                                                       "CRAM-MD5")]
    attempts += [(m, "nobody", PASSWORD, 535) for m in ("SCRAM-SHA-256", "CRAM-MD5")]
    attempts += [("PLAIN", "carol", PASSWORD, 235), ("LOGIN", "carol", PASSWORD, 235)]
    with ThreadPoolExecutor(len(attempts)) as pool:
        codes = list(pool.map(
            lambda a: login(daemon, a[0], a[1], a[2], source=f"127.0.1.{attempts.index(a) + 1}"),
            attempts))
    assert codes == [a[3] for a in attempts]
    for number, (mechanism, user, _, code) in enumerate(attempts, start=1):
        if code == 535 and user == "carol":
            # Issue 11, finding 7: carol has no secret for it, which is no failed guess.
            daemon.wait_for(f"AUTH without secret from 127.0.1.{number} user=carol "
                            f"mechanism={mechanism}")
        elif code == 535:
            daemon.wait_for(f"AUTH failed from 127.0.1.{number} user={user} "
                            f"mechanism={mechanism}")
    assert "wrong" not in "\n".join(line for line in daemon.log if "AUTH" in line)
    assert not any("AUTH failed" in line and "user=carol" in line for line in daemon.log)


def test_a_client_trying_cram_md5_first_falls_back_to_plain_at_once(daemon: Daemon) -> None:
    """Issue 11, finding 7: carol (an htpasswd -B line) has no CRAM-MD5 secret; smtplib
    tries CRAM-MD5 first, then PLAIN. Before: each login logged the fail2ban line, waited
    for the throttle (1 s, 2 s, ...) and, from the tenth in ten minutes, the address got
    454. Now twelve logins in a row from one address each take well under a second."""
    for _ in range(12):
        with connect(daemon, "127.0.2.1") as s:
            s.ehlo()
            assert s.esmtp_features["auth"].split()[2] == "CRAM-MD5"
            started = time.monotonic()
            code, _ = s.login("carol", PASSWORD)
            elapsed = time.monotonic() - started
        assert code == 235
        assert elapsed < 0.9, elapsed  # the throttle's first delay is 1 s
    daemon.wait_for("AUTH ok from 127.0.2.1 user=carol mechanism=PLAIN", count=12)
    daemon.wait_for("AUTH without secret from 127.0.2.1 user=carol mechanism=CRAM-MD5",
                    count=12)
    assert not any("AUTH failed from 127.0.2.1" in line for line in daemon.log)


def test_decoy_salts_for_unknown_names_survive_a_restart(tmp_path: Path) -> None:
    """Otherwise recording an unknown name's salt across a restart would tell it apart from a
    real user's, whose salt is stored and never changes."""
    import base64

    d = Daemon(tmp_path, CONFIG)

    def salt() -> str:
        with connect(d) as s:
            s.ehlo()
            first = base64.b64encode(b"n,,n=nobody-here,r=fixednonce").decode()
            code, reply = s.docmd("AUTH", f"SCRAM-SHA-256 {first}")
            assert code == 334, reply
            s.docmd("*")
        fields = dict(f.split("=", 1) for f in base64.b64decode(reply).decode().split(","))
        return fields["s"]

    d.start()
    try:
        before = salt()
        d.stop()
        d.start()
        assert salt() == before
    finally:
        d.stop()
