"""Fuzzing the parsers of untrusted input: the address parser and the config loader.

The address parser decides what the relay rule sees, so its properties are the relay's
foundation: whatever it accepts round-trips, its domain is a plain domain or address literal
(never a ``%``/``!`` route), and the domain the policy compares is the one delivery routes on.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smarthost.app.config import ConfigError, parse_config
from smarthost.auth import sasl
from smarthost.core.enums import Role
from smarthost.core.envelope import (
    Address,
    AddressError,
    Client,
    Recipient,
    parse_mailbox,
    parse_path,
)
from smarthost.delivery.dns import domain_key
from smarthost.delivery.maildir import mailbox_path
from smarthost.smtpd.policy import RelayPolicy

LOCAL = frozenset({"example.test", "kk.test"})
POLICY = RelayPolicy(LOCAL, (), {})
ANONYMOUS = [Client(address="192.0.2.7", role=role) for role in (Role.SUBMISSION, Role.SMTP)]

# SMARTHOST_FUZZ_EXAMPLES=N runs a long fuzz (scripts, nightly); CI keeps the default.
EXAMPLES = int(os.environ.get("SMARTHOST_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 1000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

# Pieces that relay tricks are made of, so random text often comes close to an address.
_ATOMS = st.sampled_from([
    "victim", "a", "Z9", "example", "test", "remote", "example.test", "remote.test", "kk",
    "\u212ak", "EXAMPLE", "xn--rmote-bva", "r\u00e9mote", "\u00e9", "\u3002", "\uff0e",
    "\uff61", "127.0.0.2", "IPv6:", "::1", "fe80::1", "localhost", "x" * 64, "y" * 70,
    "@", "@", "@", "%", "!", ".", ".", ":", ",", "\"", "\\", "<", ">", "[", "]", " ", "\t",
    "\x00", "\r", "\n", "\x7f", "\u202e", "-", "+", "=", "/", "..", "'",
])
ADDRESSY = st.lists(_ATOMS, max_size=12).map("".join)
TEXT = st.one_of(ADDRESSY, st.text(max_size=80), st.text(alphabet="a@.%!\"\\:[]<>,", max_size=30))


def _check_accepted(text: str, addr: Address, utf8: bool) -> None:
    # Round trip: the canonical text parses back to the same value, as a mailbox and a path.
    assert parse_mailbox(str(addr), utf8=utf8) == addr
    assert parse_path(f"<{addr}>", utf8=utf8) == addr
    # The domain is what followed the last "@" as written: "%" and "!" in the local part are
    # never interpreted as routes, and the domain itself holds no route characters.
    assert text.endswith("@" + addr.domain)
    for forbidden in "@!%\"\\ <>,:;()" + "".join(map(chr, range(32))) + "\x7f":
        if addr.is_literal and forbidden == ":":
            continue  # "[IPv6:...]" is the only place a colon may appear
        assert forbidden not in addr.domain, (forbidden, addr)
    # No IDNA full-stop look-alikes: the name DNS would see has the dots the policy sees.
    assert not any(c in addr.domain for c in "\u3002\uff0e\uff61")
    if addr.is_literal:
        inner = addr.domain[1:-1]
        inner = inner[5:] if inner.lower().startswith("ipv6:") else inner
        ipaddress.ip_address(inner)
    # The policy compares domain_key; delivery (Recipient.domain, the next-hop resolver, the
    # maildir) must route on the very same key, or "local" could be delivered elsewhere.
    key = addr.domain_key
    assert key == addr.domain.lower().rstrip(".")
    recipient = Recipient(str(addr))
    assert recipient.domain == key
    assert domain_key(recipient.domain) == key
    local = POLICY.is_local(addr)
    assert local == (not addr.is_literal and key in LOCAL)
    for client in ANONYMOUS:
        # For anyone unauthenticated and untrusted, accepted means local: never relayed.
        accepted = POLICY.check_recipient(client, addr) is None
        assert accepted == local
    if local:
        path = mailbox_path(Path("/root-dir"), str(addr))
        assert path.parent == Path("/root-dir") / key


@FUZZ
@given(text=TEXT, utf8=st.booleans())
def test_parse_mailbox_only_raises_address_error(text: str, utf8: bool) -> None:
    try:
        addr = parse_mailbox(text, utf8=utf8)
    except AddressError:
        return
    _check_accepted(text, addr, utf8)


@FUZZ
@given(route=st.sampled_from(["", "@example.test:", "@a.test,@b.test:", "@x:", "@@:", "@:"]),
       text=TEXT, utf8=st.booleans(), null=st.booleans(),
       wrap=st.sampled_from(["<{}>", "{}", "<{}", "<<{}>>", " <{}>", "<{}> "]))
def test_parse_path_only_raises_address_error(
    route: str, text: str, utf8: bool, null: bool, wrap: str
) -> None:
    path = wrap.format(route + text)
    try:
        addr = parse_path(path, utf8=utf8, allow_null=null)
    except AddressError:
        return
    if addr is None:
        assert null and path == "<>"
        return
    assert path.startswith("<") and path.endswith(">")
    _check_accepted(path[1:-1], addr, utf8)


@pytest.mark.parametrize("text", [
    "victim@[IPv6:fe80::1%remote.test]",  # an IPv6 zone id is no part of RFC 5321's literal
    "victim@[IPv6:fe80::1%25eth0]",
    "victim@a\u3002b.test",  # IDNA maps these to "." in DNS: "a.b.test"
    "victim@example\uff0etest.x",
    "victim@example.test\uff61",
])
def test_refused_tricks(text: str) -> None:
    with pytest.raises(AddressError):
        parse_mailbox(text, utf8=True)


def test_percent_and_quoted_at_stay_in_the_local_part() -> None:
    addr = parse_path("<victim%remote.test@example.test>")
    assert addr == Address("victim%remote.test", "example.test")
    addr = parse_path('<"victim@remote.test"@example.test>')
    assert addr == Address('"victim@remote.test"', "example.test")
    addr = parse_path("<@example.test,@x.test:victim@remote.test>")
    assert addr == Address("victim", "remote.test")


# -- the config loader --------------------------------------------------------------------

SCHEMA: dict[str, list[str]] = {
    "": ["hostname"],
    "listen": ["submission", "submissions", "smtp"],
    "tls": ["certificate", "key"],
    "auth": ["users", "mechanisms", "allow_plaintext"],
    "relay": ["local_domains", "trusted_networks", "local_recipients", "senders"],
    "relay.senders": ["alice", "bob@example.test"],
    "queue": ["directory", "max_size", "retry", "lifetime", "delay_warning"],
    "delivery": ["port", "nameservers", "tls", "local", "routes", "upstream"],
    "delivery.routes": ["*", "partner.test", "bad domain", "[10.0.0.1]"],
    "delivery.upstream": ["username", "password_file"],
    "log": ["events"],
    "limits": ["connections", "connections_per_ip", "auth_failures_per_ip",
               "recipients_per_message", "messages_per_user_per_hour",
               "hold_user_after_per_hour", "command_timeout"],
    "plugins": ["enabled", "example"],
}
PLAUSIBLE = st.sampled_from([
    "example.test", "mx.example.test", "tcp:2525", "tcp:0:interface=127.0.0.1",
    "127.0.0.1/32", "::1/128", "10.0.0.300/8", "PLAIN", "LOGIN", "CRAM-MD5", "SCRAM-SHA-256",
    "GSSAPI", "plain", "opportunistic", "required", "verify", "maildir:var/maildir",
    "maildir:", "smtp:10.1.2.3:25", "smtp:[::1]:587", "smtp:host:99999", "smtp:[::1",
    "smtp:h:-1", "smtp:", "127.0.0.1:5353", "[::1]:53", "var/spool", "", "*", "a@b",
    "[127.0.0.1]", "localhost", "x" * 300, "\u00e9.test", "smtp:h:1e3",
])
SCALAR = st.one_of(
    PLAUSIBLE, st.text(max_size=20), st.integers(), st.integers(-5, 70000), st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
)
VALUE = st.one_of(SCALAR, st.lists(SCALAR, max_size=4), st.lists(PLAUSIBLE, max_size=4),
                  st.lists(st.integers(-2, 5000), max_size=4))


def _toml_string(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04X}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    assert isinstance(value, list)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    lines: list[str] = []
    tables = draw(st.lists(st.sampled_from(sorted(SCHEMA)), unique=True, max_size=6))
    if "" in tables:  # top-level keys must come before any [table]
        tables.remove("")
        tables.insert(0, "")
    for table in tables:
        if table:
            header = ".".join(_toml_string(p) if not p.isidentifier() else p
                              for p in table.split("."))
            lines.append(f"[{header}]")
        keys = draw(st.lists(st.sampled_from(SCHEMA[table]), unique=True, max_size=5))
        if draw(st.booleans()):
            keys.append(draw(st.sampled_from(["trusted_network", "unknown", "Port", "x y"])))
        for key in keys:
            if f"{table}.{key}".lstrip(".") in SCHEMA:
                continue  # a sub-table: it has its own header (or is left out)
            name = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)
            lines.append(f"{name} = {_toml_value(draw(VALUE))}")
    return "\n".join(lines) + "\n"


@settings(max_examples=EXAMPLES or 400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=st.one_of(toml_documents(), toml_documents(), st.text(max_size=200)))
def test_config_loader_only_raises_config_error_naming_a_key(doc: str) -> None:
    with mock.patch("smarthost.app.config.socket.getfqdn", return_value="fuzz.example.test"):
        try:
            parse_config(doc, Path("/fuzz"), validate_mechanism=_mechanism)
        except ConfigError as e:
            message = str(e)
            if message.startswith("not valid TOML"):
                return
            assert e.key, message
            assert message.startswith(f"{e.key}: "), message
            # A dotted key name whose first part is a key or table of the document.
            first = e.key.split(".")[0].split("[")[0]
            assert first in tomllib.loads(doc), message


def _mechanism(name: str) -> None:
    sasl.build_mechanisms([name])


@pytest.mark.parametrize(("doc", "key"), [
    ('[relay]\nlocal_domains = ["[127.0.0.1]"]\n', "relay.local_domains[0]"),
    ('[relay]\nlocal_domains = ["[IPv6:::1]"]\n', "relay.local_domains[0]"),
    ('[queue]\nretry = [60, 1.5]\n', "queue.retry[1]"),
    ('[delivery]\nport = true\n', "delivery.port"),
    ('[limits]\nconnections = 0\n', "limits.connections"),
    ('[relay]\ntrusted_network = []\n', "relay.trusted_network"),
    ('hostname = "mx.ex\u00e4mple.test"\n', "hostname"),
])
def test_config_errors_name_the_key(doc: str, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc if doc.startswith("hostname") else 'hostname = "h.test"\n' + doc,
                     Path("/fuzz"))
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
