"""OAuth 2.0 bearer tokens for SMTP AUTH: the OAUTHBEARER (RFC 7628) and XOAUTH2 messages,
the credentials they become, and the cred checker that asks the token verifier plugins.

The mechanism classes live with the others, in :mod:`smarthost.auth.sasl.bearer`; this module
holds what they share and the portal side:

- :func:`parse_oauthbearer` and :func:`parse_xoauth2` turn a client message into a
  :class:`BearerToken` or raise :class:`MessageError` (malformed: ``501``). Neither the
  message nor the token ever appears in an error.
- :class:`BearerTokenChecker` is registered into the portal when an enabled plugin provides
  :class:`~smarthost.api.ITokenVerifier`. The token is not ours to judge: the verifier
  (the ``introspection`` plugin asks the authorization server, RFC 7662) says whose it is.
  The authenticated user is that owner; when the client also named a user, the two must be
  the same, or nobody could stop Alice's token logging in as Bob.
- :func:`require_verifier` is the config rule: a bearer-token mechanism in ``[auth]
  mechanisms`` without a verifier plugin is an error naming ``auth.mechanisms[i]``.

Failure answers follow RFC 7628 3.2.2: an invalid token is not answered ``535`` at once; the
server sends one more ``334`` carrying a JSON error and the client answers it with a single
``%x01``, then gets the ``535``. :data:`OAUTHBEARER_ERROR` and :data:`XOAUTH2_ERROR` are
those challenges (the session sends them; see ``Credentials.failure_challenge``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, implementer

from smarthost.api import PLUGIN_TIMEOUT, ITokenVerifier
from smarthost.auth.users import UserNameError, validate_name
from smarthost.core.errors import ConfigError

OAUTHBEARER, XOAUTH2 = "OAUTHBEARER", "XOAUTH2"
TOKEN_MECHANISMS = (OAUTHBEARER, XOAUTH2)

# The time a verifier gets before the login is answered 454, as for every other plugin.
DEFAULT_TIMEOUT = PLUGIN_TIMEOUT

# RFC 7628 3.2.2: "status" is an RFC 6749 error code; no "scope" or "openid-configuration"
# (we do not know which scope the authorization server wants).
OAUTHBEARER_ERROR = json.dumps({"status": "invalid_token", "schemes": "bearer"}).encode()
# Google's XOAUTH2 sends an HTTP-like status in the same JSON shape.
XOAUTH2_ERROR = json.dumps({"status": "401", "schemes": "bearer"}).encode()

KVSEP = "\x01"
_KEY = re.compile(r"[A-Za-z]+\Z")
# RFC 7628 3.1: value = *(VCHAR / SP / HTAB / CR / LF)
_VALUE = re.compile(r"[\x21-\x7e \t\r\n]*\Z")
# RFC 7628 3.1 / RFC 6750 2.1: "Bearer" 1*SP b64token; the scheme is case-insensitive
# (RFC 9110 11.1).
_AUTH = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)\Z")
_SASLNAME_ESCAPE = re.compile(r"=(2C|3D)?")


class MessageError(ValueError):
    """The client's message cannot be parsed; the text says why and never quotes it."""


class IBearerToken(ICredentials):
    """An OAuth 2.0 bearer token presented through OAUTHBEARER or XOAUTH2."""

    user: str | None = Attribute(
        "The user the client named (GS2 authzid, XOAUTH2 user=), or None when it named none.")
    token: str = Attribute("The access token. Secret: never logged, never in repr.")
    mechanism: str = Attribute("The SASL mechanism it came through.")


@implementer(IBearerToken)
@attrs.frozen
class BearerToken:
    user: str | None
    token: str = attrs.field(repr=False)
    mechanism: str


def _pairs(text: str, what: str) -> dict[str, str]:
    """``key=value`` pairs, each terminated by ``%x01``; ``text`` is the part between the
    header and the final ``%x01``. Repeated keys are refused."""
    if not text:
        return {}
    if not text.endswith(KVSEP):
        raise MessageError(f"{what}: key=value pairs must end with %x01")
    result: dict[str, str] = {}
    for pair in text[:-1].split(KVSEP):
        key, eq, value = pair.partition("=")
        if not eq or not _KEY.match(key) or not _VALUE.match(value):
            raise MessageError(f"{what}: malformed key=value pair")
        if key in result:
            raise MessageError(f"{what}: key {key!r} repeated")
        result[key] = value
    return result


def _token(pairs: Mapping[str, str], what: str) -> str:
    auth = pairs.get("auth")
    if auth is None:
        raise MessageError(f"{what}: no auth=")
    match = _AUTH.match(auth)
    if match is None:
        raise MessageError(f"{what}: auth= is not 'Bearer <token>'")
    return match.group(1)


def _user(name: str, what: str) -> str:
    try:
        validate_name(name)
    except UserNameError as e:
        raise MessageError(f"{what}: {e}") from None
    return name


def _decode(message: bytes, what: str) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(f"{what} is not valid UTF-8") from None


