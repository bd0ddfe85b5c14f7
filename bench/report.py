"""The report of a bench/run invocation: the tables (text and Markdown), the goals of issue
15 against Postfix, how the work spread over processes, and the profile by area."""

from __future__ import annotations

import os
import pstats
import statistics
import sys
from pathlib import Path
from typing import Any


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# The goals of issue 15, against Postfix = 1: (row id, label, sign, goal).
GOALS = (
    ("accept20", "accept, 20 sessions", ">=", 4.0),
    ("accept100", "accept, 100 sessions", ">=", 4.0),
    ("while-delivering", "accept while delivering, 20 sessions", ">=", 3.0),
    ("deliver", "accept + deliver until the queue is empty, 20 sessions", ">=", 2.5),
    ("cpu20", "server CPU per message (accept, 20 sessions)", "<=", 0.3),
)


def _cell(s: dict[str, float], unit: str) -> str:
    digits = 2 if unit == "ms" else 0 if unit == "msg/s" else 1
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def table_lines(workloads: list[dict[str, Any]], labels: list[str], markdown: bool) -> list[str]:
    """Every row: each server's median (min-max), then each smarthost's ratio to Postfix."""
    smarthosts = [label for label in labels if label != "postfix" and "postfix" in labels]
    head = ["workload", "unit", *(f"{label} med (min-max)" for label in labels),
            *(f"{label.removeprefix('smarthost ')} / postfix" for label in smarthosts)]
    rows = []
    for w in workloads:
        cells = [w["name"], w["unit"]]
        cells += [_cell(w["servers"][label]["summary"], w["unit"]) if label in w["servers"]
                  else "-" for label in labels]
        cells += [f"{w['ratios'][label]:.2f}" if label in w["ratios"] else "-"
                  for label in smarthosts]
        rows.append(cells)
    return _layout(head, rows, markdown)


def goal_lines(workloads: list[dict[str, Any]], labels: list[str], markdown: bool) -> list[str]:
    """The issue's goals table: each smarthost's ratio to Postfix = 1, and whether it meets
    the goal."""
    if "postfix" not in labels:
        return []
    by_id = {w["id"]: w for w in workloads}
    smarthosts = [label for label in labels if label != "postfix"]
    head = ["goal (Postfix = 1)", *smarthosts, "goal"]
    rows = []
    for row_id, label, sign, goal in GOALS:
        w = by_id.get(row_id)
        if w is None:
            continue
        cells = [label]
        for server in smarthosts:
            ratio = w["ratios"].get(server)
            if ratio is None:
                cells.append("-")
                continue
            met = ratio >= goal if sign == ">=" else ratio <= goal
            cells.append(f"{ratio:.2f}x {'✔' if met else '✘'}")
        cells.append(f"{'≥' if sign == '>=' else '≤'} {goal}x")
        rows.append(cells)
    return _layout(head, rows, markdown) if rows else []


def _layout(head: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        return [f"| {' | '.join(head)} |", f"|{' --- |' * len(head)}",
                *(f"| {' | '.join(r)} |" for r in rows)]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                         for i, c in enumerate(cells))

    return [line(head), "-" * len(line(head)), *(line(r) for r in rows)]


# Where the reactor thread's own time goes, by the file a function is in (first match wins).
AREAS = (
    ("log lines", ("smarthost/core/maillog.py", "twisted/logger/", "smarthost/app/activity.py",
                   "twisted/python/logfile.py", "twisted/python/log.py",
                   "twisted/python/_tzhelper.py", "twisted/python/threadable.py")),
    ("attrs (evolve, generated methods)", ("attr/_make.py", "<attrs generated")),
    ("SMTP sessions (smtpd)", ("smarthost/smtpd/",)),
    ("delivery", ("smarthost/delivery/",)),
    ("spool (queue)", ("smarthost/queue/",)),
    ("Deferreds", ("twisted/internet/defer.py",)),
    ("reactor, sockets, epoll", ("twisted/internet/", "twisted/python/context.py",
                                 "_socket.socket", "select.epoll")),
    ("other smarthost", ("smarthost/",)),
)


def areas(prof: Path) -> dict[str, float]:
    """The profile's own time (tottime) in seconds per area of :data:`AREAS`, plus "other".
    A built-in's time (``len``, ``list.append``, a socket's ``send``...) counts for the
    areas of the functions that called it, in proportion."""
    stats = pstats.Stats(str(prof))

    def area(path: str, name: str) -> str:
        where = f"{path}:{name}"
        return next((label for label, marks in AREAS if any(m in where for m in marks)),
                    "other")

    found: dict[str, float] = {}
    for (path, _, name), row in stats.stats.items():  # type: ignore[attr-defined]
        callers = row[4]
        if path == "~" and callers and not any(m in name for m in ("_socket", "select.")):
            for (cpath, _, cname), crow in callers.items():
                label = area(cpath, cname)
                found[label] = found.get(label, 0.0) + crow[2]
            continue
        label = area(path, name)
        found[label] = found.get(label, 0.0) + row[2]
    return found


