"""The Received: trace header: every line within 998 octets whatever the EHLO name (issue 18,
finding 11), the name kept readable but never able to break the header's syntax."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smarthost.smtpd.trace import MAX_HELO, Hop, received_header


def header(helo: str, *, smtputf8: bool = False, recipient: str = "b@example.test") -> bytes:
    hop = Hop(helo=helo, address="2001:db8::1", esmtp=True,
              tls=("TLSv1.3", "TLS_AES_256_GCM_SHA384"), authenticated=True, smtputf8=smtputf8)
    return received_header(hop, "mx.smarthost.test", "01A249A78E4D5CA4FEE20E", [recipient],
                           1_700_000_000)


def lines(data: bytes) -> list[bytes]:
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


def test_a_5000_character_ehlo_name_is_shortened() -> None:
    data = header("h" * 4995 + ".test")
    first = lines(data)[0]
    assert first.startswith(b"Received: from " + b"h" * (MAX_HELO - 3) + b"... ([2001:db8::1])")
    assert max(map(len, lines(data))) <= 998
    assert all(line.startswith(b"\t") for line in lines(data)[1:])  # folded


@pytest.mark.parametrize(("helo", "shown"), [
    ("client.test", "client.test"), ("[192.0.2.1]", "[192.0.2.1]"), ("x y", "x?y"),
    ("a(b)c\\d", "a?b?c?d"), ("tab\there", "tab?here"), ("", "unknown"),
    ("caf\u00e9.test", "caf?.test"),
])
def test_the_name_is_sanitised(helo: str, shown: str) -> None:
    assert lines(header(helo))[0] == f"Received: from {shown} ([2001:db8::1])".encode()


def test_utf8_names_stay_in_smtputf8_messages_and_are_cut_on_a_character() -> None:
    assert lines(header("caf\u00e9.test", smtputf8=True))[0].startswith(
        "Received: from caf\u00e9.test ".encode())
    first = lines(header("\u00e9" * 300, smtputf8=True))[0]
    first.decode("utf-8")  # not cut inside a character
    assert len(first) <= 998


@settings(max_examples=200, deadline=None)
@given(helo=st.text(max_size=6000), smtputf8=st.booleans())
def test_every_line_fits_whatever_the_name(helo: str, smtputf8: bool) -> None:
    data = header(helo, smtputf8=smtputf8, recipient="x" * 64 + "@" + "d" * 180 + ".test")
    assert max(map(len, lines(data))) <= 998
    assert b"\r" not in data.replace(b"\r\n", b"") and b"\n" not in data.replace(b"\r\n", b"")
