"""The server TLS profiles, checked by real handshakes in memory (no sockets): a client that
offers one protocol, one suite or one key-exchange group at a time, as a scanner does, must
get exactly what Mozilla's guidelines allow. tests/e2e/test_tls_profile_e2e.py does the same
against twistd with Debian's openssl and sslyze."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from OpenSSL._util import lib as openssl

from smarthost.app import tlscert
from smarthost.app.config import ConfigError, parse_config
from smarthost.smtpd.listen import server_tls_options

TLS1_0, TLS1_1, TLS1_2, TLS1_3 = (
    SSL.TLS1_VERSION, SSL.TLS1_1_VERSION, SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION
)
EVERY_SUITE = b"ALL:COMPLEMENTOFALL:@SECLEVEL=0"
TLS13_SUITES = (
    "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_CCM_SHA256", "TLS_AES_128_CCM_8_SHA256",
)
GROUPS = (
    "X25519MLKEM768", "SecP256r1MLKEM768", "SecP384r1MLKEM1024", "X25519", "X448",
    "P-256", "P-384", "P-521", "brainpoolP256r1", "brainpoolP384r1", "brainpoolP512r1",
    "ffdhe2048", "ffdhe3072", "ffdhe4096", "ffdhe6144", "ffdhe8192",
)
CLASSIC_GROUPS = {"X25519", "P-256", "P-384"}  # Mozilla intermediate 5.7 and 6.0
INTERMEDIATE_ECDSA = {
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
}
INTERMEDIATE_RSA = {
    "ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305",
}


def client_knows_group(name: str) -> bool:
    context = SSL.Context(SSL.TLS_METHOD)
    known = openssl.SSL_CTX_set1_curves_list(context._context, name.encode()) == 1
    openssl.ERR_clear_error()
    return bool(known)


def handshake(
    server: SSL.Context,
    version: int,
    ciphers: bytes = EVERY_SUITE,
    suites: str | None = None,
    group: str | None = None,
) -> SSL.Connection | None:
    """One handshake through memory BIOs: the client connection when it completes, None when
    either side refuses."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.set_cipher_list(ciphers)
    if suites is not None:
        context.set_tls13_ciphersuites(suites.encode())
    if group is not None:
        assert openssl.SSL_CTX_set1_curves_list(context._context, group.encode()) == 1
    client, peer = SSL.Connection(context), SSL.Connection(server)
    client.set_connect_state()
    peer.set_accept_state()
    for _ in range(10):  # a TLS handshake takes at most a few flights
        for one, other in ((client, peer), (peer, client)):
            try:
                one.do_handshake()
            except SSL.WantReadError:
                pass
            except SSL.Error:
                return None
            try:
                other.bio_write(one.bio_read(1 << 16))
            except SSL.WantReadError:
                pass
        if client.get_cipher_name() is not None and peer.get_cipher_name() is not None:
            return client
    raise AssertionError("handshake neither finished nor failed")


