"""OAUTHBEARER (RFC 7628) and XOAUTH2 (Google's and Microsoft's predecessor): a bearer
token, parsed here and judged by the portal.

The messages are parsed by :mod:`smarthost.auth.oauth`; the token goes to the portal as an
``IBearerToken``, whose checker asks the token verifier plugins. A refused token is answered
with one more challenge before the ``535`` (``Credentials.failure_challenge``).
"""

from __future__ import annotations

from collections.abc import Callable

from zope.interface import implementer

from smarthost.auth import oauth
from smarthost.auth.sasl.base import (
    FINISHED,
    Challenge,
    Credentials,
    ISASLExchange,
    ISASLMechanism,
    Rejected,
    Step,
)


@implementer(ISASLMechanism)
class OAuthBearerMechanism:
    """An OAuth 2.0 bearer token (RFC 7628); whose it is, the portal's token checker asks
    the verifier plugins (smarthost.auth.oauth)."""

    name = oauth.OAUTHBEARER

    def new(self) -> ISASLExchange:
        return BearerExchange(oauth.parse_oauthbearer, oauth.OAUTHBEARER_ERROR)


@implementer(ISASLMechanism)
class XOAuth2Mechanism:
    """Google's and Microsoft's predecessor of OAUTHBEARER, still what most mail clients
    send; the same token, another message format."""

    name = oauth.XOAUTH2

    def new(self) -> ISASLExchange:
        return BearerExchange(oauth.parse_xoauth2, oauth.XOAUTH2_ERROR)


@implementer(ISASLExchange)
class BearerExchange:
    """Client-first, one message: the initial response, or the answer to an empty
    challenge. A refused token comes back as the error challenge (see ``Credentials``)."""

    def __init__(
        self, parse: Callable[[bytes], oauth.BearerToken], error_challenge: bytes
    ) -> None:
        self._parse, self._error = parse, error_challenge
        self._state = "start"

    def step(self, response: bytes | None) -> Step:
        state, self._state = self._state, "done"
        if state == "start" and response is None:
            self._state = "asked"
            return Challenge(b"")
        if state not in ("start", "asked"):
            return FINISHED
        try:
            token = self._parse(response or b"")
        except oauth.MessageError as e:
            return Rejected(str(e), malformed=True)
        return Credentials(token, token.user or "", failure_challenge=self._error)
