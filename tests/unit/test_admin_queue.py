"""`smarthost queue` changing the spool itself, when no daemon answers on the control socket:
delete (by id, sender, user or all), hold and release, list filters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from test_control import FakeScheduler, Wire
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from smarthost.app import admin, control
from smarthost.core.envelope import Envelope, QueueEntry, Recipient
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool


def queue_one(directory: Path) -> QueueEntry:
    clock = Clock()
    clock.advance(1_700_000_000)
    spool, _ = Spool.open(directory, clock=clock, run_blocking=maybeDeferred)
    message = spool.receive()
    message.write(b"Subject: hi\r\n\r\nhello\r\n")
    done: list[QueueEntry] = []
    message.commit(Envelope("a@example.test", (Recipient("b@example.net"),))).addCallback(
        done.append
    )
    spool.close()
    return done[0]


def test_delete_names_each_message_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    entry = queue_one(tmp_path / "var/spool")
    config = tmp_path / "smarthost.toml"
    config.write_text('[queue]\ndirectory = "var/spool"\n')
    queue_id = str(entry.queue_id)
    code = admin.main(["queue", "--config", str(config), "delete", queue_id, queue_id])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.splitlines() == [f"deleted {queue_id}"]
    assert admin.main(["queue", "--config", str(config), "list"]) == 0
    assert "-- 0 messages in queue" in capsys.readouterr().out


# -- hold, release, delete by criteria, list filters (issue 11) -------------------------------


def queue_many(directory: Path, senders: list[tuple[str, str | None]]) -> list[QueueEntry]:
    """One message per (sender, user); every one to b@example.net."""
    clock = Clock()
    clock.advance(1_700_000_000)
    spool, _ = Spool.open(directory, clock=clock, run_blocking=maybeDeferred)
    done: list[QueueEntry] = []
    for sender, user in senders:
        message = spool.receive()
        message.write(b"Subject: hi\r\n\r\nhello\r\n")
        envelope = Envelope(sender, (Recipient("b@example.net"),), user=user)
        message.commit(envelope).addCallback(done.append)
    spool.close()
    return done


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "smarthost.toml"
    path.write_text('[queue]\ndirectory = "var/spool"\n')
    return path


def run(config: Path, *args: str) -> int:
    return admin.main(["queue", "--config", str(config), *args])


def listed(config: Path, capsys: pytest.CaptureFixture[str], *filters: str) -> list[str]:
    capsys.readouterr()
    assert run(config, "list", *filters) == 0
    return [line.split()[0] for line in capsys.readouterr().out.splitlines()
            if not line.startswith("--")]


def test_hold_and_release_by_id(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = queue_many(tmp_path / "var/spool", [("a@example.test", None)] * 2)
    assert run(config, "hold", str(a.queue_id)) == 0
    assert capsys.readouterr().out.splitlines() == [f"held {a.queue_id}"]
    assert listed(config, capsys, "--status", "held") == [str(a.queue_id)]
    assert listed(config, capsys, "--status", "queued") == [str(b.queue_id)]
    assert run(config, "hold", str(a.queue_id)) == 0
    assert capsys.readouterr().out.splitlines() == [f"{a.queue_id} was held already"]
    assert run(config, "release", str(a.queue_id), str(b.queue_id)) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == sorted([
        f"released {a.queue_id}", f"{b.queue_id} was not held"
    ])
    assert listed(config, capsys, "--status", "held") == []


def test_delete_by_sender_user_or_all(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b, c, d = queue_many(tmp_path / "var/spool", [
        ("spam@example.test", "mallory"), ("Spam@Example.test", None),
        ("alice@example.test", "mallory"), ("alice@example.test", "alice"),
    ])
    assert run(config, "delete", "--sender", "spam@example.test", "--user", "mallory") == 0
    assert capsys.readouterr().out.splitlines() == [f"deleted {a.queue_id}"]
    assert run(config, "delete", "--sender", "<SPAM@example.test>") == 0
    assert capsys.readouterr().out.splitlines() == [f"deleted {b.queue_id}"]
    assert run(config, "delete", "--user", "mallory") == 0
    assert capsys.readouterr().out.splitlines() == [f"deleted {c.queue_id}"]
    assert run(config, "delete", "--user", "nobody") == 0
    assert capsys.readouterr().out.splitlines() == ["no message matches"]
    assert run(config, "delete", "--all") == 0
    assert capsys.readouterr().out.splitlines() == [f"deleted {d.queue_id}"]
    assert listed(config, capsys) == []


@pytest.mark.parametrize("args", [
    ["delete"], ["delete", "--all", "--user", "x"], ["delete", "0123456789AB", "--all"],
    ["release"], ["release", "0123456789AB", "--user", "x"], ["hold", "not-an-id"],
])
def test_wrong_combinations_say_so(config: Path, args: list[str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    queue_many(tmp_path / "var/spool", [])
    assert run(config, *args) == 2
    assert capsys.readouterr().err.startswith("smarthost: ")


def test_list_filters_by_sender_recipient_and_status(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = queue_many(tmp_path / "var/spool", [("a@example.test", None), ("", None)])
    assert listed(config, capsys, "--sender", "A@example.test") == [str(a.queue_id)]
    assert listed(config, capsys, "--sender", "<>") == [str(b.queue_id)]
    assert sorted(listed(config, capsys, "--recipient", "B@example.net")) == sorted([
        str(a.queue_id), str(b.queue_id)
    ])
    assert listed(config, capsys, "--recipient", "c@example.net") == []
    assert listed(config, capsys, "--status", "deferred") == []
    capsys.readouterr()
    assert run(config, "list", "--json", "--sender", "a@example.test") == 0
    [shown] = json.loads(capsys.readouterr().out)
    assert shown["id"] == str(a.queue_id) and shown["status"] == "queued"


def test_release_user_without_a_daemon(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    [a] = queue_many(tmp_path / "var/spool", [("a@example.test", "alice")])
    assert run(config, "hold", str(a.queue_id)) == 0
    capsys.readouterr()
    assert run(config, "release", "--user", "alice") == 0
    assert capsys.readouterr().out.startswith("released 1 message held for alice (delivered")


def test_flush_without_a_daemon_exits_1(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    queue_many(tmp_path / "var/spool", [])
    assert run(config, "flush") == 1
    assert "no daemon is running on this spool" in capsys.readouterr().out



def test_a_running_daemon_makes_the_change(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a daemon on the control socket (here its AMP end in memory), the admin tool asks
    it and does not touch the spool's lock itself."""
    [a] = queue_many(tmp_path / "var/spool", [("a@example.test", None)])
    spool, _ = Spool.open(tmp_path / "var/spool", clock=Clock(), run_blocking=maybeDeferred)
    scheduler = FakeScheduler(spool)
    commands = control.ControlCommands(spool, cast(Scheduler, scheduler), MailLog(Clock()))

    def connect(directory: str, timeout: float = 0) -> control.ControlClient:
        assert directory == spool.directory
        wire = Wire(control.ControlFactory(commands).buildProtocol(None))
        return control.ControlClient(cast(Any, wire))

    monkeypatch.setattr(control.ControlClient, "connect", staticmethod(connect))
    assert run(config, "hold", str(a.queue_id)) == 0  # the daemon holds the lock: no SpoolLocked
    assert capsys.readouterr().out.splitlines() == ["held 1"]
    assert spool.load(a.queue_id).envelope.held and scheduler.held == [a.queue_id]
    assert run(config, "flush") == 0
    assert capsys.readouterr().out.splitlines() == ["flushed: 7 messages will be retried now"]
    assert run(config, "delete", "--all") == 0
    assert capsys.readouterr().out.splitlines() == ["deleted 1"]
    spool.close()
