"""Stand-in secrets for names that have none, and the key they are derived from.

A CRAM-MD5 or SCRAM exchange for a name that is not in the users file (or has no secret for
that mechanism) must run exactly like one for a real user and then fail, or probing would
tell the names apart. SCRAM makes that hard: the salt goes to the client before it proves
anything, so an unknown name needs a salt that looks real and never changes.
"""

from __future__ import annotations

import hashlib
import hmac

from smarthost.auth.derived import SCRAM_HASHES, SCRAM_SALT_OCTETS, CramMD5Secret, ScramSecret


def decoy_key(secret: bytes) -> bytes:
    """The key for :class:`Decoys`, derived one-way from a long-lived ``secret``.

    Decoy salts for unknown names must not change on restart: a real user's salt never
    does, so anyone recording the salts across a restart would otherwise tell real names
    from made-up ones. The daemon passes its TLS private key, a secret that already lives
    as long as the installation and never leaves the server; the HMAC makes the decoy key a
    one-way derivative of it, so nothing about the private key can be learnt from a salt.
    """
    return hmac.digest(secret, b"smarthost SCRAM decoys", "sha256")


class Decoys:
    """Stand-in secrets for names that have none: a fixed function of the name and a key.

    A SCRAM client learns the salt and iteration count before proving anything, so an
    unknown name must get a salt that looks real and stays the same on every attempt;
    otherwise two probes would tell users apart.
    """

    def __init__(self, key: bytes) -> None:
        self._key = key

    def _derive(self, label: str, name: str, size: int) -> bytes:
        out = b""
        while len(out) < size:
            message = f"{label}\0{len(out)}\0".encode() + name.encode("utf-8", "surrogatepass")
            out += hmac.digest(self._key, message, "sha256")
        return out[:size]

    def scram(self, name: str, mechanism: str, iterations: int) -> ScramSecret:
        size = hashlib.new(SCRAM_HASHES[mechanism]).digest_size
        return ScramSecret(
            iterations,
            self._derive(f"{mechanism} salt", name, SCRAM_SALT_OCTETS),
            self._derive(f"{mechanism} stored", name, size),
            self._derive(f"{mechanism} server", name, size),
        )

    def cram_md5(self, name: str) -> CramMD5Secret:
        return CramMD5Secret(self._derive("CRAM-MD5 inner", name, 16),
                             self._derive("CRAM-MD5 outer", name, 16))
