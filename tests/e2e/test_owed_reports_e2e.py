"""A bounce owed when the daemon died is sent by the next one, once.

The scheduler saves an attempt's outcomes and the reports they make due in one write, and
queues the reports after it. The owed reports used to live only in memory, so a daemon killed
in between left an entry with nothing pending, and the next daemon removed it as done: the
sender never learnt the mail had failed. Killing ``twistd`` at that exact moment needs a hook
the daemon does not have, so this test writes, with the daemon stopped, the spool state such a
kill leaves (the message with its recipient bounced and the failure report owed, through the
real :class:`Spool` and :func:`~smarthost.delivery.reporting.owe`), then starts
``twistd -n smarthost`` on it: the bounce reaches the sender's maildir, the message leaves the
queue, and a ``kill -9`` and another start send nothing more.
"""

from __future__ import annotations

import email
import json
from email import policy
from pathlib import Path

import attrs
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from daemon import Daemon, fired
from smarthost.core.envelope import BOUNCED, Envelope, Outcome, QueueEntry, Recipient
from smarthost.delivery.dsn import ReportedRecipient
from smarthost.delivery.maildir import mailbox_path
from smarthost.delivery.reporting import DueReport, owe
from smarthost.queue.spool import Spool

SENDER, BOUNCED_TO = "alice@example.test", "bob@remote.test"
REPLY = "550 5.1.1 No such user here"
BODY = b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: lost?\r\n\r\nHello.\r\n"


def _died_owing_a_bounce(directory: Path) -> str:
    """What a daemon killed between saving the 550 and queueing its bounce leaves."""
    clock = Clock()
    clock.advance(1_700_000_000)
    spool = Spool(directory, clock=clock, run_blocking=maybeDeferred)
    try:
        spool.recover()
        incoming = spool.receive()
        incoming.write(BODY)
        entry: QueueEntry = fired(incoming.commit(Envelope(
            sender=SENDER, recipients=(Recipient(BOUNCED_TO),), client_address="127.0.0.1",
            received_at=clock.seconds())))
        [state] = entry.recipients
        outcome = Outcome(state.recipient, BOUNCED, REPLY, "mx.remote.test[192.0.2.1]", "5.1.1")
        after = attrs.evolve(
            entry, attempts=1, next_attempt=clock.seconds() + 3600,
            recipients=(attrs.evolve(state, status=BOUNCED, last_reply=REPLY, attempts=1),))
        report = DueReport("failure", (ReportedRecipient.from_outcome(outcome, clock.seconds()),))
        fired(spool.update(owe(after, [report])))
        return str(entry.queue_id)
    finally:
        spool.close()


def test_a_bounce_owed_at_a_crash_is_sent_after_the_restart_once(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, """
[relay]
local_domains = ["example.test"]
[delivery]
local = "maildir:var/maildir"
""")
    daemon.start()  # makes var/spool
    daemon.stop()
    queue_id = _died_owing_a_bounce(tmp_path / "var" / "spool")
    listed = daemon.admin("queue", "--config", str(daemon.config_path), "list", "--json")
    [entry] = json.loads(listed.stdout)
    assert entry["id"] == queue_id and entry["owed_reports"] == 1  # what the operator sees
    mailbox = mailbox_path(tmp_path / "var" / "maildir", SENDER) / "new"
    daemon.start()
    try:
        line = daemon.wait_for(f"{queue_id}: failure report to sender queued as ", timeout=20)
        report_id = line.rsplit(" ", 1)[1]
        daemon.wait_for(f"{queue_id}: removed (done)", timeout=20)
        daemon.wait_for(f"{report_id}: removed (done)", timeout=20)
        daemon.kill9()
        daemon.start()
    finally:
        daemon.stop()
    assert f"{queue_id}:" not in daemon.text()  # the second start found nothing owed
    [path] = list(mailbox.iterdir())
    report = email.message_from_bytes(path.read_bytes(), policy=policy.default)
    assert report.get_content_type() == "multipart/report"
    assert f"rfc822;{BOUNCED_TO}" in path.read_text().replace(" ", "")
    assert "5.1.1" in path.read_text()
