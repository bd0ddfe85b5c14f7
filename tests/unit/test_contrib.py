"""The systemd units in contrib/systemd/ and the config that goes with them: systemd's own
verifier when it is installed, the settings the deployment guide relies on, and the config
snippets (the socket unit's [listen] table, the guide's example) through our config loader.
tests/e2e/test_systemd_socket_e2e.py runs the daemon on sockets passed as systemd passes them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from smarthost.app.config import load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "contrib" / "systemd"
DEPLOY = ROOT / "docs" / "deploy.md"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

Unit = dict[str, list[tuple[str, str]]]


def read_unit(path: Path) -> Unit:
    """Sections of a unit file, each the (key, value) lines in order (a key may repeat)."""
    sections: Unit = {}
    current: list[tuple[str, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
        else:
            key, _, value = line.partition("=")
            current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [value for k, value in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    [value] = values(unit, section, key)
    return value


@pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt install systemd)"
)
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    # A copy whose ExecStart names this checkout's twistd: verify insists the program exists.
    # The drop-in is read from the smarthost.service.d/ beside the unit.
    shutil.copytree(SYSTEMD, tmp_path / "systemd")
    service = tmp_path / "systemd" / "smarthost.service"
    twistd = Path(sys.executable).with_name("twistd")
    service.write_text(service.read_text().replace("/opt/smarthost/bin/twistd", str(twistd)))
    result = subprocess.run(
        [SYSTEMD_ANALYZE or "systemd-analyze", "verify", "--man=no",
         str(service), str(tmp_path / "systemd" / "smarthost.socket")],
        capture_output=True, text=True, timeout=60,
    )
    # verify only warns (exit 0) about an unknown key or a value it ignores: any output is a
    # finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_service_unit_says_what_the_guide_relies_on() -> None:
    unit = read_unit(SYSTEMD / "smarthost.service")
    service = dict(unit["Service"])
    assert service["Type"] == "notify"
    start = one(unit, "Service", "ExecStart").split()
    assert start[0].endswith("/twistd")
    assert start[1:4] == ["--nodaemon", "--pidfile=", "--logfile=/var/log/smarthost/smarthost.log"]
    assert start[4:] == ["smarthost", "--config", "/etc/smarthost/smarthost.toml"]
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert (service["User"], service["Group"]) == ("smarthost", "smarthost")
    assert service["AmbientCapabilities"] == service["CapabilityBoundingSet"]
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    for key, value in [
        ("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"),
        ("ProtectHome", "yes"), ("Restart", "on-failure"),
    ]:
        assert service[key] == value, key
    assert service["ReadWritePaths"].split() == ["/var/lib/smarthost", "/var/log/smarthost"]
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_socket_unit_and_its_drop_in() -> None:
    socket = read_unit(SYSTEMD / "smarthost.socket")
    assert values(socket, "Socket", "ListenStream") == [
        "0.0.0.0:587", "0.0.0.0:465", "0.0.0.0:25"
    ]
    assert one(socket, "Socket", "Service") == "smarthost.service"
    drop_in = read_unit(SYSTEMD / "smarthost.service.d" / "socket-activation.conf")
    assert one(drop_in, "Unit", "Requires") == "smarthost.socket"
    assert one(drop_in, "Service", "AmbientCapabilities") == ""
    assert one(drop_in, "Service", "CapabilityBoundingSet") == ""


def test_socket_config_takes_each_socket_for_its_role() -> None:
    config = load_config(SYSTEMD / "listen-socket-activation.toml")
    ports = [s.rpartition(":")[2] for s in values(
        read_unit(SYSTEMD / "smarthost.socket"), "Socket", "ListenStream")]
    listen = {"submission": "587", "submissions": "465", "smtp": "25"}
    for role, port in listen.items():
        [description] = getattr(config.listen, role)
        fields = dict(part.split("=") for part in description.split(":")[1:])
        assert description.startswith("systemd:") and fields["domain"] == "INET", description
        assert ports[int(fields["index"])] == port, role


def guide_config() -> str:
    """The /etc/smarthost/smarthost.toml of docs/deploy.md (its first ```toml block)."""
    match = re.search(r"```toml\n(.*?)```", DEPLOY.read_text(), re.S)
    assert match is not None
    return match.group(1)


def test_the_guides_config_loads_and_writes_only_where_the_unit_allows(tmp_path: Path) -> None:
    config = parse_config(guide_config(), Path("/etc/smarthost"))
    writable = read_unit(SYSTEMD / "smarthost.service")
    allowed = [Path(p) for p in one(writable, "Service", "ReadWritePaths").split()]
    written = [config.queue.directory, Path(config.delivery.local.removeprefix("maildir:"))]
    if config.log.events is not None:
        written.append(config.log.events)
    for path in written:
        assert any(path.is_relative_to(a) for a in allowed), path
    assert config.tls.certificate.is_relative_to("/etc/smarthost")
    assert config.tls.profile == "intermediate"
