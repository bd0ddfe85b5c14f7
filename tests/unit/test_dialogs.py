"""SMTP dialogs as transcripts: ``tests/dialogs/*.txt``.

Format, one directive per line:
  ``@ key=value ...``  session setup (role, client, allow_plaintext, max_size, local, trusted)
  ``C: text``          the client sends text + CRLF
  ``C! text``          the client sends text with \\r \\n \\x00 escapes decoded, nothing added
  ``S: text``          the next reply line; ``*`` matches any run of characters
  ``S: <closed>``      the server has closed the connection
  ``Q: n``             n messages are now committed to the spool
  ``H: n``             n of them are held (the compromised-account brake)
  ``# ...``            comment
The session runs on a StringTransport with a real spool (in a temporary directory, fsync
included) and a real cred portal over a bcrypt users file.
"""

from __future__ import annotations

import codecs
import re
from pathlib import Path

import pytest

from fakes import SessionHarness
from smarthost.auth import sasl
from smarthost.smtpd.limits import LimitSettings

DIALOGS = sorted((Path(__file__).parent.parent / "dialogs").glob("*.txt"))


class Dialog:
    def __init__(self, tmp: Path, settings: dict[str, str]) -> None:
        role = settings.get("role", "submission")
        host, port = settings.get("client", "192.0.2.7:4321").rsplit(":", 1)
        harness = SessionHarness(
            tmp,
            role=role,
            client=host,
            port=int(port),
            max_size=int(settings.get("max_size", "10000")),
            max_recipients=int(settings.get("max_recipients", "5")),
            allow_plaintext_auth=settings.get("allow_plaintext", "no") == "yes",
            mechanisms=() if role == "smtp" else sasl.build_mechanisms(["PLAIN", "LOGIN"]),
            users=("alice@example.test", "bob"),
            local_domains=settings.get("local", "example.test").split(","),
            trusted=[n for n in settings.get("trusted", "").split(",") if n],
            senders={"bob": frozenset({"bob@example.test", "@bob.test"})},
            limits=LimitSettings(
                connections_per_ip=int(settings.get("connections_per_ip", "50")),
                auth_failures_per_ip=int(settings.get("auth_failures_per_ip", "10")),
                messages_per_user_per_hour=int(settings.get("rate", "1000")),
                hold_user_after_per_hour=int(settings.get("hold_after", "5000")),
            ),
        )
        self.clock, self.spool = harness.clock, harness.spool
        self.session, self.transport = harness.session, harness.transport
        self.replies: list[str] = []

    def read_replies(self) -> None:
        # Let deliberate delays (AUTH throttle, error stalls) pass in virtual time, one
        # second at a time and only while nothing has been answered.
        for _ in range(30):
            if self.transport.value() or self.replies:
                break
            self.clock.advance(1)
        data = self.transport.value().decode("utf-8")
        self.transport.clear()
        self.replies += data.split("\r\n")[:-1] if data else []


def matches(pattern: str, line: str) -> bool:
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), line) is not None


def parse(path: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    settings: dict[str, str] = {}
    steps: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        if raw.startswith("@ "):
            settings.update(item.split("=", 1) for item in raw[2:].split())  # type: ignore[misc]
            continue
        kind, text = raw[:2], raw[3:]
        assert kind in ("C:", "C!", "S:", "Q:", "H:"), f"{path.name}: bad line {raw!r}"
        steps.append((kind, text))
    return settings, steps


@pytest.mark.parametrize("path", DIALOGS, ids=[p.stem for p in DIALOGS])
def test_dialog(path: Path, tmp_path: Path) -> None:
    settings, steps = parse(path)
    dialog = Dialog(tmp_path, settings)
    line_no = 0
    for kind, text in steps:
        line_no += 1
        if kind == "C:":
            dialog.session.dataReceived(text.encode("utf-8") + b"\r\n")
        elif kind == "C!":
            dialog.session.dataReceived(codecs.escape_decode(text.encode("utf-8"))[0])
        elif kind == "Q:":
            assert len(dialog.spool.queue_ids()) == int(text), f"step {line_no}: queue"
        elif kind == "H:":
            held = [e for e in dialog.spool.entries() if e.envelope.held]
            assert len(held) == int(text), f"step {line_no}: held"
        else:
            dialog.read_replies()
            if text == "<closed>":
                assert dialog.transport.disconnecting, f"step {line_no}: still open"
                continue
            assert dialog.replies, f"step {line_no}: expected {text!r}, got nothing"
            got = dialog.replies.pop(0)
            assert matches(text, got), f"step {line_no}: expected {text!r}, got {got!r}"
    dialog.read_replies()
    assert dialog.replies == [], f"unexpected replies at the end: {dialog.replies}"


def test_dialogs_exist() -> None:
    assert len(DIALOGS) >= 10
