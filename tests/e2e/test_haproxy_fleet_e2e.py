"""Two smarthost nodes behind a real HAProxy, sharing their limits through a real Redis
(SPEC "Using every core, and more than one machine"; issue 15).

HAProxy (tests/haproxypeer.py) balances sessions round-robin over both nodes' submission
listeners, written ``haproxy:tcp:...``, and sends each connection's PROXY v2 header; it checks
each node's ``/healthz``. Clients connect to HAProxy from 127.0.0.2 or 127.0.0.3 while HAProxy
reaches the nodes from 127.0.0.1, so a node that logs the client's address proves it read the
PROXY header. Every node routes remote.test to one test MX (tests/mxpeer.py) and names itself
in its EHLO reply ("a.smarthost.test"), which tells the test where each session landed.

Each user sends at most ``LIMIT`` messages an hour across the fleet, so every test has its own
user.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import smtplib
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import attrs
import pytest

from daemon import Daemon, client_tls
from haproxypeer import HAPROXY, HAProxy, Node, haproxy
from mxpeer import MXPeer
from redisserver import needs_redis, redis_server

pytestmark = [
    needs_redis(),
    pytest.mark.skipif(not os.access(HAPROXY, os.X_OK),
                       reason=f"{HAPROXY} is not installed (make test-deps installs haproxy)"),
]

LIMIT = 4  # [limits] messages_per_user_per_hour
PASSWORD = "Fleet-Pa55-71904"
USERS = ("alice", "bob", "carol", "dave", "erin")
RECIPIENT = "someone@remote.test"
HTTP_LISTENING = re.compile(r"http listening on [\d.]+:(\d+)")

CONFIG = """\
hostname = "{name}.smarthost.test"
[listen]
submission = ["haproxy:tcp:0:interface=127.0.0.1"]
submissions = []
smtp = []
[http]
listen = ["tcp:0:interface=127.0.0.1"]
[relay]
local_domains = ["example.test"]
[queue]
retry = [1]
lifetime = 86400
delay_warning = 0
[delivery]
nameservers = ["127.0.0.1:9"]
[delivery.routes]
"remote.test" = "smtp:127.0.0.1:{mx_port}"
[limits]
messages_per_user_per_hour = {limit}
[fleet]
redis = "{redis}"
[server]
drain = 60
"""


@attrs.frozen
class Sent:
    """One session through HAProxy: the node that answered, the MAIL or end-of-DATA reply."""

    node: str
    code: int
    reply: str
    message_id: str
    queue_id: str = ""  # when accepted


class Fleet:
    """The nodes by name, the HAProxy in front of them and the MX behind them."""

    def __init__(self, nodes: dict[str, Daemon], lb: HAProxy, mx: MXPeer) -> None:
        self.nodes, self.lb, self.mx = nodes, lb, mx

    def send(self, user: str, source: str) -> Sent:
        """One message from ``user``@example.test in its own session, from ``source``."""
        sender = f"{user}@example.test"
        message_id = f"<{uuid.uuid4().hex}@example.test>"
        data = (f"From: {sender}\r\nTo: {RECIPIENT}\r\nSubject: fleet\r\n"
                f"Message-ID: {message_id}\r\n\r\nHello.\r\n").encode()
        with smtplib.SMTP("127.0.0.1", self.lb.port, timeout=30,
                          source_address=(source, 0)) as s:
            s.starttls(context=client_tls())
            s.ehlo("client.test")
            assert s.ehlo_resp is not None
            node = s.ehlo_resp.decode().split(".", 1)[0]
            s.login(sender, PASSWORD)
            code, reply = s.mail(sender)
            if code != 250:
                return Sent(node, code, reply.decode(), message_id)
            code, reply = s.rcpt(RECIPIENT)
            assert code == 250, reply
            code, reply = s.data(data)
        found = re.search(r"queued as (\S+)", reply.decode())
        return Sent(node, code, reply.decode(), message_id, found.group(1) if found else "")

    def logged_accepted(self, sent: Sent, user: str, source: str) -> None:
        """The accepting node's log line names the real client and the user."""
        self.nodes[sent.node].wait_for(
            f"{sent.queue_id}: accepted from {source} as {user}@example.test", timeout=10)

    def delivered(self, sent: Sent, timeout: float = 20.0) -> None:
        self.nodes[sent.node].wait_for(
            re.compile(rf"{sent.queue_id}: to=<{RECIPIENT}> relay=\S+ result=delivered"),
            timeout)


def arrived(mx: MXPeer) -> list[str]:
    """The Message-IDs of what the MX accepted, in order."""
    found = (re.search(rb"^Message-ID: (\S+)\r$", m.data, re.M) for m in mx.messages)
    return [f.group(1).decode() for f in found if f]


def configure(directory: Path, name: str, redis: str, mx_port: int) -> Daemon:
    d = Daemon(directory)
    d.config_path.write_text(CONFIG.format(name=name, redis=redis, mx_port=mx_port, limit=LIMIT))
    return d


def http_port(d: Daemon) -> int:
    found = HTTP_LISTENING.search(d.wait_for(HTTP_LISTENING))
    assert found is not None
    return int(found.group(1))