def tls12_suites() -> list[str]:
    """Every TLS 1.2-and-older suite this OpenSSL can offer."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_cipher_list(EVERY_SUITE)
    return [name for name in SSL.Connection(context).get_cipher_list()
            if not name.startswith("TLS_")]


def rsa_pair(bits: int = 2048) -> tlscert.KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return tlscert.KeyPair(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


ServerFactory = Callable[[str, str], SSL.Context]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerFactory:
    """server(profile, "ecdsa" | "rsa"): the context our listeners would use."""
    directory = tmp_path_factory.mktemp("tls")
    pairs = {"ecdsa": tlscert.issue(("localhost",)), "rsa": rsa_pair()}
    for kind, pair in pairs.items():
        tlscert.write_pair(pair, directory / f"{kind}.pem", directory / f"{kind}.key")

    def make(profile: str, kind: str) -> SSL.Context:
        options = server_tls_options(
            directory / f"{kind}.pem", directory / f"{kind}.key", profile
        )
        return options.getContext()

    return make


def accepted_versions(context: SSL.Context) -> set[int]:
    return {v for v in (TLS1_0, TLS1_1, TLS1_2, TLS1_3) if handshake(context, v) is not None}


def accepted_tls12_suites(context: SSL.Context) -> set[str]:
    return {name for name in tls12_suites()
            if handshake(context, TLS1_2, ciphers=name.encode() + b":@SECLEVEL=0")}


def accepted_groups(context: SSL.Context, version: int) -> set[str]:
    return {name for name in GROUPS
            if client_knows_group(name) and handshake(context, version, group=name)}


def test_intermediate_offers_tls_1_2_and_1_3_only(server: ServerFactory) -> None:
    for kind in ("ecdsa", "rsa"):
        assert accepted_versions(server("intermediate", kind)) == {TLS1_2, TLS1_3}


def test_intermediate_tls_1_2_suites_are_the_forward_secret_aead_ones(
    server: ServerFactory,
) -> None:
    # Before the profile: CBC (SHA1, SHA256/384) and CCM suites were accepted too.
    assert accepted_tls12_suites(server("intermediate", "ecdsa")) == INTERMEDIATE_ECDSA
    # With an RSA key: no RSA key exchange (no forward secrecy) and no DHE.
    assert accepted_tls12_suites(server("intermediate", "rsa")) == INTERMEDIATE_RSA


def test_tls_1_3_suites_are_the_three_aead_ones(server: ServerFactory) -> None:
    for profile in ("intermediate", "old"):
        context = server(profile, "ecdsa")
        accepted = {s for s in TLS13_SUITES if handshake(context, TLS1_3, suites=s)}
        assert accepted == set(TLS13_SUITES[:3])


def test_key_exchange_groups_are_x25519_p256_p384_and_the_hybrid(
    server: ServerFactory,
) -> None:
    # Before the profile: X448, P-521 and the finite-field groups were accepted too.
    hybrid = {"X25519MLKEM768"} if client_knows_group("X25519MLKEM768") else set()
    assert accepted_groups(server("intermediate", "ecdsa"), TLS1_3) == CLASSIC_GROUPS | hybrid
    # TLS 1.2 has no hybrid; an RSA key, because TLS 1.2 ties an ECDSA key's curve to the
    # groups the client offers.
    assert accepted_groups(server("intermediate", "rsa"), TLS1_2) == CLASSIC_GROUPS
    assert accepted_groups(server("old", "ecdsa"), TLS1_3) == CLASSIC_GROUPS | hybrid


def test_old_profile_adds_tls_1_0_and_cbc_suites(server: ServerFactory) -> None:
    context = server("old", "ecdsa")
    assert accepted_versions(context) == {TLS1_0, TLS1_1, TLS1_2, TLS1_3}
    client = handshake(context, TLS1_0)
    assert client is not None and client.get_cipher_name() == "ECDHE-ECDSA-AES128-SHA"
    suites = accepted_tls12_suites(context)
    assert INTERMEDIATE_ECDSA < suites
    assert "ECDHE-ECDSA-AES256-SHA384" in suites
    assert not any("CCM" in s or "DHE-RSA" in s or "DES" in s for s in suites)


def test_chain_is_served_leaf_first(tmp_path: Path) -> None:
    ca = tlscert.issue(("Test CA",), is_ca=True)
    leaf = tlscert.issue(("localhost",), ca=ca)
    (tmp_path / "chain.pem").write_bytes(leaf.cert_pem + ca.cert_pem)
    (tmp_path / "leaf.key").write_bytes(leaf.key_pem)
    options = server_tls_options(tmp_path / "chain.pem", tmp_path / "leaf.key")
    client = handshake(options.getContext(), TLS1_3)
    assert client is not None
    chain = client.get_peer_cert_chain(as_cryptography=True)
    assert chain is not None
    assert [c.public_bytes(serialization.Encoding.PEM) for c in chain] == [
        leaf.cert_pem, ca.cert_pem
    ]


def test_a_certificate_openssl_refuses_fails_when_the_options_are_made(tmp_path: Path) -> None:
    # Before: accepted at start-up, then every client's handshake failed. The context is now
    # built at once, so start-up (and check-config) sees it.
    tlscert.write_pair(rsa_pair(bits=1024), tmp_path / "weak.pem", tmp_path / "weak.key")
    with pytest.raises(SSL.Error, match="key too small"):
        server_tls_options(tmp_path / "weak.pem", tmp_path / "weak.key")


def test_profile_key_in_the_config(tmp_path: Path) -> None:
    assert parse_config("", tmp_path).tls.profile == "intermediate"
    assert parse_config('[tls]\nprofile = "old"\n', tmp_path).tls.profile == "old"
    for bad in ('"modern"', '"Intermediate"', "1"):
        with pytest.raises(ConfigError) as error:
            parse_config(f"[tls]\nprofile = {bad}\n", tmp_path)
        assert error.value.key == "tls.profile"
