"""`smarthost queue` changing the spool itself, when no daemon answers on the control socket."""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from smarthost.app import admin
from smarthost.core.envelope import Envelope, QueueEntry, Recipient
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
