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
  outcomes to replies, so every success goes through the cred portal and every failure
  through the session's log and throttle. PLAIN and LOGIN never see the users file: they hand
  ``UsernamePassword`` to the portal, whose checker runs bcrypt.
- CRAM-MD5 and SCRAM must use a stored secret in the middle of the exchange (the SCRAM salt
  goes out before the client proves anything, and the SCRAM server signature must only go
  out after the proof checked). They get a :class:`ChallengeSecrets` source (the
  ``UsersFile``), check the proof themselves with ``hmac.compare_digest``, and on success
  hand the portal a ``smarthost.auth.cred.VerifiedUser`` naming that source; on failure they
  answer :class:`Rejected`, which the session logs, counts and throttles like a wrong
  password. A name without the mechanism's secret gets a decoy and fails the same way,
  except a user who exists and only lacks that secret: ``Rejected(no_secret=True)``, which
  the session answers at once without counting it (nothing was guessed).
- PLAIN and LOGIN passwords, and every name looked up, are prepared with SASLprep (RFC 4013)
  by the users file (:mod:`smarthost.auth.users`), as SCRAM clients prepare theirs.
- OAUTHBEARER and XOAUTH2 only parse (``smarthost.auth.oauth``): the token goes to the
  portal as an ``IBearerToken``, whose checker asks the token verifier plugins. A refused token is
  answered with one more challenge before the ``535`` (``Credentials.failure_challenge``).
- GSSAPI establishes a Kerberos context with the keytab's key during the exchange and hands
  the portal a ``smarthost.auth.cred.VerifiedPrincipal`` (the principal mapped to a user).

One module per family: :mod:`~smarthost.auth.sasl.base` (the answers, the interfaces, the
secrets source), :mod:`~smarthost.auth.sasl.plain` (PLAIN, LOGIN),
:mod:`~smarthost.auth.sasl.cram` (CRAM-MD5), :mod:`~smarthost.auth.sasl.scram` (SCRAM),
:mod:`~smarthost.auth.sasl.bearer` (OAUTHBEARER, XOAUTH2) and
:mod:`~smarthost.auth.sasl.gssapi` (GSSAPI, Kerberos). This module is the registry
(:func:`build_mechanisms`) and the names the session and the app import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs
from twisted.internet.interfaces import IReactorTime

from smarthost.auth.sasl.base import (
    Challenge,
    ChallengeSecrets,
    Credentials,
    ISASLExchange,
    ISASLMechanism,
    NoUsers,
    Rejected,
    Step,
)
from smarthost.auth.sasl.bearer import OAuthBearerMechanism, XOAuth2Mechanism
from smarthost.auth.sasl.cram import CramMD5Mechanism
from smarthost.auth.sasl.gssapi import GssapiMechanism, Keytab, KeytabError
from smarthost.auth.sasl.plain import LoginMechanism, PlainMechanism
from smarthost.auth.sasl.scram import ScramMechanism

__all__ = [
    "MECHANISMS",
    "REFUSED",
    "Challenge",
    "ChallengeSecrets",
    "CramMD5Mechanism",
    "Credentials",
    "GssapiMechanism",
    "ISASLExchange",
    "ISASLMechanism",
    "Keytab",
    "KeytabError",
    "LoginMechanism",
    "MechanismContext",
    "OAuthBearerMechanism",
    "PlainMechanism",
    "Rejected",
    "ScramMechanism",
    "Step",
    "XOAuth2Mechanism",
    "build_mechanisms",
]


@attrs.frozen
class MechanismContext:
    """What a mechanism may need when it is built. ``users`` is None only when mechanisms
    are built to validate a config: challenge-response mechanisms then know nobody."""

    users: ChallengeSecrets | None = None
    hostname: str = "localhost"
    clock: IReactorTime | None = None
    keytab: Keytab | None = None  # GSSAPI's; None: GSSAPI lets nobody in

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
    # The portal needs a VerifiedPrincipalChecker for the same keytab (smarthost.auth.cred).
    "GSSAPI": lambda c: GssapiMechanism(c.keytab),
}

# Mechanisms an operator may well ask for and that we refuse on purpose, with the reason
# check-config shows.
REFUSED = {
    "DIGEST-MD5": "DIGEST-MD5 is historic (RFC 6331); use SCRAM-SHA-256",
    "NTLM": "NTLM is a proprietary scheme with known weaknesses and no standard; "
            "use SCRAM-SHA-256, or PLAIN over TLS",
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
    keytab: Keytab | None = None,
) -> list[ISASLMechanism]:
    """The mechanisms named in ``[auth] mechanisms``, in the order given (the EHLO order).

    ``users`` (the ``UsersFile``) supplies CRAM-MD5 and SCRAM secrets, ``hostname`` and
    ``clock`` make the CRAM-MD5 challenge, ``keytab`` (``[auth.gssapi]``) is GSSAPI's. Without
    ``users`` or ``keytab`` those mechanisms still build, so a config can be validated, but
    they let nobody in.

    Raises ``ValueError`` naming the first unknown, refused or repeated mechanism, for config
    errors. Names are matched case-insensitively and advertised upper case.
    """
    context = MechanismContext(users, hostname, clock, keytab)
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
