"""The reports a message owes its sender, as its queue entry stores them: what the spool
writes reads back equal, an entry from before the field loads owing nothing (and is written
byte for byte as before while it owes nothing), and a damaged list makes the entry unreadable
rather than silently owing nothing."""

from __future__ import annotations

import json

import pytest

from smarthost.core.envelope import Envelope, QueueEntry, QueueId, Recipient
from smarthost.core.errors import CorruptEntry
from smarthost.delivery.dsn import ReportedRecipient
from smarthost.delivery.reporting import DueReport, decode, encode, owe
from smarthost.queue.segment import decode_entry, encode_entry

T0 = 1_700_000_000.0
QID = QueueId.new(T0)


def entry() -> QueueEntry:
    envelope = Envelope(sender="alice@example.test",
                        recipients=(Recipient("bob@remote.test", ("SUCCESS", "FAILURE"),
                                              "rfc822;Bob@Remote.test"),
                                    Recipient("carol@remote.test")),
                        received_at=T0)
    return QueueEntry.new(QID, envelope, 100)


def reports() -> list[DueReport]:
    bob, carol = (r.recipient for r in entry().recipients)
    return [
        DueReport("failure", (ReportedRecipient(bob, "5.1.1", "mx1.remote.test",
                                                "550 5.1.1 No such user \udcff", T0 + 1.5),),
                  failing_since=T0 + 2.25),
        DueReport("success", (ReportedRecipient(carol, relayed=True),)),
        DueReport("delay", (ReportedRecipient(carol, last_attempt=T0),),
                  retry_until=T0 + 86400),
    ]


def test_owed_reports_read_back_equal_through_the_spool_encoding() -> None:
    owing = owe(entry(), reports())
    again = decode_entry(QID, encode_entry(owing))
    assert again == owing
    assert [decode(r) for r in again.owed_reports] == reports()


def test_an_entry_owing_nothing_is_written_as_before_the_field() -> None:
    data = entry().to_json()
    assert "owed_reports" not in data
    assert owe(entry(), []) == entry()


def test_an_older_entry_without_the_field_owes_nothing() -> None:
    data = json.loads(encode_entry(entry()))
    data.pop("owed_reports", None)
    assert decode_entry(QID, json.dumps(data).encode()).owed_reports == ()


@pytest.mark.parametrize("damaged", ["failure", [["failure"]], 7, {"kind": "failure"}])
def test_a_damaged_list_makes_the_entry_unreadable(damaged: object) -> None:
    data = json.loads(encode_entry(owe(entry(), reports())))
    data["owed_reports"] = damaged
    with pytest.raises(CorruptEntry):
        decode_entry(QID, json.dumps(data).encode())


def test_a_damaged_report_in_a_sound_list_is_for_the_delivery_side_to_judge() -> None:
    data = json.loads(encode_entry(entry()))
    data["owed_reports"] = [{"kind": "failure"}]
    loaded = decode_entry(QID, json.dumps(data).encode())
    with pytest.raises(KeyError):  # the scheduler logs and drops it (test_delivered_once)
        decode(loaded.owed_reports[0])


def test_an_unknown_kind_is_not_a_report() -> None:
    data = encode(reports()[0]) | {"kind": "gossip"}
    with pytest.raises(ValueError, match="gossip"):
        decode(data)
