"""MAIL and RCPT parameters: RFC 5321 4.1.2 paths, SIZE (RFC 1870), BODY (RFC 6152),
SMTPUTF8 (RFC 6531), RET/ENVID/NOTIFY/ORCPT (RFC 3461), AUTH (RFC 4954), REQUIRETLS (RFC 8689).

Pure functions from the command's text to values or a Reply, so they can be fuzzed alone.
"""

from __future__ import annotations

import attrs

from smarthost.core import replies as reply
from smarthost.core.envelope import NOTIFY_KEYWORDS
from smarthost.core.replies import Reply

MAX_ENVID = 100  # RFC 3461 4.4
MAX_ORCPT = 500  # RFC 3461 4.2: octets of the whole parameter value
# RFC 5321 4.1.2 Atom: the characters of RFC 5322 atext.
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                   "!#$%&'*+-/=?^_`{|}~")


@attrs.frozen
class MailParams:
    smtputf8: bool = False
    body: str | None = None
    ret: str | None = None
    envid: str | None = None
    requiretls: bool = False


def mail_params(text: str, max_size: int, *, tls: bool = False) -> MailParams | Reply:
    """``tls``: the session is encrypted (STARTTLS done, or implicit TLS)."""
    try:
        options = parse_params(text)
    except ValueError:
        return reply.PARAM_SYNTAX
    params = MailParams()
    for key, value in options.items():
        if key == "SIZE":
            if value is None or not value.isdigit():
                return reply.PARAM_SYNTAX
            if int(value) > max_size:
                return reply.TOO_BIG
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                return reply.PARAM_SYNTAX
            params = attrs.evolve(params, body=value.upper())
        elif key == "SMTPUTF8" and value is None:
            params = attrs.evolve(params, smtputf8=True)
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                return reply.PARAM_SYNTAX
            params = attrs.evolve(params, ret=value.upper())
        elif key == "ENVID":
            decoded = xtext_decode(value)
            if decoded is None or len(decoded) > MAX_ENVID or not _printable(decoded):
                return reply.PARAM_SYNTAX
            params = attrs.evolve(params, envid=decoded)
        elif key == "REQUIRETLS":
            # RFC 8689 2: a keyword without a value, offered (and meaningful) only on a TLS
            # session; before STARTTLS the client is told what would make it acceptable.
            if value is not None:
                return reply.PARAM_SYNTAX
            if not tls:
                return reply.REQUIRETLS_NEEDS_TLS
            params = attrs.evolve(params, requiretls=True)
        elif key == "AUTH":
            pass  # RFC 4954 5: accepted and not trusted; Postfix relays send AUTH=<>
        else:
            return reply.PARAM_UNKNOWN
    return params


def split_path(text: str) -> tuple[str, str]:
    """``<path> PARAMS`` after the colon; tolerates the common space after ``FROM:``."""
    text = text.lstrip(" ")
    if text.startswith("<"):
        end = text.find(">")
        if end < 0:
            return text, ""
        return text[: end + 1], text[end + 1 :].strip()
    path, _, params = text.partition(" ")
    return path, params.strip()


def parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not key or not key.replace("-", "").isalnum() or key.upper() in params:
            raise ValueError(item)
        params[key.upper()] = value if eq else None
    return params


def rcpt_params(text: str) -> tuple[tuple[str, ...], str | None]:
    """RFC 3461 NOTIFY and ORCPT; anything else is unknown (ValueError)."""
    options = parse_params(text)
    notify: tuple[str, ...] = ()
    orcpt = None
    for key, value in options.items():
        if key == "NOTIFY" and value:
            words = tuple(w.upper() for w in value.split(","))
            if words != ("NEVER",) and not set(words) <= NOTIFY_KEYWORDS:
                raise ValueError(value)
            notify = words
        elif key == "ORCPT" and value:
            orcpt = parse_orcpt(value)
        else:
            raise ValueError(key)
    return notify, orcpt


def parse_orcpt(value: str) -> str:
    """RFC 3461 4.2: ``addr-type ";" xtext``, at most 500 octets, the address type an atom
    and the decoded address printable US-ASCII; it comes back with the address decoded.
    Anything else is a ValueError (``501 5.5.4``): it would reach the next hop and our own
    reports (RFC 3464 Original-Recipient) as it was sent."""
    if len(value.encode("utf-8")) > MAX_ORCPT:
        raise ValueError("ORCPT too long")
    addr_type, semi, xtext = value.partition(";")
    if not semi or not addr_type or not _ATEXT.issuperset(addr_type):
        raise ValueError("ORCPT address type")
    decoded = xtext_decode(xtext)
    if decoded is None or not _printable(decoded):
        raise ValueError("ORCPT address")
    return f"{addr_type};{decoded}"


def _printable(text: str) -> bool:
    """RFC 3461 4.2 and 4.4: graphic and space characters of US-ASCII only."""
    return all(" " <= c <= "~" for c in text)


def xtext_decode(text: str | None) -> str | None:
    """RFC 3461 4: xtext, "+" followed by two upper-case hex digits."""
    if text is None:
        return None
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "+":
            hexpair = text[i + 1 : i + 3]
            if len(hexpair) != 2 or not all(h in "0123456789ABCDEF" for h in hexpair):
                return None
            out.append(chr(int(hexpair, 16)))
            i += 3
            continue
        if not ("!" <= c <= "~") or c == "=":
            return None
        out.append(c)
        i += 1
    return "".join(out)
