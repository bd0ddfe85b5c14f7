"""Golden tables: config errors name the right key; relay decisions per role/client/user."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_check_config import checked_dir, first_error

from smarthost.app.config import load_config, parse_config
from smarthost.core.enums import Role
from smarthost.core.envelope import Client, parse_mailbox
from smarthost.smtpd.policy import RelayPolicy

GOLDEN = Path(__file__).parent.parent / "golden"


def config_cases() -> list[tuple[str, str]]:
    cases = []
    for block in (GOLDEN / "config_errors.txt").read_text().split("---\n"):
        lines = [line for line in block.splitlines() if not line.startswith("#")]
        key = next(line[3:] for line in lines if line.startswith("=> "))
        text = "\n".join(line for line in lines if not line.startswith("=> "))
        cases.append((text, key))
    return cases


@pytest.mark.parametrize(("text", "key"), config_cases())
def test_config_error_names_the_key(text: str, key: str, tmp_path: Path) -> None:
    """Through everything check-config checks: loading, then the files and strings."""
    found, message = first_error(text, checked_dir(tmp_path))
    assert found == key, message
    assert message.startswith(key)


def test_the_example_file_is_the_embedded_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every key has a default and the shipped example states exactly those defaults."""
    monkeypatch.chdir(tmp_path)
    example = Path(__file__).parent.parent.parent / "smarthost.example.toml"
    assert parse_config(example.read_text(), tmp_path) == parse_config("", tmp_path)
    assert load_config(None) == parse_config("", tmp_path)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "smarthost.toml"
    path.write_text('[queue]\ndirectory = "spool"\n[auth]\nusers = "/abs/users"\n')
    config = load_config(path)
    assert config.queue.directory == tmp_path / "etc" / "spool"
    assert str(config.auth.users) == "/abs/users"


def relay_cases() -> list[list[str]]:
    lines = (GOLDEN / "relay_decisions.txt").read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("case", relay_cases(), ids=lambda c: "-".join(c[:4]))
def test_relay_decision(case: list[str], tmp_path: Path) -> None:
    role, address, user, recipient, expected = case
    config = parse_config(
        '[relay]\nlocal_domains = ["example.test"]\n'
        'trusted_networks = ["192.0.2.0/24", "2001:db8::/32"]\n',
        tmp_path,
    )
    policy = RelayPolicy(
        config.relay.local_domains, config.relay.trusted_networks, config.relay.senders
    )
    client = Client(address=address, role=Role(role), user=None if user == "-" else user)
    refusal = policy.check_recipient(client, parse_mailbox(recipient))
    assert (str(refusal.code) if refusal else "ok") == expected
