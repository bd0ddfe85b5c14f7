"""`smarthost queue` with `[server] workers = 2`: one spool per worker (`worker-1`,
`worker-2`), every command over all of them, each change made by the worker whose spool
holds the message or, with that worker not running, on its spool directly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, cast

import pytest
from test_admin_queue import queue_many
from test_control import FakeScheduler, Wire
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from smarthost.app import admin, control
from smarthost.core.envelope import QueueEntry
from smarthost.core.maillog import MailLog
from smarthost.delivery.scheduler import Scheduler
from smarthost.queue.spool import Spool


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "smarthost.toml"
    path.write_text('[server]\nworkers = 2\n[queue]\ndirectory = "var/spool"\n')
    return path


def run(config: Path, *args: str) -> int:
    return admin.main(["queue", "--config", str(config), *args])


def two_spools(tmp_path: Path) -> tuple[list[QueueEntry], list[QueueEntry]]:
    root = tmp_path / "var/spool"
    first = queue_many(root / "worker-1", [("a@example.test", None), ("c@example.test", None)])
    second = queue_many(root / "worker-2", [("b@example.test", "bob")])
    return first, second


def listed_ids(config: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert run(config, "list", "--json") == 0
    return [m["id"] for m in json.loads(capsys.readouterr().out)]


def test_list_and_show_cover_every_worker(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = two_spools(tmp_path)
    every = sorted(str(e.queue_id) for e in first + second)
    assert listed_ids(config, capsys) == every  # merged, in arrival (id) order
    assert run(config, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == every
    assert lines[-1] == "-- 3 messages in queue"
    assert run(config, "list", "--sender", "b@example.test") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "-- 1 of 3 messages match"
    assert run(config, "show", str(second[0].queue_id)) == 0
    assert "sender: <b@example.test>" in capsys.readouterr().out


def test_changes_go_to_the_spool_holding_each_message(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No worker runs: each spool is changed directly, under its own lock."""
    first, second = two_spools(tmp_path)
    a, b = str(first[0].queue_id), str(second[0].queue_id)
    assert run(config, "hold", a, b) == 0
    assert sorted(capsys.readouterr().out.splitlines()) == sorted([f"held {a}", f"held {b}"])
    assert run(config, "list", "--status", "held") == 0
    assert capsys.readouterr().out.splitlines()[-1] == "-- 2 of 3 messages match"
    assert run(config, "release", "--user", "bob") == 0
    assert capsys.readouterr().out.splitlines() == [
        "released 1 message held for bob (delivered when the daemon next starts)"]
    assert run(config, "delete", "--sender", "c@example.test") == 0
    assert capsys.readouterr().out.splitlines() == [f"deleted {first[1].queue_id}"]
    assert run(config, "delete", "--all") == 0
    assert sorted(capsys.readouterr().out.splitlines()) == sorted([f"deleted {a}", f"deleted {b}"])
    assert listed_ids(config, capsys) == []


def test_an_unknown_id_changes_nothing(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = two_spools(tmp_path)
    missing = "0" * 22
    assert run(config, "delete", str(first[0].queue_id), missing) == 2
    assert f"no message {missing} in the queue" in capsys.readouterr().err
    assert len(listed_ids(config, capsys)) == 3


def test_an_id_in_two_spools_is_refused_not_guessed(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ids are random per worker; should two ever meet, which message is meant is unknown."""
    first, _ = two_spools(tmp_path)
    root = tmp_path / "var/spool"
    shutil.copytree(root / "worker-1", root / "worker-3")  # a left-over spool: still seen
    queue_id = str(first[0].queue_id)
    assert run(config, "delete", queue_id) == 2
    assert "is queued in more than one spool" in capsys.readouterr().err
    assert len(listed_ids(config, capsys)) == 5


def test_mail_left_in_the_root_spool_is_listed(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Mail queued while `workers` was 1 stays visible after the switch to 2."""
    [old] = queue_many(tmp_path / "var/spool", [("old@example.test", None)])
    assert listed_ids(config, capsys) == [str(old.queue_id)]
    assert run(config, "delete", str(old.queue_id)) == 0
    assert listed_ids(config, capsys) == []


def test_no_spool_at_all_says_so(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(config, "list") == 2
    assert "no spool at" in capsys.readouterr().err


def test_a_running_worker_makes_its_changes_the_other_spool_is_changed_here(
    tmp_path: Path, config: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Worker 1 runs (its AMP end in memory), worker 2 does not."""
    first, second = two_spools(tmp_path)
    spool, _ = Spool.open(tmp_path / "var/spool/worker-1", clock=Clock(),
                          run_blocking=maybeDeferred)
    scheduler = FakeScheduler(spool)
    commands = control.ControlCommands(spool, cast(Scheduler, scheduler), MailLog(Clock()))

    def connect(directory: str, timeout: float = 0) -> control.ControlClient | None:
        if directory != spool.directory:
            return None
        wire = Wire(control.ControlFactory(commands).buildProtocol(None))
        return control.ControlClient(cast(Any, wire))

    monkeypatch.setattr(control.ControlClient, "connect", staticmethod(connect))
    a, b = first[0].queue_id, second[0].queue_id
    assert run(config, "hold", str(a), str(b)) == 0
    assert capsys.readouterr().out.splitlines() == ["held 1", f"held {b}"]
    assert scheduler.held == [a]
    assert run(config, "flush") == 0
    assert capsys.readouterr().out.splitlines() == [
        "flushed: 7 messages will be retried now",
        f"no daemon is running on {tmp_path / 'var/spool/worker-2'}; its messages are "
        "retried when it starts",
    ]
    assert run(config, "delete", "--all") == 0
    assert capsys.readouterr().out.splitlines() == ["deleted 2", f"deleted {b}"]
    assert spool.queue_ids() == []
    spool.close()
