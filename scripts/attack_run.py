"""The combined attack run of issue 18: a legitimate client sends 100 messages while anonymous
clients try, all at once, to stall, flood and starve a real ``twistd -n smarthost``.

Everything runs on loopback (127.0.0.0/8): the daemon, an aiosmtpd MX (tests/mxpeer.py) that
the test DNS server (tests/dnsserver.py) names for ``remote.test``, and these attackers, each
from addresses of its own and each bounded in time:

``handshake``  keeps its per-address quota of connections stalled in a TLS handshake: after
               STARTTLS with no ClientHello, on port 465 with none, or with half of one;
``silent``     holds 300 sockets from one address on every listener, never sends or reads,
               and reopens each one the server closes a second later;
``flood``      pipelines HELP without ever reading the replies (the 1.4 GB finding);
``drip``       sends one byte a second, in a command line or in DATA.

Meanwhile a prober connects a fresh client every quarter second and times its greeting, and
the daemon's memory is sampled from /proc. Before the attack, a first phase measures the memory
a connection that floods without reading costs the daemon. Run::

    .venv/bin/python scripts/attack_run.py [--seconds 40] [--json]

Exit status 0 when all 100 messages were accepted and delivered, the peak RSS stayed under
200 MB and every fresh client was greeted within a second; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import selectors
import smtplib
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from daemon import Daemon, client_tls  # noqa: E402  (the end-to-end harness lives in tests/)
from mxpeer import MXPeer  # noqa: E402

MESSAGES = 100
ZONE = "remote.test MX 10 mx.remote.test\nmx.remote.test A 127.0.0.2\n"
CONFIG = """
[relay]
local_domains = ["example.test"]
[delivery]
port = {mx_port}
nameservers = ["127.0.0.1:{dns_port}"]
[queue]
retry = [1, 2, 5]
[limits]
connections = 400
connections_per_ip = 20
command_timeout = 10
tls_handshake_timeout = 5
"""


class Run:
    """What every attacker shares: the deadline, the counters, the ports."""

    def __init__(self, ports: dict[str, int], seconds: float) -> None:
        self.ports = ports
        self.until = time.monotonic() + seconds
        self.counts: Counter[str] = Counter()
        self.lifetimes: dict[str, list[float]] = {}
        self.lock = threading.Lock()
        self.tick = threading.Event()  # never set: the watchers' pace

    def running(self) -> bool:
        return time.monotonic() < self.until

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def lived(self, kind: str, seconds: float) -> None:
        with self.lock:
            self.lifetimes.setdefault(kind, []).append(seconds)


def connect(port: int, source: str, timeout: float = 5) -> socket.socket | None:
    try:
        return socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                        source_address=(source, 0))
    except OSError:
        return None  # refused and reset before connect() returned: closed at once


def read_reply(sock: socket.socket, timeout: float = 5) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not (data.endswith(b"\r\n") and data.split(b"\r\n")[-2][3:4] == b" "):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def client_hello() -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls().wrap_bio(incoming, outgoing, server_side=False)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# -- the attackers -------------------------------------------------------------------------------


def stalled_handshake(run: Run, source: str, kind: str, hello: bytes) -> socket.socket | None:
    if kind == "starttls":
        sock = connect(run.ports["submission"], source)
        if sock is None:
            return None
        try:
            if not read_reply(sock).startswith(b"220"):
                sock.close()
                return None
            sock.sendall(b"EHLO attacker\r\n")
            read_reply(sock)
            sock.sendall(b"STARTTLS\r\n")
            read_reply(sock)
        except OSError:
            sock.close()
            return None
        return sock
    sock = connect(run.ports["submissions"], source)
    if sock is not None and kind == "half-hello":
        try:
            sock.sendall(hello[: len(hello) // 2])
        except OSError:
            pass
    return sock


def hold(run: Run, name: str, sources: list[str], per_source: int,
         make: Callable[[str, int], socket.socket | None], *, flood: bytes = b"",
         drip: bool = False, retry_after: float = 0.0) -> None:
    """Keep ``per_source`` connections open from each source and reopen what the server
    closes (a slot ``retry_after`` seconds after it was lost), recording how long each lived.
    Waits on the sockets themselves: readable (what the server sends is read and dropped; EOF
    or a reset is its close), or, with ``flood``, writable (more of ``flood`` is sent; never a
    byte read). ``drip`` sends one byte a second."""
    sel = selectors.DefaultSelector()
    born: dict[socket.socket, float] = {}
    owner: dict[socket.socket, str] = {}
    last_drip: dict[socket.socket, float] = {}
    waiting: dict[str, list[float]] = {source: [] for source in sources}  # slots lost, when
    n = 0

    def lost(sock: socket.socket) -> None:
        lived = time.monotonic() - born.pop(sock)
        run.lived(name, lived)
        waiting[owner.pop(sock)].append(time.monotonic())
        last_drip.pop(sock, None)
        sel.unregister(sock)
        sock.close()
        run.count(f"{name} closed by the server")
        if lived < 1.0:
            run.count(f"{name} closed by the server within 1 s")

    while run.running():
        now = time.monotonic()
        for source in sources:
            waiting[source] = [t for t in waiting[source] if now - t < retry_after]
            while (list(owner.values()).count(source) + len(waiting[source]) < per_source
                   and run.running()):
                n += 1
                sock = make(source, n)
                run.count(f"{name} opened")
                if sock is None:
                    run.count(f"{name} refused and closed at once")
                    waiting[source].append(time.monotonic())
                    break
                sock.setblocking(False)
                born[sock], owner[sock] = time.monotonic(), source
                sel.register(sock, selectors.EVENT_WRITE if flood else selectors.EVENT_READ)
        for key, _ in sel.select(0.2):
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            try:
                if flood:
                    run.count("flood bytes sent", ready.send(flood))
                elif not ready.recv(65536):
                    lost(ready)
            except BlockingIOError:
                pass
            except OSError:
                lost(ready)
        if drip:
            for sock in list(owner):
                if time.monotonic() - last_drip.get(sock, born[sock]) >= 1.0:
                    last_drip[sock] = time.monotonic()
                    try:
                        sock.send(b"N")
                    except OSError:
                        lost(sock)
    for sock in owner:
        sock.close()
    sel.close()


def handshake_attack(run: Run) -> None:
    hello = client_hello()
    kinds = ("starttls", "silent-465", "half-hello")

    def make(source: str, n: int) -> socket.socket | None:
        return stalled_handshake(run, source, kinds[n % 3], hello)

    hold(run, "handshake", ["127.0.0.101", "127.0.0.102"], 20, make)


def silent_attack(run: Run) -> None:
    """Hundreds of silent sockets from one address, on every listener."""
    listeners = ("submission", "submissions", "smtp")

    def make(source: str, n: int) -> socket.socket | None:
        return connect(run.ports[listeners[n % 3]], source)

    hold(run, "silent", ["127.0.0.103"], 300, make, retry_after=1.0)


def flood_attack(run: Run) -> None:
    def make(source: str, n: int) -> socket.socket | None:
        sock = connect(run.ports["smtp"], source)
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        return sock

    hold(run, "flood", ["127.0.0.104", "127.0.0.105"], 10, make, flood=b"HELP\r\n" * 20000)


def drip_attack(run: Run) -> None:
    def make(source: str, n: int) -> socket.socket | None:
        sock = connect(run.ports["submission"], source)
        if sock is None:
            return None
        try:
            read_reply(sock)
            if n % 2:  # in DATA
                for line in (b"EHLO d", b"MAIL FROM:<d@remote.test>", b"RCPT TO:<d@example.test>",
                             b"DATA"):
                    sock.sendall(line + b"\r\n")
                    read_reply(sock)
        except OSError:
            sock.close()
            return None
        return sock

    hold(run, "drip", ["127.0.0.106", "127.0.0.107"], 10, make, drip=True)


# -- the legitimate side and the watchers ----------------------------------------------------------


def legitimate(run: Run, results: dict[str, Any]) -> None:
    """100 messages from the trusted host, ten per connection, to the remote MX."""
    accepted = 0
    for batch in range(MESSAGES // 10):
        for _attempt in range(5):
            try:
                with smtplib.SMTP("127.0.0.1", run.ports["submission"], timeout=30) as s:
                    s.ehlo("office.test")
                    for n in range(10):
                        number = batch * 10 + n
                        if number < accepted:
                            continue
                        s.sendmail("office@example.test", [f"user{number}@remote.test"],
                                   f"Subject: legit {number}\r\n\r\nhello\r\n".encode())
                        accepted += 1
                break
            except (OSError, smtplib.SMTPException) as e:
                results.setdefault("legit errors", []).append(f"{type(e).__name__}: {e}")
    results["accepted"] = accepted


def prober(port: int, seconds: float, out: Any) -> None:
    """A fresh client every quarter second: the time to its greeting (and, apart, to its
    TCP connection, which the kernel's accept queue decides). Runs in a process of its own,
    so the attackers' threads cannot delay it (the GIL) and inflate what it measures."""
    latencies: list[float] = []
    connects: list[float] = []
    failures: list[str] = []
    until = time.monotonic() + seconds
    pace = threading.Event()  # never set
    while time.monotonic() < until:
        start = time.monotonic()
        sock = connect(port, "127.0.0.3", timeout=5)
        if sock is None:
            failures.append("connect failed")
        else:
            connects.append(time.monotonic() - start)
            try:
                banner = read_reply(sock, timeout=5)
                latencies.append(time.monotonic() - start)
                if not banner.startswith(b"220"):
                    failures.append(banner.decode(errors="replace").strip())
                sock.sendall(b"QUIT\r\n")
            except OSError as e:
                failures.append(f"{type(e).__name__}: {e}")
            finally:
                sock.close()
        pace.wait(0.25)
    out.put((latencies, connects, failures))


def memory(daemon: Daemon, field: str = "VmRSS") -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field}")


