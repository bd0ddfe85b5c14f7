"""The status page: one HTML document an office admin reads at a glance, made on the server.

No JavaScript and nothing fetched: the chart is inline SVG drawn here, the style is inline,
and the page reloads itself every 30 seconds. Every text that came from outside (client
addresses, user names tried, remote replies, domains) goes through :func:`html.escape`; the
HTTP side also forbids scripts with a Content-Security-Policy, in case one slips through.
"""

from __future__ import annotations

import datetime
import html
import math
from collections.abc import Mapping, Sequence

import attrs

from smarthost.app.activity import SERIES, AuthFailures, Deferral
from smarthost.app.meters import ListenerLoad
from smarthost.app.queueview import QueueSnapshot

REFRESH = 30  # seconds
EXPIRY_WARNING_DAYS = 14
_COLORS = {"accepted": "#2563eb", "delivered": "#16a34a", "deferred": "#d97706",
           "bounced": "#dc2626"}
_MAX_REPLY = 240


@attrs.frozen
class CertificateInfo:
    subject: str
    not_after: float  # Unix time


@attrs.frozen
class StatusView:
    """Everything the page shows, read at one moment."""

    hostname: str
    now: float
    health: str  # "ready", "starting" or "stopping"
    queue: QueueSnapshot
    history: Mapping[str, Sequence[int]]  # per minute, oldest first, the current minute last
    failures: Sequence[AuthFailures]
    deferrals: Mapping[str, Deferral]  # the last temporary failure per domain
    listeners: Sequence[ListenerLoad]
    certificate: CertificateInfo | None


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def age(seconds: float | None) -> str:
    if seconds is None:
        return "\u2014"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _local(when: float, form: str = "%Y-%m-%d %H:%M") -> str:
    return datetime.datetime.fromtimestamp(when).astimezone().strftime(form)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_REPLY else text[: _MAX_REPLY - 1] + "\u2026"


def render(view: StatusView) -> str:
    return _document(view.hostname, [
        _header(view.hostname, view.health, view.now),
        _tiles(view.queue),
        _activity(view),
        _backlog(view),
        '<div class="columns">',
        _failures(view),
        "<div>",
        _listeners(view.listeners),
        _certificate(view.certificate, view.now),
        "</div></div>",
    ])


@attrs.frozen
class WorkerStatus:
    """One worker process as the master's page shows it (from the worker's /metrics)."""

    name: str  # "worker 2"
    answered: bool  # False: it did not answer the master in time; the numbers are unknown
    queue: Mapping[str, int]  # messages in its spool by status
    oldest_age: float  # seconds, 0 when its queue holds nothing but held mail
    connections: int  # open SMTP connections


@attrs.frozen
class WorkersView:
    """The master's page with ``[server] workers`` > 1: the workers and their queues."""

    hostname: str
    now: float
    health: str
    workers: Sequence[WorkerStatus]  # the running ones
    down: int  # workers that should run and do not (being restarted)


def render_workers(view: WorkersView) -> str:
    answered = [w for w in view.workers if w.answered]
    counts = {name: sum(w.queue.get(name, 0) for w in answered)
              for name in ("queued", "deferred", "held")}
    waiting = counts["queued"] + counts["deferred"]
    oldest_age = max((w.oldest_age for w in answered), default=0.0)
    queue = QueueSnapshot(view.now, counts, view.now - oldest_age if waiting else None, ())
    return _document(view.hostname, [
        _header(view.hostname, view.health, view.now),
        _tiles(queue),
        _workers(view),
    ])


def _workers(view: WorkersView) -> str:
    rows = []
    for w in view.workers:
        if not w.answered:
            rows.append([_e(w.name), '<span class="badge warn">not answering</span>',
                         "", "", "", "", ""])
            continue
        rows.append([_e(w.name), '<span class="badge ok">running</span>',
                     *(str(w.queue.get(name, 0)) for name in ("queued", "deferred", "held")),
                     _e(age(w.oldest_age)), str(w.connections)])
    down = (f' <small>{view.down} not running (being restarted)</small>' if view.down else "")
    table = _table(["Worker", "State", "Queued", "Deferred", "Held", "Oldest", "Connections"],
                   rows, "No worker is running.", narrow=range(1, 7))
    return f'<section class="card"><h2>Worker processes{down}</h2>{table}</section>'


def _document(hostname: str, parts: Sequence[str]) -> str:
    title = f"smarthost \u2014 {hostname}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        *parts,
        f'<footer>Refreshes every {REFRESH} s. For Prometheus: <a href="/metrics">/metrics</a>'
        ' \u00b7 for load balancers: <a href="/healthz">/healthz</a></footer>',
        "</body></html>",
    ])


def _header(hostname: str, health: str, now: float) -> str:
    badge = {"ready": ("ok", "Ready"), "starting": ("warn", "Starting"),
             "stopping": ("bad", "Stopping")}.get(health, ("warn", health))
    return (
        f'<header><h1>smarthost <span class="host">{_e(hostname)}</span></h1>'
        f'<span class="badge {badge[0]}">{_e(badge[1])}</span>'
        f'<span class="when">as of {_e(_local(now, "%Y-%m-%d %H:%M:%S %Z"))}</span>'
        "</header>"
    )


