"""The From: spoofing fix end to end (SPEC "Mail standards", ``[relay] check_header_from``): a
real ``twistd -n smarthost``, an authenticated user over STARTTLS writing its boss's address
in ``From:`` is refused at the end of DATA and nothing is queued; its own From: is queued."""

from __future__ import annotations

import json
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon import Daemon, client_tls

CONFIG = """
[relay]
local_domains = ["example.test"]
trusted_networks = []
[relay.senders]
"alice" = ["alice@example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
"""


def message(sender: str) -> bytes:
    return (f"From: {sender}\r\nTo: bob@elsewhere.test\r\nSubject: wire transfer\r\n\r\n"
            "Please pay the attached invoice today.\r\n").encode()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(Path(tmp_path_factory.mktemp("header-from")), CONFIG)
    d.add_user("alice", "correct horse")
    d.start()
    yield d
    d.stop()


def queued(d: Daemon) -> list[dict[str, object]]:
    result = d.admin("queue", "--config", str(d.config_path), "list", "--json")
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, object]] = json.loads(result.stdout)
    return entries


def test_forged_from_is_refused_at_end_of_data_and_own_from_passes(daemon: Daemon) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.ports["submission"], timeout=30) as s:
        s.starttls(context=client_tls())
        s.login("alice", "correct horse")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            s.sendmail("alice@example.test", ["bob@elsewhere.test"],
                       message("CEO <ceo@example.test>"))
        error = refused.value.smtp_error
        assert refused.value.smtp_code == 550
        assert (error.decode() if isinstance(error, bytes) else error).startswith("5.7.1")
        assert queued(daemon) == []
        daemon.wait_for("refused DATA <alice@example.test> from 127.0.0.1")
        # The same session goes on; the user's own From: is taken.
        s.sendmail("alice@example.test", ["bob@elsewhere.test"],
                   message("Alice <alice@example.test>"))
    [entry] = queued(daemon)
    assert entry["sender"] == "alice@example.test"
