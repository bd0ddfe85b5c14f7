"""Two real daemons sharing one real redis-server (``[fleet] redis``): a user's hourly limit
counts across both; with Redis killed both still accept mail on their own counts, and each
logs the outage once."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import Daemon, client_tls
from redisserver import RedisServer, needs_redis

pytestmark = needs_redis()

CONFIG = """
[relay]
local_domains = ["example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
[limits]
messages_per_user_per_hour = 3
[fleet]
redis = "{url}"
"""
USERS = {"alice@example.test": "alice pw", "bob@example.test": "bob pw"}
COUNTING = "fleet: counting across the fleet in redis"
UNREACHABLE = "fleet: redis unreachable, counting locally"


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def nodes(tmp_path: Path, redis: RedisServer) -> Iterator[tuple[Daemon, Daemon]]:
    started: list[Daemon] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            node = Daemon(tmp_path / name, CONFIG.format(url=redis.url))
            for user, password in USERS.items():
                node.add_user(user, password)
            started.append(node.start())
            node.wait_for(COUNTING)
        yield started[0], started[1]
    finally:
        for node in started:
            node.stop()


def send(node: Daemon, user: str, n: int) -> tuple[int, bytes]:
    """One message from ``user`` in its own session through ``node``; the reply to it."""
    with smtplib.SMTP_SSL("127.0.0.1", node.ports["submissions"], timeout=30,
                          context=client_tls()) as s:
        s.login(user, USERS[user])
        try:
            s.sendmail(user, ["postmaster@example.test"], b"Subject: %d\r\n\r\nbody\r\n" % n)
        except smtplib.SMTPSenderRefused as e:
            return e.smtp_code, e.smtp_error
        return 250, b""


def test_hourly_limit_across_two_nodes(nodes: tuple[Daemon, Daemon]) -> None:
    a, b = nodes
    replies = [send(node, "alice@example.test", n) for n, node in enumerate((a, a, b, b))]
    assert [code for code, _ in replies[:3]] == [250, 250, 250]
    code, text = replies[3]
    assert code == 451 and text.startswith(b"4.7.1"), replies[3]
    # ...and on A too, which last heard of alice at its own second message: the session asks
    # for the fleet's count at AUTH success and MAIL waits for the answer.
    codes = [send(a, "alice@example.test", n)[0] for n in (4, 5)]
    assert codes == [451, 451], codes
    assert send(a, "bob@example.test", 6)[0] == 250  # another user is not affected


def test_redis_killed_mail_still_accepted_outage_logged_once(
    nodes: tuple[Daemon, Daemon], redis: RedisServer,
) -> None:
    a, b = nodes
    assert send(a, "alice@example.test", 0)[0] == 250
    redis.kill()
    for n, node in enumerate((a, b, a, b)):
        assert send(node, "bob@example.test", n)[0] == 250  # four: the fleet's count is gone
    # Each node still counts its own: bob's third on A is his last there this hour.
    assert send(a, "bob@example.test", 4)[0] == 250
    assert send(a, "bob@example.test", 5)[0] == 451
    for node in (a, b):
        node.wait_for(UNREACHABLE)
        assert sum(UNREACHABLE in line for line in node.log) == 1, node.text()
