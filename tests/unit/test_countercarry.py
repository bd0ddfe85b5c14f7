"""The master's counters across worker restarts and missed scrapes: each worker's families
made as the master's parser makes them (prometheus_client Metric objects: a counter, its
``_created`` gauge, a histogram, gauges), one CounterCarry over successive scrapes, the
master's text read back with prometheus_client's parser. Prometheus reads any decrease of
a counter as a reset, so every counter sample the master shows must never go down."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from smarthost.app import masterhttp
from smarthost.app.countercarry import CounterCarry

ACCEPTED = "smarthost_messages_accepted_total"
CREATED = "smarthost_messages_accepted_created"
BUCKETS = ("0.01", "0.1", "+Inf")

Values = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def worker(accepted: Mapping[str, float], created: float = 1000.0, queued: float = 0.0,
           commits: Sequence[int] = (0, 0, 0)) -> list[Metric]:
    """One worker's answer: accepted messages by listener (the counter made at ``created``),
    commit times as cumulative bucket counts, a queue gauge."""
    counter = Metric("smarthost_messages_accepted", "Messages accepted", "counter")
    since = Metric(CREATED, "Messages accepted", "gauge")
    for listener, value in accepted.items():
        counter.add_sample(ACCEPTED, {"listener": listener}, value)
        since.add_sample(CREATED, {"listener": listener}, created)
    histogram = Metric("smarthost_spool_commit_seconds", "Commit time", "histogram")
    for le, count in zip(BUCKETS, commits, strict=True):
        histogram.add_sample("smarthost_spool_commit_seconds_bucket", {"le": le}, count)
    histogram.add_sample("smarthost_spool_commit_seconds_count", {}, commits[-1])
    histogram.add_sample("smarthost_spool_commit_seconds_sum", {}, 0.05 * commits[-1])
    gauge = Metric("smarthost_queue_messages", "Messages in the queue", "gauge")
    gauge.add_sample("smarthost_queue_messages", {"status": "queued"}, queued)
    return [counter, since, histogram, gauge]


def scrape(i: int, families: list[Metric] | None) -> masterhttp.Scrape:
    return masterhttp.Scrape(Path(f"/run/spool/worker-{i}/http.sock"), families)


class Master:
    """The master's side: one carry for all its scrapes, as MasterHTTPService keeps."""

    def __init__(self) -> None:
        self.carry = CounterCarry()

    def scrape(self, *scrapes: masterhttp.Scrape, expected: int = 2) -> Values:
        text = masterhttp.exposition(list(scrapes), expected, self.carry,
                                     self.carry.ticket()).decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}


def accepted(got: Values, listener: str = "smtp") -> float:
    return got[ACCEPTED, (("listener", listener),)]


def test_a_restarted_worker_adds_to_what_it_had_counted() -> None:
    master = Master()
    assert accepted(master.scrape(scrape(1, worker({"smtp": 5})),
                                  scrape(2, worker({"smtp": 3})))) == 8
    # Worker 1 died and was restarted: its new process has counted 1.
    assert accepted(master.scrape(scrape(1, worker({"smtp": 1}, created=2000)),
                                  scrape(2, worker({"smtp": 3})))) == 9
    assert accepted(master.scrape(scrape(1, worker({"smtp": 4}, created=2000)),
                                  scrape(2, worker({"smtp": 4})))) == 13


def test_a_restart_is_seen_by_created_when_the_new_process_counted_past_the_old() -> None:
    master = Master()
    master.scrape(scrape(1, worker({"smtp": 2})), scrape(2, worker({"smtp": 3})))
    got = master.scrape(scrape(1, worker({"smtp": 5}, created=2000)),
                        scrape(2, worker({"smtp": 3})))
    assert accepted(got) == 2 + 5 + 3
    # The sum has counted since the first process of any worker started.
    assert got[CREATED, (("listener", "smtp"),)] == 1000


def test_a_worker_that_misses_a_scrape_counts_with_its_last_values() -> None:
    master = Master()
    master.scrape(scrape(1, worker({"smtp": 5}, queued=2)),
                  scrape(2, worker({"smtp": 3}, queued=7)))
    got = master.scrape(scrape(1, worker({"smtp": 6}, queued=2)), scrape(2, None))
    assert accepted(got) == 9
    # Its gauges are not carried: a worker that does not answer has no known state.
    assert got["smarthost_queue_messages", (("status", "queued"),)] == 2
    # The workers' own gauges are as before.
    assert got["smarthost_workers_scrape_failed", ()] == 1
    assert got["smarthost_workers", (("state", "not_answering"),)] == 1
    got = master.scrape(scrape(1, worker({"smtp": 6}, queued=2)),
                        scrape(2, worker({"smtp": 4}, queued=7)))
    assert accepted(got) == 10
    assert got["smarthost_queue_messages", (("status", "queued"),)] == 9


