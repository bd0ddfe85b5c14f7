"""SASL mechanisms for SMTP AUTH (RFC 4954), one small class per mechanism.

The split of work with the session:

- The session owns the SMTP framing: it base64-decodes every client line before calling
  :meth:`ISASLExchange.step` and base64-encodes every :class:`Challenge` into a ``334`` reply.
  Bad base64 is its ``501``; a ``*`` line cancels the exchange (RFC 4954 4) without any call
  here. An initial response on the AUTH command is passed as bytes; no initial response at
  all is ``None``; the initial response ``=`` means "present but empty" (RFC 4954 4) and
  must be passed as ``b""``, which is not the same as ``None``.
- A mechanism only sees decoded octets and answers with one of three values: send a
  challenge, here are credentials for ``Portal.login``, or refuse. ``step`` never raises for
  anything a client can send.
- The session logs in with the credentials (``smarthost.auth.cred.PortalLogin``) and maps
  outcomes to replies, so every success goes through the cred portal and every failure through the
  session's log and throttle. PLAIN and LOGIN never see the users file: they hand
  ``UsernamePassword`` to the portal, whose checker runs bcrypt.
- CRAM-MD5 and SCRAM must use a stored secret in the middle of the exchange (the SCRAM salt
  goes out before the client proves anything, and the SCRAM server signature must only go
  out after the proof checked). They get a :class:`ChallengeSecrets` source (the
  ``UsersFile``), check the proof themselves with ``hmac.compare_digest``, and on success
  hand the portal a ``smarthost.auth.cred.VerifiedUser`` naming that source; on failure they
  answer :class:`Rejected`, which the session logs, counts and throttles like a wrong
  password. A name without the mechanism's secret gets a decoy and fails the same way.
- OAUTHBEARER and XOAUTH2 only parse (``smarthost.auth.oauth``): the token goes to the portal as
  an ``IBearerToken``, whose checker asks the token verifier plugins. A refused token is
  answered with one more challenge before the ``535`` (``Credentials.failure_challenge``).

In SMTP, SCRAM's server-final message (``v=``) travels as one more ``334`` challenge that
the client answers with an empty line (RFC 4954 4, no "additional data with success").

The interfaces are zope.interface rather than typing Protocols, like every other seam in
smarthost: fakes and new mechanisms can be checked with ``verifyObject``, mypy-zope checks
implementations statically, and a third-party mechanism could later be found with
``twisted.plugin.getPlugins(ISASLMechanism)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable
from typing import Protocol

import attrs
from twisted.cred.credentials import ICredentials, UsernamePassword
from twisted.internet.interfaces import IReactorTime
from zope.interface import Attribute, Interface, implementer

from smarthost.auth import oauth
from smarthost.auth.cred import VerifiedUser
from smarthost.auth.decoys import Decoys
from smarthost.auth.derived import (
    SCRAM_HASHES,
    CramMD5Secret,
    ScramSecret,
)
from smarthost.auth.users import Secret


@attrs.frozen
class Challenge:
    """Send ``334 <base64(data)>`` and pass the client's answer to the next ``step``."""

    data: bytes


@attrs.frozen
class Credentials:
    """The exchange is complete: log in with ``credentials``. Nothing secret reaches repr."""

    credentials: ICredentials = attrs.field(repr=False)
    username: str  # for log lines; the portal decides whether it is real
    # When the portal refuses: send this as one more 334 challenge and answer 535 only after
    # the client's reply (RFC 7628 3.2.2, OAUTHBEARER's error challenge). None: 535 at once.
    failure_challenge: bytes | None = None


@attrs.frozen
class Rejected:
    """The exchange failed before any password check.

    ``malformed`` means the client sent something this mechanism cannot parse (answer
    ``501 5.5.2``); otherwise the request is well formed but refused (answer ``535 5.7.8``).
    Named ``Rejected``, not ``Failure``, so it cannot be confused with Twisted's ``Failure``.
    """

    reason: str  # for logs, never shown to the client
    malformed: bool = False
    username: str | None = None  # when known, for the failed-AUTH log line


Step = Challenge | Credentials | Rejected


class ISASLExchange(Interface):
    """One authentication attempt in progress; used once, then thrown away."""

    def step(response: bytes | None) -> Step:
        """Take the client's next decoded response (``None``: no initial response was given)
        and say what happens next. After a ``Credentials`` or ``Rejected`` every further call
        answers ``Rejected``."""


