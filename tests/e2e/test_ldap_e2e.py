"""Users from the office directory, end to end: a private OpenLDAP slapd (StartTLS, a test
CA, users, a group, a service account) and ``twistd -n smarthost`` with
``[auth] backends = ["users", "ldap"]``; logins with smtplib after STARTTLS relay mail to an
aiosmtpd MX. One slapd and one daemon for the module."""

from __future__ import annotations

import re
import shutil
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage

import attrs
import pytest

from daemon import Daemon, client_tls
from mxpeer import MXPeer
from slapdserver import GROUP_DN, SERVICE_DN, SERVICE_PASSWORD, USERS, Slapd

pytestmark = pytest.mark.skipif(
    shutil.which("slapd") is None and not __import__("os").path.exists("/usr/sbin/slapd"),
    reason="needs OpenLDAP's slapd (make test-deps installs it)",
)


@attrs.frozen
class World:
    daemon: Daemon
    slapd: Slapd
    peer: MXPeer


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("ldap")
    (tmp / "slapd").mkdir()
    slapd = Slapd(tmp / "slapd").start()
    peer = MXPeer("127.0.0.1", name="mx.peer.test")
    peer.start()
    (tmp / "ldap.secret").write_text(SERVICE_PASSWORD + "\n")
    daemon = Daemon(tmp, f"""
[tls]
ca_file = "{slapd.ca_pem}"
[auth]
backends = ["users", "ldap"]
[auth.ldap]
url = "{slapd.url}"
starttls = true
bind_dn = "{SERVICE_DN}"
bind_password_file = "ldap.secret"
base = "dc=example,dc=test"
require_group = "{GROUP_DN}"
[relay]
local_domains = ["example.test"]
trusted_networks = []
[relay.senders]
"bob" = ["bob-alias@example.test"]
[delivery.routes]
"*" = "smtp:127.0.0.1:{peer.port}"
""")
    daemon.add_user("filer", "file-pw")
    try:
        daemon.start()
        yield World(daemon, slapd, peer)
    finally:
        daemon.stop()
        slapd.stop()
        peer.stop()


def submit(d: Daemon, mechanism: str, user: str, password: str, sender: str,
           rcpt: str = "someone@outside.test") -> tuple[int, int]:
    """(AUTH code, MAIL..DATA code): 0 for the second when AUTH failed."""
    with smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=30) as s:
        s.starttls(context=client_tls())
        s.ehlo()
        s.user, s.password = user, password
        authobject = {"PLAIN": s.auth_plain, "LOGIN": s.auth_login}[mechanism]
        try:
            code, _ = s.auth(mechanism, authobject,
                             initial_response_ok=mechanism == "PLAIN")
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code, 0
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = sender, rcpt, f"via {mechanism}"
        msg.set_content("hello from the directory\n")
        try:
            s.send_message(msg, sender, [rcpt])
        except smtplib.SMTPSenderRefused as e:
            return code, e.smtp_code
        return code, 250


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_directory_user_relays_mail(world: World, mechanism: str) -> None:
    password = USERS["alice"][0]
    before = len(world.peer.messages)
    # The sender is alice's through the directory's mail attribute only.
    assert submit(world.daemon, mechanism, "alice", password, "sales@example.test") == (235, 250)
    with world.peer._cond:
        assert world.peer._cond.wait_for(lambda: len(world.peer.messages) > before, 30)
    assert world.peer.messages[-1].mail_from == "sales@example.test"


def test_login_by_mail_address_and_users_file_first(world: World) -> None:
    d = world.daemon
    assert submit(d, "PLAIN", "bob@example.test", USERS["bob"][0], "bob@example.test")[0] == 235
    assert submit(d, "PLAIN", "filer", "file-pw", "filer@example.test")[0] == 235


def test_wrong_password_unknown_user_and_outside_group_refused(world: World) -> None:
    d = world.daemon
    assert submit(d, "PLAIN", "alice", "wrong", "alice@example.test")[0] == 535
    assert submit(d, "LOGIN", "nobody", "x", "nobody@example.test")[0] == 535
    assert submit(d, "PLAIN", "carol", USERS["carol"][0], "carol@example.test")[0] == 535
    # A sender neither the directory nor [relay.senders] gives bob is refused at MAIL;
    # [relay.senders] still adds to what the directory says.
    assert submit(d, "PLAIN", "bob", USERS["bob"][0], "alice@example.test")[1] >= 550
    assert submit(d, "PLAIN", "bob", USERS["bob"][0], "bob-alias@example.test") == (235, 250)


def test_stopped_directory_gives_454_then_recovers(world: World) -> None:
    d, slapd = world.daemon, world.slapd
    slapd.stop()
    try:
        # A password not in the cache: the directory must be asked.
        assert submit(d, "PLAIN", "bob", "not-cached-pw", "bob@example.test")[0] == 454
        d.wait_for(f"LDAP directory {slapd.url} did not answer", 10)
    finally:
        slapd.start()
    assert submit(d, "PLAIN", "bob", USERS["bob"][0], "bob@example.test")[0] == 235


def test_service_password_never_logged(world: World) -> None:
    text = "\n".join([*world.daemon.history, *world.daemon.log])
    assert SERVICE_PASSWORD not in text
    assert USERS["alice"][0] not in text


def test_no_simple_bind_in_plaintext(world: World) -> None:
    """From slapd's own log: every simple BIND ran on a connection with TLS (ssf > 0)."""
    binds = re.findall(r"BIND dn=\"([^\"]*)\" mech=SIMPLE bind_ssf=\d+ ssf=(\d+)",
                       world.slapd.log())
    assert {dn for dn, _ in binds} >= {SERVICE_DN, "uid=alice,ou=people,dc=example,dc=test"}
    assert all(int(ssf) > 0 for _, ssf in binds), binds
