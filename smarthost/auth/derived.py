"""Secrets derived from a password for the challenge-response mechanisms.

``smarthost passwd`` derives them beside the bcrypt hash so that CRAM-MD5 and SCRAM can check
a login without the password ever being stored (the file format is in :mod:`smarthost.auth.users`).
Also the decoys that stand in for unknown users, so probing cannot tell names apart.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import os
import stringprep
import struct
import unicodedata

import attrs

# RFC 7677 4 asks for at least 4096 iterations; what `smarthost passwd` uses.
SCRAM_ITERATIONS = 4096
SCRAM_SALT_OCTETS = 16
# SASL mechanism name -> hashlib name. The users-file key is the mechanism name in lower case.
SCRAM_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-1": "sha1"}
CRAM_MD5_FIELD = "cram-md5"



@attrs.frozen
class ScramSecret:
    """What RFC 5802 section 3 lets a server store instead of the password."""

    iterations: int
    salt: bytes
    stored_key: bytes = attrs.field(repr=False)
    server_key: bytes = attrs.field(repr=False)

    def field(self) -> str:
        parts = [base64.b64encode(v).decode("ascii")
                 for v in (self.salt, self.stored_key, self.server_key)]
        return ",".join([str(self.iterations), *parts])

    @classmethod
    def parse(cls, value: str, hash_name: str) -> ScramSecret | None:
        parts = value.split(",")
        if len(parts) != 4 or not parts[0].isascii() or not parts[0].isdigit():
            return None
        try:
            salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[1:])
        except (binascii.Error, ValueError):
            return None
        iterations = int(parts[0])
        size = hashlib.new(hash_name).digest_size
        if not 1 <= iterations <= 10_000_000 or not salt or not len(stored) == len(server) == size:
            return None
        return cls(iterations, salt, stored, server)


def derive_scram(
    password: bytes, hash_name: str, salt: bytes | None = None,
    iterations: int = SCRAM_ITERATIONS,
) -> ScramSecret:
    """RFC 5802 section 3 from a (normalised, see :func:`scram_password`) password."""
    if salt is None:
        salt = os.urandom(SCRAM_SALT_OCTETS)
    salted = hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)  # Hi()
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    return ScramSecret(iterations, salt, stored_key, server_key)


def scram_password(password: bytes) -> bytes:
    """``Normalize(password)`` of RFC 5802 2.2: SASLprep (RFC 4013) when the password is
    text it accepts; otherwise the octets as given, as PostgreSQL does, since a client that
    cannot prepare them either sends them unchanged."""
    try:
        return saslprep(password.decode("utf-8")).encode("utf-8")
    except (UnicodeDecodeError, ValueError):
        return password


_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
    stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
    stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
    stringprep.in_table_a1,  # unassigned code points: a stored string (RFC 3454 7)
)


def saslprep(text: str) -> str:
    """RFC 4013 SASLprep for a stored string; ``ValueError`` when it is prohibited."""
    # 2.1: non-ASCII spaces become SPACE, "commonly mapped to nothing" vanish.
    mapped = "".join(" " if stringprep.in_table_c12(c) else c
                     for c in text if not stringprep.in_table_b1(c))
    # 2.2: NFKC of the Unicode version stringprep is defined on (3.2).
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for char in prepared:
        if any(table(char) for table in _PROHIBITED):
            raise ValueError(f"SASLprep prohibits {char!a}")
    # 2.4 (RFC 3454 6): right-to-left text must be wholly so and start and end with it.
    if any(stringprep.in_table_d1(c) for c in prepared) and (
        any(stringprep.in_table_d2(c) for c in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        raise ValueError("SASLprep: bad bidirectional text")
    return prepared


# MD5 (RFC 1321) with its state exposed. hashlib's MD5 can neither export nor import the
# chaining state, and CRAM-MD5 without the password needs both: the users file keeps the
# HMAC-MD5 states after the key blocks, and each login continues from them.
_MASK = 0xFFFFFFFF
_MD5_SHIFTS = (7, 12, 17, 22) * 4 + (5, 9, 14, 20) * 4 + (4, 11, 16, 23) * 4 + (6, 10, 15, 21) * 4
_MD5_K = tuple(int(abs(math.sin(i + 1)) * 2**32) & _MASK for i in range(64))  # RFC 1321 3.4
MD5_IV = struct.pack("<4I", 0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)


def md5_compress(state: bytes, block: bytes) -> bytes:
    """One MD5 compression: 16-octet state (little-endian words) and a 64-octet block."""
    a0, b0, c0, d0 = struct.unpack("<4I", state)
    words = struct.unpack("<16I", block)
    a, b, c, d = a0, b0, c0, d0
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | ~d), (7 * i) % 16
        f = (f + a + _MD5_K[i] + words[g]) & _MASK
        s = _MD5_SHIFTS[i]
        a, d, c = d, c, b
        b = (b + ((f << s) | (f >> (32 - s)))) & _MASK
    return struct.pack("<4I", (a0 + a) & _MASK, (b0 + b) & _MASK, (c0 + c) & _MASK,
                       (d0 + d) & _MASK)


def md5_resume(state: bytes, consumed: int, data: bytes) -> bytes:
    """The MD5 digest of a message whose first ``consumed`` octets (a multiple of 64) left
    the hash in ``state`` and whose remaining octets are ``data``."""
    if consumed % 64:
        raise ValueError("MD5 can only resume at a block boundary")
    length = consumed + len(data)
    padded = (data + b"\x80" + b"\0" * ((55 - length) % 64)
              + struct.pack("<Q", (length * 8) & 0xFFFFFFFFFFFFFFFF))
    for offset in range(0, len(padded), 64):
        state = md5_compress(state, padded[offset:offset + 64])
    return state


@attrs.frozen
class CramMD5Secret:
    """HMAC-MD5 keyed with the password, stopped after the key blocks (RFC 2104)."""

    inner: bytes = attrs.field(repr=False)  # MD5 state after key XOR ipad
    outer: bytes = attrs.field(repr=False)  # MD5 state after key XOR opad

    @classmethod
    def derive(cls, password: bytes) -> CramMD5Secret:
        key = password
        if len(key) > 64:
            key = hashlib.md5(key).digest()  # noqa: S324 -- RFC 2104 2 requires MD5 here
        key = key.ljust(64, b"\0")
        return cls(md5_compress(MD5_IV, bytes(k ^ 0x36 for k in key)),
                   md5_compress(MD5_IV, bytes(k ^ 0x5C for k in key)))

    def hmac(self, message: bytes) -> bytes:
        """``HMAC-MD5(password, message)`` without the password."""
        return md5_resume(self.outer, 64, md5_resume(self.inner, 64, message))

    def field(self) -> str:
        return (self.outer + self.inner).hex()  # Dovecot's order: outer state first

    @classmethod
    def parse(cls, value: str) -> CramMD5Secret | None:
        if len(value) != 64:
            return None
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            return None
        return cls(inner=raw[16:], outer=raw[:16])


def derive_secrets(password: bytes, iterations: int = SCRAM_ITERATIONS) -> tuple[str, ...]:
    """The extra users-file fields for ``password``, in the order they are written."""
    prepared = scram_password(password)
    fields = [f"{mechanism.lower()}={derive_scram(prepared, hash_name, None, iterations).field()}"
              for mechanism, hash_name in SCRAM_HASHES.items()]
    fields.append(f"{CRAM_MD5_FIELD}={CramMD5Secret.derive(password).field()}")
    return tuple(fields)


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