class ISASLMechanism(Interface):
    """A mechanism offered in EHLO; makes a fresh exchange for each AUTH command."""

    name: str = Attribute("Registered name, upper case, as advertised (RFC 4422 3.1).")

    def new() -> ISASLExchange:
        """Start one exchange."""


def _decode(data: bytes, what: str) -> str | Rejected:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Rejected(f"{what} is not valid UTF-8", malformed=True)


_FINISHED = Rejected("exchange already finished", malformed=True)


# --- PLAIN (RFC 4616) -------------------------------------------------------------------


@implementer(ISASLMechanism)
class PlainMechanism:
    name = "PLAIN"

    def new(self) -> ISASLExchange:
        return PlainExchange()


@implementer(ISASLExchange)
class PlainExchange:
    """``[authzid] NUL authcid NUL passwd`` in one message (RFC 4616 2)."""

    def __init__(self) -> None:
        self._done = False
        self._asked = False

    def step(self, response: bytes | None) -> Step:
        if self._done:
            return _FINISHED
        if response is None and not self._asked:
            # RFC 4616 2 / RFC 4954 4: no initial response, so send an empty challenge and
            # the client answers with the whole message.
            self._asked = True
            return Challenge(b"")
        self._done = True
        return _parse_plain(response or b"")


def _parse_plain(message: bytes) -> Step:
    parts = message.split(b"\0")
    if len(parts) != 3:
        return Rejected("PLAIN message needs exactly two NUL separators", malformed=True)
    raw_authzid, raw_authcid, password = parts
    authzid = _decode(raw_authzid, "PLAIN authorization identity")
    authcid = _decode(raw_authcid, "PLAIN user name")
    checked_password = _decode(password, "PLAIN password")
    for value in (authzid, authcid, checked_password):
        if isinstance(value, Rejected):
            return value
    assert isinstance(authzid, str) and isinstance(authcid, str)
    if not authcid or not password:
        return Rejected("PLAIN user name or password is empty", malformed=True)
    if authzid and authzid != authcid:
        # RFC 4616 2: the server decides whether authcid may act as authzid. Nobody may act
        # as someone else here: sender ownership is decided for the authenticated name only.
        return Rejected("PLAIN authorization identity differs from the user name",
                        username=authcid)
    return Credentials(UsernamePassword(raw_authcid, password), authcid)


# --- LOGIN (draft-murchison-sasl-login) --------------------------------------------------


@implementer(ISASLMechanism)
class LoginMechanism:
    """The obsolete but ubiquitous LOGIN mechanism (Outlook, printers, scanners)."""

    name = "LOGIN"

    def new(self) -> ISASLExchange:
        return LoginExchange()


@implementer(ISASLExchange)
class LoginExchange:
    """Asks ``Username:`` then ``Password:``; an initial response is taken as the user name,
    as Postfix (Cyrus SASL) and Exim do."""

    def __init__(self) -> None:
        self._state = "start"
        self._username = b""
        self._name = ""

    def step(self, response: bytes | None) -> Step:
        if self._state == "start":
            if response is None:
                self._state = "username"
                return Challenge(b"Username:")
            return self._take_username(response)
        if self._state == "username":
            return self._take_username(response or b"")
        if self._state == "password":
            self._state = "done"
            password = response or b""
            if not password:
                return Rejected("LOGIN password is empty", malformed=True, username=self._name)
            checked = _decode(password, "LOGIN password")
            if isinstance(checked, Rejected):
                return attrs.evolve(checked, username=self._name)
            return Credentials(UsernamePassword(self._username, password), self._name)
        return _FINISHED

    def _take_username(self, response: bytes) -> Step:
        name = _decode(response, "LOGIN user name")
        if isinstance(name, Rejected):
            self._state = "done"
            return name
        if not name:
            self._state = "done"
            return Rejected("LOGIN user name is empty", malformed=True)
        self._state = "password"
        self._username, self._name = response, name
        return Challenge(b"Password:")


# --- challenge-response: where the secrets come from ----------------------------------


class ChallengeSecrets(Protocol):
    """What CRAM-MD5 and SCRAM need from the users file (``smarthost.auth.users.UsersFile``).

    Always answers: a name without the secret gets a decoy (``known=False``), so the
    exchange runs the same steps for it and then fails.
    """

    def scram(self, name: str, mechanism: str) -> Secret[ScramSecret]: ...

    def cram_md5(self, name: str) -> Secret[CramMD5Secret]: ...