def test_a_worker_down_then_back_in_its_place() -> None:
    """Down (being restarted: the master does not ask it), then its index answers again
    from a new process."""
    master = Master()
    master.scrape(scrape(1, worker({"smtp": 5})), scrape(2, worker({"smtp": 3})))
    got = master.scrape(scrape(1, worker({"smtp": 5})))
    assert accepted(got) == 8
    assert got["smarthost_workers", (("state", "down"),)] == 1
    got = master.scrape(scrape(1, worker({"smtp": 5})),
                        scrape(2, worker({"smtp": 0}, created=2000)))
    assert accepted(got) == 8
    assert got["smarthost_workers", (("state", "running"),)] == 2
    assert accepted(master.scrape(scrape(1, worker({"smtp": 5})),
                                  scrape(2, worker({"smtp": 1}, created=2000)))) == 9


def test_labels_are_carried_apart_even_when_the_new_process_lacks_one() -> None:
    master = Master()
    master.scrape(scrape(1, worker({"smtp": 5, "submission": 2})))
    # The new process has not made the submission child yet: its 2 stay counted.
    got = master.scrape(scrape(1, worker({"smtp": 1}, created=2000)))
    assert (accepted(got), accepted(got, "submission")) == (6, 2)
    got = master.scrape(scrape(1, worker({"smtp": 1, "submission": 1}, created=2000)))
    assert (accepted(got), accepted(got, "submission")) == (6, 3)


def test_a_histogram_stays_consistent_across_a_restart() -> None:
    """Every sample of the worker moves into its offset at once: the buckets still grow
    with ``le`` and the +Inf bucket is the count, even when only some buckets fell."""
    master = Master()
    master.scrape(scrape(1, worker({"smtp": 1}, commits=(2, 2, 3))))
    got = master.scrape(scrape(1, worker({"smtp": 1}, created=2000, commits=(1, 4, 4))))
    buckets = [got["smarthost_spool_commit_seconds_bucket", (("le", le),)] for le in BUCKETS]
    assert buckets == [3, 6, 7]
    assert got["smarthost_spool_commit_seconds_count", ()] == 7
    assert abs(got["smarthost_spool_commit_seconds_sum", ()] - 0.05 * 7) < 1e-9


def test_counters_never_go_down_over_restarts_and_misses() -> None:
    master = Master()
    answers: list[tuple[list[Metric] | None, list[Metric] | None]] = [
        (worker({"smtp": 3}), worker({"smtp": 4})),
        (None, worker({"smtp": 6})),
        (worker({"smtp": 0}, created=2000), None),
        (worker({"smtp": 2}, created=2000), worker({"smtp": 1}, created=3000)),
        (worker({"smtp": 9}, created=4000), worker({"smtp": 1}, created=3000)),
    ]
    seen = [accepted(master.scrape(scrape(1, one), scrape(2, two))) for one, two in answers]
    assert seen == [7, 9, 9, 3 + 2 + 6 + 1, 3 + 2 + 9 + 6 + 1]


def test_an_answer_older_than_one_already_counted_is_no_restart() -> None:
    """Two scrapes at once (two Prometheus servers): the one started first answers last,
    with the values read first; they are not taken for a drop."""
    carry = CounterCarry()
    first, second = carry.ticket(), carry.ticket()
    masterhttp.exposition([scrape(1, worker({"smtp": 6}))], 1, carry, second)
    got = masterhttp.exposition([scrape(1, worker({"smtp": 5}, queued=4))], 1, carry, first)
    values = {(s.name, tuple(s.labels.items())): s.value
              for f in text_string_to_metric_families(got.decode()) for s in f.samples}
    assert values[ACCEPTED, (("listener", "smtp"),)] == 6
    assert values["smarthost_queue_messages", (("status", "queued"),)] == 4
    later = masterhttp.exposition([scrape(1, worker({"smtp": 7}))], 1, carry, carry.ticket())
    assert f'{ACCEPTED}{{listener="smtp"}} 7.0' in later.decode()


def test_types_and_order_survive_the_carry() -> None:
    master = Master()
    master.scrape(scrape(1, worker({"smtp": 1})))
    text = masterhttp.exposition([scrape(1, None)], 1, master.carry,
                                 master.carry.ticket()).decode()
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert types["smarthost_messages_accepted"] == "counter"
    assert types["smarthost_spool_commit_seconds"] == "histogram"
    assert types[CREATED] == "gauge"
    assert "smarthost_queue_messages" not in types  # a gauge of a worker that did not answer
    buckets = [line.split("le=")[1].split("}")[0] for line in text.splitlines()
               if line.startswith("smarthost_spool_commit_seconds_bucket")]
    assert buckets == ['"0.01"', '"0.1"', '"+Inf"']


def test_a_lower_sum_alone_is_no_restart() -> None:
    """A histogram's ``_sum`` may go down within a process (negative observations): only
    ``_total``, ``_count`` and ``_bucket`` falling, or a new ``_created``, mean a restart."""
    master = Master()
    before = worker({"smtp": 2}, commits=(1, 1, 1))
    master.scrape(scrape(1, before))
    after = worker({"smtp": 2}, commits=(1, 1, 1))
    [histogram] = [f for f in after if f.type == "histogram"]
    histogram.samples = [s._replace(value=-1.0) if s.name.endswith("_sum") else s
                         for s in histogram.samples]
    got = master.scrape(scrape(1, after))
    assert accepted(got) == 2
    assert got["smarthost_spool_commit_seconds_count", ()] == 1
    assert got["smarthost_spool_commit_seconds_sum", ()] == -1.0
