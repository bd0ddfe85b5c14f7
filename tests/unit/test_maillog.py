"""The operator's log lines: formatted once by us, rendered literally by twisted.logger."""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from smarthost.core.envelope import DEFERRED, Outcome, QueueId, Recipient
from smarthost.core.maillog import MailLog


class MailLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)  # any callable of one event is one
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.log = MailLog(Clock())

    def lines(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e.get("log_namespace") == "smarthost"]

    def test_a_delivery_line_reads_as_before(self) -> None:
        queue_id = QueueId("01A2203286761C839E4B17")
        outcome = Outcome(Recipient("bob@remote.test"), DEFERRED, "451 4.3.0 try later",
                          "mx.remote.test[192.0.2.1]")
        self.log.attempt(queue_id, outcome)
        self.assertEqual(self.lines(), [
            "01A2203286761C839E4B17: to=<bob@remote.test> relay=mx.remote.test[192.0.2.1] "
            "result=deferred reply=451 4.3.0 try later"
        ])
        self.assertEqual(self.events[-1]["recipient"], "bob@remote.test")  # fields kept

    def test_braces_from_the_network_are_text(self) -> None:
        self.log.refused("127.0.0.1", "RCPT", "{log_namespace}{0}@x.test", "554 5.7.1 no")
        self.assertEqual(self.lines(),
                         ["refused RCPT <{log_namespace}{0}@x.test> from 127.0.0.1: 554 5.7.1 no"])

    def test_a_line_that_is_not_plain_format_syntax_is_left_to_twisted(self) -> None:
        self.log.notice("{spool!z} is odd", spool="x")  # no such conversion: must not raise
        [event] = self.events
        self.assertEqual(event["log_format"], "{spool!z} is odd")
