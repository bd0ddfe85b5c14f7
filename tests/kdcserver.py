"""A private MIT Kerberos KDC on loopback for the GSSAPI tests.

Everything lives in a temporary directory: ``krb5.conf`` (``KRB5_CONFIG``), ``kdc.conf``
(``KRB5_KDC_PROFILE``), the database made with ``kdb5_util create -s``, principals made with
``kadmin.local``, keytabs written with ``ktadd`` and the KDC's log. ``krb5kdc -n`` stays in
the foreground on one loopback port (UDP and TCP). Never the system's KDC or krb5.conf.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
from pathlib import Path

from serverproc import stop_process, wait_listening

KRB5KDC = shutil.which("krb5kdc") or "/usr/sbin/krb5kdc"
KDB5_UTIL = shutil.which("kdb5_util") or "/usr/sbin/kdb5_util"
KADMIN_LOCAL = shutil.which("kadmin.local") or "/usr/sbin/kadmin.local"
KINIT = shutil.which("kinit") or "/usr/bin/kinit"
REALM = "EXAMPLE.TEST"

KRB5_CONF = """\
[libdefaults]
    default_realm = {realm}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
    default_ccache_name = FILE:{dir}/ccache-default
[realms]
    {realm} = {{
        kdc = 127.0.0.1:{port}
    }}
[domain_realm]
    .smarthost.test = {realm}
    smarthost.test = {realm}
"""

KDC_CONF = """\
[kdcdefaults]
    kdc_listen = 127.0.0.1:{port}
    kdc_tcp_listen = 127.0.0.1:{port}
[realms]
    {realm} = {{
        database_name = {dir}/principal
        key_stash_file = {dir}/stash
        acl_file = {dir}/kadm5.acl
        kdc_listen = 127.0.0.1:{port}
        kdc_tcp_listen = 127.0.0.1:{port}
        supported_enctypes = aes256-cts-hmac-sha1-96:normal aes128-cts-hmac-sha1-96:normal
        max_life = 1h
    }}
[logging]
    kdc = FILE:{dir}/kdc.log
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class KDC:
    """One realm's KDC in ``directory``; :attr:`env` is what a process needs to use it."""

    def __init__(self, directory: Path, realm: str = REALM) -> None:
        self.directory, self.realm = directory, realm
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "kdc.log"
        fields = {"dir": directory, "realm": realm, "port": self.port}
        (directory / "krb5.conf").write_text(KRB5_CONF.format(**fields))
        (directory / "kdc.conf").write_text(KDC_CONF.format(**fields))
        (directory / "kadm5.acl").write_text("")
        self.env = {
            "KRB5_CONFIG": str(directory / "krb5.conf"),
            "KRB5_KDC_PROFILE": str(directory / "kdc.conf"),
            # The acceptor's replay cache stays in the directory too.
            "KRB5RCACHEDIR": str(directory),
        }
        self._run([KDB5_UTIL, "create", "-s", "-r", realm, "-P", secrets.token_hex(16)])

    def _run(self, args: list[str], stdin: str | None = None) -> str:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=30,
                              env={**os.environ, **self.env})
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def kadmin(self, query: str) -> str:
        return self._run([KADMIN_LOCAL, "-r", self.realm, "-q", query])

    def add_principal(self, name: str, password: str | None = None) -> str:
        """``name@REALM`` with a password, or a random key when ``password`` is None."""
        principal = f"{name}@{self.realm}"
        if password is None:
            self.kadmin(f"addprinc -randkey {principal}")
        else:
            self.kadmin(f"addprinc -pw {password} {principal}")
        return principal

    def keytab(self, principal: str, path: Path) -> Path:
        self.kadmin(f"ktadd -k {path} {principal}")
        return path

    def kinit(self, principal: str, password: str, ccache: Path) -> None:
        """A TGT for ``principal`` in ``ccache``; kinit reads the password on stdin."""
        self._run([KINIT, "-c", f"FILE:{ccache}", principal], stdin=password + "\n")

    def start(self, timeout: float = 15.0) -> KDC:
        log = (self.directory / "krb5kdc.out").open("ab")
        self.proc = subprocess.Popen(
            [KRB5KDC, "-n", "-r", self.realm, "-P", str(self.directory / "kdc.pid")],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env},
        )
        log.close()
        wait_listening(
            self.proc, self.port, "krb5kdc",
            lambda: (self.directory / "krb5kdc.out").read_text(errors="replace"), timeout,
        )
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
