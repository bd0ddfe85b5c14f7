"""The From:/Sender: ownership check (SPEC "Mail standards", ``[relay] check_header_from``):
a table of header forms and the decision for each, then the check in a session at the end of
DATA (550 5.7.1, nothing queued) and its configuration key."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes import SessionHarness, codes
from smarthost.app.config import parse_config
from smarthost.core import replies as reply
from smarthost.core.enums import Role
from smarthost.core.envelope import Client
from smarthost.core.replies import Reply
from smarthost.smtpd.headerfrom import HeaderError, claimed_senders
from smarthost.smtpd.policy import RelayPolicy
from smarthost.smtpd.reception import HEADER_LIMIT

USER = "alice@example.test"
SENDERS = {USER: frozenset({"sales@example.test", "@alice.test", '"al ice"@example.test',
                            "jörg@bücher.example"})}
ALICE = Client("192.0.2.7", Role.SUBMISSION, tls=True, user=USER)
ANONYMOUS = Client("192.0.2.7", Role.SUBMISSION, tls=True)
TRUSTED = Client("127.0.0.1", Role.SUBMISSION)
OWNED, NOT_OWNED, INVALID = None, reply.HEADER_FROM_NOT_OWNED, reply.HEADER_FROM_INVALID

# (name, header section, client, check_header_from, expected decision)
TABLE: list[tuple[str, bytes, Client, bool, Reply | None]] = [
    ("own address", b"From: alice@example.test\r\n", ALICE, True, OWNED),
    ("display name, own", b"From: Alice <alice@example.test>\r\n", ALICE, True, OWNED),
    ("display name, the CEO's", b"From: CEO <ceo@example.test>\r\n", ALICE, True, NOT_OWNED),
    ("listed in [relay.senders]", b"From: Sales <sales@example.test>\r\n", ALICE, True, OWNED),
    ("whole domain listed", b"From: anything@alice.test\r\n", ALICE, True, OWNED),
    ("upper-case domain", b"From: alice@EXAMPLE.TEST\r\n", ALICE, True, OWNED),
    ("upper-case local part, as the envelope", b"From: ALICE@example.test\r\n", ALICE, True,
     OWNED),
    ("lower-case field name", b"from: alice@example.test\r\n", ALICE, True, OWNED),
    ("comment", b"From: alice@example.test (Alice in Wonderland)\r\n", ALICE, True, OWNED),
    ("needless quotes on the local part", b'From: "alice"@example.test\r\n', ALICE, True,
     OWNED),
    ("quoted local part, listed", b'From: "al ice"@example.test\r\n', ALICE, True, OWNED),
    ("quoted local part, not listed", b'From: "ceo boss"@example.test\r\n', ALICE, True,
     NOT_OWNED),
    ("encoded-word display name", b"From: =?utf-8?q?Al=C3=AFce?= <alice@example.test>\r\n",
     ALICE, True, OWNED),
    ("encoded word naming the CEO, own address",
     b"From: =?utf-8?q?ceo=40example.test?= <alice@example.test>\r\n", ALICE, True, OWNED),
    ("several addresses, all owned", b"From: alice@example.test, sales@example.test\r\n",
     ALICE, True, OWNED),
    ("several addresses, one not owned", b"From: alice@example.test, ceo@example.test\r\n",
     ALICE, True, NOT_OWNED),
    ("group, all owned", b"From: Team: alice@example.test, x@alice.test;\r\n", ALICE, True,
     OWNED),
    ("group hiding the CEO", b"From: Team: alice@example.test, ceo@example.test;\r\n", ALICE,
     True, NOT_OWNED),
    ("empty group", b"From: undisclosed-senders:;\r\n", ALICE, True, OWNED),
    ("no From: at all", b"Subject: hello\r\n", ALICE, True, OWNED),
    ("no header section", b"", ALICE, True, OWNED),
    ("headerless body from a script", b"hello world\r\n", ALICE, True, OWNED),
    ("folded over two lines", b"From: Alice\r\n <alice@example.test>\r\n", ALICE, True, OWNED),
    ("SMTPUTF8 address, owned", "From: Jörg <jörg@bücher.example>\r\n".encode(), ALICE, True,
     OWNED),
    ("SMTPUTF8 domain, upper case", "From: jörg@BÜCHER.example\r\n".encode(), ALICE, True,
     OWNED),
    ("IDN not owned", "From: ceo@bücher.example\r\n".encode(), ALICE, True, NOT_OWNED),
    ("Sender: owned", b"From: sales@example.test\r\nSender: alice@example.test\r\n", ALICE, True,
     OWNED),
    ("Sender: not owned", b"From: alice@example.test\r\nSender: ceo@example.test\r\n", ALICE,
     True, NOT_OWNED),
    ("a second From:", b"From: alice@example.test\r\nFrom: ceo@example.test\r\n", ALICE, True,
     INVALID),
    ("a second Sender:", b"Sender: alice@example.test\r\nsender: alice@example.test\r\n",
     ALICE, True, INVALID),
    ("defect: missing '>'", b"From: <alice@example.test\r\n", ALICE, True, INVALID),
    ("defect: two addresses without a comma",
     b"From: alice@example.test <ceo@example.test>\r\n", ALICE, True, INVALID),
    ("defect: no domain", b"From: alice\r\n", ALICE, True, INVALID),
    ("not UTF-8", b"From: \xe9ve@example.test\r\n", ALICE, True, INVALID),
    ("From: after a broken header line", b"X-A: 1\r\nbroken\r\nFrom: ceo@example.test\r\n",
     ALICE, True, INVALID),
    ("blank before the colon", b"Subject: x\r\nFrom : ceo@example.test\r\n", ALICE, True,
     INVALID),
    ("blank before the colon, first line", b"From : ceo@example.test\r\n", ALICE, True,
     INVALID),
    ("first line a continuation", b" From: ceo@example.test\r\n", ALICE, True, INVALID),
    ("unauthenticated client: not checked", b"From: CEO <ceo@example.test>\r\n", ANONYMOUS,
     True, OWNED),
    ("trusted network: not checked", b"From: CEO <ceo@example.test>\r\n", TRUSTED, True, OWNED),
    ("check_header_from = false", b"From: CEO <ceo@example.test>\r\n", ALICE, False, OWNED),
    ("check_header_from = false, defect", b"From: <ceo@example.test\r\n", ALICE, False, OWNED),
]


def policy(check_header_from: bool = True) -> RelayPolicy:
    return RelayPolicy(frozenset({"example.test"}), (ip_network("127.0.0.0/8"),), SENDERS,
                       check_header_from=check_header_from)


@pytest.mark.parametrize(("header", "client", "check", "expected"),
                         [case[1:] for case in TABLE], ids=[case[0] for case in TABLE])
def test_header_from_table(header: bytes, client: Client, check: bool,
                           expected: Reply | None) -> None:
    assert policy(check).check_header_from(client, header) == expected


def test_the_table_is_large_enough() -> None:
    assert len(TABLE) >= 20
    assert len({case[0] for case in TABLE}) == len(TABLE)


def test_a_header_section_too_long_to_keep_is_refused() -> None:
    # Reception gives None when the section was cut: the From: may lie past the cut.
    assert policy().check_header_from(ALICE, None) == INVALID
    assert policy().check_header_from(ANONYMOUS, None) is None


def test_replies_are_550_5_7_1() -> None:
    for r in (reply.HEADER_FROM_NOT_OWNED, reply.HEADER_FROM_INVALID):
        assert (r.code, r.enhanced) == (550, "5.7.1")


FIELD_PARTS = st.sampled_from([b"From:", b"Sender:", b"From :", b" ", b"<", b">", b"@", b",",
                               b";", b":", b'"', b"(", b")", b"\\", b"=?utf-8?q?a=40b?=",
                               b"\r\n", b"\r\n ", b"a", b"example.test", b".", b"[1.2.3.4]",
                               "\u00e9".encode(), b"\xff", b"\0"])


@settings(max_examples=300, deadline=None)
@given(st.lists(FIELD_PARTS, max_size=30).map(b"".join))
def test_any_header_section_gives_addresses_or_header_error(section: bytes) -> None:
    """Untrusted input: the parser either answers or refuses, never crashes (a 451)."""
    try:
        addresses = claimed_senders(section)
    except HeaderError:
        return
    assert all("@" in a for a in addresses)


def message(header: str) -> str:
    return f"{header}\nTo: bob@partner.test\nSubject: figures\n\nHello Bob\n"


def test_session_refuses_a_forged_from_at_the_end_of_data(tmp_path: Path) -> None:
    h = SessionHarness(tmp_path)
    h.login()
    replies = h.message(USER, ["bob@partner.test"], message("From: CEO <ceo@example.test>"))
    assert codes(replies)[-2:] == [354, 550], replies
    assert replies[-1].startswith("550 5.7.1")
    assert h.spool.queue_ids() == []
    # The session goes on: the next message, with its own From:, is queued.
    replies = h.message(USER, ["bob@partner.test"], message("From: Alice <alice@example.test>"))
    assert codes(replies)[-1] == 250, replies
    assert len(h.spool.queue_ids()) == 1


def test_session_refuses_a_header_section_too_long_to_check(tmp_path: Path) -> None:
    h = SessionHarness(tmp_path, max_size=2 * HEADER_LIMIT)
    h.login()
    filler = "".join(f"X-Filler-{i}: {'x' * 70}\n" for i in range(HEADER_LIMIT // 80 + 10))
    replies = h.message(USER, ["bob@partner.test"],
                        message(filler + "From: alice@example.test"))
    assert replies[-1].startswith("550 5.7.1"), replies[-3:]
    assert h.spool.queue_ids() == []


def test_trusted_network_is_not_checked_in_a_session(tmp_path: Path) -> None:
    h = SessionHarness(tmp_path, client="127.0.0.1", trusted=["127.0.0.0/8"])
    h.send("EHLO client.test")
    replies = h.message("printer@example.test", ["bob@partner.test"],
                        message("From: CEO <ceo@example.test>"))
    assert codes(replies)[-1] == 250, replies


@pytest.mark.parametrize(("text", "expected"), [("", True), ("check_header_from = false\n",
                                                              False)])
def test_config_key(text: str, expected: bool, tmp_path: Path) -> None:
    config = parse_config(f'hostname = "mx.example.test"\n[relay]\n{text}', tmp_path)
    assert config.relay.check_header_from is expected
