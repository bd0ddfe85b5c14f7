"""The master's /metrics with `[server] workers` > 1: each worker's Prometheus text in (made
by the real Metrics registry), one text out, read back with prometheus_client's own parser.
Counters and histograms add up, gauges that count things add up, the oldest message is the
oldest of any worker, the certificate's expiry the first one."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from smarthost.app import masterhttp
from smarthost.app.metrics import Metrics, State
from smarthost.app.statuspage import WorkersView, render_workers


def worker_text(accepted: int, commits: list[float], queued: int, held: int, oldest: float,
                smtp: int, expiry: float | None) -> str:
    metrics = Metrics()
    for _ in range(accepted):
        metrics.accepted("submission")
    for seconds in commits:
        metrics.commit_seconds(seconds)
    metrics.delivery("delivered")
    metrics.watch(lambda: State({"queued": queued, "held": held}, oldest, {"smtp": smtp},
                                expiry))
    return generate_latest(metrics.registry).decode()


def scrape(i: int, text: str | None) -> masterhttp.Scrape:
    return masterhttp.Scrape(Path(f"/run/spool/worker-{i}/http.sock"),
                             None if text is None else masterhttp.parse(text))


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


ONE = worker_text(2, [0.003], queued=2, held=1, oldest=5.0, smtp=1, expiry=1.9e9)
TWO = worker_text(3, [0.02, 0.2], queued=3, held=0, oldest=50.0, smtp=2, expiry=1.8e9)


def test_the_workers_add_up() -> None:
    out = masterhttp.exposition([scrape(1, ONE), scrape(2, TWO)], expected=2).decode()
    got = values(out)
    assert got["smarthost_messages_accepted_total", (("listener", "submission"),)] == 5
    assert got["smarthost_recipients_delivered_total", ()] == 2
    assert got["smarthost_spool_commit_seconds_count", ()] == 3
    assert got["smarthost_spool_commit_seconds_bucket", (("le", "0.005"),)] == 1
    assert got["smarthost_spool_commit_seconds_bucket", (("le", "0.025"),)] == 2
    assert got["smarthost_spool_commit_seconds_bucket", (("le", "+Inf"),)] == 3
    assert abs(got["smarthost_spool_commit_seconds_sum", ()] - 0.223) < 1e-9
    assert got["smarthost_queue_messages", (("status", "queued"),)] == 5
    assert got["smarthost_queue_messages", (("status", "held"),)] == 1
    assert got["smarthost_connections", (("listener", "smtp"),)] == 3
    assert got["smarthost_queue_oldest_age_seconds", ()] == 50.0  # the oldest anywhere
    assert got["smarthost_tls_certificate_expiry_timestamp_seconds", ()] == 1.8e9  # the first
    first = values(ONE)["smarthost_recipients_delivered_created", ()]
    second = values(TWO)["smarthost_recipients_delivered_created", ()]
    assert got["smarthost_recipients_delivered_created", ()] == min(first, second)
    assert got["smarthost_workers", (("state", "running"),)] == 2
    assert got["smarthost_workers_scrape_failed", ()] == 0
    # Types survive: Prometheus still sees a counter and a histogram.
    types = {f.name: f.type for f in text_string_to_metric_families(out)}
    assert types["smarthost_messages_accepted"] == "counter"
    assert types["smarthost_spool_commit_seconds"] == "histogram"
    # The buckets stay in order (le ascending), as Prometheus requires.
    buckets = [line.split("le=")[1].split("}")[0] for line in out.splitlines()
               if line.startswith("smarthost_spool_commit_seconds_bucket")]
    assert buckets[-1] == '"+Inf"' and len(buckets) == 15


def test_a_worker_that_does_not_answer_is_left_out_and_counted() -> None:
    out = masterhttp.exposition([scrape(1, ONE), scrape(2, None)], expected=3).decode()
    got = values(out)
    assert got["smarthost_messages_accepted_total", (("listener", "submission"),)] == 2
    assert got["smarthost_workers", (("state", "running"),)] == 1
    assert got["smarthost_workers", (("state", "not_answering"),)] == 1
    assert got["smarthost_workers", (("state", "down"),)] == 1
    assert got["smarthost_workers_scrape_failed", ()] == 1


def test_text_that_is_not_the_format_counts_as_no_answer() -> None:
    assert masterhttp.parse("<html>not metrics</html>\n") is None
    assert scrape(1, "smarthost_x{ 1\n").families is None


def test_a_family_whose_type_differs_is_not_mixed_in() -> None:
    """Two versions side by side during an upgrade: the first worker's type wins."""
    counter = "# TYPE smarthost_x_total counter\nsmarthost_x_total 4\n"
    gauge = "# TYPE smarthost_x gauge\nsmarthost_x 100\n"
    got = values(masterhttp.exposition([scrape(1, counter), scrape(2, gauge)]).decode())
    assert got["smarthost_x_total", ()] == 4


def test_rules_for_gauges_the_table_does_not_name() -> None:
    text = ("# TYPE smarthost_started_timestamp_seconds gauge\n"
            "smarthost_started_timestamp_seconds {}\n"
            '# TYPE smarthost_build_info gauge\nsmarthost_build_info{{version="1"}} 1\n'
            "# TYPE smarthost_open_files gauge\nsmarthost_open_files {}\n")
    got = values(masterhttp.exposition(
        [scrape(1, text.format(100, 7)), scrape(2, text.format(200, 8))]).decode())
    assert got["smarthost_started_timestamp_seconds", ()] == 200
    assert got["smarthost_build_info", (("version", "1"),)] == 1
    assert got["smarthost_open_files", ()] == 15


def test_the_master_page_lists_each_worker() -> None:
    workers = [masterhttp.worker_status(scrape(1, ONE)),
               masterhttp.worker_status(scrape(2, None))]
    assert workers[0].queue == {"queued": 2, "deferred": 0, "held": 1}
    assert workers[0].connections == 1 and workers[0].oldest_age == 5.0
    page = render_workers(WorkersView(hostname="mx<1>", now=1_800_000_000.0, health="starting",
                                      workers=workers, down=1))
    assert "mx&lt;1&gt;" in page and "<1>" not in page
    assert "worker 1" in page and "worker 2" in page and "not answering" in page
    assert "1 not running" in page and 'href="/metrics"' in page
