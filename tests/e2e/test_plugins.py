"""Plugin discovery and the documented API: the example in docs/plugins.md, run as written;
a separately installed plugin distribution driving a real daemon; check-config naming a
missing plugin; and the cred side (``--auth smarthost-users:PATH`` for other twistd servers,
``twistd smarthost --auth ...`` for us)."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys
import tempfile
import unittest
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.cred import strcred
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.plugin import pluginPackagePaths
from twisted.trial.unittest import TestCase

import smarthost.plugins
from daemon import SMARTHOST, TWISTD, Daemon
from fakes import HASH, PluginSession, codes, run_now
from smarthost.api import Context
from smarthost.app import credfactory
from smarthost.app.pluginload import available_plugins, build_plugins
from smarthost.auth import cred
from smarthost.auth.cred import BcryptChecker, build_portal
from smarthost.auth.users import UsersFile

# strcred's plugin scan imports Twisted's own unix checker, which imports the deprecated spwd.
pytestmark = pytest.mark.filterwarnings("ignore:'spwd' is deprecated:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "plugins.md"
EXAMPLE_DIST = Path(__file__).resolve().parents[1] / "plugin_example"


# -- the example in docs/plugins.md ------------------------------------------------------


def docs_example(marker: str = "example") -> str:
    """The Python block right after the ``<!-- MARKER: ... -->`` comment."""
    text = DOCS.read_text(encoding="utf-8")
    match = re.search(rf"<!-- {marker}:[^>]*-->\s*```python\n(.*?)\n```", text, re.DOTALL)
    assert match is not None, f"docs/plugins.md lost its tested {marker} block"
    return match.group(1) + "\n"


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Iterator[Path]:
    """A fresh ``smarthost/plugins/`` directory on sys.path, seen by the plugin namespace as
    if it had been there at start (the package computes its path once, when imported)."""
    root = tmp_path / "site"
    directory = root / "smarthost" / "plugins"
    directory.mkdir(parents=True)
    saved_path, saved_ns = list(sys.path), list(smarthost.plugins.__path__)
    saved_modules = set(sys.modules)
    sys.path.insert(0, str(root))
    # Exactly what smarthost/plugins/__init__.py does at import time.
    for found in pluginPackagePaths("smarthost.plugins"):
        if found not in smarthost.plugins.__path__:
            smarthost.plugins.__path__.append(found)
    try:
        yield directory
    finally:
        sys.path[:] = saved_path
        smarthost.plugins.__path__[:] = saved_ns
        for name in set(sys.modules) - saved_modules:
            if name.startswith("smarthost.plugins."):
                del sys.modules[name]


def test_docs_example_is_discovered_and_refuses_a_recipient(
    plugin_dir: Path, tmp_path: Path
) -> None:
    (plugin_dir / "rcpt_blocklist.py").write_text(docs_example(), encoding="utf-8")
    assert not (plugin_dir / "__init__.py").exists()
    found = available_plugins()
    assert "rcpt_blocklist" in found
    context = Context(Clock(), "mx.smarthost.test", object(), run_now)
    plugins = build_plugins(
        ["rcpt_blocklist"], {"rcpt_blocklist": {"domains": ["competitor.example"]}}, context
    )
    # A printer on a trusted network may relay, but not to a blocked domain.
    session = PluginSession(tmp_path, plugins, trusted=["192.0.2.0/24"])
    assert codes(session.send("EHLO printer.test")) == [220, 250]
    replies = session.message(
        "printer@example.test",
        ["bob@competitor.example", "bob@sales.competitor.example", "carol@partner.test"],
        "Subject: scan\n\nhello",
    )
    assert codes(replies) == [250, 550, 550, 250, 354, 250]
    assert len(session.committed()) == 1


def test_docs_example_validates_its_settings(plugin_dir: Path) -> None:
    (plugin_dir / "rcpt_blocklist.py").write_text(docs_example(), encoding="utf-8")
    context = Context(Clock(), "mx.smarthost.test", object(), run_now)
    for settings, key in (
        ({}, "domains"),
        ({"domains": ["ok.example", "not a domain"]}, "domains[1]"),
        ({"domains": ["ok.example"], "reply": "250 2.0.0"}, "reply"),
        ({"domains": ["ok.example"], "domain": []}, "domain"),
    ):
        with pytest.raises(ValueError, match=rf"^plugins\.rcpt_blocklist: {re.escape(key)}:"):
            build_plugins(["rcpt_blocklist"], {"rcpt_blocklist": settings}, context)


def test_docs_testing_example_passes() -> None:
    source = docs_example() + docs_example("example-test")
    namespace: dict[str, Any] = {"__name__": "docs_plugins_example"}
    exec(compile(source, str(DOCS), "exec"), namespace)
    result = unittest.TestResult()
    namespace["BlocklistTests"]("test_refuses_blocked_domain").run(result)
    assert result.wasSuccessful(), result.failures + result.errors
    assert result.testsRun == 1


def test_shipped_plugins_are_discovered() -> None:
    assert {"dnsbl", "dkim"} <= set(available_plugins())


# -- a separately installed plugin distribution, in a real daemon ----------------------


class EnvDaemon(Daemon):
    """A Daemon with extra environment variables and extra ``twistd smarthost`` options."""

    def __init__(
        self, directory: Path, config: str = "", env: dict[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> None:
        super().__init__(directory, config)
        self.env = dict(env or {})
        self.args = list(args)

    def start(self, timeout: float = 30.0) -> EnvDaemon:
        self.ports = {}
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "--logfile=-", "smarthost", "--config",
             str(self.config_path), *self.args],
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )
        self.wait_for("ready", timeout)
        return self


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/plugin_example installed with pip into a directory of its own (for
    PYTHONPATH), as an operator would install a plugin distribution."""
    target = tmp_path_factory.mktemp("site")
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources.
    source = tmp_path_factory.mktemp("src") / "plugin_example"
    shutil.copytree(EXAMPLE_DIST, source)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if result.returncode != 0:
        # pip builds in an isolated environment and needs setuptools from an index; offline,
        # the source tree has the same layout and still exercises discovery.
        warnings.warn(f"pip could not install tests/plugin_example; using the source tree:\n"
                      f"{result.stderr[-2000:]}", stacklevel=1)
        return EXAMPLE_DIST
    assert (target / "smarthost" / "plugins" / "example_plugin.py").is_file()
    assert not (target / "smarthost" / "__init__.py").exists()
    assert not (target / "smarthost" / "plugins" / "__init__.py").exists()
    return target


