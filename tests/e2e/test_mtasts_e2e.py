"""MTA-STS (RFC 8461) end to end: ``twistd -n smarthost`` finds each recipient domain's
``_mta-sts`` TXT record and its MX hosts through tests/dnsserver.py, fetches the policy over
HTTPS from a real server on loopback, and delivers (or not) to aiosmtpd MX peers offering
STARTTLS with certificates from a test CA that ``[tls] ca_file`` names.

The fetcher asks ``https://mta-sts.DOMAIN/`` on port 443, as RFC 8461 3.3 fixes it: there is
no knob for another port, so the policy server listens on port 443 of a loopback address of
the run's own (the tests run as root; elsewhere the module is skipped, saying so). One
daemon, one policy server, one DNS server for the module; every domain is one case.
"""

from __future__ import annotations

import http.server
import random
import re
import selectors
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_e2e_delivery import delivery_line, message, submit, to, wait_messages

from daemon import Daemon
from mxpeer import MXPeer, Received
from smarthost.app.tlscert import KeyPair, issue

# A /24 of loopback of this run's own: two runs at once (two checkouts, two people) must not
# meet on port 443. Every name reaches it through the test DNS server.
NET = f"127.{random.randint(16, 250)}.{random.randint(0, 255)}"
POLICY_ADDRESS = f"{NET}.1"
MX = {  # domain -> (MX address, the name its certificate is for)
    "good.test": (f"{NET}.2", "mx.good.test"),
    "stray.test": (f"{NET}.3", "mx.stray.test"),
    "badcert.test": (f"{NET}.4", "someone-else.test"),
    "testing.test": (f"{NET}.5", "mx.testing.test"),
}
POLICIES = {  # what https://mta-sts.DOMAIN/.well-known/mta-sts.txt answers
    "good.test": "enforce\nmx: mx.good.test",
    "stray.test": "enforce\nmx: mx.elsewhere.test",  # its real MX is not listed
    "badcert.test": "enforce\nmx: mx.badcert.test",  # listed, but the certificate is wrong
    "testing.test": "testing\nmx: mx.elsewhere.test",
}


def zone() -> str:
    lines = []
    for domain, (address, _name) in MX.items():
        lines += [
            f"{domain} MX 10 mx.{domain}",
            f"mx.{domain} A {address}",
            f"_mta-sts.{domain} TXT v=STSv1; id=1",
            f"mta-sts.{domain} A {POLICY_ADDRESS}",
        ]
    return "\n".join(lines) + "\n"


def can_listen_on_443() -> bool:
    with socket.socket() as s:
        try:
            s.bind((POLICY_ADDRESS, 443))
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(
    not can_listen_on_443(),
    reason="the MTA-STS fetch uses port 443 (RFC 8461 3.3): needs root or CAP_NET_BIND_SERVICE",
)


class PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0]
        domain = host.removeprefix("mta-sts.")
        mode_mx = POLICIES.get(domain)
        if self.path != "/.well-known/mta-sts.txt" or mode_mx is None:
            self.send_error(404)
            return
        mode, mx = mode_mx.split("\n")
        body = f"version: STSv1\r\nmode: {mode}\r\n{mx}\r\nmax_age: 86400\r\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # the daemon's log is the one the tests read


