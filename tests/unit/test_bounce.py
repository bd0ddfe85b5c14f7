"""RFC 3464 reports: who is told, what the report says, and that it is valid on the wire."""
# trial's assertion methods carry no annotations.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import email
import io
from email import policy
from email.message import EmailMessage, Message
from email.utils import format_datetime, parsedate_to_datetime

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smarthost.core.envelope import BOUNCED, Envelope, Outcome, Recipient, RecipientState
from smarthost.delivery.bounce import Kind, build_report, report_envelope
from smarthost.delivery.dsn import ReportedRecipient, remote_mta_name, status_from_reply

ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
ORIGINAL = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: bob@remote.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <orig.1@example.test>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"the numbers are attached.\r\n"
)

BOB = Recipient("bob@remote.test", orcpt="rfc822;Bob@Remote.test")
CAROL = Recipient("carol@remote.test")


def envelope(*recipients: Recipient, sender: str = "alice@example.test", ret: str | None = None,
             envid: str | None = "ENV-42") -> Envelope:
    return Envelope(sender=sender, recipients=recipients or (BOB, CAROL), ret=ret, envid=envid,
                    received_at=ARRIVAL)


def reported(rcpt: Recipient, status: str = "5.1.1",
             diagnostic: str = "550 5.1.1 No such user") -> ReportedRecipient:
    return ReportedRecipient(rcpt, status, "mx.remote.test", diagnostic, NOW - 60)


def report(kind: Kind = "failure", env: Envelope | None = None,
           recipients: list[ReportedRecipient] | None = None, original: bytes = ORIGINAL,
           **kwargs: int | float) -> bytes | None:
    env = env or envelope()
    if recipients is None:
        recipients = [reported(r) for r in env.recipients]
    return build_report(
        kind, reporting_mta="mail.example.test", envelope=env, recipients=recipients,
        original=io.BytesIO(original), arrival=ARRIVAL, now=NOW, queue_id="18B3F0C8A00ABCDEF1234",
        **kwargs,  # type: ignore[arg-type]
    )


