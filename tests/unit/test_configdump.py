"""`smarthost config [--changed]`: the configuration in effect as TOML that loads back to the
same Config, with secrets left out."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from smarthost.app import admin
from smarthost.app.config import Config, load_config, parse_config
from smarthost.app.configdump import dump

# Every key set to something other than its default (and a few awkward strings).
EVERYTHING = r'''
hostname = "mail.example.org"
[listen]
submission = ["tcp6:2587:interface=\\:\\:1", "haproxy:tcp:2588"]
submissions = []
smtp = ["unix:/run/smarthost/smtp.sock"]
[tls]
certificate = "/etc/ssl/mail.pem"
key = "keys/mail.key"
[auth]
users = "etc/users"
mechanisms = ["PLAIN", "SCRAM-SHA-256"]
allow_plaintext = true
[relay]
local_domains = ["example.org", "b.example.org"]
trusted_networks = ["192.168.0.0/16", "2001:db8::/32"]
local_recipients = "etc/recipients"
[relay.senders]
"alice" = ["alice@example.org", "sales@example.org"]
"we\"ird\\name" = ["x@example.org"]
[queue]
directory = "/var/spool/smarthost"
max_size = 10485760
retry = [30, 60]
lifetime = 86400
delay_warning = 0
[delivery]
port = 2525
nameservers = ["127.0.0.1:5353"]
tls = "verify"
local = "smtp:127.0.0.1:2526"
[delivery.routes]
"partner.test" = "smtp:10.1.2.3:25"
"*" = "smtp:smtp.upstream.test:587"
[delivery.upstream]
username = "office@example.org"
password_file = "etc/upstream.secret"
[log]
events = "log/events.jsonl"
[limits]
connections = 10
connections_per_ip = 2
auth_failures_per_ip = 3
recipients_per_message = 4
messages_per_user_per_hour = 5
hold_user_after_per_hour = 6
command_timeout = 7
tls_handshake_timeout = 8
min_data_rate = 9
messages_per_ip_per_hour = 11
ipv6_prefix = 48
[server]
workers = 3
drain = 5
[fleet]
redis = "redis://127.0.0.1:6390/2"
[plugins]
enabled = ["dnsbl", "introspection"]
[plugins.dnsbl]
zones = ["zen.example.test"]
timeout = 2.5
reply = "550 5.7.1 listed\ttab \u0001"
[plugins.introspection]
url = "https://auth.example.org/introspect"
client_id = "smarthost"
client_secret_file = "etc/secret"
nested = { a = [1, 2], when = 1979-05-27T07:32:00Z }
'''


def reload(text: str, base: Path) -> Config:
    return parse_config(text, base)


def test_everything_loads_back_the_same(tmp_path: Path) -> None:
    config = parse_config(EVERYTHING, tmp_path)
    assert reload(dump(config), tmp_path) == config
    assert reload(dump(config, changed_only=True), tmp_path) == config


def test_the_default_loads_back_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(None)
    text = dump(config)
    assert reload(text, tmp_path) == config
    data = tomllib.loads(text)
    assert data["queue"]["directory"] == str(tmp_path / "var/spool")  # absolute, as in use
    assert data["limits"]["connections"] == 1000  # defaults filled in
    assert dump(config, changed_only=True).splitlines()[1:] == []


def test_changed_is_only_what_differs(tmp_path: Path) -> None:
    config = parse_config('[queue]\nretry = [30]\n[limits]\nconnections = 10\n', tmp_path)
    data = tomllib.loads(dump(config, changed_only=True))
    assert data == {"queue": {"retry": [30]}, "limits": {"connections": 10}}


def test_secrets_are_never_printed(tmp_path: Path) -> None:
    (tmp_path / "upstream.secret").write_text("hunter2\n")
    config = parse_config(
        '[delivery.upstream]\nusername = "office@example.org"\n'
        'password_file = "upstream.secret"\n'
        '[plugins.custom]\nclient_secret = "hunter3"\napi_token = "hunter4"\n'
        'password = "hunter5"\nsecret_file = "s.txt"\n'
        '[fleet]\nredis = "redis://smarthost:hunter6@127.0.0.1:6379/0"\n', tmp_path)
    text = dump(config)
    for secret in ("hunter2", "hunter3", "hunter4", "hunter5", "hunter6"):
        assert secret not in text
    assert str(tmp_path / "upstream.secret") in text and 's.txt' in text
    assert "# client_secret = (a secret: not shown)" in text
    assert "# redis = (the URL holds a password: not shown)" in text


def test_the_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "smarthost.toml"
    path.write_text('hostname = "mail.example.org"\n[limits]\nconnections = 10\n')
    assert admin.main(["config", "--config", str(path), "--changed"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out) == {"hostname": "mail.example.org", "limits": {"connections": 10}}
    assert admin.main(["config", "--config", str(path)]) == 0
    assert load_config(path) == reload(capsys.readouterr().out, tmp_path)
