"""Fill a spool with N deferred messages for the start-up measurement.

Run with the project's venv python: ``python bench/genspool.py DIR N``. It uses the real
:class:`smarthost.queue.spool.Spool` (so the files are exactly what the daemon writes) with a
synchronous ``run_blocking``. The per-batch syncs are skipped here, and one ``sync()`` is
made at the end: how the files got to disk does not change what start-up has to read.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import attrs
from twisted.internet.defer import Deferred, maybeDeferred

from smarthost.core.envelope import Envelope, QueueEntry, Recipient
from smarthost.queue.spool import Spool

LINE = b"x" * 76 + b"\r\n"


class WallClock:
    def seconds(self) -> float:
        return time.time()


def run_now(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    return maybeDeferred(f, *args, **kwargs)


def body(n: int, size: int = 4096) -> bytes:
    head = (
        f"From: bench@src.test\r\nTo: rcpt@dst.test\r\nSubject: bench {n}\r\n"
        f"Message-Id: <bench.{n}@src.test>\r\n\r\n"
    ).encode()
    return head + LINE * (size // len(LINE))


def main(directory: str, count: int) -> None:
    os.fsync = os.fdatasync = lambda fd: None  # see the module docstring
    clock = WallClock()
    spool, _ = Spool.open(directory, clock=clock, run_blocking=run_now)  # type: ignore[arg-type]
    later = time.time() + 86400  # deferred: nothing is due while the benchmark watches
    results: list[QueueEntry] = []
    for n in range(count):
        message = spool.receive()
        message.write(body(n))
        now = clock.seconds()
        envelope = Envelope(
            sender="bench@src.test",
            recipients=(Recipient(f"rcpt{n % 100}@dst.test"),),
            client_address="127.0.0.1",
            client_name="bench.test",
            received_at=now,
        )
        message.commit(envelope).addCallback(results.append)
        entry = results.pop()
        deferred = attrs.evolve(
            entry, attempts=1, next_attempt=later,
            last_error="connection refused by 127.0.0.1[127.0.0.1]:9",
        )
        spool.update(deferred).addErrback(lambda f: f.raiseException())
    spool.close()
    os.sync()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
