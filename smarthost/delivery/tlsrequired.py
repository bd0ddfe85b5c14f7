"""``TLS-Required: No`` (RFC 8689 5): the sender asks that the recipient domain's TLS policy
(MTA-STS here) be ignored, so that the message is delivered even where that policy would
hold it back; TLS is still used opportunistically. Per RFC 8689 4.1 the header field means
nothing when the envelope carries REQUIRETLS: the stronger request wins.

The operator's own rules (``[delivery] tls`` and ``[delivery.tls_policy]``) are not the
recipient domain's policy and still apply. The header field stays in the message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from smarthost.core.envelope import Envelope
from smarthost.core.tlswaiver import says_no


def policies_apply(envelope: Envelope, open_body: Callable[[], BinaryIO]) -> bool:
    """False when the sender waived the recipient domain's TLS policy for this message: a
    ``TLS-Required: No`` header field and no REQUIRETLS on the envelope (RFC 8689 4.1, which
    also spares opening the body), or the envelope already says it."""
    if envelope.requiretls:
        return True
    if envelope.tls_required_no is not None:  # read when the message was taken in
        return not envelope.tls_required_no
    with open_body() as body:
        return not says_no(body)
