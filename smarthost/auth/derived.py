"""Secrets derived from a password for the challenge-response mechanisms.

``smarthost passwd`` derives them beside the bcrypt hash so that CRAM-MD5 and SCRAM can check
a login without the password ever being stored (the file format is in :mod:`smarthost.auth.users`).
The decoys that stand in for names without these secrets are in :mod:`smarthost.auth.decoys`;
the resumable MD5 that CRAM-MD5 needs is in :mod:`smarthost.auth.md5state`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import stringprep
import unicodedata

import attrs

from smarthost.auth.md5state import MD5_IV, md5_compress, md5_resume

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
    """RFC 5802 section 3 from a prepared (:func:`prepare_password`) password."""
    if salt is None:
        salt = os.urandom(SCRAM_SALT_OCTETS)
    salted = hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)  # Hi()
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", hash_name)
    return ScramSecret(iterations, salt, stored_key, server_key)


def prepare_password(password: bytes, *, query: bool = False) -> bytes:
    """A password in the one form every mechanism hashes and compares: SASLprep (RFC 4013).

    ``smarthost passwd`` hashes this with bcrypt and derives SCRAM from it (a "stored" string:
    RFC 4616 2, and RFC 5802 2.2 ``Normalize``); PLAIN and LOGIN prepare what the client
    presents the same way, as a ``query`` (RFC 4616 2: unassigned code points allowed), so a
    password typed in another Unicode normal form still works, as it does with SCRAM, where
    the client prepares it. A password SASLprep refuses (not UTF-8, a control character) is
    used as given, as PostgreSQL does for SCRAM: a client cannot prepare it either and sends
    it unchanged; so is one SASLprep would empty. ASCII passwords without controls are their
    own prepared form.
    """
    try:
        prepared = saslprep(password.decode("utf-8"), query=query).encode("utf-8")
    except (UnicodeDecodeError, ValueError):
        return password
    return prepared or password  # only "mapped to nothing" characters: never the empty one


def prepare_name(name: str) -> str:
    """A user name as presented, prepared for the users-file lookup (RFC 4616 2 for PLAIN,
    RFC 5802 5.1 for SCRAM: a "query", so unassigned code points are allowed); as given when
    SASLprep refuses it (then only the exact name can match)."""
    try:
        return saslprep(name, query=True)
    except ValueError:
        return name


_PROHIBITED = (
    stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
    stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
    stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
)


def saslprep(text: str, *, query: bool = False) -> str:
    """RFC 4013 SASLprep; ``ValueError`` when the result is prohibited.

    A stored string may not hold unassigned code points (RFC 3454 7); a ``query`` (what a
    client presents, compared with stored strings) may.
    """
    # 2.1: non-ASCII spaces become SPACE, "commonly mapped to nothing" vanish.
    mapped = "".join(" " if stringprep.in_table_c12(c) else c
                     for c in text if not stringprep.in_table_b1(c))
    # 2.2: NFKC of the Unicode version stringprep is defined on (3.2).
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)
    for char in prepared:
        if any(table(char) for table in _PROHIBITED):
            raise ValueError(f"SASLprep prohibits {char!a}")
        if not query and stringprep.in_table_a1(char):
            raise ValueError(f"SASLprep: {char!a} is unassigned in Unicode 3.2")
    # 2.4 (RFC 3454 6): right-to-left text must be wholly so and start and end with it.
    if any(stringprep.in_table_d1(c) for c in prepared) and (
        any(stringprep.in_table_d2(c) for c in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        raise ValueError("SASLprep: bad bidirectional text")
    return prepared


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
    """The extra users-file fields for ``password`` (as typed), in the order they are written.

    SCRAM's come from the prepared password, which is what a SCRAM client hashes. CRAM-MD5's
    come from the password as typed: RFC 2195 knows no preparation and its clients key the
    HMAC with the octets the user typed, so only that form can ever match.
    """
    prepared = prepare_password(password)
    fields = [f"{mechanism.lower()}={derive_scram(prepared, hash_name, None, iterations).field()}"
              for mechanism, hash_name in SCRAM_HASHES.items()]
    fields.append(f"{CRAM_MD5_FIELD}={CramMD5Secret.derive(password).field()}")
    return tuple(fields)