class NoUsers:
    """A source that knows nobody: mechanisms built only to validate a config."""

    def __init__(self) -> None:
        self._decoys = Decoys(os.urandom(32))

    def scram(self, name: str, mechanism: str) -> Secret[ScramSecret]:
        return Secret(self._decoys.scram(name, mechanism, 4096), known=False)

    def cram_md5(self, name: str) -> Secret[CramMD5Secret]:
        return Secret(self._decoys.cram_md5(name), known=False)


@implementer(ICredentials)
@attrs.frozen
class SecretsUnavailable:
    """The users file could not be read in the middle of an exchange.

    Handed to the portal as the exchange's credentials: no checker takes them, so the login
    fails with ``UnhandledCredentials``, which the session answers ``454 4.7.0`` (our
    fault, try again), just as an unreadable file does for PLAIN; never ``535``.
    """

    reason: str


def _unavailable(error: OSError, name: str) -> Credentials:
    return Credentials(SecretsUnavailable(f"users file unreadable: {error}"), name)


def _random_nonce() -> str:
    # 144 bits; base64 is within RFC 5802's "printable" (no ",") for the nonce.
    return base64.b64encode(os.urandom(18)).decode("ascii")


# --- CRAM-MD5 (RFC 2195) -----------------------------------------------------------------


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
            return _FINISHED
        self._state = "done"
        text = _decode(response or b"", "CRAM-MD5 response")
        if isinstance(text, Rejected):
            return text
        # "user SP digest" (RFC 2195 2); the name may contain spaces, the digest may not.
        name, _, digest = text.rpartition(" ")
        if not name or not _HEX_DIGEST.match(digest):
            return Rejected("CRAM-MD5 response is not 'user digest'", malformed=True)
        try:
            secret = self._users.cram_md5(name)
        except OSError as e:
            return _unavailable(e, name)
        expected = secret.value.hmac(self._challenge).hex().encode("ascii")
        if not hmac.compare_digest(expected, digest.lower().encode("ascii")) or not secret.known:
            return Rejected("wrong CRAM-MD5 digest", username=name)
        return Credentials(VerifiedUser(name, "CRAM-MD5", self._users), name)


# --- SCRAM-SHA-256, SCRAM-SHA-1 (RFC 5802, RFC 7677) ------------------------------------


@implementer(ISASLMechanism)
class ScramMechanism:
    """SCRAM without channel binding: the -PLUS variants are not offered, so a client may
    say ``n`` (no support) or ``y`` (supported, but not by this server), never ``p=``."""

    def __init__(
        self, name: str, users: ChallengeSecrets, nonce: Callable[[], str] = _random_nonce
    ) -> None:
        if name not in SCRAM_HASHES:
            raise ValueError(f"not a SCRAM mechanism: {name!r}")
        self.name = name
        self._users, self._nonce = users, nonce

    def new(self) -> ISASLExchange:
        return ScramExchange(self.name, self._users, self._nonce())


_SASLNAME_ESCAPE = re.compile(r"=(2C|3D)?")
_NONCE = re.compile(r"[\x21-\x2b\x2d-\x7e]+\Z")  # RFC 5802 7: printable except ","


def _unescape_saslname(value: str) -> str | None:
    """RFC 5802 5.1: ``=2C`` is ``,`` and ``=3D`` is ``=``; any other ``=`` is an error."""
    bad = False

    def replace(match: re.Match[str]) -> str:
        nonlocal bad
        code = match.group(1)
        if code is None:
            bad = True
            return ""
        return "," if code == "2C" else "="

    result = _SASLNAME_ESCAPE.sub(replace, value)
    return None if bad or not result else result