def report(results: dict[str, Any], labels: list[str], out: Path) -> None:
    """The tables on stdout, and in Markdown next to the JSON (``<stamp>.md``)."""
    workloads = results["workloads"]
    text = table_lines(workloads, labels, markdown=False)
    goals = goal_lines(workloads, labels, markdown=False)
    if workloads:
        print("\n" + "\n".join(text))
    if goals:
        print("\n" + "\n".join(goals))
    print_processes(workloads)
    for failure in results["failures"]:
        print(f"FAILED and left out: {failure['workload']}, round {failure['round']}, "
              f"{failure['server']}: {failure['error'].splitlines()[0]}")
    loads = [r["loadavg_before"][0] for w in workloads
             for v in w["servers"].values() for r in v.get("runs", ())]
    if loads:
        print(f"\nload average (1 min) before each run: median {statistics.median(loads):.2f}, "
              f"min {min(loads):.2f}, max {max(loads):.2f} on {os.cpu_count()} CPUs")
    md = [f"bench/run {' '.join(sys.argv[1:])} — {results['started_utc']}, "
          f"commit {results['machine']['smarthost_commit']}, {results['rounds']} rounds of "
          f"{results['messages']} messages", "",
          *table_lines(workloads, labels, markdown=True)]
    if goals:
        md += ["", *goal_lines(workloads, labels, markdown=True)]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print_alone(results)
    print_profiles(results)
    print(f"\nresults: {out} and {out.with_suffix('.md').name} "
          f"({results['elapsed_seconds']:.0f} s)")


def print_processes(workloads: list[dict[str, Any]]) -> None:
    """How the work spread: the master's share, messages per worker, the load generators'
    own CPU."""
    for w in workloads:
        for label, values in w["servers"].items():
            runs = values.get("runs", ())
            shares = [r["root_cpu_share"] for r in runs if "root_cpu_share" in r]
            client = [r["client_cpu_ms_per_message"] for r in runs
                      if "client_cpu_ms_per_message" in r]
            if shares and label != "postfix" and not label.endswith("w=1"):
                spreads = [" / ".join(str(n) for _, n in sorted(r["accepted_by_worker"].items()))
                           for r in runs]
                print(f"{w['name'].strip()}, {label}: the master's share of the server's CPU "
                      f"{100 * statistics.median(shares):.0f}% (median); messages accepted per "
                      f"worker, run by run: {', '.join(spreads)}")
            sink = [r["sink_cpu_ms_per_message"] for r in runs if "sink_cpu_ms_per_message" in r]
            if client:
                print(f"{w['name'].strip()}, {label}: smtp-source's own CPU "
                      f"{statistics.median(client):.2f} ms per message (median)"
                      + (f", smtp-sink's {statistics.median(sink):.2f} ms" if sink else ""))


def print_alone(results: dict[str, Any]) -> None:
    """Start-up and idle connections."""
    for r in results.get("startup", []):
        print(f"start-up, {r['messages']} deferred in the spool: "
              f"'scheduler started' {r['scheduler_started_seconds']:.2f} s, "
              f"'ready' {r['ready_seconds']:.2f} s, RSS {r['rss_mib']:.0f} MiB")
    for w in results["workloads"]:
        if w["id"] != "idle":
            continue
        for label, values in w["servers"].items():
            last = values["runs"][-1]
            print(f"idle, {label}: PSS {last['pss_mib']:.1f} MiB in {last['processes']} "
                  f"processes, {last['pss_per_connection_kib']:.1f} KiB PSS per "
                  f"connection, all greeted in {last['seconds_to_greet_all']:.2f} s, "
                  f"new client greeted in {last['new_client_banner_seconds']:.3f} s")
    if "many_idle" in results:
        r = results["many_idle"]
        print(f"idle, smarthost alone: {r['connections']} connections in "
              f"{r['rss_mib']:.1f} MiB RSS / {r['pss_mib']:.1f} MiB PSS, "
              f"{r['pss_per_connection_kib']:.1f} KiB PSS per connection, all greeted in "
              f"{r['seconds_to_greet_all']:.2f} s, new client greeted in "
              f"{r['new_client_banner_seconds']:.3f} s")


def print_profiles(results: dict[str, Any]) -> None:
    for key in ("profile", "profile_deliver"):
        if key not in results:
            continue
        p = results[key]
        print(f"\nprofile of one 20-session run, {p['workload']}, under cProfile "
              f"({p['rate_under_profiler']:.0f} msg/s profiled): {p['prof']}")
        for order in ("cumulative", "tottime"):
            print(f"\n== top 25 by {order} ==")
            print(_stats_body(p["top"][order]))
        total = sum(p["areas"].values())
        print("\nthe reactor thread's own time by area (ms per message under the profiler):")
        for area, seconds in sorted(p["areas"].items(), key=lambda kv: -kv[1]):
            print(f"  {area:34} {seconds * 1000 / p['messages']:6.3f}  "
                  f"{100 * seconds / total:4.1f}%")


def _stats_body(text: str) -> str:
    """pstats output from the column header on (its preamble names the file again)."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "ncalls" in line:
            return "\n".join(lines[i:]).rstrip()
    return text