def cpu_seconds(daemon: Daemon) -> float:
    """User + system CPU time the daemon has used, from /proc."""
    assert daemon.proc is not None
    fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sampler(run: Run, daemon: Daemon, samples: list[int]) -> None:
    while run.running():
        samples.append(memory(daemon))
        run.tick.wait(0.1)


def per_connection_memory(daemon: Daemon, ports: dict[str, int], count: int = 60) -> float:
    """Bytes of daemon RSS per connection that pipelines HELP and never reads."""
    payload = b"HELP\r\n" * 20000
    warm = connect(ports["smtp"], "127.0.0.120")  # first-use allocations out of the way
    if warm is not None:
        warm.close()
    before = memory(daemon)
    socks = [s for i in range(count)
             if (s := connect(ports["smtp"], f"127.0.0.{121 + i // 20}")) is not None]
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
    # Send until the server has stopped reading every one of them: one second with none
    # writable (select waits on the sockets; bounded by the deadline).
    quiet_since, deadline = time.monotonic(), time.monotonic() + 8
    while time.monotonic() < deadline and time.monotonic() - quiet_since < 1.0:
        _, writable, _ = select.select([], socks, [], 0.2)
        for s in writable:
            try:
                if s.send(payload):
                    quiet_since = time.monotonic()
            except OSError:
                pass
    after = memory(daemon)
    for s in socks:
        s.close()
    return (after - before) / max(len(socks), 1)