def node(d: Daemon) -> Node:
    return Node(d.ports["submission"], http_port(d))


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """MX, Redis, both nodes, HAProxy; stopped in the reverse order (the nodes before Redis,
    so no node logs a Redis outage on its way out)."""
    root = tmp_path_factory.mktemp("fleet")
    with ExitStack() as stack:
        mx = MXPeer("127.0.0.1", name="mx.remote.test")
        mx.start()
        stack.callback(mx.stop)
        redis = stack.enter_context(redis_server(root / "redis"))
        nodes: dict[str, Daemon] = {}
        for name in ("a", "b"):
            (root / name).mkdir()
            nodes[name] = configure(root / name, name, redis, mx.port)
            stack.callback(nodes[name].stop)
        for user in USERS:
            nodes["a"].add_user(f"{user}@example.test", PASSWORD)
        (root / "b/var").mkdir()
        shutil.copy(root / "a/var/users", root / "b/var/users")
        for d in nodes.values():
            d.launch()
        for d in nodes.values():
            d.wait_for("ready")
        lb = stack.enter_context(haproxy(root, {name: node(d) for name, d in nodes.items()}))
        lb.wait_servers({"a": "UP", "b": "UP"})
        yield Fleet(nodes, lb, mx)


def test_sessions_are_balanced_over_both_nodes(fleet: Fleet) -> None:
    sent = [fleet.send("alice", "127.0.0.2") for _ in range(LIMIT)]
    assert [s.code for s in sent] == [250] * LIMIT, sent
    nodes = [s.node for s in sent]
    assert nodes.count("a") == nodes.count("b") == LIMIT // 2, sent  # round robin
    for s in sent:
        fleet.logged_accepted(s, "alice", "127.0.0.2")


def test_each_node_logs_the_real_client_address(fleet: Fleet) -> None:
    sent = [fleet.send("bob", "127.0.0.3") for _ in range(2)]
    assert {s.node for s in sent} == {"a", "b"}, sent  # round robin: one each
    for s in sent:
        fleet.logged_accepted(s, "bob", "127.0.0.3")
    # HAProxy itself connects from 127.0.0.1: no node took that for the client.
    for d in fleet.nodes.values():
        assert "accepted from 127.0.0.1 " not in d.text()
    for name in fleet.nodes:  # and HAProxy saw the same client on its side
        fleet.lb.wait_for(re.compile(rf"127\.0\.0\.3:\d+ .* nodes/{name} "))


def test_the_hourly_limit_counts_across_both_nodes(fleet: Fleet) -> None:
    first = [fleet.send("carol", "127.0.0.2") for _ in range(LIMIT)]
    assert [s.code for s in first] == [250] * LIMIT, first
    assert {s.node for s in first} == {"a", "b"}, first  # neither node alone reached LIMIT
    more = [fleet.send("carol", "127.0.0.2") for _ in range(4)]  # two more on each node
    # Counting alone, each node would take LIMIT. Counting in the fleet, the session learns
    # the user's count at AUTH and MAIL waits for it: every one of these is refused, on
    # both nodes.
    assert [s.code for s in more] == [451] * len(more), more
    assert {s.node for s in more} == {"a", "b"}, more
    for s in more:
        assert (s.code, s.reply[:5]) == (451, "4.7.1"), s
        fleet.nodes[s.node].wait_for(
            "refused MAIL <carol@example.test> from 127.0.0.2: rate limit", timeout=10)


def test_a_stopped_node_hands_new_mail_to_the_other_and_keeps_its_own(fleet: Fleet) -> None:
    a, mx = fleet.nodes["a"], fleet.mx
    mx.behaviour.tempfail_first = 10**9  # the MX answers 451: accepted mail stays queued
    try:
        before = [fleet.send("dave", "127.0.0.2") for _ in range(LIMIT)]
        assert [s.code for s in before] == [250] * LIMIT, before
        assert {s.node for s in before} == {"a", "b"}, before
        held_by_a = [s for s in before if s.node == "a"]
        for s in held_by_a:  # tried once and deferred: in node a's spool when it stops
            a.wait_for(re.compile(rf"{s.queue_id}: to=<{RECIPIENT}> .* result=deferred"))

        # SIGTERM with [server] drain: /healthz answers 503 while node a still serves, so
        # HAProxy takes it out on its health check, not on refused connections.
        a.send_signal(signal.SIGTERM)
        a.wait_for("draining for 60 s")
        fleet.lb.wait_servers({"a": "DOWN", "b": "UP"})
        assert a.proc is not None and a.proc.poll() is None  # out of rotation, still up
        after = [fleet.send("erin", "127.0.0.3") for _ in range(LIMIT)]
        assert [(s.node, s.code) for s in after] == [("b", 250)] * LIMIT, after
        a.stop()  # the second SIGTERM: now
    finally:
        mx.behaviour.tempfail_first = 0
    for s in [*before, *after]:
        if s.node == "b":
            fleet.delivered(s)
    # Node a's mail waits for node a: no other node holds its spool.
    assert not {s.message_id for s in held_by_a} & set(arrived(mx))

    # Node a comes back (its ports are new ones: HAProxy is told, as an orchestrator would)
    # and delivers what it had accepted.
    a.start()
    fleet.lb.move("a", node(a))
    fleet.lb.wait_servers({"a": "UP", "b": "UP"})
    for s in held_by_a:
        fleet.delivered(s)
    at_mx = arrived(mx)
    for s in [*before, *after]:  # every 250 from either node: delivered, once
        assert at_mx.count(s.message_id) == 1, (s, at_mx)