@implementer(ISASLExchange)
class ScramExchange:
    def __init__(self, mechanism: str, users: ChallengeSecrets, server_nonce: str) -> None:
        self._mechanism = mechanism
        self._hash = SCRAM_HASHES[mechanism]
        self._users = users
        self._server_nonce = server_nonce
        self._state = "start"
        self._name = ""
        self._gs2_header = ""
        self._nonce = ""
        self._messages = ""  # client-first-message-bare "," server-first-message
        self._secret: Secret[ScramSecret] | None = None

    def step(self, response: bytes | None) -> Step:
        state, self._state = self._state, "done"  # any early return ends the exchange
        if state == "start":
            if response is None:
                self._state = "start-asked"
                return Challenge(b"")  # the client speaks first: ask for its message
            return self._client_first(response)
        if state == "start-asked":
            return self._client_first(response or b"")
        if state == "client-final":
            return self._client_final(response or b"")
        if state == "server-final":
            if response:
                return Rejected("SCRAM: non-empty answer to the server signature",
                                malformed=True, username=self._name)
            return Credentials(VerifiedUser(self._name, self._mechanism, self._users),
                               self._name)
        return _FINISHED

    def _client_first(self, data: bytes) -> Step:
        text = _decode(data, "SCRAM client-first-message")
        if isinstance(text, Rejected):
            return text
        parts = text.split(",", 2)
        if len(parts) != 3:
            return Rejected("SCRAM client-first-message has no GS2 header", malformed=True)
        flag, authzid_field, bare = parts
        if flag.startswith("p="):
            # RFC 5802 6: channel binding asked of a server that offers no -PLUS: fail.
            return Rejected("SCRAM channel binding requested; -PLUS is not offered")
        if flag not in ("n", "y"):
            return Rejected("SCRAM GS2 channel-binding flag is invalid", malformed=True)
        authzid = None
        if authzid_field:
            authzid = (_unescape_saslname(authzid_field[2:])
                       if authzid_field.startswith("a=") else None)
            if authzid is None:
                return Rejected("SCRAM authorization identity is invalid", malformed=True)
        attributes = bare.split(",")
        if attributes[0].startswith("m="):
            # RFC 5802 5.1: reserved for mandatory extensions, none of which we know.
            return Rejected("SCRAM mandatory extension not supported", malformed=True)
        if (len(attributes) < 2 or not attributes[0].startswith("n=")
                or not attributes[1].startswith("r=")):
            return Rejected("SCRAM client-first-message needs n= and r=", malformed=True)
        name = _unescape_saslname(attributes[0][2:])
        client_nonce = attributes[1][2:]
        if name is None or not _NONCE.match(client_nonce):
            return Rejected("SCRAM user name or nonce is invalid", malformed=True)
        if authzid is not None and authzid != name:
            # As for PLAIN: nobody may act as someone else.
            return Rejected("SCRAM authorization identity differs from the user name",
                            username=name)
        self._name, self._gs2_header = name, f"{flag},{authzid_field},"
        self._nonce = client_nonce + self._server_nonce
        try:
            self._secret = self._users.scram(name, self._mechanism)
        except OSError as e:
            return _unavailable(e, name)
        secret = self._secret.value
        salt = base64.b64encode(secret.salt).decode("ascii")
        server_first = f"r={self._nonce},s={salt},i={secret.iterations}"
        self._messages = f"{bare},{server_first}"
        self._state = "client-final"
        return Challenge(server_first.encode("ascii"))

    def _client_final(self, data: bytes) -> Step:
        name = self._name
        text = _decode(data, "SCRAM client-final-message")
        if isinstance(text, Rejected):
            return attrs.evolve(text, username=name)
        without_proof, separator, proof_b64 = text.rpartition(",p=")
        attributes = without_proof.split(",")
        if not separator or len(attributes) < 2 or not attributes[0].startswith("c="):
            return Rejected("SCRAM client-final-message is malformed", malformed=True,
                            username=name)
        try:
            binding = base64.b64decode(attributes[0][2:], validate=True)
            proof = base64.b64decode(proof_b64, validate=True)
        except (binascii.Error, ValueError):
            return Rejected("SCRAM client-final-message has bad base64", malformed=True,
                            username=name)
        assert self._secret is not None
        secret, known = self._secret.value, self._secret.known
        if len(proof) != len(secret.stored_key):
            return Rejected("SCRAM proof has the wrong length", malformed=True, username=name)
        if binding != self._gs2_header.encode("utf-8"):
            return Rejected("SCRAM channel binding does not repeat the GS2 header",
                            username=name)
        if attributes[1] != f"r={self._nonce}":
            return Rejected("SCRAM nonce does not match", username=name)
        # RFC 5802 3: ClientKey = ClientProof XOR HMAC(StoredKey, AuthMessage), and
        # H(ClientKey) must be StoredKey.
        auth_message = f"{self._messages},{without_proof}".encode()
        signature = hmac.digest(secret.stored_key, auth_message, self._hash)
        client_key = bytes(p ^ s for p, s in zip(proof, signature, strict=True))
        stored_key = hashlib.new(self._hash, client_key).digest()
        if not hmac.compare_digest(stored_key, secret.stored_key) or not known:
            return Rejected("wrong SCRAM proof", username=name)
        server_signature = hmac.digest(secret.server_key, auth_message, self._hash)
        self._state = "server-final"
        return Challenge(b"v=" + base64.b64encode(server_signature))


