"""SCRAM-SHA-256 and SCRAM-SHA-1 (RFC 5802, RFC 7677), without channel binding.

The salt and iteration count go to the client before it proves anything, so a name without
a secret gets a decoy that looks real and never changes (``smarthost.auth.decoys``). The
server signature (``v=``) goes out only after the proof checked; in SMTP it travels as one
more ``334`` challenge that the client answers with an empty line (RFC 4954 4, no
"additional data with success").
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable

import attrs
from zope.interface import implementer

from smarthost.auth.cred import VerifiedUser
from smarthost.auth.derived import SCRAM_HASHES, ScramSecret
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
from smarthost.auth.users import Secret


def _random_nonce() -> str:
    # 144 bits; base64 is within RFC 5802's "printable" (no ",") for the nonce.
    return base64.b64encode(os.urandom(18)).decode("ascii")


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
        return FINISHED

    def _client_first(self, data: bytes) -> Step:
        text = decode_utf8(data, "SCRAM client-first-message")
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
            return unavailable(e, name)
        secret = self._secret.value
        salt = base64.b64encode(secret.salt).decode("ascii")
        server_first = f"r={self._nonce},s={salt},i={secret.iterations}"
        self._messages = f"{bare},{server_first}"
        self._state = "client-final"
        return Challenge(server_first.encode("ascii"))

    def _client_final(self, data: bytes) -> Step:
        name = self._name
        text = decode_utf8(data, "SCRAM client-final-message")
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
        matches = hmac.compare_digest(stored_key, secret.stored_key)
        if self._secret.user_without_secret:
            return Rejected(f"no {self._mechanism} secret for this user", username=name,
                            no_secret=True)
        if not matches or not known:
            return Rejected("wrong SCRAM proof", username=name)
        server_signature = hmac.digest(secret.server_key, auth_message, self._hash)
        self._state = "server-final"
        return Challenge(b"v=" + base64.b64encode(server_signature))