PLUGIN_CONFIG = """
[relay]
local_domains = ["example.test"]

[plugins]
enabled = ["example"]

[plugins.example]
refuse = ["blocked@example.test"]
"""


def test_installed_plugin_refuses_a_recipient_over_smtp(
    installed_example: Path, tmp_path: Path
) -> None:
    daemon = EnvDaemon(tmp_path, PLUGIN_CONFIG, env={"PYTHONPATH": str(installed_example)})
    try:
        daemon.start()
        daemon.wait_for("plugin example enabled")
        with smtplib.SMTP("127.0.0.1", daemon.ports["smtp"], timeout=30) as client:
            client.ehlo("client.test")
            assert client.mail("someone@remote.test")[0] == 250
            assert client.rcpt("blocked@example.test")[0] == 550
            assert client.rcpt("ok@example.test")[0] == 250
            code, _ = client.data(b"Subject: hi\r\n\r\nhello\r\n")
            assert code == 250
    finally:
        daemon.stop()
    check = daemon.admin("check-config", "--config", str(daemon.config_path))
    assert check.returncode == 2  # without PYTHONPATH the plugin is not installed
    assert "plugins.enabled[0]" in check.stderr + check.stdout


def test_check_config_names_a_missing_plugin(tmp_path: Path) -> None:
    config = tmp_path / "smarthost.toml"
    config.write_text('hostname = "mx.test"\n[plugins]\nenabled = ["no_such_plugin"]\n')
    result = subprocess.run(
        [SMARTHOST, "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    output = result.stderr + result.stdout
    assert "plugins.enabled[0]" in output
    assert "no_such_plugin" in output


def test_check_config_passes_settings_errors_on(tmp_path: Path) -> None:
    config = tmp_path / "smarthost.toml"
    config.write_text('hostname = "mx.test"\n[plugins]\nenabled = ["dnsbl"]\n'
                      '[plugins.dnsbl]\nzones = ["bad zone"]\n')
    result = subprocess.run(
        [SMARTHOST, "check-config", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "plugins.dnsbl: zones[0]" in result.stderr + result.stdout


# -- cred: our users file for other twistd servers, other checkers for us ---------------


class CheckerFactoryTests(TestCase):
    def setUp(self) -> None:
        # Not self.mktemp(): under pytest that writes into the working directory.
        directory = tempfile.mkdtemp(prefix="smarthost-cred-")
        self.addCleanup(shutil.rmtree, directory, ignore_errors=True)
        self.path = Path(directory) / "users"
        self.path.write_text(f"alice@example.test:{HASH}\n")

    async def test_make_checker_finds_smarthost_users(self) -> None:
        # The checker a `twistd web --auth smarthost-users:PATH` would get, bcrypt in a thread.
        checker = strcred.makeChecker(f"smarthost-users:{self.path}")
        self.assertIsInstance(checker, BcryptChecker)
        self.assertEqual(
            await checker.requestAvatarId(UsernamePassword(b"alice@example.test", b"secret")),
            b"alice@example.test",
        )
        for name, password in ((b"alice@example.test", b"wrong"), (b"mallory", b"secret")):
            with self.assertRaises(UnauthorizedLogin):
                await checker.requestAvatarId(UsernamePassword(name, password))

    def test_missing_or_empty_path_is_refused(self) -> None:
        with self.assertRaises(ValueError):
            strcred.makeChecker("smarthost-users:")
        with self.assertRaises(ValueError):
            strcred.makeChecker(f"smarthost-users:{self.path}.missing")

    def test_extra_checkers_come_after_the_users_file(self) -> None:
        portal = build_portal(UsersFile(self.path), run_now)
        extra = InMemoryUsernamePasswordDatabaseDontUse(bob=b"hunter2")
        other = InMemoryUsernamePasswordDatabaseDontUse(carol=b"pw")
        credfactory.with_checkers(portal, [extra, other])

        def login(name: str, password: str) -> Any:
            results: list[Any] = []
            cred.login(portal, UsernamePassword(name.encode(), password.encode())).addBoth(
                results.append)
            return results[0]

        self.assertEqual(login("alice@example.test", "secret").name, "alice@example.test")
        self.assertEqual(login("bob", "hunter2").name, "bob")
        self.assertEqual(login("carol", "pw").name, "carol")
        self.assertTrue(login("bob", "secret").check(UnauthorizedLogin))
        self.assertTrue(login("alice@example.test", "hunter2").check(UnauthorizedLogin))

    def test_a_broken_users_file_is_not_skipped(self) -> None:
        # A server-side error is not a refusal: the next checker must not be asked.
        class Broken:
            credentialInterfaces = BcryptChecker.credentialInterfaces

            def requestAvatarId(self, credentials: Any) -> Deferred[bytes]:
                return fail(OSError("the users file cannot be read"))

        chain = credfactory.FirstOf(
            [Broken(), InMemoryUsernamePasswordDatabaseDontUse(bob=b"pw")])  # type: ignore[list-item]
        results: list[Any] = []
        chain.requestAvatarId(UsernamePassword(b"bob", b"pw")).addBoth(results.append)
        self.assertTrue(results[0].check(OSError))


def test_twistd_lists_the_checker_factory() -> None:
    result = subprocess.run([TWISTD, "smarthost", "--help-auth"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()[4:] if line.strip()]
    assert listed.count("smarthost-users") == 1
    assert "file" in listed


AUTH_CONFIG = """
[auth]
allow_plaintext = true

[relay]
local_domains = ["example.test"]
trusted_networks = []
"""


def test_daemon_takes_auth_checkers_beside_the_users_file(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("carol@example.test:filepass\n")
    daemon = EnvDaemon(tmp_path, AUTH_CONFIG, args=["--auth", f"file:{tmp_path / 'passwd'}"])
    daemon.add_user("alice@example.test", "secret")
    try:
        daemon.start()
        port = daemon.ports["submission"]
        for user, password in (("alice@example.test", "secret"),
                               ("carol@example.test", "filepass")):
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("client.test")
                assert client.login(user, password)[0] == 235
                # The avatar is a real user: the core lets it send as itself.
                client.sendmail(user, ["someone@example.test"], b"Subject: hi\r\n\r\nhi\r\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("client.test")
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                client.login("carol@example.test", "secret")
            assert failed.value.smtp_code == 535
    finally:
        daemon.stop()
