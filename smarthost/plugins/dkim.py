"""``dkim``: sign authenticated users' outgoing mail with DKIM (RFC 6376), using dkimpy.

Settings (``[plugins.dkim]``)::

    # Per signing domain, one key or a list of keys, each with the selector its public key is
    # published under (a TXT record at <selector>._domainkey.<domain>). A key is an RSA
    # private key in PEM (PKCS#1 or PKCS#8, at least 1024 bits, 2048 recommended by RFC 8301)
    # or an Ed25519 key (RFC 8463): PEM as `openssl genpkey -algorithm ed25519` writes it, or
    # dknewkey --ktype ed25519's base64 seed. Every key of the domain signs, so a domain can
    # send both an RSA and an Ed25519 signature while verifiers learn Ed25519 (RFC 8463 5).
    keys = { "example.test" = { selector = "s1", key = "dkim/example.test.key" } }
    keys."example.test" = [{ selector = "rsa", key = "rsa.key" },
                           { selector = "ed", key = "ed.key" }]
    headers = ["From", "To", "Subject", ...]  # optional: the fields to sign (see DEFAULT_HEADERS)

Relative ``key`` paths are resolved against the directory of the config file
(``context.base_dir``), like every path in the config. Keys are read once, at start:
an unreadable or malformed key stops the start (and ``smarthost check-config``) with an error
naming the setting. Rotating a key means restarting.

What is signed: mail from authenticated users only (``client.user`` set), by the key of the
*envelope sender's* domain, which the core has already checked the user may use. The From
header's domain is not trusted for this: the core does not check it, so choosing the key by it
would let any user get another hosted domain's signature. With no key for the sender's domain,
or the null sender, the message goes out unsigned; that is not an error.

Canonicalization is relaxed/relaxed (RFC 6376 3.4.2, 3.4.4), which survives the header
refolding and trailing-space changes relays commonly make. Every configured header field
present is signed; those RFC 5322 3.6 allows only once are signed one extra time
("oversigned", RFC 6376 8.15), so a second From or Subject cannot be added after signing.
Signing is CPU work (RSA in pure Python) and reads the message from disk: it runs through
``context.run_blocking``, off the reactor thread.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from smarthost.api import Client, IHeaderAdder, ISmarthostPlugin, MessageView, PluginContext

DEFAULT_HEADERS = (
    "From", "Sender", "Reply-To", "Subject", "Date", "Message-ID", "To", "Cc",
    "In-Reply-To", "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "Content-Disposition", "List-Id", "List-Unsubscribe", "List-Unsubscribe-Post",
)
# RFC 5322 3.6: at most one of each per message.
SINGLE = frozenset({"from", "sender", "reply-to", "subject", "date", "message-id", "to",
                    "cc", "in-reply-to", "references"})
# RFC 6376 5.4.1: these change in transit or must not be signed (dkimpy refuses them).
_NEVER = frozenset(h.decode() for h in dkim.DKIM.SHOULD_NOT) | {"received"}
MIN_KEY_BITS = 1024  # RFC 8301 3.2: verifiers must refuse smaller RSA keys
_SETTINGS = ("keys", "headers")
_KEY_SETTINGS = ("selector", "key")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?\Z")
_FIELD_NAME = re.compile(r"[!-9;-~]+\Z")  # RFC 5322 2.2: printable US-ASCII except ":"


RSA, ED25519 = b"rsa-sha256", b"ed25519-sha256"


@attrs.frozen
class SigningKey:
    domain: str
    selector: str
    pem: bytes = attrs.field(repr=False)  # RSA: the PEM; Ed25519: the base64 seed dkimpy takes
    algorithm: bytes = RSA


@attrs.frozen
class Settings:
    keys: Mapping[str, tuple[SigningKey, ...]]  # by lower-case domain, each key signs
    headers: tuple[str, ...] = tuple(h.lower() for h in DEFAULT_HEADERS)


def parse_settings(settings: Mapping[str, Any], base_dir: Path | None = None) -> Settings:
    """Validate ``[plugins.dkim]`` and read the keys; a ValueError names the bad setting."""
    for name in settings:
        if name not in _SETTINGS:
            raise ValueError(f"{name}: unknown setting (known: {', '.join(_SETTINGS)})")
    table = settings.get("keys", {})
    if not isinstance(table, Mapping):
        raise ValueError("keys: expected a table of domain = { selector, key }")
    keys: dict[str, tuple[SigningKey, ...]] = {}
    for domain, entries in table.items():
        where = f'keys."{domain}"'
        name = domain.lower().rstrip(".")
        if not _dns_name(name, minimum=2):
            raise ValueError(f"{where}: {domain!r} is not a domain name")
        if name in keys:
            raise ValueError(f"{where}: {name} is configured twice")
        many = isinstance(entries, list)
        if many and not entries:
            raise ValueError(f"{where}: expected at least one {{ selector, key }}")
        found = tuple(
            _signing_key(name, f"{where}[{i}]" if many else where, entry, base_dir)
            for i, entry in enumerate(entries if many else [entries])
        )
        if len({k.selector for k in found}) < len(found):
            raise ValueError(f"{where}: two keys with one selector")
        keys[name] = found
    headers = settings.get("headers", list(DEFAULT_HEADERS))
    if not isinstance(headers, list) or not headers:
        raise ValueError("headers: expected a list of header field names")
    names: list[str] = []
    for i, field in enumerate(headers):
        if not isinstance(field, str) or not _FIELD_NAME.match(field):
            raise ValueError(f"headers[{i}]: expected a header field name")
        if field.lower() in _NEVER:
            raise ValueError(f"headers[{i}]: {field} must not be signed (RFC 6376 5.4.1)")
        if field.lower() not in names:
            names.append(field.lower())
    if "from" not in names:
        raise ValueError("headers: must include From (RFC 6376 5.4)")
    return Settings(keys, tuple(names))


def _signing_key(
    domain: str, where: str, entry: object, base_dir: Path | None
) -> SigningKey:
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected {{ selector = ..., key = ... }}")
    for key in entry:
        if key not in _KEY_SETTINGS:
            raise ValueError(f"{where}.{key}: unknown setting (known: selector, key)")
    selector = entry.get("selector")
    if not isinstance(selector, str) or not _dns_name(selector, minimum=1):
        raise ValueError(f"{where}.selector: expected a selector such as \"s1\"")
    path = entry.get("key")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where}.key: expected the path of a PEM private key")
    secret, algorithm = _read_key(f"{where}.key", path, base_dir)
    return SigningKey(domain, selector, secret, algorithm)


def _dns_name(name: str, minimum: int) -> bool:
    labels = name.split(".")
    return len(labels) >= minimum and len(name) <= 253 and all(_LABEL.match(x) for x in labels)


def _read_key(where: str, text: str, base_dir: Path | None) -> tuple[bytes, bytes]:
    """The key as dkimpy takes it, and its algorithm: an RSA PEM as is, an Ed25519 key as the
    base64 of its 32-byte seed (dknewkey's file is exactly that; openssl's PKCS#8 PEM is
    converted)."""
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = (base_dir if base_dir is not None else Path.cwd()) / path
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{where}: cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN" not in data:
        try:
            seed = base64.b64decode(data.strip(), validate=True)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise ValueError(f"{where}: {path} is neither a PEM private key nor an Ed25519 "
                             "seed as dknewkey writes it")
        return base64.b64encode(seed), ED25519
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ValueError(f"{where}: {path} is not an unencrypted PEM private key") from None
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        return base64.b64encode(raw), ED25519
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{where}: {path} is neither an RSA nor an Ed25519 key")
    if key.key_size < MIN_KEY_BITS:
        raise ValueError(f"{where}: {path} is a {key.key_size}-bit key; DKIM needs at least "
                         f"{MIN_KEY_BITS} bits (RFC 8301)")
    return data, RSA


def header_names(headers: bytes) -> list[str]:
    """The field names of a header section, lower case, in order (folded lines skipped)."""
    names = []
    for line in headers.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") or b":" not in line:
            continue
        names.append(line.split(b":", 1)[0].strip().decode("ascii", "replace").lower())
    return names


def fields_to_sign(wanted: Sequence[str], present: Sequence[str]) -> list[str]:
    """Each wanted field as many times as it is present, one more for the RFC 5322 singletons:
    a verifier then also fails a message with an instance added after signing."""
    signed: list[str] = []
    for name in wanted:
        count = present.count(name)
        if count:
            signed += [name] * (count + (name in SINGLE))
    return signed


def sign(key: SigningKey, include: Sequence[str], read: Callable[[], bytes]) -> str:
    """The DKIM-Signature field value for the message ``read()`` returns (blocking)."""
    signature: bytes = dkim.sign(
        read(),
        key.selector.encode("ascii"),
        key.domain.encode("ascii"),
        key.pem,
        canonicalize=(b"relaxed", b"relaxed"),
        signature_algorithm=key.algorithm,
        include_headers=[name.encode("ascii") for name in include],
        linesep=b"\r\n",
    )
    field, _, value = signature.decode("ascii").partition(":")
    assert field.lower() == "dkim-signature"
    return value.strip(" \t").removesuffix("\r\n")


@implementer(IHeaderAdder)
class DKIMSigner:
    def __init__(self, settings: Settings, run_blocking: Callable[..., Deferred[Any]]) -> None:
        self._settings = settings
        self._run_blocking = run_blocking

    async def add_headers(
        self, client: Client, message: MessageView
    ) -> Sequence[tuple[str, str]]:
        if client.user is None:
            return []  # only our own users' mail: relayed and inbound mail is not ours to sign
        sender = message.envelope.sender
        domain = sender.rpartition("@")[2].lower().rstrip(".") if "@" in sender else ""
        keys = self._settings.keys.get(domain, ())
        include = fields_to_sign(self._settings.headers, header_names(message.headers))
        if "from" not in include:
            return []  # no From: not a message RFC 5322 allows, and DKIM cannot sign it
        # Each signature covers the message without the others (RFC 6376 5.4 signs only the
        # fields named in h=), so the order they are prepended in does not matter.
        return [
            ("DKIM-Signature", await self._run_blocking(sign, key, include, message.read))
            for key in keys
        ]


@implementer(IPlugin, ISmarthostPlugin)
class DKIMPlugin:
    name = "dkim"

    def build(self, settings: Mapping[str, Any], context: PluginContext) -> DKIMSigner:
        parsed = parse_settings(settings, context.base_dir)
        return DKIMSigner(parsed, context.run_blocking)


dkim_signer = DKIMPlugin()
