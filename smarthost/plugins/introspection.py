"""``introspection``: check OAuth 2.0 bearer tokens (AUTH OAUTHBEARER, XOAUTH2) by asking the
authorization server, with RFC 7662 token introspection.

Settings (``[plugins.introspection]``)::

    url = "https://auth.example.test/introspect"   # required; https only
    client_id = "smarthost"                        # required: our client at the server
    client_secret_file = "introspection.secret"    # required; relative to the config file
    user_claim = "username"                        # the claim naming the user ("sub", "email")
    ca = "certs/auth-ca.pem"                       # optional: trust only this CA (PEM)
    timeout = 10                                   # seconds per request (less than 30)

For each login: ``POST url`` with ``token=<token>&token_type_hint=access_token``
(``application/x-www-form-urlencoded``, RFC 7662 2.1) and HTTP Basic client authentication
(RFC 6749 2.3.1: id and secret form-urlencoded, then Basic). The answer (RFC 7662 2.2):

- ``200`` with ``{"active": true, "<user_claim>": "alice@example.test", ...}``: the token is
  alice's;
- ``200`` with ``"active"`` anything but ``true``: not a valid token (``535``);
- ``200`` with an active token but no string ``user_claim`` (a token issued to a client, not a
  user): refused (``535``), with a warning in the log;
- any other status (``401``: our client credentials are wrong), a body that is not a JSON
  object, a TLS or connection failure, or no answer within ``timeout``: an exception, which
  the core answers ``454 4.7.0`` (try again later).

Only ``https`` URLs are accepted: the request carries the user's token and our secret. The
certificate is checked against the system's trust store, or only against ``ca`` when given.
Redirects are not followed. The secret is read once at start; a change needs a restart.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus, urlsplit

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.iweb import IAgent
from zope.interface import implementer

from smarthost.api import PLUGIN_TIMEOUT, ISmarthostPlugin, ITokenVerifier, PluginContext

DEFAULT_TIMEOUT = 10.0
MAX_TIMEOUT = PLUGIN_TIMEOUT  # the core's own limit on a verifier
_SETTINGS = ("url", "client_id", "client_secret_file", "user_claim", "ca", "timeout")
_CLAIM = re.compile(r"[A-Za-z0-9_.:-]{1,64}\Z")

_log = Logger(namespace="smarthost.plugins.introspection")


class IntrospectionError(Exception):
    """The authorization server gave no usable answer: a temporary failure (454)."""


@attrs.frozen
class Settings:
    url: str
    client_id: str
    client_secret: str = attrs.field(repr=False)
    user_claim: str = "username"
    ca: tuple[bytes, ...] | None = attrs.field(default=None, repr=False)  # PEM certificates
    timeout: float = DEFAULT_TIMEOUT


def _string(settings: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = settings.get(key, default)
    if value is None:
        raise ValueError(f"{key}: required")
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: expected a non-empty string")
    return value


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when it is not a number
    except ValueError as e:
        raise ValueError(f"url: {e}") from None
    if parts.scheme != "https":
        raise ValueError("url: must be an https:// URL (the token and our secret travel in it)")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise ValueError("url: expected https://host[:port]/path, without user or password")
    if parts.fragment or port == 0:
        raise ValueError("url: expected https://host[:port]/path")


def _read(base_dir: Path, key: str, text: str) -> tuple[Path, bytes]:
    path = base_dir / text
    try:
        return path, path.read_bytes()
    except OSError as e:
        raise ValueError(f"{key}: cannot read {path}: {e.strerror or e}") from None


def parse_settings(settings: Mapping[str, Any], base_dir: Path) -> Settings:
    """Validate ``[plugins.introspection]``, reading the secret and CA files; a ValueError
    names the bad setting."""
    for key in settings:
        if key not in _SETTINGS:
            raise ValueError(f"{key}: unknown setting (known: {', '.join(_SETTINGS)})")
    url = _string(settings, "url")
    _check_url(url)
    client_id = _string(settings, "client_id")
    secret_path, raw = _read(base_dir, "client_secret_file",
                             _string(settings, "client_secret_file"))
    try:
        secret = raw.decode("utf-8").strip("\r\n")
    except UnicodeDecodeError:
        raise ValueError(f"client_secret_file: {secret_path} is not UTF-8 text") from None
    if not secret:
        raise ValueError(f"client_secret_file: {secret_path} is empty")
    user_claim = _string(settings, "user_claim", "username")
    if not _CLAIM.match(user_claim):
        raise ValueError("user_claim: expected a claim name such as \"username\", \"sub\" "
                         "or \"email\"")
    ca: tuple[bytes, ...] | None = None
    if "ca" in settings:
        ca_path, pem = _read(base_dir, "ca", _string(settings, "ca"))
        try:
            certificates = x509.load_pem_x509_certificates(pem)
        except ValueError:
            raise ValueError(f"ca: {ca_path} holds no PEM certificate") from None
        ca = tuple(c.public_bytes(serialization.Encoding.PEM) for c in certificates)
    timeout = settings.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError("timeout: expected a number of seconds")
    if not 0 < timeout < MAX_TIMEOUT:
        raise ValueError(f"timeout: must be more than 0 and less than {MAX_TIMEOUT:g} seconds")
    return Settings(url, client_id, secret, user_claim, ca, float(timeout))


def _basic(client_id: str, secret: str) -> bytes:
    # RFC 6749 2.3.1: each part form-urlencoded first, then HTTP Basic (RFC 7617).
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode("ascii")
    return b"Basic " + base64.b64encode(pair)


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


@implementer(ITokenVerifier)
class IntrospectionVerifier:
    """Asks the introspection endpoint about each token. ``reactor`` makes the connections
    (in the daemon, the plugin context's ``clock`` is the reactor) and, unless ``clock`` is
    given, times them out."""

    def __init__(
        self, settings: Settings, reactor: IReactorTime, clock: IReactorTime | None = None
    ) -> None:
        self._settings = settings
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._agent: IAgent | None = None
        self._authorization = _basic(settings.client_id, settings.client_secret)

    def __repr__(self) -> str:
        return f"<IntrospectionVerifier {self._settings.url}>"

    def _client(self) -> IAgent:
        # Made at first use: check-config builds the plugin with a clock that cannot connect.
        if self._agent is None:
            if not IReactorTCP.providedBy(self._reactor):
                raise IntrospectionError("the plugin context's clock cannot make connections")
            ca = self._settings.ca
            # Twisted has no annotations for these yet.
            trust = (ssl.trustRootFromCertificates(  # type: ignore[no-untyped-call]
                [ssl.Certificate.loadPEM(c) for c in ca]
            ) if ca is not None else ssl.platformTrust())  # type: ignore[no-untyped-call]
            policy = BrowserLikePolicyForHTTPS(trust)  # type: ignore[no-untyped-call]
            # One connection per request: a POST on a connection the server has just closed
            # is not retried (it is not idempotent), which would be a needless 454.
            pool = HTTPConnectionPool(  # type: ignore[no-untyped-call]
                self._reactor, persistent=False)
            pool._factory = _QuietFactory  # no "Starting factory" log line per login
            self._agent = Agent(  # type: ignore[no-untyped-call]
                self._reactor, policy, pool=pool)
        return self._agent

    async def verify(self, token: str, user: str | None) -> str | None:
        # The client's name is not sent: the core compares it with the owner we report.
        s = self._settings
        d = Deferred.fromCoroutine(self._introspect(token))
        # Not Deferred.addTimeout: the cancelled request fails with the HTTP client's own
        # error (ResponseNeverReceived), which addTimeout does not recognise as its doing.
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            d.cancel()

        call = self._clock.callLater(s.timeout, expire)
        try:
            return await d
        except IntrospectionError:
            raise
        except Exception as e:
            if expired:
                raise IntrospectionError(f"{s.url}: no answer within {s.timeout:g} s") from None
            raise IntrospectionError(f"{s.url}: {type(e).__name__}: {e}") from None
        finally:
            if call.active():
                call.cancel()

    async def _introspect(self, token: str) -> str | None:
        import treq  # its import pulls in a lot; only the daemon ever calls this

        s = self._settings
        headers: dict[bytes | str, list[bytes | str]] = {
            "Authorization": [self._authorization], "Accept": ["application/json"],
        }
        response = await treq.request(
            "POST",
            s.url,
            data={"token": token, "token_type_hint": "access_token"},
            headers=headers,
            allow_redirects=False,
            agent=self._client(),
        )
        body = await treq.content(response)
        if response.code != 200:
            hint = " (check client_id and client_secret_file)" if response.code == 401 else ""
            raise IntrospectionError(f"{s.url}: HTTP {response.code}{hint}")
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise IntrospectionError(f"{s.url}: the answer is not a JSON object")
        if answer.get("active") is not True:
            return None
        owner = answer.get(s.user_claim)
        if not isinstance(owner, str) or not owner:
            _log.warn(
                "introspection: an active token has no {claim} claim; refused (is user_claim "
                "right, or was the token issued to a client rather than a user?)",
                claim=s.user_claim,
            )
            return None
        return owner


@implementer(IPlugin, ISmarthostPlugin)
class IntrospectionPlugin:
    name = "introspection"

    def build(self, settings: Mapping[str, Any], context: PluginContext) -> IntrospectionVerifier:
        return IntrospectionVerifier(parse_settings(settings, context.base_dir), context.clock)


introspection = IntrospectionPlugin()