# -- the run ---------------------------------------------------------------------------------------


def start_dns(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    zone = directory / "zone.txt"
    zone.write_text(ZONE)
    proc = subprocess.Popen([sys.executable, str(_TESTS / "dnsserver.py"), "--zone", str(zone),
                             "--port", "0"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(30):
            proc.kill()
            raise RuntimeError("the DNS server printed no port")
    return proc, int(proc.stdout.readline())


def attack(seconds: float) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix="attack-run-"))
    dns, dns_port = start_dns(directory)
    peer = MXPeer("127.0.0.2", name="mx.remote.test")
    peer.start()
    (directory / "daemon").mkdir()
    daemon = Daemon(directory / "daemon", CONFIG.format(mx_port=peer.port, dns_port=dns_port))
    results: dict[str, Any] = {}
    try:
        daemon.start()
        results["rss at start"] = memory(daemon)
        results["rss per non-reading flood connection"] = per_connection_memory(
            daemon, daemon.ports)
        run = Run(daemon.ports, seconds)
        samples: list[int] = []
        spawn = multiprocessing.get_context("spawn")
        probed: Any = spawn.Queue()
        probe = spawn.Process(target=prober, args=(daemon.ports["submission"], seconds, probed))
        probe.start()
        delivered: list[str] = []

        def watch_log() -> None:  # also keeps the daemon's stdout pipe drained
            try:
                daemon.wait_for("result=delivered", timeout=seconds + 120, count=MESSAGES)
                delivered.append("all")
            except (TimeoutError, RuntimeError) as e:
                results["log wait"] = str(e).splitlines()[0]

        threads = [threading.Thread(target=f, args=a, daemon=True) for f, a in (
            (watch_log, ()), (sampler, (run, daemon, samples)), (handshake_attack, (run,)),
            (silent_attack, (run,)), (flood_attack, (run,)), (drip_attack, (run,)),
        )]
        for t in threads:
            t.start()
        started, cpu_before = time.monotonic(), cpu_seconds(daemon)
        legit = threading.Thread(target=legitimate, args=(run, results), daemon=True)
        legit.start()
        legit.join(seconds + 60)
        results["legit seconds"] = round(time.monotonic() - started, 1)
        for t in threads[1:]:
            t.join(seconds + 30)
        threads[0].join(120)
        latencies, connects, failures = probed.get(timeout=60)
        probe.join(30)
        results["daemon CPU share during the run"] = round(
            (cpu_seconds(daemon) - cpu_before) / (time.monotonic() - started), 2)
        results["delivered (log lines)"] = sum("result=delivered" in line for line in daemon.log)
        results["delivered (MX received)"] = len(peer.messages)
        results["rss peak sampled"] = max(samples, default=0)
        results["rss peak VmHWM"] = memory(daemon, "VmHWM")
        results["greetings"] = len(latencies)
        results["greeting latency max"] = round(max(latencies, default=0), 3)
        results["greeting latency median"] = round(statistics.median(latencies or [0]), 4)
        results["greeting latencies over 0.1 s"] = sorted(
            round(x, 3) for x in latencies if x > 0.1)
        results["connect time max"] = round(max(connects, default=0), 3)
        results["greeting failures"] = failures[:10]
        results["attack counts"] = dict(sorted(run.counts.items()))
        results["lifetime max by attack (s)"] = {
            k: round(max(v), 1) for k, v in sorted(run.lifetimes.items())}
    finally:
        daemon.stop()
        peer.stop()
        dns.terminate()
        dns.wait(10)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=40, help="attack duration")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    results = attack(args.seconds)
    ok = (
        results.get("accepted") == MESSAGES
        and results.get("delivered (MX received)") == MESSAGES
        and results.get("rss peak VmHWM", 1 << 40) < 200 * 1024 * 1024
        and results.get("greeting latency max", 99) < 1.0
        and not results.get("greeting failures")
    )
    results["goal met"] = ok
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            if isinstance(value, int) and "rss" in key:
                value = f"{value / 1e6:.1f} MB"
            elif isinstance(value, float) and "rss" in key:
                value = f"{value / 1e3:.0f} KB"
            print(f"{key}: {value}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