def _tile(label: str, value: str, note: str, tone: str = "") -> str:
    return (f'<div class="tile {tone}"><div class="label">{_e(label)}</div>'
            f'<div class="value">{_e(value)}</div><div class="note">{_e(note)}</div></div>')


def _tiles(queue: QueueSnapshot) -> str:
    counts = queue.counts
    deferred, held = counts.get("deferred", 0), counts.get("held", 0)
    oldest = queue.oldest_age if queue.oldest is not None else None
    stale = oldest is not None and oldest > 3600
    return '<section class="tiles">' + "".join([
        _tile("Queued", str(counts.get("queued", 0)), "waiting for a first try"),
        _tile("Deferred", str(deferred), "waiting for a retry", "warn" if deferred else ""),
        _tile("Held", str(held), "kept until released", "warn" if held else ""),
        _tile("Oldest message", age(oldest), "held mail not counted",
              "warn" if stale else ""),
    ]) + "</section>"


def _activity(view: StatusView) -> str:
    totals = {name: sum(view.history.get(name, ())) for name in SERIES}
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{_COLORS[name]}"></span>'
        f"{_e(name.capitalize())} <b>{totals[name]}</b></span>"
        for name in SERIES
    )
    return (
        '<section class="card"><h2>The last hour <small>(per minute)</small></h2>'
        f'<div class="legend">{legend}</div>{chart(view.history)}</section>'
    )


def _nice_step(peak: int) -> int:
    """A step of 1, 2 or 5 times a power of ten giving at most five grid lines."""
    raw = max(1.0, peak / 5)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if factor * power >= raw:
            return int(factor * power)
    return int(10 * power)


def chart(history: Mapping[str, Sequence[int]], width: int = 860, height: int = 220) -> str:
    """Accepted as a shaded area, delivered, deferred and bounced as lines on top of it."""
    left, right, top, bottom = 40, 10, 10, 24
    plot_w, plot_h = width - left - right, height - top - bottom
    minutes = max((len(history.get(name, ())) for name in SERIES), default=0) or 60
    peak = max((max(history.get(name, ()) or [0]) for name in SERIES), default=0)
    step = _nice_step(peak)
    ceiling = max(step, step * math.ceil(peak / step))

    def x(i: int) -> float:
        return left + plot_w * i / max(1, minutes - 1)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / ceiling)

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             'aria-label="messages per minute over the last hour" '
             'xmlns="http://www.w3.org/2000/svg">']
    for value in range(0, ceiling + 1, step):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y(value):.1f}" '
                     f'y2="{y(value):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(value) + 4:.1f}" class="ytick">{value}</text>')
    for ago in (60, 45, 30, 15, 0):
        i = minutes - 1 - min(ago, minutes - 1)
        label = "now" if ago == 0 else f"\u2212{ago} min"
        anchor = "end" if ago == 0 else ("start" if i == 0 else "middle")
        parts.append(f'<text x="{x(i):.1f}" y="{height - 6}" class="xtick" '
                     f'text-anchor="{anchor}">{label}</text>')
    for name in SERIES:
        values = list(history.get(name, ())) or [0] * minutes
        points = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(values))
        if name == "accepted":
            area = f"{x(0):.1f},{y(0):.1f} {points} {x(len(values) - 1):.1f},{y(0):.1f}"
            parts.append(f'<polygon points="{area}" fill="{_COLORS[name]}" '
                         'fill-opacity="0.18" stroke="none"/>')
        parts.append(f'<polyline points="{points}" fill="none" stroke="{_COLORS[name]}" '
                     'stroke-width="2" stroke-linejoin="round"><title>'
                     f"{_e(name)}</title></polyline>")
    parts.append("</svg>")
    return "".join(parts)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], empty: str,
           narrow: Sequence[int] = ()) -> str:
    """``rows`` hold HTML already escaped; the ``narrow`` columns (counts, ages) take only
    the width they need."""
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'

    def cls(i: int) -> str:
        return ' class="narrow"' if i in narrow else ""

    header = "".join(f"<th{cls(i)}>{_e(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{cell}</td>" for i, cell in enumerate(row))
                   + "</tr>" for row in rows)
    return f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>"


def _backlog(view: StatusView) -> str:
    rows = []
    for item in view.queue.backlog:
        known = view.deferrals.get(item.domain)
        reply = known.reply if known is not None else item.last_reply
        relay = known.relay if known is not None else item.remote
        when = f"{age(view.now - known.when)} ago" if known is not None else "\u2014"
        error = f'<span class="reply">{_e(_short(reply))}</span>'
        if relay and relay != "none":
            error += f'<div class="relay">from {_e(relay)}</div>'
        rows.append([f"<b>{_e(item.domain)}</b>", str(item.messages), str(item.recipients),
                     error, _e(when)])
    table = _table(["Destination", "Messages", "Recipients", "Last error", "When"], rows,
                   "No deferred mail: every destination took what it was sent.", (1, 2, 4))
    return f'<section class="card"><h2>Destinations with deferred mail</h2>{table}</section>'