def parse(data: bytes | None) -> EmailMessage:
    assert data is not None
    msg = email.message_from_bytes(data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return [p for p in payload if isinstance(p, EmailMessage)]


def status_blocks(msg: EmailMessage) -> list[Message]:
    payload = parts(msg)[1].get_payload()
    assert isinstance(payload, list)
    return [b for b in payload if isinstance(b, Message)]


def text_of(msg: EmailMessage) -> str:
    content = parts(msg)[0].get_content()
    assert isinstance(content, str)
    return content.replace("\r\n", "\n")


def assert_wire_clean(test: SynchronousTestCase, data: bytes) -> None:
    """CRLF only (it goes out over SMTP as is) and RFC 5322 2.1.1 line lengths."""
    test.assertTrue(data.endswith(b"\r\n"))
    lines = data.split(b"\r\n")
    for line in lines:
        test.assertNotIn(b"\n", line)
        test.assertNotIn(b"\r", line)
        test.assertLessEqual(len(line), 998)


class FailureReportTests(SynchronousTestCase):
    def test_report_structure(self) -> None:
        msg = parse(report())
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual(
            [p.get_content_type() for p in parts(msg)],
            ["text/plain", "message/delivery-status", "message/rfc822"],
        )

    def test_headers(self) -> None:
        msg = parse(report())
        self.assertEqual(msg["To"], "alice@example.test")
        self.assertEqual(msg["From"].addresses[0].addr_spec, "MAILER-DAEMON@mail.example.test")
        self.assertEqual(msg["Subject"], "Undelivered Mail Returned to Sender")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertEqual(msg["MIME-Version"], "1.0")
        self.assertEqual(parsedate_to_datetime(msg["Date"]).timestamp(), NOW)
        self.assertRegex(msg["Message-ID"], r"^<[^<>@\s]+@mail\.example\.test>$")
        # RFC 3834 3.1.5: threaded to the original.
        self.assertEqual(msg["In-Reply-To"], "<orig.1@example.test>")

    def test_message_ids_are_unique(self) -> None:
        self.assertNotEqual(parse(report())["Message-ID"], parse(report())["Message-ID"])

    def test_per_message_fields(self) -> None:
        fields = status_blocks(parse(report()))[0]
        self.assertEqual(fields["Reporting-MTA"], "dns; mail.example.test")
        self.assertEqual(fields["Original-Envelope-Id"], "ENV-42")
        self.assertEqual(parsedate_to_datetime(fields["Arrival-Date"]).timestamp(), ARRIVAL)

    def test_no_envelope_id_field_without_envid(self) -> None:
        fields = status_blocks(parse(report(env=envelope(envid=None))))[0]
        self.assertIsNone(fields["Original-Envelope-Id"])

    def test_per_recipient_fields(self) -> None:
        recipients = [
            reported(BOB),
            ReportedRecipient(CAROL, "5.7.1", "mx2.remote.test", "554 5.7.1 Relay denied",
                              NOW - 30),
        ]
        bob, carol = status_blocks(parse(report(recipients=recipients)))[1:]
        self.assertEqual(bob["Original-Recipient"], "rfc822;Bob@Remote.test")
        self.assertEqual(bob["Final-Recipient"], "rfc822;bob@remote.test")
        self.assertEqual(bob["Action"], "failed")
        self.assertEqual(bob["Status"], "5.1.1")
        self.assertEqual(bob["Remote-MTA"], "dns; mx.remote.test")
        self.assertEqual(bob["Diagnostic-Code"], "smtp; 550 5.1.1 No such user")
        self.assertEqual(parsedate_to_datetime(bob["Last-Attempt-Date"]).timestamp(), NOW - 60)
        self.assertIsNone(bob["Will-Retry-Until"])
        self.assertIsNone(carol["Original-Recipient"])
        self.assertEqual(carol["Final-Recipient"], "rfc822;carol@remote.test")
        self.assertEqual(carol["Status"], "5.7.1")
        self.assertEqual(carol["Remote-MTA"], "dns; mx2.remote.test")
        self.assertEqual(carol["Diagnostic-Code"], "smtp; 554 5.7.1 Relay denied")

    def test_fields_left_out_when_unknown(self) -> None:
        only = ReportedRecipient(BOB, "5.4.4")
        (fields,) = status_blocks(parse(report(recipients=[only])))[1:]
        self.assertIsNone(fields["Remote-MTA"])
        self.assertIsNone(fields["Diagnostic-Code"])
        self.assertIsNone(fields["Last-Attempt-Date"])

    def test_own_reason_is_not_labelled_smtp(self) -> None:
        own = ReportedRecipient(BOB, "5.1.2", "", "Host or domain name not found")
        (fields,) = status_blocks(parse(report(recipients=[own])))[1:]
        self.assertEqual(fields["Diagnostic-Code"], "X-Smarthost; Host or domain name not found")

    def test_status_defaults_and_expiry_status(self) -> None:
        rcpts = [ReportedRecipient(BOB, ""), ReportedRecipient(CAROL, "4.4.1")]
        bob, carol = status_blocks(parse(report(recipients=rcpts)))[1:]
        self.assertEqual(bob["Status"], "5.0.0")
        # A message that expired after temporary errors keeps its 4.X.X status.
        self.assertEqual(carol["Status"], "4.4.1")

    def test_malformed_status_replaced(self) -> None:
        rcpts = [ReportedRecipient(BOB, "5.1.1\r\nX-Evil: 1"), ReportedRecipient(CAROL, "2.0.0")]
        bob, carol = status_blocks(parse(report(recipients=rcpts)))[1:]
        self.assertEqual(bob["Status"], "5.0.0")
        self.assertEqual(carol["Status"], "5.0.0")

    def test_full_original_returned(self) -> None:
        returned = parts(parse(report()))[2]
        inner = returned.get_payload(0)
        assert isinstance(inner, EmailMessage)
        self.assertEqual(inner["Subject"], "quarterly numbers")
        self.assertEqual(inner.get_content(), "Hello Bob,\r\nthe numbers are attached.\r\n")

    def test_original_carried_byte_for_byte(self) -> None:
        data = report()
        assert data is not None
        self.assertIn(ORIGINAL, data)

    def test_text_part_names_recipients_and_replies(self) -> None:
        text = text_of(parse(report()))
        self.assertIn("bob@remote.test", text)
        self.assertIn("carol@remote.test", text)
        self.assertIn("550 5.1.1 No such user", text)
        self.assertIn("mx.remote.test", text)

    def test_ret_hdrs_returns_headers_only(self) -> None:
        data = report(env=envelope(ret="HDRS"))
        assert data is not None
        returned = parts(parse(data))[2]
        self.assertEqual(returned.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: quarterly numbers", returned.get_content())
        self.assertNotIn(b"the numbers are attached", data)

    def test_ret_full_explicit(self) -> None:
        returned = parts(parse(report(env=envelope(ret="FULL"))))[2]
        self.assertEqual(returned.get_content_type(), "message/rfc822")

    def test_large_original_returns_headers_and_says_so(self) -> None:
        big = ORIGINAL + b"x" * 70 + b"\r\n" * 1 + (b"y" * 70 + b"\r\n") * 2000
        data = report(original=big, max_returned=10_000)
        assert data is not None
        msg = parse(data)
        self.assertEqual(parts(msg)[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"yyyy", data)
        self.assertIn("too large", text_of(msg))

    def test_original_exactly_at_limit_is_returned(self) -> None:
        msg = parse(report(max_returned=len(ORIGINAL)))
        self.assertEqual(parts(msg)[2].get_content_type(), "message/rfc822")

    def test_original_without_body(self) -> None:
        headers_only = b"Subject: no body\r\nFrom: a@example.test\r\n"
        returned = parts(parse(report(original=headers_only)))[2]
        inner = returned.get_payload(0)
        assert isinstance(inner, EmailMessage)
        self.assertEqual(inner["Subject"], "no body")

    def test_header_block_larger_than_read_ahead(self) -> None:
        many = b"".join(b"X-Trace-%d: %s\r\n" % (i, b"t" * 60) for i in range(2000))
        original = many + b"Subject: deep\r\n\r\nbody line\r\n"
        data = report(env=envelope(ret="HDRS"), original=original)
        assert data is not None
        returned = parts(parse(data))[2]
        self.assertIn("Subject: deep", returned.get_content())
        self.assertNotIn(b"body line", data)


class WhoIsToldTests(SynchronousTestCase):
    def test_null_sender_never_gets_a_report(self) -> None:
        for kind in ("failure", "delay", "success"):
            env = envelope(Recipient("bob@remote.test", notify=("SUCCESS", "FAILURE", "DELAY")),
                           sender="")
            self.assertIsNone(report(kind, env=env))

    def test_notify_never_suppresses_everything(self) -> None:
        never = Recipient("bob@remote.test", notify=("NEVER",))
        for kind in ("failure", "delay", "success"):
            self.assertIsNone(report(kind, env=envelope(never)))

    def test_default_notify_is_failure_and_delay(self) -> None:
        env = envelope(CAROL)
        self.assertIsNotNone(report("failure", env=env))
        self.assertIsNotNone(report("delay", env=env))
        self.assertIsNone(report("success", env=env))

    def test_notify_success_only(self) -> None:
        env = envelope(Recipient("bob@remote.test", notify=("SUCCESS",)))
        self.assertIsNotNone(report("success", env=env))
        self.assertIsNone(report("failure", env=env))
        self.assertIsNone(report("delay", env=env))

    def test_recipients_not_asking_are_left_out(self) -> None:
        never = Recipient("never@remote.test", notify=("NEVER",))
        env = envelope(never, CAROL)
        data = report(env=env)
        assert data is not None
        finals = [b["Final-Recipient"] for b in status_blocks(parse(data))[1:]]
        self.assertEqual(finals, ["rfc822;carol@remote.test"])
        self.assertNotIn(b"never@remote.test", data)

    def test_no_recipients_no_report(self) -> None:
        self.assertIsNone(report(recipients=[]))

    def test_unknown_kind_refused(self) -> None:
        with self.assertRaises(ValueError):
            report("bounce")  # type: ignore[arg-type]


class DelayAndSuccessTests(SynchronousTestCase):
    def test_delay_report(self) -> None:
        until = ARRIVAL + 5 * 86400
        data = report("delay", recipients=[reported(CAROL, "4.4.1", "421 4.4.1 try later")],
                      env=envelope(CAROL), retry_until=until)
        msg = parse(data)
        self.assertEqual(msg["Subject"], "Delayed Mail (still being retried)")
        (fields,) = status_blocks(msg)[1:]
        self.assertEqual(fields["Action"], "delayed")
        self.assertEqual(fields["Status"], "4.4.1")
        self.assertEqual(parsedate_to_datetime(fields["Will-Retry-Until"]).timestamp(), until)
        # RFC 3461 4.3: no failure in the report, so headers only.
        self.assertEqual(parts(msg)[2].get_content_type(), "text/rfc822-headers")
        self.assertIn(format_datetime(parsedate_to_datetime(fields["Will-Retry-Until"])),
                      text_of(msg).replace("\n", " "))

    def test_delay_status_must_be_temporary(self) -> None:
        data = report("delay", recipients=[reported(CAROL, "5.1.1")], env=envelope(CAROL))
        (fields,) = status_blocks(parse(data))[1:]
        self.assertEqual(fields["Status"], "4.0.0")

    def test_success_report_delivered_and_relayed(self) -> None:
        want = ("SUCCESS",)
        bob, carol = Recipient("bob@remote.test", want), Recipient("carol@example.test", want)
        recipients = [
            ReportedRecipient(bob, "2.0.0", "mx.remote.test", "250 2.0.0 Ok", NOW, relayed=True),
            ReportedRecipient(carol, "2.0.0", "", "delivered to maildir", NOW),
        ]
        msg = parse(report("success", env=envelope(bob, carol), recipients=recipients))
        self.assertEqual(msg["Subject"], "Successful Mail Delivery Report")
        relayed, delivered = status_blocks(msg)[1:]
        self.assertEqual(relayed["Action"], "relayed")
        self.assertEqual(delivered["Action"], "delivered")
        self.assertEqual(delivered["Status"], "2.0.0")
        self.assertEqual(parts(msg)[2].get_content_type(), "text/rfc822-headers")


class WireFormatTests(SynchronousTestCase):
    def test_crlf_and_line_length(self) -> None:
        long_reply = "550-5.1.1 first line\r\n550 5.1.1 " + "z" * 2500
        recipients = [reported(BOB, diagnostic=long_reply), reported(CAROL)]
        data = report(recipients=recipients)
        assert data is not None
        assert_wire_clean(self, data)
        bob = status_blocks(parse(data))[1]
        self.assertTrue(bob["Diagnostic-Code"].startswith("smtp; 550-5.1.1 first line 550 5.1.1"))

    def test_bare_lf_original_is_normalised(self) -> None:
        data = report(original=b"Subject: lf\n\nline one\nline two\rthree\n")
        assert data is not None
        assert_wire_clean(self, data)
        self.assertIn(b"line one\r\nline two\r\nthree\r\n", data)

    def test_overlong_original_line_is_cut(self) -> None:
        data = report(original=b"Subject: long\r\n\r\n" + b"w" * 3000 + b"\r\n")
        assert data is not None
        assert_wire_clean(self, data)

    def test_eight_bit_original_round_trips(self) -> None:
        original = (
            "Subject: =?utf-8?q?caf=C3=A9?=\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln, 東京\r\n"
        ).encode() + b"raw \xff\xfe byte\r\n"
        data = report(original=original)
        assert data is not None
        assert_wire_clean(self, data)
        self.assertIn(original, data)
        returned = parts(parse(data))[2]
        self.assertEqual(returned["Content-Transfer-Encoding"], "8bit")
        inner = returned.get_payload(0)
        assert isinstance(inner, EmailMessage)
        self.assertEqual(inner["Subject"], "café")
        self.assertEqual(inner.get_payload(decode=True), "Grüße aus Köln, 東京\r\n".encode()
                         + b"raw \xff\xfe byte\r\n")
        self.assertEqual(report_envelope(data, envelope(), NOW).body, "8BITMIME")

    def test_seven_bit_original_declared_7bit(self) -> None:
        data = report()
        assert data is not None
        self.assertTrue(data.isascii())
        self.assertEqual(parts(parse(data))[2]["Content-Transfer-Encoding"], "7bit")

    def test_no_field_injection(self) -> None:
        evil = Recipient("bob@remote.test", orcpt="rfc822;bob@remote.test\r\nAction: delivered")
        recipients = [ReportedRecipient(evil, "5.1.1", "mx.remote.test\r\nX-Evil: 1",
                                        "550 5.1.1 no\r\nAction: delivered\r\n\r\nX-Evil: 2", NOW)]
        data = report(env=envelope(evil, envid="E\r\nX-Evil: 3"), recipients=recipients)
        assert data is not None
        assert_wire_clean(self, data)
        blocks = status_blocks(parse(data))
        self.assertEqual(len(blocks), 2)
        self.assertEqual(blocks[1].get_all("Action"), ["failed"])
        self.assertIsNone(blocks[1]["X-Evil"])
        self.assertIsNone(blocks[0]["X-Evil"])

    def test_internationalized_addresses(self) -> None:
        jose = Recipient("josé@remote.test", orcpt="utf-8;jos\\x{E9}@remote.test")
        env = Envelope(sender="zoë@example.test", recipients=(jose,), smtputf8=True)
        original = "From: zoë@example.test\r\nSubject: ¡hola!\r\n\r\nhi\r\n".encode()
        data = report(env=env, recipients=[reported(jose, diagnostic="550 5.1.1 usuário")],
                      original=original)
        assert data is not None
        assert_wire_clean(self, data)
        msg = email.message_from_bytes(data, policy=policy.SMTPUTF8)
        assert isinstance(msg, EmailMessage)
        self.assertEqual(msg["To"], "zoë@example.test")
        (fields,) = status_blocks(msg)[1:]
        # RFC 6533 3: message/delivery-status stays ASCII.
        self.assertEqual(fields["Final-Recipient"], "utf-8;jos\\x{E9}@remote.test")
        self.assertEqual(fields["Diagnostic-Code"], "smtp; 550 5.1.1 usu\\x{E1}rio")
        # RFC 6532 3.7: an original with UTF-8 headers is returned as message/global.
        self.assertEqual(parts(msg)[2].get_content_type(), "message/global")
        self.assertIn(original, data)
        self.assertTrue(report_envelope(data, env, NOW).smtputf8)

    @settings(max_examples=150, deadline=None)
    @given(original=st.binary(max_size=3000), diagnostic=st.text(max_size=1200),
           kind=st.sampled_from(["failure", "delay", "success"]),
           ret=st.sampled_from([None, "FULL", "HDRS"]))
    def test_any_input_gives_a_valid_report(self, original: bytes, diagnostic: str, kind: Kind,
                                            ret: str | None) -> None:
        rcpt = Recipient("bob@remote.test", notify=("SUCCESS", "FAILURE", "DELAY"))
        data = report(kind, env=envelope(rcpt, ret=ret),
                      recipients=[reported(rcpt, diagnostic=diagnostic)], original=original,
                      max_returned=1000)
        assert data is not None
        assert_wire_clean(self, data)
        msg = parse(data)
        self.assertEqual(len(parts(msg)), 3)
        self.assertEqual(len(status_blocks(msg)), 2)


# What SMTPUTF8 and the spool let through that a header cannot hold: line and paragraph
# separators, NEXT LINE, controls, a lone surrogate (JSON keeps it), and address syntax.
_AWKWARD = "\u2028\u2029\u0085\r\n\x00\t\x0b\x0c\x1c\x1e\x7f\udc80\u200b\ufeff <>\"@;,:\\"
_ANY_TEXT = st.text(
    alphabet=st.one_of(st.characters(exclude_categories=()), st.sampled_from(_AWKWARD)),
    max_size=300,
)


def _sender(local: str) -> str:
    return f'"{local}"@example.test'


class UnbuildableReportTests(SynchronousTestCase):
    """Hardening II, finding 5: a sender such as ``"a\u2028b"@x`` made the builder raise
    ("Header values may not contain linefeed..."); now every envelope gives a valid report."""

    def test_line_separators_in_the_sender(self) -> None:
        for local in ("line\u2028sep", "next\u0085line", "para\u2029sep", "a\u2028\u0085b"):
            env = envelope(BOB, sender=_sender(local))
            data = report(env=env)
            assert data is not None
            assert_wire_clean(self, data)
            shown = local.replace("\u2028", "?").replace("\u0085", "?").replace("\u2029", "?")
            self.assertIn(f"\r\nTo: {_sender(shown)}\r\n".encode(), data)
            # The report still goes to the real address.
            self.assertEqual(report_envelope(data, env, NOW).recipients[0].address,
                             _sender(local))

    @settings(max_examples=300, deadline=None)
    @given(sender=_ANY_TEXT.filter(bool), address=_ANY_TEXT, orcpt=st.none() | _ANY_TEXT,
           envid=st.none() | _ANY_TEXT, diagnostic=_ANY_TEXT, remote=_ANY_TEXT,
           status=_ANY_TEXT, kind=st.sampled_from(["failure", "delay", "success"]),
           ret=st.sampled_from([None, "FULL", "HDRS"]))
    def test_any_envelope_the_spool_can_hold_gives_a_valid_report(
        self, sender: str, address: str, orcpt: str | None, envid: str | None,
        diagnostic: str, remote: str, status: str, kind: Kind, ret: str | None,
    ) -> None:
        rcpt = Recipient(address, notify=("SUCCESS", "FAILURE", "DELAY"), orcpt=orcpt)
        env = Envelope(sender=sender, recipients=(rcpt,), ret=ret, envid=envid,
                       smtputf8=not sender.isascii(), received_at=ARRIVAL)
        data = report(kind, env=env,
                      recipients=[ReportedRecipient(rcpt, status, remote, diagnostic, NOW)],
                      retry_until=NOW + 86400)
        assert data is not None
        assert_wire_clean(self, data)
        msg = email.message_from_bytes(data, policy=policy.SMTPUTF8)
        assert isinstance(msg, EmailMessage)
        self.assertEqual(len(msg.get_all("To") or []), 1)
        self.assertEqual(len(parts(msg)), 3)
        blocks = status_blocks(msg)
        self.assertEqual(len(blocks), 2)  # no value added a field block of its own
        actions = {"failure": "failed", "delay": "delayed", "success": "delivered"}
        self.assertEqual(blocks[1].get_all("Action"), [actions[kind]])
        # message/delivery-status is ASCII (RFC 6533 3 escapes the rest).
        self.assertTrue(parts(msg)[1].as_bytes().isascii())


class HelperTests(SynchronousTestCase):
    def test_report_envelope(self) -> None:
        env = envelope()
        data = report()
        assert data is not None
        queued = report_envelope(data, env, NOW)
        self.assertEqual(queued.sender, "")
        self.assertEqual(queued.recipients, (Recipient("alice@example.test", notify=("NEVER",)),))
        self.assertIsNone(queued.body)
        self.assertFalse(queued.smtputf8)
        self.assertEqual(queued.received_at, NOW)

    def test_remote_mta_name(self) -> None:
        self.assertEqual(remote_mta_name("mx.remote.test[192.0.2.1]:25"), "mx.remote.test")
        self.assertEqual(remote_mta_name("mx.remote.test[192.0.2.1]"), "mx.remote.test")
        self.assertEqual(remote_mta_name("relay.test:587"), "relay.test")
        self.assertEqual(remote_mta_name("maildir"), "")
        self.assertEqual(remote_mta_name(""), "")

    def test_status_from_reply(self) -> None:
        self.assertEqual(status_from_reply("550 5.1.1 No such user"), "5.1.1")
        self.assertEqual(status_from_reply("451-4.7.1 greylisted\r\n451 4.7.1 later"), "4.7.1")
        self.assertEqual(status_from_reply("550 No such user"), "")
        self.assertEqual(status_from_reply("connection refused"), "")

    def test_from_outcome_and_state(self) -> None:
        outcome = Outcome(BOB, BOUNCED, "550 5.1.1 No such user", "mx.remote.test[192.0.2.1]")
        r = ReportedRecipient.from_outcome(outcome, NOW)
        self.assertEqual((r.status, r.remote_mta, r.diagnostic, r.last_attempt),
                         ("5.1.1", "mx.remote.test", "550 5.1.1 No such user", NOW))
        state = RecipientState(CAROL, last_reply="421 4.4.2 timeout", remote="mx.remote.test[::1]")
        s = ReportedRecipient.from_state(state, NOW)
        self.assertEqual((s.status, s.remote_mta), ("4.4.2", "mx.remote.test"))
