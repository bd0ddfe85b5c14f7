"""The failed-host memory in virtual time: how long a host is remembered (the first retry
interval, at most a minute), its place in a route, suspension by host set, and flush."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from smarthost.delivery.hostcache import MAX_HOLD, HostCache
from smarthost.delivery.recording import RetryPolicy
from smarthost.delivery.routing import Host, HostFailure

A = Host("a.test", "192.0.2.1", 25)
B = Host("b.test", "192.0.2.2", 25)
C = Host("c.test", "192.0.2.3", 25)


def refused(host: Host) -> HostFailure:
    return HostFailure(host, f"connection refused by {host}", "4.4.1")


class HoldTests(SynchronousTestCase):
    def test_the_first_retry_interval_is_the_hold(self) -> None:
        clock = Clock()
        hosts = HostCache(clock, first_retry=RetryPolicy(delays=(1, 1, 2)).delay(1))
        hosts.failed(refused(A), since=clock.seconds())
        self.assertEqual(hosts.order([A, B]), (B, A))
        self.assertEqual(hosts.suspended([A]), refused(A))
        clock.advance(0.999)
        self.assertTrue(hosts.remembered(A))
        clock.advance(0.001)  # the second attempt of [1, 1, 2] tries it again
        self.assertFalse(hosts.remembered(A))
        self.assertEqual(hosts.order([A, B]), (A, B))
        self.assertIsNone(hosts.suspended([A]))

    def test_the_default_schedule_holds_a_minute(self) -> None:
        clock = Clock()
        hosts = HostCache(clock, first_retry=RetryPolicy().delay(1))
        self.assertEqual(hosts.hold, 60)
        hosts.failed(refused(A), since=clock.seconds())
        clock.advance(59)
        self.assertIsNotNone(hosts.suspended([A]))
        clock.advance(1)
        self.assertIsNone(hosts.suspended([A]))

    def test_never_more_than_a_minute(self) -> None:
        self.assertEqual(HostCache(Clock(), first_retry=3600).hold, MAX_HOLD)
        self.assertEqual(MAX_HOLD, 60)

    def test_a_new_failure_starts_the_hold_again(self) -> None:
        clock = Clock()
        hosts = HostCache(clock, first_retry=10)
        hosts.failed(refused(A), since=clock.seconds())
        clock.advance(8)
        hosts.failed(refused(A), since=clock.seconds())
        clock.advance(8)
        self.assertTrue(hosts.remembered(A))
        clock.advance(2)
        self.assertFalse(hosts.remembered(A))

    def test_the_hold_counts_from_the_start_of_the_attempt(self) -> None:
        clock = Clock()
        hosts = HostCache(clock, first_retry=1)
        clock.advance(0.5)  # DNS and a slow refusal took half a second
        hosts.failed(refused(A), since=0)
        clock.advance(0.5)  # the message's second attempt tries the host again
        self.assertFalse(hosts.remembered(A))

    def test_expired_failures_do_not_hide_live_ones(self) -> None:
        clock = Clock()
        hosts = HostCache(clock, first_retry=10)
        hosts.failed(refused(A), since=clock.seconds())
        clock.advance(10)
        hosts.failed(refused(B), since=clock.seconds())  # drops A's expired entry on the way
        self.assertEqual(hosts.order([A, B, C]), (A, C, B))


class OrderTests(SynchronousTestCase):
    def test_remembered_hosts_go_last_in_their_order(self) -> None:
        hosts = HostCache(Clock(), first_retry=60)
        hosts.failed(refused(C), since=0)
        hosts.failed(refused(A), since=0)
        self.assertEqual(hosts.order([A, B, C]), (B, A, C))

    def test_all_remembered_keeps_order_and_drops_nothing(self) -> None:
        hosts = HostCache(Clock(), first_retry=60)
        for host in (A, B, C):
            hosts.failed(refused(host), since=0)
        self.assertEqual(hosts.order([A, B, C]), (A, B, C))

    def test_a_host_is_its_address_and_port(self) -> None:
        hosts = HostCache(Clock(), first_retry=60)
        hosts.failed(refused(A), since=0)
        self.assertTrue(hosts.remembered(Host("other-name.test", A.address, 25)))
        self.assertFalse(hosts.remembered(Host(A.name, A.address, 587)))


class SuspensionTests(SynchronousTestCase):
    def test_a_route_all_of_whose_hosts_failed_is_suspended_in_any_order(self) -> None:
        hosts = HostCache(Clock(), first_retry=60)
        hosts.failed(refused(A), since=0)
        hosts.failed(refused(B), since=0)
        self.assertEqual(hosts.suspended([A, B]), refused(B))  # the latest failure says why
        self.assertEqual(hosts.suspended([B, A]), refused(B))

    def test_one_host_not_remembered_is_enough_to_try(self) -> None:
        hosts = HostCache(Clock(), first_retry=60)
        hosts.failed(refused(A), since=0)
        self.assertIsNone(hosts.suspended([A, B]))
        self.assertIsNone(hosts.suspended([B]))

    def test_a_route_without_hosts_is_never_suspended(self) -> None:
        self.assertIsNone(HostCache(Clock(), first_retry=60).suspended([]))

    def test_flush_forgets_everything(self) -> None:
        hosts = HostCache(Clock(), first_retry=60)
        hosts.failed(refused(A), since=0)
        hosts.forget_all()
        self.assertIsNone(hosts.suspended([A]))
        self.assertEqual(hosts.order([A, B]), (A, B))