# --- OAUTHBEARER (RFC 7628), XOAUTH2 (Google) -------------------------------------------


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
            return _FINISHED
        try:
            token = self._parse(response or b"")
        except oauth.MessageError as e:
            return Rejected(str(e), malformed=True)
        return Credentials(token, token.user or "", failure_challenge=self._error)


# --- the registry ------------------------------------------------------------------------


@attrs.frozen
class MechanismContext:
    """What a mechanism may need when it is built. ``users`` is None only when mechanisms
    are built to validate a config: challenge-response mechanisms then know nobody."""

    users: ChallengeSecrets | None = None
    hostname: str = "localhost"
    clock: IReactorTime | None = None

    @property
    def secrets(self) -> ChallengeSecrets:
        return self.users if self.users is not None else NoUsers()


MECHANISMS: dict[str, Callable[[MechanismContext], ISASLMechanism]] = {
    "PLAIN": lambda context: PlainMechanism(),
    "LOGIN": lambda context: LoginMechanism(),
    "CRAM-MD5": lambda c: CramMD5Mechanism(c.secrets, c.hostname, c.clock),
    "SCRAM-SHA-256": lambda c: ScramMechanism("SCRAM-SHA-256", c.secrets),
    "SCRAM-SHA-1": lambda c: ScramMechanism("SCRAM-SHA-1", c.secrets),
    # The portal needs a token verifier plugin for these (smarthost.auth.oauth.require_verifier).
    "OAUTHBEARER": lambda c: OAuthBearerMechanism(),
    "XOAUTH2": lambda c: XOAuth2Mechanism(),
}

# Mechanisms an operator may well ask for and that we refuse on purpose, with the reason
# check-config shows.
REFUSED = {
    "DIGEST-MD5": "DIGEST-MD5 is historic (RFC 6331); use SCRAM-SHA-256",
    "NTLM": "NTLM is a proprietary scheme with known weaknesses and no standard; "
            "use SCRAM-SHA-256, or PLAIN over TLS",
    "GSSAPI": "GSSAPI needs Kerberos, which smarthost does not support; use SCRAM-SHA-256",
    "OAUTH10A": "OAUTH10A (RFC 7628) needs OAuth 1.0a request signing, which smarthost "
                "does not support; use OAUTHBEARER (OAuth 2.0) or SCRAM-SHA-256",
    "SCRAM-SHA-256-PLUS": "channel binding (-PLUS) is not supported; use SCRAM-SHA-256",
    "SCRAM-SHA-1-PLUS": "channel binding (-PLUS) is not supported; use SCRAM-SHA-1",
    "ANONYMOUS": "ANONYMOUS would let anyone submit mail; list trusted_networks instead",
}


def build_mechanisms(
    names: Iterable[str],
    *,
    users: ChallengeSecrets | None = None,
    hostname: str = "localhost",
    clock: IReactorTime | None = None,
) -> list[ISASLMechanism]:
    """The mechanisms named in ``[auth] mechanisms``, in the order given (the EHLO order).

    ``users`` (the ``UsersFile``) supplies CRAM-MD5 and SCRAM secrets, ``hostname`` and
    ``clock`` make the CRAM-MD5 challenge. Without ``users`` those mechanisms still build,
    so a config can be validated, but they let nobody in.

    Raises ``ValueError`` naming the first unknown, refused or repeated mechanism, for config
    errors. Names are matched case-insensitively and advertised upper case.
    """
    context = MechanismContext(users, hostname, clock)
    result: list[ISASLMechanism] = []
    seen: set[str] = set()
    for name in names:
        key = name.upper()
        if key in REFUSED:
            raise ValueError(f"SASL mechanism {name!r} is not supported: {REFUSED[key]}")
        if key not in MECHANISMS:
            known = ", ".join(sorted(MECHANISMS))
            raise ValueError(f"unknown SASL mechanism {name!r} (known: {known})")
        if key in seen:
            raise ValueError(f"SASL mechanism {name!r} is listed twice")
        seen.add(key)
        result.append(MECHANISMS[key](context))
    return result
