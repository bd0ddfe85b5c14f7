"""The ``[http]`` listener: ``/metrics`` for Prometheus, ``/healthz`` for load balancers and
orchestrators, and ``/``, the status page (SPEC "Watching it").

The numbers come from the live objects and the operator log's events (the :class:`Watch`,
built once per process), never from log files. ``/healthz`` answers ``200 ok`` only while
the daemon is ready; it answers ``503`` while the daemon starts and from the moment it begins
to stop: the port stays open through the stop of the other services (it closes in the
reactor's "during shutdown" phase), so a load balancer sees the 503 rather than a refused
connection while mail is still being handed over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from cryptography import x509
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Site

from smarthost.app import control
from smarthost.app.metrics import State
from smarthost.app.queueview import QueueReader, QueueSnapshot, QueueView
from smarthost.app.statuspage import CertificateInfo, StatusView, render
from smarthost.app.watch import Watch
from smarthost.core.maillog import MailLog

STEP = "http"  # the start-up step this listener reports (smarthost.app.startup)
# No script may run, whatever a bug let into the page; images only from the page itself.
_PAGE_POLICY = b"default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"


class _Request(Protocol):
    """The slice of ``twisted.web.server.Request`` the pages use, typed."""

    def setHeader(self, name: bytes, value: bytes) -> None: ...

    def setResponseCode(self, code: int) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...


class StartupSteps(Protocol):
    """The slice of :class:`~smarthost.app.startup.Startup` the listener reports to."""

    def done(self, step: str) -> None: ...

    def fail(self, key: str, problem: str) -> None: ...


@attrs.frozen
class StatusSources:
    """The live objects the HTTP side reads."""

    watch: Watch
    spool: QueueReader
    maillog: MailLog
    startup: StartupSteps
    ready: Callable[[], bool]  # True once the daemon is ready (all or nothing, SPEC)
    hostname: Callable[[], str]  # the current generation's
    certificate: Callable[[], x509.Certificate | None]  # the one served now


def leaf_of(options: Any) -> x509.Certificate | None:
    """The certificate a Twisted ``CertificateOptions`` serves."""
    certificate = getattr(options, "certificate", None)
    return None if certificate is None else certificate.to_cryptography()


def make_http_service(
    reactor: Any, listen: Sequence[str | Path], sources: StatusSources
) -> SiteService:
    """The service of the ``[http] listen`` endpoints (none: nothing listens, nothing is
    observed). Add it to the daemon before the other services: it stops after them. A
    :class:`~pathlib.Path` is a unix socket (mode 0600, any path length): a worker's
    ``http.sock``, which its master scrapes."""
    return HTTPService(reactor, listen, sources)


class SiteService(Service):
    """Serves ``site`` on the ``listen`` endpoints, opened before twistd drops privileges,
    and reports the :data:`STEP` to ``startup``. Stays open while the other services stop
    (:attr:`stopping` says so, for a 503) and closes in the reactor's "during shutdown".
    The daemon's HTTP side and the master's (:mod:`smarthost.app.masterhttp`) are both one."""

    def __init__(self, reactor: Any, listen: Sequence[str | Path], site: Site,
                 startup: StartupSteps, maillog: MailLog) -> None:
        self._reactor = reactor
        self._listen = list(listen)
        self.site = site
        self.site.noisy = False  # no "Starting factory" lines in the operator log
        self._startup = startup
        self._maillog = maillog
        self._ports: list[IListeningPort] = []
        self._triggers: list[Any] = []
        self.stopping = False
        self._shutting_down = False

    def health(self, ready: bool) -> str:
        if self.stopping:
            return "stopping"
        return "ready" if ready else "starting"

    def privilegedStartService(self) -> None:
        # Before twistd drops to --uid/--gid, like the SMTP listeners.
        super().privilegedStartService()  # type: ignore[no-untyped-call]
        if not self._listen:
            return
        self._triggers = [
            self._reactor.addSystemEventTrigger("before", "shutdown", self._begin_stop),
            self._reactor.addSystemEventTrigger("during", "shutdown", self._close),
        ]
        Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        for i, description in enumerate(self._listen):
            try:
                port = await self._listen_on(description)
            except Exception as e:
                self._startup.fail(f"http.listen[{i}]", f"cannot listen on {description!r}: {e}")
                return
            self._ports.append(port)
            host = port.getHost()
            self._maillog.notice(
                "{role} listening on {address} ({description})", role="http",
                address=(str(description) if isinstance(description, Path)
                         else f"{getattr(host, 'host', '')}:{getattr(host, 'port', '')}"),
                description=str(description),
            )
        self._startup.done(STEP)

    async def _listen_on(self, description: str | Path) -> IListeningPort:
        if isinstance(description, Path):
            return await control.listen_unix(self._reactor, str(description.parent),
                                             description.name, self.site)
        endpoint = serverFromString(self._reactor, description)  # type: ignore[no-untyped-call]
        port: IListeningPort = await endpoint.listen(self.site)
        return port

    def _begin_stop(self) -> None:
        self._shutting_down = True
        self.stopping = True

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.stopping = True
        if self._shutting_down:
            return None  # the port answers 503 until the reactor's "during shutdown"
        for trigger in self._triggers:
            self._reactor.removeSystemEventTrigger(trigger)
        self._triggers = []
        return self._close()

    def _close(self) -> Deferred[Any]:
        ports, self._ports = self._ports, []
        return DeferredList([Deferred.fromCoroutine(_stop(port)) for port in ports])


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


class QuietSite(Site):
    """The access log without ``/healthz`` and ``/metrics``: load balancers and Prometheus ask
    every few seconds (HAProxy's checks every 2 s by default), which would bury the mail log
    under a line per check and node."""

    def log(self, request: Any) -> None:
        if request.path not in (b"/healthz", b"/metrics"):
            super().log(request)


class HTTPService(SiteService):
    def __init__(
        self, reactor: Any, listen: Sequence[str | Path], sources: StatusSources
    ) -> None:
        self._sources = sources
        view = QueueView(sources.spool, reactor, deferToThread)
        self.status = _Status(reactor, sources, view, self._health)
        sources.watch.metrics.watch(self._state_from_thread)
        registry = sources.watch.metrics.registry
        metrics = MetricsPage(lambda accept: deferToThread(_exposition, registry, accept),
                              sources.maillog)
        root = _root(self.status, metrics, sources.maillog)
        super().__init__(reactor, listen, QuietSite(root),  # type: ignore[no-untyped-call]
                         sources.startup, sources.maillog)

    def _health(self) -> str:
        return self.health(self._sources.ready())

    def _state_from_thread(self) -> State:
        """prometheus_client collects in the thread pool; the live objects are read on the
        reactor thread."""
        read: Callable[[], Deferred[State]] = self.status.state
        state: State = blockingCallFromThread(self._reactor, read)  # type: ignore[arg-type]
        return state

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self._listen:
            globalLogPublisher.addObserver(self._sources.watch.activity)

    def stopService(self) -> Deferred[Any] | None:
        globalLogPublisher.removeObserver(self._sources.watch.activity)
        return super().stopService()


class _Status:
    """Reads the live objects, on the reactor thread."""

    def __init__(self, clock: Any, sources: StatusSources, view: QueueView,
                 health: Callable[[], str]) -> None:
        self._clock = clock
        self._sources = sources
        self._view = view
        self.health = health

    def state(self) -> Deferred[State]:
        return self._view.snapshot().addCallback(self._state)

    def _state(self, queue: QueueSnapshot) -> State:
        certificate = self._sources.certificate()
        return State(
            queue=queue.counts,
            oldest_age=queue.oldest_age,
            connections=self._sources.watch.connections.by_listener(),
            certificate_expiry=(None if certificate is None
                                else certificate.not_valid_after_utc.timestamp()),
        )

    def page(self) -> Deferred[str]:
        return self._view.snapshot().addCallback(self._page)

    def _page(self, queue: QueueSnapshot) -> str:
        sources, activity = self._sources, self._sources.watch.activity
        certificate = sources.certificate()
        return render(StatusView(
            hostname=sources.hostname(),
            now=self._clock.seconds(),
            health=self.health(),
            queue=queue,
            history=activity.history(),
            failures=activity.auth_failures(),
            deferrals=activity.deferrals(),
            listeners=sources.watch.connections.listeners(),
            certificate=None if certificate is None else CertificateInfo(
                certificate.subject.rfc4514_string(),
                certificate.not_valid_after_utc.timestamp(),
            ),
        ))


def _root(status: _Status, metrics: IResource, maillog: MailLog) -> Resource:
    root = Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"", StatusPageResource(status.page, maillog))
    root.putChild(b"healthz", HealthResource(status.health))
    root.putChild(b"metrics", metrics)
    return root


def _exposition(registry: CollectorRegistry, accept: str) -> tuple[str, bytes]:
    """In a thread (the collectors read the live objects through the reactor thread): the
    Prometheus text, or OpenMetrics when the scraper asks for it."""
    encoder, content_type = choose_encoder(accept)
    return content_type, encoder(registry)


class MetricsPage(Resource):
    """``/metrics``: ``render(accept header)`` gives the content type and the text.

    Not prometheus_client's ``MetricsResource``: that is a WSGI application, and Twisted's
    WSGI container needs a client address with a host, which a unix socket (a worker's
    ``http.sock``, scraped by the master) does not have."""

    isLeaf = True

    def __init__(self, render: Callable[[str], Deferred[tuple[str, bytes]]],
                 maillog: MailLog) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._render = render
        self._log = maillog

    def render_GET(self, request: Any) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def send(answer: tuple[str, bytes]) -> None:
            if not gone:
                request.setHeader(b"content-type", answer[0].encode())
                request.write(answer[1])
                request.finish()

        def failed(failure: Failure) -> None:
            self._log.failure("/metrics could not be made", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        accept = request.getHeader(b"accept")
        self._render(accept.decode("latin-1") if accept else "").addCallbacks(send, failed)
        return NOT_DONE_YET


class HealthResource(Resource):
    """``/healthz``: ``200 ok`` when ``health()`` says ready, else 503 and the state."""

    isLeaf = True

    def __init__(self, health: Callable[[], str]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._health = health

    def render_GET(self, request: _Request) -> bytes:
        state = self._health()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if state == "ready":
            return b"ok\n"
        request.setResponseCode(503)
        return f"{state}\n".encode()


class StatusPageResource(Resource):
    """``/``: the HTML ``page()`` makes, with the headers that keep any script out."""

    isLeaf = True

    def __init__(self, page: Callable[[], Deferred[str]], maillog: MailLog) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._page = page
        self._log = maillog

    def render_GET(self, request: _Request) -> int:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def send(page: str) -> None:
            if gone:
                return  # the browser went away meanwhile
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-security-policy", _PAGE_POLICY)
            request.setHeader(b"x-content-type-options", b"nosniff")
            request.write(page.encode("utf-8"))
            request.finish()

        def failed(failure: Failure) -> None:
            self._log.failure("the status page could not read the queue", failure)
            if not gone:
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.write(b"the queue could not be read; see the daemon's log\n")
                request.finish()

        self._page().addCallbacks(send, failed)
        return NOT_DONE_YET
