"""CRAM-MD5 (RFC 2195): the server's challenge, the client's HMAC-MD5 of it.

The users file holds HMAC-MD5 states, not the password (``smarthost.auth.derived``), so the
digest is computed from those; a name without them gets a decoy and fails like a wrong
password, or, for a user who only lacks them, as ``Rejected(no_secret=True)``.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from smarthost.auth.cred import VerifiedUser
from smarthost.auth.sasl.base import (
    FINISHED,
    Challenge,
    ChallengeSecrets,
    Credentials,
    ISASLExchange,
    ISASLMechanism,
    Rejected,
    Step,
    decode_utf8,
    unavailable,
)


@implementer(ISASLMechanism)
class CramMD5Mechanism:
    """Historic but still asked for by old clients; the password itself never crosses the
    wire, though the stored HMAC states are password-equivalent (guard the users file)."""

    name = "CRAM-MD5"

    def __init__(
        self,
        users: ChallengeSecrets,
        hostname: str,
        clock: IReactorTime | None = None,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._users, self._hostname, self._clock, self._random = users, hostname, clock, random

    def new(self) -> ISASLExchange:
        # RFC 2195 2: "<random digits.timestamp@hostname>", as Dovecot and Cyrus send it.
        digits = int.from_bytes(self._random(8), "big")
        stamp = int(self._clock.seconds()) if self._clock is not None else 0
        challenge = f"<{digits}.{stamp}@{self._hostname}>".encode()
        return CramMD5Exchange(self._users, challenge)


_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{32}\Z")


@implementer(ISASLExchange)
class CramMD5Exchange:
    def __init__(self, users: ChallengeSecrets, challenge: bytes) -> None:
        self._users, self._challenge = users, challenge
        self._state = "start"

    def step(self, response: bytes | None) -> Step:
        if self._state == "start":
            self._state = "response"
            if response is not None:
                # RFC 4954 4: an initial response to a server-first mechanism is a 501.
                self._state = "done"
                return Rejected("CRAM-MD5 takes no initial response", malformed=True)
            return Challenge(self._challenge)
        if self._state != "response":
            return FINISHED
        self._state = "done"
        text = decode_utf8(response or b"", "CRAM-MD5 response")
        if isinstance(text, Rejected):
            return text
        # "user SP digest" (RFC 2195 2); the name may contain spaces, the digest may not.
        name, _, digest = text.rpartition(" ")
        if not name or not _HEX_DIGEST.match(digest):
            return Rejected("CRAM-MD5 response is not 'user digest'", malformed=True)
        try:
            secret = self._users.cram_md5(name)
        except OSError as e:
            return unavailable(e, name)
        expected = secret.value.hmac(self._challenge).hex().encode("ascii")
        matches = hmac.compare_digest(expected, digest.lower().encode("ascii"))
        if secret.user_without_secret:
            return Rejected("no CRAM-MD5 secret for this user", username=name, no_secret=True)
        if not matches or not secret.known:
            return Rejected("wrong CRAM-MD5 digest", username=name)
        return Credentials(VerifiedUser(name, "CRAM-MD5", self._users), name)
