"""What a scanner sees on our TLS listeners, end to end: ``twistd -n smarthost`` on loopback,
probed on the submission port (STARTTLS) and the submissions port (implicit TLS) by Debian's
``openssl s_client`` one protocol, suite and group at a time, and by sslyze's Mozilla
"intermediate" check when sslyze is installed.

sslyze is not a test dependency: it pins cryptography below the version this project runs on,
so it is installed apart (``pipx install sslyze``) and found on PATH or through ``SSLYZE``.
The in-memory handshakes of tests/unit/test_tls_profile.py cover RSA keys and the old profile.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daemon import Daemon
from smarthost.app import tlscert

OPENSSL = shutil.which("openssl")
SSLYZE = os.environ.get("SSLYZE") or shutil.which("sslyze")
LISTENERS = ["submission", "submissions"]  # STARTTLS, implicit TLS

# The certificate is an ECDSA P-256 key (what the self-signed default and certbot make), so
# the TLS 1.2 suites a client can get are the ECDSA ones.
INTERMEDIATE_TLS12 = {
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
}
TLS13_SUITES = {
    "TLS_AES_128_GCM_SHA256": True, "TLS_AES_256_GCM_SHA384": True,
    "TLS_CHACHA20_POLY1305_SHA256": True, "TLS_AES_128_CCM_SHA256": False,
    "TLS_AES_128_CCM_8_SHA256": False,
}
# The groups OpenSSL 3.0's client offers, and whether Mozilla intermediate allows them.
GROUPS = {
    "X25519": True, "P-256": True, "P-384": True, "X448": False, "P-521": False,
    "ffdhe2048": False, "ffdhe3072": False, "ffdhe4096": False, "ffdhe6144": False,
    "ffdhe8192": False,
}

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="needs the openssl command-line tool")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("tls")
    # A leaf from a test CA (not self-signed), so that sslyze's path validation can pass.
    ca = tlscert.issue(("Smarthost Test CA",), is_ca=True)
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    leaf = tlscert.issue(("localhost", "127.0.0.1"), ca=ca)
    tlscert.write_pair(leaf, directory / "certs/smarthost.pem", directory / "certs/smarthost.key")
    d = Daemon(directory).start()
    yield d
    d.stop()


def s_client(d: Daemon, listener: str, *args: str) -> str:
    """One ``openssl s_client`` handshake; its output, which says whether it was established
    and, when not, which alert the server sent."""
    starttls = ["-starttls", "smtp"] if listener == "submission" else []
    result = subprocess.run(
        [OPENSSL or "openssl", "s_client", "-brief", "-connect",
         f"127.0.0.1:{d.ports[listener]}", *starttls, *args],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30,
        # Debian's openssl.cnf holds the client to TLS 1.2 and security level 2; a scanner
        # must be free to offer anything.
        env={**os.environ, "OPENSSL_CONF": os.devnull},
    )
    output = result.stdout + result.stderr
    established = "CONNECTION ESTABLISHED" in output
    assert established == (result.returncode == 0), output
    # A refusal must be the server's (an alert it sent), not our client failing on its own.
    assert established or "alert" in output, output
    return output


def probe(d: Daemon, listener: str, variants: Iterable[list[str]]) -> list[str]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda args: s_client(d, listener, *args), variants))


def established(output: str) -> bool:
    return "CONNECTION ESTABLISHED" in output


def client_tls12_suites() -> list[str]:
    listed = subprocess.run(
        [OPENSSL or "openssl", "ciphers", "-tls1_2", "ALL:COMPLEMENTOFALL:!PSK:!SRP:@SECLEVEL=0"],
        capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "OPENSSL_CONF": os.devnull},
    )
    return [name for name in listed.stdout.strip().split(":") if not name.startswith("TLS_")]


@pytest.mark.parametrize("listener", LISTENERS)
def test_only_tls_1_2_and_1_3_are_accepted(daemon: Daemon, listener: str) -> None:
    versions = ["-tls1", "-tls1_1", "-tls1_2", "-tls1_3"]
    outputs = probe(daemon, listener, ([v, "-cipher", "ALL:@SECLEVEL=0"] for v in versions))
    assert [established(o) for o in outputs] == [False, False, True, True]
    assert all("alert protocol version" in o for o in outputs[:2])


@pytest.mark.parametrize("listener", LISTENERS)
def test_tls_1_2_suites_are_exactly_mozilla_intermediate(daemon: Daemon, listener: str) -> None:
    # Before: the CBC (SHA1, SHA256, SHA384) and CCM suites were accepted too.
    suites = client_tls12_suites()
    assert INTERMEDIATE_TLS12 <= set(suites)
    outputs = probe(daemon, listener, (["-tls1_2", "-cipher", f"{s}:@SECLEVEL=0"] for s in suites))
    accepted = {suite for suite, output in zip(suites, outputs, strict=True) if established(output)}
    assert accepted == INTERMEDIATE_TLS12


@pytest.mark.parametrize("listener", LISTENERS)
def test_tls_1_3_suites_are_the_three_aead_ones(daemon: Daemon, listener: str) -> None:
    outputs = probe(daemon, listener, (["-tls1_3", "-ciphersuites", s] for s in TLS13_SUITES))
    assert {s: established(o) for s, o in zip(TLS13_SUITES, outputs, strict=True)} == TLS13_SUITES


@pytest.mark.parametrize("listener", LISTENERS)
def test_key_exchange_groups_are_exactly_mozilla_intermediate(
    daemon: Daemon, listener: str
) -> None:
    # Before: X448 and P-521 (and the finite-field groups) were accepted too.
    outputs = probe(daemon, listener, (["-tls1_3", "-groups", g] for g in GROUPS))
    assert {g: established(o) for g, o in zip(GROUPS, outputs, strict=True)} == GROUPS


@pytest.mark.skipif(
    SSLYZE is None,
    reason="sslyze is not installed (it needs cryptography<47, so it lives in its own venv: "
    "pipx install sslyze, or SSLYZE=/path/to/sslyze)",
)
@pytest.mark.parametrize("listener", LISTENERS)
def test_sslyze_finds_mozilla_intermediate(daemon: Daemon, listener: str) -> None:
    starttls = ["--starttls", "smtp"] if listener == "submission" else []
    result = subprocess.run(
        [SSLYZE or "sslyze", "--mozilla_config", "intermediate",
         "--certinfo_ca_file", str(daemon.directory / "ca.pem"), *starttls,
         f"127.0.0.1:{daemon.ports[listener]}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK - Compliant" in result.stdout


def test_old_profile_lets_tls_1_0_clients_in(tmp_path: Path) -> None:
    d = Daemon(tmp_path, '[tls]\nprofile = "old"\n').start()
    try:
        outputs = probe(d, "submissions", (["-tls1", "-cipher", "ALL:@SECLEVEL=0"],
                                           ["-tls1_3", "-groups", "X448"]))
    finally:
        d.stop()
    assert established(outputs[0]) and "Protocol version: TLSv1\n" in outputs[0]
    assert not established(outputs[1])
