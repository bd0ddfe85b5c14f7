"""`smarthost check-config` checks what start-up checks (finding 8 of issue 11: it said OK to
bad listen strings, a missing certificate or key, a missing users or password file) and
warns about risky settings: the golden table tests/golden/config_warnings.txt, the errors'
cases at the end of tests/golden/config_errors.txt (run by test_golden.py), and the command's
output and exit status.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from smarthost.app import admin, checks, tlscert
from smarthost.app.config import ConfigError, parse_config
from smarthost.auth import sasl

GOLDEN = Path(__file__).parent.parent / "golden"
NOW = datetime.datetime.now(datetime.UTC)
ENVIRONMENT = checks.Environment(now=NOW, nofile_hard_limit=4096)
DAY = datetime.timedelta(days=1)


def checked_dir(directory: Path) -> Path:
    """Every file the golden cases name: a good certificate and key where the defaults look,
    an empty users file (mode 0600), and the odd ones the cases use."""
    certs = directory / "certs"
    certs.mkdir(parents=True, exist_ok=True)
    tlscert.write_pair(tlscert.issue(("mx.example.test",), now=NOW), certs / "smarthost.pem",
                       certs / "smarthost.key")
    other = tlscert.issue(("other.example.test",), now=NOW)
    (certs / "other.key").write_bytes(other.key_pem)
    (certs / "garbage.pem").write_text("not a certificate\n")
    tlscert.write_pair(tlscert.issue(("mx.example.test",), now=NOW - 20 * DAY, days=30),
                       certs / "expiring.pem", certs / "expiring.key")
    tlscert.write_pair(tlscert.issue(("mx.example.test",), now=NOW - 30 * DAY, days=10),
                       certs / "expired.pem", certs / "expired.key")
    (directory / "var").mkdir(exist_ok=True)
    for name, text, mode in (("var/users", "", 0o600), ("badusers", "nonsense\n", 0o600),
                             ("openusers", "", 0o644), ("recipients", "a@example.test\n", 0o644)):
        (directory / name).write_text(text)
        (directory / name).chmod(mode)
    (directory / "adir").mkdir(exist_ok=True)
    return directory


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checked_dir(tmp_path_factory.mktemp("checked"))


def validate(name: str) -> None:
    sasl.build_mechanisms([name])


def check(text: str, directory: Path) -> checks.Findings:
    """What check-config finds in ``text`` (a ConfigError when it does not load)."""
    return checks.check_config(parse_config(text, directory, validate_mechanism=validate),
                               ENVIRONMENT)


def first_error(text: str, directory: Path) -> tuple[str, str]:
    """The key and message of the first error check-config reports for ``text``."""
    try:
        findings = check(text, directory)
    except ConfigError as e:
        return e.key, str(e)
    assert findings.errors, f"no error for:\n{text}"
    return findings.errors[0].key, str(findings.errors[0])


def warning_cases() -> list[tuple[str, list[str]]]:
    cases = []
    for block in (GOLDEN / "config_warnings.txt").read_text().split("---\n"):
        lines = [line for line in block.splitlines() if not line.startswith("#")]
        keys = [line[3:] for line in lines if line.startswith("=> ")]
        text = "\n".join(line for line in lines if not line.startswith("=> "))
        if "hostname" not in text:
            text = 'hostname = "mx.example.test"\n' + text
        cases.append((text, [] if keys == ["none"] else keys))
    return cases


@pytest.mark.parametrize(("text", "keys"), warning_cases())
def test_warnings_name_the_key(text: str, keys: list[str], checked: Path) -> None:
    findings = check(text, checked)
    assert findings.errors == ()
    assert [w.key for w in findings.warnings] == keys, findings.warnings


def test_connections_fit_an_unlimited_descriptor_table(checked: Path) -> None:
    config = parse_config('hostname = "mx.example.test"\n[limits]\nconnections = 100000\n',
                          checked)
    unlimited = checks.Environment(now=NOW, nofile_hard_limit=None)
    assert checks.check_config(config, unlimited).warnings == ()


def test_endpoint_problem_never_binds() -> None:
    assert checks.endpoint_problem("tcp:25") is None  # port 25 needs root to bind, not to parse
    assert checks.endpoint_problem("haproxy:tcp:587:interface=127.0.0.1") is None
    assert checks.endpoint_problem("systemd:domain=INET:index=0") is None
    assert checks.endpoint_problem("systemd:domain=INET:name=smtp") is None
    assert "systemd" in (checks.endpoint_problem("systemd:domain=INET:index=x") or "")


# -- the command ---------------------------------------------------------------------------


def write(directory: Path, text: str) -> Path:
    path = directory / "smarthost.toml"
    path.write_text(text)
    return path


def test_ok_with_warnings_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(checked_dir(tmp_path),
                 'hostname = "localhost"\n[relay]\ntrusted_networks = ["0.0.0.0/0"]\n')
    assert admin.main(["check-config", "--config", str(path)]) == 0
    out = capsys.readouterr()
    assert out.err.splitlines() == [
        line for line in out.err.splitlines() if line.startswith("warning: ")
    ]
    assert "warning: hostname: " in out.err
    assert "warning: relay.trusted_networks[0]: 0.0.0.0/0 reaches beyond" in out.err
    assert "OK" in out.out


def test_every_error_is_named_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(checked_dir(tmp_path), 'hostname = "mx.example.test"\n'
                 '[listen]\nsmtp = ["tcp:notaport"]\n[tls]\nkey = "certs/other.key"\n')
    assert admin.main(["check-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "smarthost: configuration error: listen.smtp[0]: 'tcp:notaport'" in err
    assert "smarthost: configuration error: tls.key: " in err
    assert "Traceback" not in err


def test_a_missing_password_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It said OK, and then the daemon refused to start."""
    path = write(checked_dir(tmp_path), 'hostname = "mx.example.test"\n[delivery.upstream]\n'
                 'username = "office@example.test"\npassword_file = "var/upstream.secret"\n')
    assert admin.main(["check-config", "--config", str(path)]) == 2
    assert "delivery.upstream.password_file: cannot read" in capsys.readouterr().err
    (tmp_path / "var/upstream.secret").write_text("s3cret\n")
    assert admin.main(["check-config", "--config", str(path)]) == 0
    assert "s3cret" not in "".join(capsys.readouterr())


