"""The client side of the SASL mechanisms the probe logs in with (RFC 4954 framing):
PLAIN, LOGIN, CRAM-MD5 and SCRAM-SHA-1/-256 (RFC 5802, with the server's signature checked,
so a server that does not know the password cannot pass)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from smarthost.app.probesmtp import ProbeError, Reply, SMTPDialog
from smarthost.auth.derived import saslprep

SUPPORTED = ("PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-1", "SCRAM-SHA-256")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _challenge(reply: Reply) -> bytes:
    try:
        return base64.b64decode(reply.lines[0] if reply.lines else "", validate=True)
    except ValueError:
        raise ProbeError(f"the server's challenge is not base64: {reply.first}") from None


async def authenticate(dialog: SMTPDialog, mechanism: str, user: str, password: str) -> Reply:
    """Run one AUTH exchange; the server's last reply (235 when it worked)."""
    if mechanism == "PLAIN":
        response = b"\0" + user.encode() + b"\0" + password.encode()
        return await dialog.command(f"AUTH PLAIN {_b64(response)}")
    if mechanism == "LOGIN":
        reply = await dialog.command("AUTH LOGIN")
        if reply.code == 334:
            reply = await dialog.command(_b64(user.encode()))
        if reply.code == 334:
            reply = await dialog.command(_b64(password.encode()))
        return reply
    if mechanism == "CRAM-MD5":
        reply = await dialog.command("AUTH CRAM-MD5")
        if reply.code != 334:
            return reply
        digest = hmac.new(password.encode(), _challenge(reply), hashlib.md5).hexdigest()
        return await dialog.command(_b64(f"{user} {digest}".encode()))
    if mechanism in ("SCRAM-SHA-1", "SCRAM-SHA-256"):
        return await _scram(dialog, mechanism, user, password)
    raise ValueError(mechanism)


async def _scram(dialog: SMTPDialog, mechanism: str, user: str, password: str) -> Reply:
    digest = hashlib.sha1 if mechanism == "SCRAM-SHA-1" else hashlib.sha256
    name = saslprep(user).replace("=", "=3D").replace(",", "=2C")
    nonce = secrets.token_urlsafe(18)
    first_bare = f"n={name},r={nonce}"
    reply = await dialog.command(f"AUTH {mechanism} {_b64(('n,,' + first_bare).encode())}")
    if reply.code != 334:
        return reply
    server_first = _challenge(reply).decode("utf-8", "replace")
    fields = dict(part.split("=", 1) for part in server_first.split(",") if "=" in part)
    try:
        server_nonce, salt = fields["r"], base64.b64decode(fields["s"])
        iterations = int(fields["i"])
    except (KeyError, ValueError):
        raise ProbeError(f"a SCRAM challenge the probe cannot read: {server_first!r}") from None
    if not server_nonce.startswith(nonce) or not 0 < iterations <= 1_000_000:
        raise ProbeError(f"a SCRAM challenge that breaks RFC 5802: {server_first!r}")
    salted = hashlib.pbkdf2_hmac(digest().name, saslprep(password).encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", digest).digest()
    without_proof = f"c=biws,r={server_nonce}"
    message = f"{first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(digest(client_key).digest(), message, digest).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    reply = await dialog.command(_b64(f"{without_proof},p={_b64(proof)}".encode()))
    if reply.code != 334:
        return reply
    expected = hmac.new(hmac.new(salted, b"Server Key", digest).digest(), message,
                        digest).digest()
    if _challenge(reply).decode("ascii", "replace") != f"v={_b64(expected)}":
        await dialog.command("*")
        raise ProbeError("the server's SCRAM signature is wrong: it does not know the password")
    return await dialog.command("")  # RFC 4954 4: the empty answer to the last challenge
