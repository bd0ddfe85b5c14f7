"""OAuth 2.0 bearer tokens end to end: ``twistd -n smarthost`` with the ``introspection``
plugin asking an RFC 7662 endpoint (HTTPS on 127.0.0.1, certificate from a test CA), and
smtplib logging in with XOAUTH2 and OAUTHBEARER through ``SMTP.auth`` and sending mail."""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from daemon import Daemon, client_tls
from smarthost.app import tlscert

SECRET = "introspection secret"
TOKENS = {
    "alice-token-1": {"active": True, "email": "alice@example.test"},
    "revoked-token": {"active": False},
}


class IntrospectionServer:
    """A minimal authorization server's introspection endpoint, in a thread (smtplib blocks
    the test's thread while the daemon asks it)."""

    def __init__(self, directory: Path) -> None:
        ca = tlscert.issue(("Smarthost E2E CA",), is_ca=True)
        pair = tlscert.issue(("localhost", "127.0.0.1"), ca=ca)
        tlscert.write_pair(pair, directory / "auth.pem", directory / "auth.key")
        self.ca_pem = ca.cert_pem
        expected = "Basic " + base64.b64encode(f"smarthost:{SECRET.replace(' ', '+')}".encode()
                                               ).decode()
        self.tokens_seen: list[str] = []
        seen = self.tokens_seen

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                if self.headers.get("authorization") != expected:
                    self.reply(401, {"error": "invalid_client"})
                    return
                token = form["token"][0]
                seen.append(token)
                if token == "server-trouble":
                    self.reply(503, {"error": "temporarily_unavailable"})
                    return
                self.reply(200, TOKENS.get(token, {"active": False}))

            def reply(self, code: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(directory / "auth.pem", directory / "auth.key")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


def config(port: int) -> str:
    return f"""
[auth]
mechanisms = ["XOAUTH2", "OAUTHBEARER", "PLAIN"]
[plugins]
enabled = ["introspection"]
[plugins.introspection]
url = "https://127.0.0.1:{port}/introspect"
client_id = "smarthost"
client_secret_file = "introspection.secret"
user_claim = "email"
ca = "auth-ca.pem"
timeout = 5
[relay]
local_domains = ["example.test"]
[delivery]
nameservers = ["127.0.0.1:9"]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IntrospectionServer]:
    s = IntrospectionServer(tmp_path_factory.mktemp("authserver"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, server: IntrospectionServer
           ) -> Iterator[Daemon]:
    directory = tmp_path_factory.mktemp("oauth")
    d = Daemon(directory, config(server.port))
    (directory / "introspection.secret").write_text(SECRET + "\n")
    (directory / "auth-ca.pem").write_bytes(server.ca_pem)
    d.start()
    yield d
    d.stop()


def xoauth2(user: str, token: str) -> Callable[..., str]:
    def authobject(challenge: bytes | None = None) -> str:
        if challenge is None:
            return f"user={user}\x01auth=Bearer {token}\x01\x01"
        return ""  # Google's clients answer the error challenge with an empty line

    return authobject


def oauthbearer(user: str, token: str) -> Callable[..., str]:
    def authobject(challenge: bytes | None = None) -> str:
        if challenge is None:
            return f"n,a={user},\x01host=127.0.0.1\x01auth=Bearer {token}\x01\x01"
        assert json.loads(challenge)["status"] == "invalid_token"
        return "\x01"  # RFC 7628 3.2.3

    return authobject


def login(d: Daemon, authobject: Callable[..., str], mechanism: str, source: str,
          send: bool = False) -> int:
    with smtplib.SMTP_SSL("127.0.0.1", d.ports["submissions"], timeout=30,
                          context=client_tls(), source_address=(source, 0)) as s:
        s.ehlo()
        try:
            code, _ = s.auth(mechanism, authobject)
        except smtplib.SMTPAuthenticationError as e:
            return e.smtp_code
        if send:
            refused = s.sendmail("alice@example.test", ["bob@elsewhere.test"],
                                 b"Subject: oauth e2e\r\n\r\nHello.\r\n")
            assert refused == {}
        return code


def test_ehlo_offers_the_token_mechanisms(daemon: Daemon) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", daemon.ports["submissions"], timeout=30,
                          context=client_tls()) as s:
        s.ehlo()
        assert s.esmtp_features["auth"].split() == ["XOAUTH2", "OAUTHBEARER", "PLAIN"]


@pytest.mark.parametrize(("mechanism", "make"), [("XOAUTH2", xoauth2),
                                                 ("OAUTHBEARER", oauthbearer)])
def test_login_and_relay(daemon: Daemon, mechanism: str, make: Callable[..., Callable[..., str]]
                         ) -> None:
    assert login(daemon, make("alice@example.test", "alice-token-1"), mechanism,
                 "127.0.0.1", send=True) == 235
    daemon.wait_for(f"AUTH ok from 127.0.0.1 user=alice@example.test mechanism={mechanism}")
    daemon.wait_for("as alice@example.test sender=<alice@example.test>")


def test_refusals_and_temporary_failures(daemon: Daemon, server: IntrospectionServer) -> None:
    # One client address each: every failure is counted by the per-address throttle.
    assert login(daemon, oauthbearer("alice@example.test", "revoked-token"), "OAUTHBEARER",
                 "127.0.2.1") == 535
    assert login(daemon, xoauth2("alice@example.test", "revoked-token"), "XOAUTH2",
                 "127.0.2.2") == 535
    # A valid token, but the client claims to be someone else.
    assert login(daemon, xoauth2("bob@example.test", "alice-token-1"), "XOAUTH2",
                 "127.0.2.3") == 535
    # The authorization server fails: try again later.
    assert login(daemon, xoauth2("alice@example.test", "server-trouble"), "XOAUTH2",
                 "127.0.2.4") == 454
    daemon.wait_for("AUTH failed from 127.0.2.1 user=alice@example.test mechanism=OAUTHBEARER")
    daemon.wait_for("AUTH failed from 127.0.2.3 user=bob@example.test mechanism=XOAUTH2")
    daemon.wait_for("HTTP 503")
    assert "server-trouble" in server.tokens_seen
    for token in ("alice-token-1", "revoked-token", "server-trouble", SECRET):
        assert token not in daemon.text()


def test_check_config(daemon: Daemon) -> None:
    result = daemon.admin("check-config", "--config", str(daemon.config_path))
    assert result.returncode == 0, result.stderr


def test_no_verifier_plugin_stops_the_start(tmp_path: Path) -> None:
    d = Daemon(tmp_path, '[auth]\nmechanisms = ["PLAIN", "XOAUTH2"]\n')
    result = d.admin("check-config", "--config", str(d.config_path))
    assert result.returncode == 2 and "auth.mechanisms[1]" in result.stderr
    with pytest.raises(RuntimeError) as e:
        d.start()
    assert "auth.mechanisms[1]" in str(e.value)
    d.stop()
