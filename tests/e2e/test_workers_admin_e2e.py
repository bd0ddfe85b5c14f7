"""``smarthost queue`` and the master's ``/metrics`` with ``[server] workers = 2``, end to
end: ``twistd -n smarthost`` as a master of two real worker processes on loopback; mail
accepted by both waits in their two spools (its next hop refuses connections), and the
admin tool and Prometheus each see it all in one place."""

from __future__ import annotations

import json
import re
import smtplib
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon import AdoptedSMTP, Daemon, connect_burst, mx_config

ACCEPTED = re.compile(r"\[worker-(\d+) smarthost#info\] (\w+): accepted from")
HTTP = re.compile(r"^(?!.*\[worker-).*http listening on 127\.0\.0\.1:(\d+)")  # the master's
QUEUED_AS = re.compile(r"queued as (\w+)")

CONFIG = mx_config(9, workers=2, retry=3600)  # a closed next hop: the mail stays queued


def send(port: int, n: int, sock: socket.socket | None = None) -> str:
    """One message on its own connection (so the kernel picks a worker for each); its id. On
    the submission port: the smtp role never relays, whatever [relay] trusted_networks says."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) if sock is None else AdoptedSMTP(
            sock) as client:
        client.ehlo("client.test")
        client.mail("a@client.test")
        client.rcpt("b@remote.test")
        code, reply = client.data(f"Subject: m{n}\r\n\r\nbody {n}\r\n")
        assert code == 250, reply
    found = QUEUED_AS.search(reply.decode())
    assert found is not None, reply
    return found.group(1)


def get(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


@pytest.fixture
def two(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, CONFIG)
    try:
        d.start()
        yield d
    finally:
        d.stop()


def test_queue_and_metrics_cover_both_workers(two: Daemon) -> None:
    by_worker: dict[str, str] = {}  # queue id -> worker index
    port = two.ports["submission"]
    for burst in range(25):  # bounded; a burst of 8 connections spreads over both workers
        for n, sock in enumerate(connect_burst(port, 8)):
            queue_id = send(port, burst * 8 + n, sock)
            two.wait_for(re.compile(rf"{queue_id}: accepted from"))
        by_worker.update({m.group(2): m.group(1) for line in two.log
                          if (m := ACCEPTED.search(line))})
        if set(by_worker.values()) == {"1", "2"}:
            break
    assert set(by_worker.values()) == {"1", "2"}, "one worker took every connection"

    listed = two.admin("queue", "--config", str(two.config_path), "list", "--json")
    assert listed.returncode == 0, listed.stderr
    ids = [m["id"] for m in json.loads(listed.stdout)]
    assert ids == sorted(by_worker)  # every message of both spools, in arrival order

    one_each = [next(i for i, w in by_worker.items() if w == k) for k in ("1", "2")]
    held = two.admin("queue", "--config", str(two.config_path), "hold", *one_each)
    assert (held.returncode, held.stdout.splitlines()) == (0, ["held 2"]), held.stderr
    flushed = two.admin("queue", "--config", str(two.config_path), "flush")
    assert flushed.returncode == 0, flushed.stderr
    assert flushed.stdout.startswith("flushed: "), flushed.stdout

    port = int(re.search(HTTP, two.wait_for(HTTP)).group(1))  # type: ignore[union-attr]
    assert get(port, "/healthz") == (200, "ok\n")
    status, text = get(port, "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["smarthost_messages_accepted_total", (("listener", "submission"),)] == len(ids)
    assert samples["smarthost_workers", (("state", "running"),)] == 2
    assert samples["smarthost_workers_scrape_failed", ()] == 0
    assert samples["smarthost_queue_messages", (("status", "held"),)] == 2
    status, page = get(port, "/")
    assert status == 200 and "worker 1" in page and "worker 2" in page
