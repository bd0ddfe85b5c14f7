"""``[auth] backends`` built: the password checkers in order, and the senders mapping the
relay policy asks (``[relay.senders]`` plus what the directory says each user owns)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import ssl

from smarthost.app.config import Config, ConfigError, LdapConfig
from smarthost.auth.cred import BcryptChecker, UserDirectory, VerifiedPrincipalChecker
from smarthost.auth.ldap import (
    DirectorySenders,
    LdapChecker,
    LdapConnector,
    LdapDirectory,
    LdapSettings,
)
from smarthost.auth.sasl.gssapi import Keytab, KeytabError
from smarthost.core.types import RunBlocking


@attrs.frozen
class Backends:
    # None: the users file alone, as before [auth] backends existed.
    checkers: Sequence[ICredentialsChecker] | None
    senders: Mapping[str, frozenset[str]]
    directory: LdapDirectory | None = None


def build_backends(config: Config, reactor: Any, users: UserDirectory,
                   run_blocking: RunBlocking) -> Backends:
    auth = config.auth
    if auth.backends == ("users",) or auth.ldap is None:
        return Backends(None, config.relay.senders)
    senders = DirectorySenders(config.relay.senders)
    directory = ldap_directory(auth.ldap, config.tls.ca_file, reactor)
    checkers: list[ICredentialsChecker] = []
    for i, name in enumerate(auth.backends):
        if name == "users":
            last = i == len(auth.backends) - 1
            checkers.append(BcryptChecker(users, run_blocking, say_unknown=not last))
        else:
            checkers.append(LdapChecker(directory, senders))
    return Backends(checkers, senders, directory)


def read_bind_password(path: Path) -> str:
    """The service account's password (a trailing newline is not part of it); a
    ``ConfigError`` naming the key when the file cannot be read. check-config uses it too."""
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("auth.ldap.bind_password_file", f"cannot read {path}: {e}") from None


def trust_root(ca_file: Path | None) -> Any:
    """``[tls] ca_file``'s CAs, or the system's (SSL_CERT_FILE honoured) when unset."""
    if ca_file is None:
        return ssl.platformTrust()  # type: ignore[no-untyped-call]
    try:
        text = ca_file.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("tls.ca_file", f"cannot read {ca_file}: {e}") from None
    end = "-----END CERTIFICATE-----"
    pems = [block + end for block in text.split(end) if "-----BEGIN CERTIFICATE-----" in block]
    if not pems:
        raise ConfigError("tls.ca_file", f"{ca_file} holds no PEM certificate")
    return ssl.trustRootFromCertificates(  # type: ignore[no-untyped-call]
        [ssl.Certificate.loadPEM(p.encode("ascii")) for p in pems])


def ldap_directory(cfg: LdapConfig, ca_file: Path | None, reactor: Any) -> LdapDirectory:
    settings = LdapSettings(
        url=cfg.url, base=cfg.base, bind_dn=cfg.bind_dn,
        bind_password=read_bind_password(cfg.bind_password_file), starttls=cfg.starttls,
        filter=cfg.filter, sender_attributes=cfg.sender_attributes,
        require_group=cfg.require_group,
    )
    tls = ssl.optionsForClientTLS(settings.host, trustRoot=trust_root(ca_file))
    return LdapDirectory(settings, LdapConnector(reactor, settings, tls), reactor)


def gssapi_keytab(config: Config) -> Keytab | None:
    """``[auth.gssapi] keytab`` read, when GSSAPI is offered; a ``ConfigError`` naming the
    key when it cannot accept logins (missing, unreadable, no keys)."""
    gssapi = config.auth.gssapi
    if "GSSAPI" not in config.auth.mechanisms or gssapi is None:
        return None
    try:
        return Keytab(gssapi.keytab)
    except KeytabError as e:
        raise ConfigError("auth.gssapi.keytab", str(e)) from None


def principal_checkers(keytab: Keytab | None) -> list[ICredentialsChecker]:
    """The portal's checker for GSSAPI's verified principals, for this keytab only."""
    return [] if keytab is None else [VerifiedPrincipalChecker(keytab)]