def tls_context(pair: KeyPair, directory: Path) -> ssl.SSLContext:
    (directory / "cert.pem").write_bytes(pair.cert_pem)
    (directory / "key.pem").write_bytes(pair.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


class World:
    """The test CA, the HTTPS policy server, the DNS server and one MX peer per domain."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = issue(("smarthost MTA-STS test CA",), is_ca=True)
        (directory / "ca.pem").write_bytes(self.ca.cert_pem)
        policy_pair = issue(tuple(f"mta-sts.{d}" for d in MX), ca=self.ca)
        self.https = http.server.ThreadingHTTPServer((POLICY_ADDRESS, 443), PolicyHandler)
        self.https.socket = tls_context(policy_pair, Path(tempfile.mkdtemp(dir=directory))) \
            .wrap_socket(self.https.socket, server_side=True)
        self.https_thread = threading.Thread(target=self.https.serve_forever, daemon=True)
        self.https_thread.start()
        self.peers: dict[str, MXPeer] = {}
        port = 0
        for domain, (address, name) in MX.items():
            peer = MXPeer(address, port, name=f"mx.{domain}", starttls=True,
                          certificate=issue((name,), ca=self.ca))
            peer.start()
            port = peer.port
            self.peers[domain] = peer
        self.mx_port = port
        (directory / "zone.txt").write_text(zone())
        self.dns = subprocess.Popen(
            [sys.executable, str(Path(__file__).parents[1] / "dnsserver.py"),
             "--zone", str(directory / "zone.txt"), "--port", "0"],
            stdout=subprocess.PIPE,
        )
        assert self.dns.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.dns.stdout, selectors.EVENT_READ)
            assert sel.select(30), "the DNS server printed no port"
        self.dns_port = int(self.dns.stdout.readline())

    def stop(self) -> None:
        self.dns.terminate()
        self.dns.wait(15)
        for peer in self.peers.values():
            peer.stop()
        self.https.shutdown()
        self.https.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("mtasts-world"))
    try:
        yield w
    finally:
        w.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, world: World) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("mtasts")
    config = f"""
[tls]
ca_file = "{world.directory / 'ca.pem'}"
[relay]
local_domains = ["example.test"]
trusted_networks = ["127.0.0.1/32"]
[queue]
retry = [3600]
lifetime = 86400
delay_warning = 0
[delivery]
port = {world.mx_port}
nameservers = ["127.0.0.1:{world.dns_port}"]
"""
    d = Daemon(directory, config)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def delivered_to(world: World, domain: str, recipient: str) -> Received:
    [received] = wait_messages(world.peers[domain], to(recipient))
    return received


def test_enforce_delivers_to_the_listed_mx_over_verified_tls(
    world: World, daemon: Daemon
) -> None:
    queue_id = submit(daemon, "a@example.test", ["alice@good.test"], message("enforce"))
    delivery_line(daemon, queue_id, "alice@good.test", "delivered")
    assert delivered_to(world, "good.test", "alice@good.test").tls


def test_enforce_defers_when_no_mx_is_listed(world: World, daemon: Daemon) -> None:
    queue_id = submit(daemon, "a@example.test", ["bob@stray.test"], message("stray"))
    line = delivery_line(daemon, queue_id, "bob@stray.test", "deferred")
    assert "MTA-STS policy of stray.test names none of its MX hosts" in line, line
    assert not any(to("bob@stray.test")(m) for m in world.peers["stray.test"].messages)


def test_enforce_defers_on_a_certificate_for_another_name(
    world: World, daemon: Daemon
) -> None:
    queue_id = submit(daemon, "a@example.test", ["carol@badcert.test"], message("badcert"))
    line = delivery_line(daemon, queue_id, "carol@badcert.test", "deferred")
    assert "TLS failure with mx.badcert.test" in line, line
    peer = world.peers["badcert.test"]
    assert not any(to("carol@badcert.test")(m) for m in peer.messages)


def test_testing_delivers_and_logs_what_enforce_would_do(world: World, daemon: Daemon) -> None:
    queue_id = submit(daemon, "a@example.test", ["dave@testing.test"], message("testing"))
    delivery_line(daemon, queue_id, "dave@testing.test", "delivered")
    daemon.wait_for(re.compile(
        r"MTA-STS testing for testing\.test: enforce would deliver only over verified TLS"
        r" and never to mx\.testing\.test"), timeout=20)
    delivered_to(world, "testing.test", "dave@testing.test")


def test_tls_required_no_delivers_where_enforce_would_defer(
    world: World, daemon: Daemon
) -> None:
    data = b"TLS-Required: No\r\n" + message("tls-required-no")
    queue_id = submit(daemon, "a@example.test", ["erin@stray.test"], data)
    delivery_line(daemon, queue_id, "erin@stray.test", "delivered")
    received = delivered_to(world, "stray.test", "erin@stray.test")
    assert b"TLS-Required: No\r\n" in received.data  # RFC 8689 5: the field stays
