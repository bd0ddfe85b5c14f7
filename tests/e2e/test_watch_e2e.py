"""Watching it work, end to end (issue 12): ``twistd -n smarthost`` with its [http] listener,
real mail (delivered to a maildir, deferred by a closed port, bounced by an aiosmtpd MX that
refuses the recipient), a failed login; /metrics read with prometheus_client's own parser,
counters kept through SIGHUP, /healthz around the stop, the status page rendered by headless
Chromium, and ``smarthost probe`` passing every check against this daemon (test CA,
credentials, the test DNS server with a PTR record)."""

from __future__ import annotations

import json
import re
import selectors
import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import Daemon, client_tls
from mxpeer import MXPeer
from smarthost.app.tlscert import issue, write_pair

HOST = "mx.smarthost.test"
PASSWORD = "correct horse battery"
HTTP = re.compile(r"http listening on [\d.]+:(\d+)")
TESTS = Path(__file__).parents[1]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def refusing_mx() -> Iterator[MXPeer]:
    peer = MXPeer(reject={"nobody@bounce.test"})
    peer.start()
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def dns(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The test DNS server with the host's A and PTR records; yields its HOST:PORT."""
    zone = tmp_path_factory.mktemp("dns") / "zone.txt"
    zone.write_text(f"{HOST}  A  127.0.0.1\n")
    proc = subprocess.Popen(
        [sys.executable, str(TESTS / "probepeers.py"), "--zone", str(zone),
         "--ptr", f"127.0.0.1={HOST}"],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(30), "the DNS server printed no port"
        yield f"127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.terminate()
        proc.wait(15)


def config(mx_port: int) -> str:
    return f"""
[auth]
mechanisms = ["PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256"]
[relay]
local_domains = ["example.test"]
trusted_networks = []
[relay.senders]
"alice" = ["alice@example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
[delivery.routes]
"deferred.test" = "smtp:127.0.0.1:{closed_port()}"
"bounce.test" = "smtp:127.0.0.1:{mx_port}"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, refusing_mx: MXPeer) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("watch")
    ca = issue(("Smarthost Test CA",), is_ca=True)
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    write_pair(issue((HOST, "127.0.0.1"), ca=ca), directory / "certs/smarthost.pem",
               directory / "certs/smarthost.key")
    d = Daemon(directory, config(refusing_mx.port))
    d.add_user("alice", PASSWORD)
    (directory / "password").write_text(PASSWORD + "\n")
    d.start()
    yield d
    d.stop()


def http_port(d: Daemon) -> int:
    return int(HTTP.search(d.wait_for(HTTP, 10)).group(1))  # type: ignore[union-attr]


def get(d: Daemon, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{http_port(d)}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def scrape(d: Daemon) -> dict[str, float]:
    """Every sample as ``name{label=value,...}``."""
    status, text = get(d, "/metrics")
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def scrape_until(d: Daemon, wanted: dict[str, float], timeout: float = 30) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        found = scrape(d)
        if all(found.get(key, 0) >= value for key, value in wanted.items()):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never reached {wanted}: {found}")
        time.sleep(0.2)  # polling a real daemon's counters, bounded by the deadline


def send(d: Daemon, recipient: str) -> None:
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "alice@example.test", recipient, "hi"
    message.set_content("Hello.\n")
    with smtplib.SMTP_SSL("127.0.0.1", d.ports["submissions"], timeout=30,
                          context=client_tls()) as s:
        s.login("alice", PASSWORD)
        s.send_message(message)


def test_metrics_move_with_real_traffic(daemon: Daemon) -> None:
    assert get(daemon, "/healthz") == (200, "ok\n")
    for recipient in ("bob@example.test", "kim@deferred.test", "nobody@bounce.test"):
        send(daemon, recipient)
    with smtplib.SMTP("127.0.0.1", daemon.ports["submission"], timeout=30) as s:
        s.starttls(context=client_tls())
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "wrong password")
    found = scrape_until(daemon, {
        "smarthost_messages_accepted_total{listener=submissions}": 3,
        "smarthost_recipients_delivered_total{}": 1,
        "smarthost_recipients_deferred_total{}": 1,
        "smarthost_recipients_bounced_total{}": 1,
        "smarthost_auth_failures_total{mechanism=PLAIN}": 1,
        "smarthost_queue_messages{status=deferred}": 1,
    })
    assert found["smarthost_messages_accepted_total{listener=submission}"] == 0
    # The bounce report to alice is delivered to the maildir too: not a client's message.
    assert found["smarthost_spool_commit_seconds_count{}"] == 3
    assert found["smarthost_queue_oldest_age_seconds{}"] >= 0
    assert found["smarthost_connections{listener=submissions}"] == 0
    assert "smarthost_connections{listener=smtp}" in found
    expiry = found["smarthost_tls_certificate_expiry_timestamp_seconds{}"]
    assert 360 * 86400 < expiry - time.time() < 366 * 86400


def test_counters_survive_a_reload(daemon: Daemon) -> None:
    before = scrape(daemon)
    daemon.send_signal(signal.SIGHUP)
    daemon.wait_for("reloaded", 30)
    after = scrape(daemon)
    for key, value in before.items():
        if key.endswith("_total{}") or "_total{" in key:
            assert after[key] >= value, key
    assert after["smarthost_messages_accepted_total{listener=submissions}"] >= 3


def test_status_page_renders_in_chromium(daemon: Daemon, tmp_path: Path) -> None:
    status, _ = get(daemon, "/")
    assert status == 200
    url = f"http://127.0.0.1:{http_port(daemon)}/"
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*chromium, "--dump-dom", url], capture_output=True, text=True,
                         timeout=60)
    assert dom.returncode == 0, dom.stderr
    for text in (HOST, "Destinations with deferred mail", "deferred.test", "Failed logins",
                 "127.0.0.1", "Listeners", "TLS certificate", "<svg"):
        assert text in dom.stdout, text
    shot = tmp_path / "status.png"
    result = subprocess.run([*chromium, "--window-size=1280,1100", f"--screenshot={shot}", url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # a page, not a blank


def test_probe_passes_against_smarthost(daemon: Daemon, dns: str) -> None:
    result = daemon.admin(
        "probe", HOST, "--port", str(daemon.ports["submission"]), "--user", "alice",
        "--password-file", "password", "--cafile", "ca.pem", "--nameserver", dns,
        "--timeout", "10", "--json",
    )
    checks = json.loads(result.stdout)
    assert result.returncode == 0, checks
    assert {c["result"] for c in checks} == {"PASS"}, checks
    names = {c["check"] for c in checks}
    for wanted in ("dns-address", "dns-ptr", "banner", "ehlo", "auth-offered-before-tls",
                   "auth-plain-before-tls", "auth-login-before-tls", "starttls", "tls-version",
                   "certificate", "certificate-expiry", "open-relay", "relay-percent-hack",
                   "relay-bang-path", "relay-source-route", "relay-quoted-local-part",
                   "auth:PLAIN", "auth:LOGIN", "auth:CRAM-MD5", "auth:SCRAM-SHA-256",
                   "sender-ownership"):
        assert wanted in names, wanted


def test_probe_without_the_ca_fails_the_certificate(daemon: Daemon, dns: str) -> None:
    result = daemon.admin("probe", HOST, "--port", str(daemon.ports["submission"]),
                          "--nameserver", dns, "--timeout", "10")
    assert result.returncode == 1, result.stdout
    lines = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}
    assert lines["certificate"] == "FAIL"
    assert lines["open-relay"] == "PASS"


def test_healthz_around_start_and_stop(tmp_path: Path) -> None:
    d = Daemon(tmp_path)
    try:
        d.launch()
        port = int(HTTP.search(d.wait_for(HTTP, 30)).group(1))  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/healthz"
        d.wait_for("ready", 30)
        assert _health(url) == 200
        d.send_signal(signal.SIGTERM)
        d.wait_for("Received SIGTERM", 15)
        seen = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            code = _health(url)
            seen.append(code)
            if code is None:
                break
        assert seen[-1] is None, seen  # the port closed
        assert 200 not in seen, seen  # never "ok" once the stop began
        assert d.proc is not None
        # twistd ends by the signal it was sent (Twisted re-raises it once stopped).
        assert d.proc.wait(15) in (0, -signal.SIGTERM)
    finally:
        d.stop()


def _health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, ConnectionError):
        return None


@pytest.mark.parametrize("workers", [1, 2])
def test_drain_keeps_accepting_with_healthz_503(tmp_path: Path, workers: int) -> None:
    """``[server] drain``: the first SIGTERM turns /healthz to 503 for the balancer and goes
    on accepting mail (with workers: the master drains, its workers accept); a second
    SIGTERM stops at once."""
    d = Daemon(tmp_path, f"[server]\nworkers = {workers}\ndrain = 120\n"
                         '[relay]\nlocal_domains = ["example.test"]\n')
    try:
        d.start()
        port = int(HTTP.search(d.text()).group(1))  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{port}/healthz"
        assert _health(url) == 200
        d.send_signal(signal.SIGTERM)
        d.wait_for("draining for 120 s", 15)
        assert _health(url) == 503
        with smtplib.SMTP("127.0.0.1", d.ports["smtp"], timeout=30) as s:
            s.sendmail("a@remote.test", ["b@example.test"], b"Subject: drained\r\n\r\nx\r\n")
        d.wait_for("accepted from 127.0.0.1", 15)
        assert d.proc is not None and d.proc.poll() is None  # still serving, 120 s to go
        d.send_signal(signal.SIGTERM)
        d.wait_for("SIGTERM again: stopping now", 15)
        assert d.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        d.stop()