def parse_oauthbearer(message: bytes) -> BearerToken:
    """RFC 7628 3.1: ``gs2-header %x01 *(key=value %x01) %x01``, e.g.
    ``n,a=alice@example.test,\\x01host=mx\\x01auth=Bearer TOKEN\\x01\\x01``.

    Channel binding (``p=``) is refused: OAUTHBEARER has none (RFC 7628 3.1). Keys other than
    ``auth`` (``host``, ``port``, extensions) are ignored.
    """
    text = _decode(message, "OAUTHBEARER message")
    if text == KVSEP:
        # RFC 7628 3.2.3: the lone %x01 only ever answers an error challenge.
        raise MessageError("OAUTHBEARER: a lone %x01 is not an authentication request")
    parts = text.split(",", 2)
    if len(parts) != 3:
        raise MessageError("OAUTHBEARER: no GS2 header")
    flag, authzid, rest = parts
    if flag not in ("n", "y"):
        # "p=..." included: there is no channel binding to agree on.
        raise MessageError("OAUTHBEARER: GS2 channel-binding flag must be 'n' or 'y'")
    user: str | None = None
    if authzid:
        if not authzid.startswith("a="):
            raise MessageError("OAUTHBEARER: GS2 authzid must be 'a=<user>'")
        user = _user(_unescape_saslname(authzid[2:]), "OAUTHBEARER authzid")
    if not rest.startswith(KVSEP) or not rest.endswith(KVSEP) or len(rest) < 2:
        raise MessageError("OAUTHBEARER: the GS2 header must be followed by %x01 and the "
                           "message must end with %x01%x01")
    pairs = _pairs(rest[1:-1], "OAUTHBEARER")
    return BearerToken(user, _token(pairs, "OAUTHBEARER"), OAUTHBEARER)


def parse_xoauth2(message: bytes) -> BearerToken:
    """Google's XOAUTH2: ``user=<user> %x01 auth=Bearer <token> %x01 %x01``."""
    text = _decode(message, "XOAUTH2 message")
    if not text.endswith(KVSEP + KVSEP):
        raise MessageError("XOAUTH2: the message must end with %x01%x01")
    pairs = _pairs(text[:-1], "XOAUTH2")
    if "user" not in pairs:
        raise MessageError("XOAUTH2: no user=")
    user = _user(pairs["user"], "XOAUTH2 user")
    return BearerToken(user, _token(pairs, "XOAUTH2"), XOAUTH2)


def _unescape_saslname(value: str) -> str:
    """RFC 5801 4: in the GS2 authzid ``=2C`` is ``,`` and ``=3D`` is ``=``; any other
    ``=`` is an error (the same rule as SCRAM's, RFC 5802 5.1)."""
    def replace(match: re.Match[str]) -> str:
        code = match.group(1)
        if code is None:
            raise MessageError("OAUTHBEARER: bad '=' escape in the GS2 authzid")
        return "," if code == "2C" else "="

    return _SASLNAME_ESCAPE.sub(replace, value)


class VerifierFailed(Exception):
    """A token verifier raised or did not answer in time: a temporary failure (``454``).

    Built from the verifier's error with the token cut out of its text, and raised without
    the original attached, so nothing the plugin put in its exception reaches the log
    with the token in it.
    """


@implementer(ICredentialsChecker)
class BearerTokenChecker:
    """Asks the enabled token verifiers, in ``[plugins] enabled`` order, whose token this
    is; the first that names an owner decides.

    - the owner is the authenticated user; when the client named a user as well, it must be
      the owner exactly (names compare case-sensitively, as in the users file), else
      ``UnauthorizedLogin``;
    - every verifier answering None (inactive, expired, unknown token): ``UnauthorizedLogin``;
    - a verifier raising or not answering within ``timeout``: :class:`VerifierFailed`,
      which the session answers ``454 4.7.0``. The next verifier is not asked: the token
      was meant for one authorization server, and sending it to another would leak it.
    """

    credentialInterfaces = (IBearerToken,)

    def __init__(
        self,
        verifiers: Sequence[tuple[str, ITokenVerifier]],
        clock: IReactorTime,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._verifiers = tuple(verifiers)
        self._clock = clock
        self._timeout = timeout

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        return Deferred.fromCoroutine(self._check(credentials))

    async def _check(self, credentials: IBearerToken) -> bytes | tuple[()]:
        for name, verifier in self._verifiers:
            owner = await self._ask(name, verifier, credentials)
            if owner is None:
                continue
            if credentials.user is not None and credentials.user != owner:
                raise UnauthorizedLogin()
            return owner.encode("utf-8")
        raise UnauthorizedLogin()

    async def _ask(
        self, name: str, verifier: ITokenVerifier, credentials: IBearerToken
    ) -> str | None:
        token = credentials.token
        try:
            d = Deferred.fromCoroutine(_await(verifier.verify(token, credentials.user)))
            d.addTimeout(self._timeout, self._clock)
            owner = await d
        except Exception as e:
            text = str(e).replace(token, "[token]") if token else str(e)
            raise VerifierFailed(
                f"token verifier {name!r} failed: {type(e).__name__}: {text}") from None
        if owner is None:
            return None
        if not isinstance(owner, str):
            raise VerifierFailed(f"token verifier {name!r} returned a {type(owner).__name__}, "
                                 "not a user name")
        try:
            validate_name(owner)
        except UserNameError as e:
            raise VerifierFailed(f"token verifier {name!r} returned a bad user name: {e}"
                                 ) from None
        return owner


async def _await(awaitable: Any) -> Any:
    return await awaitable


def require_verifier(
    mechanisms: Sequence[str], plugins: Sequence[tuple[str, object]]
) -> None:
    """Raise :class:`ConfigError` (``auth.mechanisms[i]``) when a bearer-token mechanism is
    configured but no enabled plugin provides ``ITokenVerifier``: without one, every such
    login would fail, so the daemon refuses to start (and ``check-config`` says why)."""
    if any(ITokenVerifier.providedBy(plugin) for _, plugin in plugins):
        return
    for i, name in enumerate(mechanisms):
        if name.upper() in TOKEN_MECHANISMS:
            raise ConfigError(
                f"auth.mechanisms[{i}]",
                f"{name.upper()} needs a token verifier: enable a plugin that checks OAuth "
                "tokens in [plugins] enabled (e.g. \"introspection\")",
            )
