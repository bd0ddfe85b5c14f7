"""A private OpenLDAP ``slapd`` on loopback for the directory tests.

Its own config file, database and log in a temporary directory; StartTLS on one port and
``ldaps://`` on another, with a certificate from a test CA (``ca.pem``). Started with the
``stats`` log level, so its log names every connection's TLS state and every BIND: the
tests read it to show that no bind ever crossed in plaintext. Never the system's slapd.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

from serverproc import stop_process, wait_listening
from smarthost.app import tlscert

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
BASE = "dc=example,dc=test"
SERVICE_DN = f"cn=smarthost,ou=services,{BASE}"
SERVICE_PASSWORD = "service-Secret-7f3a"
GROUP_DN = f"cn=mailers,ou=groups,{BASE}"

CONFIG = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {dir}/slapd.pid
TLSCACertificateFile {dir}/ca.pem
TLSCertificateFile {dir}/server.pem
TLSCertificateKeyFile {dir}/server.key
database mdb
suffix "{base}"
rootdn "cn=admin,{base}"
directory {dir}/db
maxsize 10485760
access to attrs=userPassword by anonymous auth by * none
access to * by dn.exact="{service}" read by self read by * none
"""

USERS = {
    # uid: (password, mail, other senders)
    "alice": ("alice-pw-1", "alice@example.test", ["sales@example.test"]),
    "bob": ("bob-pw-2", "bob@example.test", []),
    "carol": ("carol-pw-3", "carol@example.test", []),  # not in the group
}


def ldif() -> str:
    parts = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n",
        f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=services,{BASE}\nobjectClass: organizationalUnit\nou: services\n",
        f"dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n",
        f"dn: {SERVICE_DN}\nobjectClass: person\nobjectClass: simpleSecurityObject\n"
        f"cn: smarthost\nsn: service\nuserPassword: {SERVICE_PASSWORD}\n",
    ]
    for uid, (password, mail, others) in USERS.items():
        mails = "".join(f"mail: {m}\n" for m in [mail, *others])
        parts.append(
            f"dn: uid={uid},ou=people,{BASE}\nobjectClass: inetOrgPerson\nuid: {uid}\n"
            f"cn: {uid}\nsn: {uid}\n{mails}userPassword: {password}\n"
        )
    members = "".join(f"member: uid={u},ou=people,{BASE}\n" for u in ("alice", "bob"))
    parts.append(f"dn: {GROUP_DN}\nobjectClass: groupOfNames\ncn: mailers\n{members}")
    return "\n".join(parts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Slapd:
    """One slapd in ``directory``; :meth:`stop` and :meth:`start` again keep its data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.tls_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "slapd.log"
        ca = tlscert.issue(("Smarthost Test LDAP CA",), is_ca=True)
        self.ca_pem = directory / "ca.pem"
        self.ca_pem.write_bytes(ca.cert_pem)
        tlscert.write_pair(tlscert.issue(("localhost",), ca=ca),
                           directory / "server.pem", directory / "server.key")
        (directory / "db").mkdir()
        conf = directory / "slapd.conf"
        conf.write_text(CONFIG.format(dir=directory, base=BASE, service=SERVICE_DN))
        (directory / "data.ldif").write_text(ldif())
        subprocess.run([SLAPADD, "-f", str(conf), "-l", str(directory / "data.ldif")],
                       check=True, capture_output=True, timeout=30)

    @property
    def url(self) -> str:
        return f"ldap://localhost:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://localhost:{self.tls_port}"

    def start(self, timeout: float = 15.0) -> Slapd:
        urls = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"
        log = self.log_path.open("ab")
        # -d stats: stay in the foreground and log connections, TLS state and every BIND.
        self.proc = subprocess.Popen(
            [SLAPD, "-d", "stats", "-h", urls, "-f", str(self.directory / "slapd.conf")],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_listening(self.proc, self.port, "slapd", self.log, timeout)
        return self

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
