"""The ``dkim`` plugin: messages signed through the real session path and verified from the
spool with dkimpy's own verifier; what is not signed; settings and key errors."""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from fakes import PluginSession, codes, run_now
from smarthost.api import Context, IHeaderAdder
from smarthost.app.pluginload import PluginError, build_plugins
from smarthost.plugins.dkim import (
    DKIMPlugin,
    fields_to_sign,
    header_names,
    parse_settings,
)

MESSAGE = """\
From: Alice <alice@example.test>
To: Bob <bob@partner.test>
Subject: Quarterly figures
Date: Tue, 14 Nov 2023 22:13:20 +0000
Message-ID: <1@example.test>
MIME-Version: 1.0
Content-Type: text/plain; charset=utf-8

Hello Bob,
 here are the figures.\t
..a line that starts with a dot
"""


@pytest.fixture(scope="module")
def key_pair() -> tuple[bytes, bytes]:
    """(PKCS#8 PEM private key, the TXT record publishing its public half)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dns_for(records: dict[bytes, bytes]) -> Callable[..., bytes | None]:
    asked: list[bytes] = []

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        asked.append(name)
        return records.get(name)

    dnsfunc.asked = asked  # type: ignore[attr-defined]
    return dnsfunc


def signer(tmp_path: Path, pem: bytes, **settings: Any) -> list[tuple[str, object]]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    key = tmp_path / "example.test.key"
    key.write_bytes(pem)
    settings.setdefault("keys", {"example.test": {"selector": "s1", "key": str(key)}})
    context = Context(Clock(), "mx.smarthost.test", object(), run_now)
    plugins = build_plugins(["dkim"], {"dkim": settings}, context)
    verifyObject(IHeaderAdder, plugins[0][1])
    return plugins


def submit(tmp_path: Path, plugins: list[tuple[str, object]], *, login: bool = True,
           sender: str = "alice@example.test", message: str = MESSAGE,
           trusted: tuple[str, ...] = ()) -> bytes:
    # alice may also write as alice@partner.test, so a message "from" another domain reaches
    # the DKIM stage (the From: ownership check would refuse it otherwise).
    session = PluginSession(tmp_path / "session", plugins, trusted=trusted,
                            senders={"alice@example.test": frozenset({"alice@partner.test"})})
    if login:
        session.login()
    else:
        session.send("EHLO client.test")
    replies = session.message(sender, ["bob@partner.test"], message)
    assert codes(replies)[-1] == 250, replies
    [body] = session.committed()
    return body


def test_signed_through_the_session_and_verified_by_dkimpy(
    tmp_path: Path, key_pair: tuple[bytes, bytes]
) -> None:
    pem, txt = key_pair
    body = submit(tmp_path, signer(tmp_path, pem))
    assert body.startswith(b"DKIM-Signature: ")
    dnsfunc = dns_for({b"s1._domainkey.example.test.": txt})
    assert dkim.verify(body, dnsfunc=dnsfunc)
    assert dnsfunc.asked == [b"s1._domainkey.example.test."]  # type: ignore[attr-defined]
    signature = body.split(b"\r\nReceived:", 1)[0].decode()
    assert "c=relaxed/relaxed" in signature
    assert "d=example.test" in signature and "s=s1" in signature
    # From (and the other singletons) are oversigned: h= names From twice.
    h = signature.split("h=", 1)[1].split(";", 1)[0].replace("\r\n", "").replace(" ", "")
    assert h.lower().split(":").count("from") == 2
    assert "received" not in h.lower()


def test_signature_breaks_when_the_message_changes(
    tmp_path: Path, key_pair: tuple[bytes, bytes]
) -> None:
    pem, txt = key_pair
    body = submit(tmp_path, signer(tmp_path, pem))
    dnsfunc = dns_for({b"s1._domainkey.example.test.": txt})
    assert not dkim.verify(body.replace(b"figures.", b"figures!"), dnsfunc=dnsfunc)
    # A second From added after signing (RFC 6376 8.15) is caught by the oversigning.
    forged = body.replace(b"\r\nFrom: Alice", b"\r\nFrom: ceo@example.test\r\nFrom: Alice", 1)
    assert not dkim.verify(forged, dnsfunc=dnsfunc)
    # Relaxed canonicalization survives refolding and trailing whitespace changes.
    relaxed = body.replace(b"Subject: Quarterly figures", b"Subject:  Quarterly\r\n figures")
    assert dkim.verify(relaxed.replace(b"figures.\t\r\n", b"figures.\r\n"), dnsfunc=dnsfunc)


def test_pkcs1_key_works_too(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    body = submit(tmp_path, signer(tmp_path, pem))
    dnsfunc = dns_for({b"s1._domainkey.example.test.": b"v=DKIM1; p=" + base64.b64encode(der)})
    assert dkim.verify(body, dnsfunc=dnsfunc)


def test_unauthenticated_mail_is_not_signed(
    tmp_path: Path, key_pair: tuple[bytes, bytes]
) -> None:
    # A trusted-network client (a printer) may relay, but it did not authenticate.
    body = submit(tmp_path, signer(tmp_path, key_pair[0]), login=False,
                  trusted=("192.0.2.0/24",))
    assert b"DKIM-Signature" not in body


def test_other_domains_and_the_null_sender_are_not_signed(
    tmp_path: Path, key_pair: tuple[bytes, bytes]
) -> None:
    plugins = signer(tmp_path, key_pair[0])
    # alice owns only her address; the null sender is always allowed.
    body = submit(tmp_path, plugins, sender="")
    assert b"DKIM-Signature" not in body
    # The key is chosen by the envelope sender's domain (example.test, no key here), never
    # by the From header's (partner.test, which has one).
    session_plugins = signer(tmp_path / "other", key_pair[0], keys={
        "partner.test": {"selector": "s1", "key": str(tmp_path / "example.test.key")}})
    body = submit(tmp_path / "other", session_plugins,
                  message=MESSAGE.replace("alice@example.test", "alice@partner.test"))
    assert b"DKIM-Signature" not in body


def test_no_from_header_no_signature(tmp_path: Path, key_pair: tuple[bytes, bytes]) -> None:
    body = submit(tmp_path, signer(tmp_path, key_pair[0]),
                  message="Subject: no From\n\nbody")
    assert b"DKIM-Signature" not in body


def test_fields_to_sign() -> None:
    headers = b"From: a@b.test\r\nTo: x@y.test,\r\n z@y.test\r\nX-Other: 1\r\nReferences: <1@x>\r\n"
    names = header_names(headers)
    assert names == ["from", "to", "x-other", "references"]
    assert fields_to_sign(["from", "to", "subject", "list-id"], names) == [
        "from", "from", "to", "to"]
    assert fields_to_sign(["list-id"], ["list-id", "list-id"]) == ["list-id", "list-id"]


# -- settings ----------------------------------------------------------------------------


def test_settings_errors_name_the_setting(
    tmp_path: Path, key_pair: tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.key"
    good.write_bytes(key_pair[0])
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    # cryptography makes no keys under 1024 bits: raise the bar instead to test the check.
    monkeypatch.setattr("smarthost.plugins.dkim.MIN_KEY_BITS", 4096)
    small = good

    def key(path: Path | str, selector: str = "s1") -> dict[str, Any]:
        return {"selector": selector, "key": str(path)}

    cases: list[tuple[dict[str, Any], str]] = [
        ({"keys": {"example.test": key(tmp_path / "missing.key")}}, 'keys."example.test".key'),
        ({"keys": {"example.test": key(garbage)}}, 'keys."example.test".key'),
        ({"keys": {"example.test": key(small)}}, 'keys."example.test".key'),  # too small
        ({"keys": {"example.test": key(tmp_path)}}, 'keys."example.test".key'),
        ({"keys": {"example.test": {"selector": "s1"}}}, 'keys."example.test".key'),
        ({"keys": {"example.test": key(good, "bad selector")}},
         'keys."example.test".selector'),
        ({"keys": {"example.test": {**key(good), "algorithm": "x"}}},
         'keys."example.test".algorithm'),
        ({"keys": {"not a domain": key(good)}}, 'keys."not a domain"'),
        ({"keys": {"example.test": "s1"}}, 'keys."example.test"'),
        ({"keys": ["example.test"]}, "keys"),
        ({"keys": {}, "headers": ["To"]}, "headers"),
        ({"keys": {}, "headers": ["From", "Received"]}, "headers[1]"),
        ({"keys": {}, "headers": ["From", "Bad:Name"]}, "headers[1]"),
        ({"keys": {}, "header": ["From"]}, "header"),
    ]
    for settings, name in cases:
        with pytest.raises(ValueError) as caught:
            parse_settings(settings)
        assert str(caught.value).startswith(f"{name}:"), (settings, str(caught.value))
    context = Context(Clock(), "mx.test", object(), run_now)
    with pytest.raises(PluginError) as error:
        build_plugins(["dkim"], {"dkim": cases[0][0]}, context)
    assert error.value.key == "plugins.dkim"
    assert 'keys."example.test".key' in str(error.value)


def test_relative_key_paths(tmp_path: Path, key_pair: tuple[bytes, bytes],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dkim").mkdir()
    (tmp_path / "dkim" / "k.pem").write_bytes(key_pair[0])
    settings = {"keys": {"Example.Test.": {"selector": "s1", "key": "dkim/k.pem"}}}
    monkeypatch.chdir(tmp_path)  # relative to the working directory...
    assert parse_settings(settings).keys["example.test"][0].pem == key_pair[0]
    monkeypatch.chdir("/")
    with pytest.raises(ValueError):
        parse_settings(settings)
    # ... or to the config file's directory, once the context says where that is.
    assert parse_settings(settings, tmp_path).keys["example.test"][0].pem == key_pair[0]
    assert b"PRIVATE" in key_pair[0]
    assert "PRIVATE" not in repr(parse_settings(settings, tmp_path))  # keys stay out of repr


def test_plugin_object(tmp_path: Path, key_pair: tuple[bytes, bytes]) -> None:
    (tmp_path / "k.pem").write_bytes(key_pair[0])
    built = DKIMPlugin().build(
        {"keys": {"example.test": {"selector": "s1", "key": str(tmp_path / "k.pem")}}},
        Context(Clock(), "mx.test", object(), run_now),
    )
    verifyObject(IHeaderAdder, built)


# -- Ed25519 (RFC 8463) and several keys per domain --------------------------------------


def ed25519_pair() -> tuple[ed25519.Ed25519PrivateKey, bytes]:
    """A key and the TXT record publishing it (k=ed25519, p= the raw 32-byte public key)."""
    key = ed25519.Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    return key, b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def signatures(body: bytes) -> list[str]:
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    return [f for f in head.replace("\r\n ", " ").replace("\r\n\t", " ").split("\r\n")
            if f.startswith("DKIM-Signature:")]


def test_ed25519_pem_and_rsa_both_sign_and_verify(
    tmp_path: Path, key_pair: tuple[bytes, bytes]
) -> None:
    """openssl genpkey -algorithm ed25519 writes PKCS#8 PEM; with an RSA key beside it the
    domain sends two signatures and dkimpy verifies each."""
    rsa_pem, rsa_txt = key_pair
    ed_key, ed_txt = ed25519_pair()
    (tmp_path / "rsa.key").write_bytes(rsa_pem)
    (tmp_path / "ed.key").write_bytes(ed_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    keys = {"example.test": [{"selector": "rsa", "key": str(tmp_path / "rsa.key")},
                             {"selector": "ed", "key": str(tmp_path / "ed.key")}]}
    body = submit(tmp_path, signer(tmp_path, rsa_pem, keys=keys))
    found = signatures(body)
    assert len(found) == 2
    assert sum("a=ed25519-sha256" in f for f in found) == 1
    assert sum("a=rsa-sha256" in f for f in found) == 1
    dnsfunc = dns_for({b"rsa._domainkey.example.test.": rsa_txt,
                       b"ed._domainkey.example.test.": ed_txt})
    for index in range(2):  # dkim.verify checks the first; DKIM(...).verify(idx) each
        assert dkim.DKIM(body).verify(idx=index, dnsfunc=dnsfunc)
    tampered = body.replace(b"figures.", b"figures!")
    for index in range(2):
        try:
            valid = dkim.DKIM(tampered).verify(idx=index, dnsfunc=dnsfunc)
        except dkim.ValidationError:  # dkimpy raises on a body hash mismatch at idx > 0
            valid = False
        assert not valid


def test_ed25519_key_as_dknewkey_writes_it(tmp_path: Path) -> None:
    ed_key, ed_txt = ed25519_pair()
    seed = ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    body = submit(tmp_path, signer(tmp_path, base64.b64encode(seed) + b"\n"))
    assert "a=ed25519-sha256" in signatures(body)[0]
    assert dkim.verify(body, dnsfunc=dns_for({b"s1._domainkey.example.test.": ed_txt}))


def test_several_keys_settings_errors(tmp_path: Path, key_pair: tuple[bytes, bytes]) -> None:
    good = tmp_path / "good.key"
    good.write_bytes(key_pair[0])
    short = tmp_path / "short.key"
    short.write_bytes(base64.b64encode(b"x" * 16))
    cases: list[tuple[Any, str]] = [
        ([], 'keys."example.test":'),
        ([{"selector": "a", "key": str(good)}, {"selector": "a", "key": str(good)}],
         'keys."example.test":'),
        ([{"selector": "a", "key": str(good)}, {"selector": "b"}], 'keys."example.test"[1].key:'),
        ([{"selector": "a", "key": str(short)}], 'keys."example.test"[0].key:'),
    ]
    for entries, name in cases:
        with pytest.raises(ValueError) as caught:
            parse_settings({"keys": {"example.test": entries}})
        assert str(caught.value).startswith(name), (entries, str(caught.value))
    parsed = parse_settings({"keys": {"example.test": [{"selector": "a", "key": str(good)}]}})
    assert [k.selector for k in parsed.keys["example.test"]] == ["a"]
