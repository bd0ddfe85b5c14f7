"""AUTH GSSAPI (RFC 4752) end to end: a private MIT KDC (realm EXAMPLE.TEST), a keytab for
``smtp/mx.smarthost.test``, ``twistd -n smarthost`` with ``[auth] mechanisms = ["PLAIN",
"GSSAPI"]``, a TGT for alice from ``kinit``, and the SASL exchange driven over a real socket
after STARTTLS with the ``gssapi`` package as the client. One KDC and one daemon for the
module."""

from __future__ import annotations

import base64
import os
import shutil
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import attrs
import gssapi
import pytest

from daemon import Daemon, client_tls
from kdcserver import KDC, KRB5KDC, REALM
from mxpeer import MXPeer

pytestmark = pytest.mark.skipif(
    shutil.which("krb5kdc") is None and not os.path.exists(KRB5KDC),
    reason="needs MIT Kerberos' krb5kdc (make test-deps installs krb5-kdc)",
)

SERVICE = "smtp@mx.smarthost.test"  # tests/daemon.py's hostname
PASSWORDS = {"alice": "alice-Krb-pw-1", "alice/admin": "admin-Krb-pw-2"}


@attrs.frozen
class World:
    daemon: Daemon
    kdc: KDC
    peer: MXPeer
    ccaches: dict[str, Path]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("gssapi")
    (tmp / "kdc").mkdir()
    kdc = KDC(tmp / "kdc")
    saved = {k: os.environ.get(k) for k in kdc.env}
    os.environ.update(kdc.env)  # the client side (this process) uses the private realm too
    kdc.start()
    peer = MXPeer("127.0.0.1", name="mx.peer.test")
    peer.start()
    daemon = None
    try:
        keytab = kdc.keytab(kdc.add_principal("smtp/mx.smarthost.test"), tmp / "smtp.keytab")
        ccaches = {}
        for name, password in PASSWORDS.items():
            principal = kdc.add_principal(name, password)
            ccaches[name] = tmp / f"ccache-{name.replace('/', '-')}"
            kdc.kinit(principal, password, ccaches[name])
        daemon = Daemon(tmp, f"""
[auth]
mechanisms = ["PLAIN", "GSSAPI"]
[auth.gssapi]
keytab = "{keytab}"
[relay]
local_domains = ["example.test"]
trusted_networks = []
[relay.senders]
"alice" = ["alice@example.test"]
[delivery.routes]
"*" = "smtp:127.0.0.1:{peer.port}"
""")
        daemon.env.update(kdc.env)
        daemon.start()
        yield World(daemon, kdc, peer, ccaches)
    finally:
        if daemon is not None:
            daemon.stop()
        peer.stop()
        kdc.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(d: Daemon) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", d.ports["submission"], timeout=30)
    s.starttls(context=client_tls())
    s.ehlo()
    return s


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii") or "="


def auth_gssapi(s: smtplib.SMTP, ccache: Path, authzid: bytes = b"",
                layer: int = 0x01) -> int:
    """Drives RFC 4752 as a client; the final reply code."""
    creds = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})
    ctx = gssapi.SecurityContext(
        name=gssapi.Name(SERVICE, gssapi.NameType.hostbased_service), usage="initiate",
        creds=creds,
        flags=gssapi.RequirementFlag.mutual_authentication | gssapi.RequirementFlag.integrity,
    )
    code, text = s.docmd("AUTH", "GSSAPI " + b64(ctx.step() or b""))
    while code == 334 and not ctx.complete:
        out = ctx.step(base64.b64decode(text))
        code, text = s.docmd(b64(out or b""))
    if code == 334 and not text.strip():  # our empty answer to the last context token
        code, text = s.docmd("")
    if code != 334:
        return code
    offer = ctx.unwrap(base64.b64decode(text)).message
    assert offer[0] & 0x01, offer  # "no security layer" offered
    answer = ctx.wrap(bytes([layer, 0, 0, 0]) + authzid, False).message
    code, _ = s.docmd(b64(answer))
    return code


def test_kerberos_user_relays_mail(world: World) -> None:
    before = len(world.peer.messages)
    with connect(world.daemon) as s:
        assert "GSSAPI" in s.esmtp_features.get("auth", "").split()
        assert auth_gssapi(s, world.ccaches["alice"]) == 235
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = ("alice@example.test", "someone@outside.test",
                                                  "via GSSAPI")
        msg.set_content("hello from Kerberos\n")
        s.send_message(msg)
    with world.peer._cond:
        assert world.peer._cond.wait_for(lambda: len(world.peer.messages) > before, 30)
    assert world.peer.messages[-1].mail_from == "alice@example.test"
    world.daemon.wait_for("AUTH ok from 127.0.0.1 user=alice mechanism=GSSAPI", 10)
    world.daemon.wait_for("as alice", 10)


def test_authzid_of_the_same_user_is_accepted(world: World) -> None:
    with connect(world.daemon) as s:
        assert auth_gssapi(s, world.ccaches["alice"], authzid=b"alice") == 235


def test_authzid_of_another_user_is_refused(world: World) -> None:
    with connect(world.daemon) as s:
        assert auth_gssapi(s, world.ccaches["alice"], authzid=b"bob") == 535


def test_security_layer_other_than_none_is_refused(world: World) -> None:
    with connect(world.daemon) as s:
        assert auth_gssapi(s, world.ccaches["alice"], layer=0x02) == 535


def test_principal_with_an_instance_is_refused(world: World) -> None:
    with connect(world.daemon) as s:
        assert auth_gssapi(s, world.ccaches["alice/admin"]) == 535
    world.daemon.wait_for(f"user=alice/admin@{REALM}", 10)


def test_garbage_token_is_535_not_a_traceback(world: World) -> None:
    with connect(world.daemon) as s:
        code, _ = s.docmd("AUTH", "GSSAPI " + b64(b"\x60\x03garbage-token"))
        assert code == 535
        # The session is still usable afterwards.
        assert auth_gssapi(s, world.ccaches["alice"]) == 235
    world.daemon.wait_for("AUTH failed from 127.0.0.1", 10)  # counted like a wrong password
    assert not any("Traceback" in line for line in world.daemon.log)


def test_not_offered_before_tls(world: World) -> None:
    with smtplib.SMTP("127.0.0.1", world.daemon.ports["submission"], timeout=30) as s:
        s.ehlo()
        assert "GSSAPI" not in s.esmtp_features.get("auth", "")
