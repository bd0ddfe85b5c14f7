"""What our TLS listeners offer: protocol versions, cipher suites and key-exchange groups.

The profiles follow Mozilla's server-side TLS guidelines (https://ssl-config.mozilla.org/),
so that a scanner run as ``sslyze --starttls smtp HOST:587 --mozilla_config intermediate``
passes. ``intermediate`` is the default on every listener (STARTTLS and implicit TLS alike);
``old`` is for offices with clients that cannot do TLS 1.2 (old printers and scanners, Windows
7 era mail clients) and trades security for reach.

Twisted's ``CertificateOptions`` can raise the minimum version and filter cipher names, but it
cannot keep an OpenSSL ``@SECLEVEL`` directive (TLS 1.0 needs level 0 with OpenSSL 3), set the
TLS 1.3 suites or choose the key-exchange groups (OpenSSL's default list also offers X448,
secp521r1 and finite-field groups, which the guidelines leave out). ``ProfileOptions`` adds
those to the context Twisted builds.
"""

from __future__ import annotations

from typing import Any

import attrs
from constantly import NamedConstant
from OpenSSL import SSL
from OpenSSL._util import lib as _openssl
from twisted.internet import ssl

__all__ = ["PROFILES", "ProfileOptions", "TLSProfile"]

# Mozilla "intermediate" (guidelines 6.0; a subset of 5.7, which sslyze checks against): only
# forward-secret AEAD suites. The DHE-RSA suites of 5.7 are left out, as 6.0 does: every
# client that has them also has ECDHE, and they would need DH parameters loaded.
_INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

# Mozilla "old" (guidelines 5.7, the last that has it) without DHE (as above) and without
# 3DES (Sweet32; current OpenSSL builds no longer offer it anyway). TLS 1.0 and 1.1 sign the
# handshake with MD5+SHA-1, which OpenSSL 3 refuses above security level 0.
_OLD_CIPHERS = (
    _INTERMEDIATE_CIPHERS + ":"
    "ECDHE-ECDSA-AES128-SHA256:ECDHE-RSA-AES128-SHA256:"
    "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:"
    "ECDHE-ECDSA-AES256-SHA384:ECDHE-RSA-AES256-SHA384:"
    "ECDHE-ECDSA-AES256-SHA:ECDHE-RSA-AES256-SHA:"
    "AES128-GCM-SHA256:AES256-GCM-SHA384:AES128-SHA256:AES256-SHA256:AES128-SHA:AES256-SHA:"
    "@SECLEVEL=0"
)

# The same three suites in every profile (OpenSSL's own default, named so that no system
# configuration can widen it).
_TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# Key-exchange groups, most preferred first. Guidelines 6.0 put the post-quantum hybrid
# X25519MLKEM768 first; OpenSSL before 3.5 does not know it and refuses the whole list, so
# the classic list (5.7's X25519, prime256v1, secp384r1) follows as the fallback.
_GROUPS = (b"X25519MLKEM768:X25519:P-256:P-384", b"X25519:P-256:P-384")


@attrs.frozen
class TLSProfile:
    name: str
    minimum: NamedConstant  # an ssl.TLSVersion
    ciphers: str  # OpenSSL cipher string for TLS 1.2 and older
    tls13_suites: bytes = _TLS13_SUITES
    groups: tuple[bytes, ...] = _GROUPS  # group lists; the first OpenSSL accepts is used

    def apply(self, context: SSL.Context) -> SSL.Context:
        context.set_cipher_list(self.ciphers.encode("ascii"))
        context.set_tls13_ciphersuites(self.tls13_suites)
        _set_groups(context, self.groups)
        return context


PROFILES = {
    profile.name: profile
    for profile in (
        TLSProfile("intermediate", ssl.TLSVersion.TLSv1_2, _INTERMEDIATE_CIPHERS),
        TLSProfile("old", ssl.TLSVersion.TLSv1_0, _OLD_CIPHERS),
    )
}


def _set_groups(context: SSL.Context, choices: tuple[bytes, ...]) -> None:
    # pyOpenSSL offers one curve at most (set_tmp_ecdh); the list goes to OpenSSL's
    # SSL_CTX_set1_groups_list (named set1_curves_list in the binding), the way Twisted
    # itself reaches SSL_CTX_set_ecdh_auto.
    for groups in choices:
        if _openssl.SSL_CTX_set1_curves_list(context._context, groups) == 1:
            return
        _openssl.ERR_clear_error()  # the refusal must not surface in a later, unrelated call
    raise ValueError(f"OpenSSL accepts none of the key-exchange group lists {choices}")


class ProfileOptions(ssl.CertificateOptions):
    """``CertificateOptions`` whose context follows ``profile``."""

    def __init__(self, profile: TLSProfile, **options: Any) -> None:
        # insecurelyLowerMinimumTo is how Twisted spells "the minimum is exactly this",
        # whether it is below its own default (TLS 1.2) or not.
        super().__init__(insecurelyLowerMinimumTo=profile.minimum, **options)
        self.profile = profile
        self._profiled: SSL.Context | None = None

    def getContext(self) -> SSL.Context:
        # Twisted builds the context once and hands out that one for every connection.
        if self._profiled is None:
            self._profiled = self.profile.apply(super().getContext())
        return self._profiled