LDAP = """
[auth]
backends = ["users", "ldap"]
[auth.ldap]
url = "ldaps://dc1.example.test"
bind_dn = "cn=smarthost,dc=example,dc=test"
bind_password_file = "{secret}"
base = "dc=example,dc=test"
"""


def test_directory_password_file_must_be_readable(checked: Path) -> None:
    found = check(LDAP.format(secret="missing.secret"), checked)
    assert [p.key for p in found.errors] == ["auth.ldap.bind_password_file"]


def test_directory_password_file_readable_by_everyone_is_a_warning(
    checked: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "ldap.secret"
    secret.write_text("service password\n")
    secret.chmod(0o644)
    found = check(LDAP.format(secret=secret), checked)
    assert found.errors == ()
    assert "auth.ldap.bind_password_file" in [p.key for p in found.warnings]
    assert all("service password" not in str(p) for p in found.warnings)
    secret.chmod(0o600)
    assert "auth.ldap.bind_password_file" not in [p.key for p in check(
        LDAP.format(secret=secret), checked).warnings]


def test_http_listener_endpoints_are_checked(checked: Path) -> None:
    bad = check('[http]\nlisten = ["tcp:nope"]\n', checked)
    assert [p.key for p in bad.errors] == ["http.listen[0]"]
    public = check('[http]\nlisten = ["tcp:2580"]\n', checked)
    assert "http.listen[0]" in [p.key for p in public.warnings]
    loopback = check('[http]\nlisten = ["tcp:2580:interface=127.0.0.1"]\n', checked)
    assert "http.listen[0]" not in [p.key for p in loopback.warnings]


def test_workers_need_listeners_they_can_share(checked: Path) -> None:
    """An ``ssl:`` listener does its TLS in the endpoint, which a worker's adopted socket
    would not bring along: check-config says so before a start would."""
    key_file = checked / "certs" / "smarthost.key"
    text = (f'[listen]\nsubmissions = ["ssl:2465:privateKey={key_file}:'
            f'certKey={checked / "certs" / "smarthost.pem"}"]\n')
    assert not [p for p in check(text, checked).errors if p.key.startswith("listen.")]
    key, message = first_error('[server]\nworkers = 2\n' + text, checked)
    assert key == "listen.submissions[0]" and "workers share" in message
    assert not check('[server]\nworkers = 2\n', checked).errors  # the default listeners


def test_cpu_affinity_is_a_boolean(checked: Path) -> None:
    assert not check('[server]\nworkers = 2\ncpu_affinity = true\n', checked).errors
    key, message = first_error('[server]\ncpu_affinity = "yes"\n', checked)
    assert key == "server.cpu_affinity", message