def _failures(view: StatusView) -> str:
    rows = [
        [f"<b>{_e(f.client)}</b>", str(f.count), _e(f.user), _e(f.mechanism),
         _e(f"{age(view.now - f.last)} ago")]
        for f in view.failures[:20]
    ]
    table = _table(["Client address", "Failures", "Last user tried", "Mechanism", "Last"],
                   rows, "No failed logins in the last hour.", (1, 3, 4))
    title = "Failed logins <small>(last hour)</small>"
    return f'<section class="card"><h2>{title}</h2>{table}</section>'


def _listeners(listeners: Sequence[ListenerLoad]) -> str:
    rows = [[f"<b>{_e(item.listener)}</b>", f"<code>{_e(item.description)}</code>",
             str(item.connections)] for item in listeners]
    table = _table(["Listener", "Endpoint", "Open connections"], rows, "No SMTP listeners.",
                   (2,))
    return f'<section class="card"><h2>Listeners</h2>{table}</section>'


def _certificate(info: CertificateInfo | None, now: float) -> str:
    if info is None:
        body = '<p class="empty">No certificate loaded.</p>'
    else:
        days = (info.not_after - now) / 86400
        if days < 0:
            tone, note = "bad", f"expired {age(-days * 86400)} ago"
        elif days < EXPIRY_WARNING_DAYS:
            tone, note = "warn", f"expires in {age(days * 86400)}: renew it, then SIGHUP"
        else:
            tone, note = "ok", f"{int(days)} days left"
        body = (f'<p class="subject"><code>{_e(info.subject)}</code></p>'
                f'<p>Valid until <b>{_e(_local(info.not_after))}</b> '
                f'<span class="badge {tone}">{_e(note)}</span></p>')
    return f'<section class="card"><h2>TLS certificate</h2>{body}</section>'


_STYLE = """
:root{color-scheme:light;--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--card:#fff;
--ok:#15803d;--warn:#b45309;--bad:#b91c1c}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1200px;padding:20px 24px;background:#f3f4f6;color:var(--fg);
font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
header{display:flex;align-items:baseline;gap:14px;flex-wrap:wrap;margin-bottom:16px}
h1{font-size:22px;margin:0}h1 .host{font-weight:400;color:var(--muted)}
h2{font-size:16px;margin:0 0 10px}h2 small{font-weight:400;color:var(--muted)}
.when{color:var(--muted);margin-left:auto}
.badge{display:inline-block;padding:2px 10px;border-radius:999px;font-size:13px;
font-weight:600;color:#fff}
.badge.ok{background:var(--ok)}.badge.warn{background:var(--warn)}.badge.bad{background:var(--bad)}
.tiles{display:grid;grid-template-columns:repeat(4,1fr);gap:14px;margin-bottom:14px}
.tile,.card{background:var(--card);border:1px solid var(--line);border-radius:10px;
padding:14px 16px}
.tile .label{color:var(--muted);font-size:13px;text-transform:uppercase;letter-spacing:.04em}
.tile .value{font-size:32px;font-weight:700;line-height:1.2}
.tile .note{color:var(--muted);font-size:13px}
.tile.warn{border-color:#f59e0b;background:#fffbeb}.tile.warn .value{color:var(--warn)}
.card{margin-bottom:14px;overflow:hidden}
.columns{display:grid;grid-template-columns:1fr 1fr;gap:14px;align-items:start}
.columns .card{margin-bottom:14px}
.legend{display:flex;gap:18px;flex-wrap:wrap;margin-bottom:6px}
.key{display:inline-flex;align-items:center;gap:6px}
.swatch{width:14px;height:4px;border-radius:2px;display:inline-block}
.chart{width:100%;height:auto;display:block}
.chart .grid{stroke:#e5e7eb;stroke-width:1}
.chart text{font-size:11px;fill:#6b7280;font-family:inherit}
.chart .ytick{text-anchor:end}
table{width:100%;border-collapse:collapse;font-size:14px}
th{text-align:left;color:var(--muted);font-weight:600;font-size:12px;text-transform:uppercase;
letter-spacing:.04em;border-bottom:1px solid var(--line);padding:4px 8px 6px 0}
td{border-bottom:1px solid var(--line);padding:6px 10px 6px 0;vertical-align:top;
overflow-wrap:break-word}
th.narrow,td.narrow{width:1%;white-space:nowrap}
tr:last-child td{border-bottom:0}
.reply{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12.5px}
.relay{color:var(--muted);font-size:12px;overflow-wrap:anywhere}
.empty{color:var(--muted);margin:4px 0}
code{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:13px}
.subject{margin:0 0 6px}
footer{color:var(--muted);font-size:13px;margin-top:6px}
footer a{color:inherit}
@media (max-width:800px){.tiles{grid-template-columns:1fr 1fr}.columns{grid-template-columns:1fr}}
"""
