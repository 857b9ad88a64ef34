"""SIGTERM's graceful stop (vmm/shutdown.py): ask the guest, stop hard at the deadline."""

from __future__ import annotations

import pytest

from vmm.shutdown import GracefulStop


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Harness:
    def __init__(self, timeout: float, guest_hears: bool = True) -> None:
        self.clock = Clock()
        self.requests = 0
        self.stops: list[str] = []
        self.guest_hears = guest_hears
        self.stop = GracefulStop(timeout, request=self.request, stop=self.stops.append, clock=self.clock)

    def request(self) -> bool:
        self.requests += 1
        return self.guest_hears


def test_timeout_0_stops_at_once_without_asking_the_guest():
    h = Harness(0)
    h.stop.on_sigterm()
    assert h.stops == ["stopped by SIGTERM"] and h.requests == 0
    assert h.stop.poll_timeout() is None and not h.stop.timed_out


def test_the_guest_is_asked_and_nothing_stops_before_the_deadline():
    h = Harness(30)
    assert h.stop.poll_timeout() is None  # nothing armed before SIGTERM
    h.stop.on_sigterm()
    assert h.requests == 1 and h.stops == []
    assert h.stop.poll_timeout() == 30
    h.clock.now += 29.5
    h.stop.check()
    assert h.stops == [] and h.stop.poll_timeout() == pytest.approx(0.5)


def test_past_the_deadline_the_vm_is_stopped_hard_once():
    h = Harness(2.5)
    h.stop.on_sigterm()
    h.clock.now += 2.5
    assert h.stop.poll_timeout() == 0
    h.stop.check()
    h.stop.check()
    assert h.stops == ["the guest did not power off within 2.5 s of SIGTERM: stopped"]
    assert h.stop.timed_out
    h.clock.now += 10
    assert h.stop.poll_timeout() == 0  # never negative


def test_a_second_sigterm_stops_at_once():
    h = Harness(30)
    h.stop.on_sigterm()
    h.clock.now += 1
    h.stop.on_sigterm()
    assert h.requests == 1 and h.stops == ["stopped by SIGTERM again while the guest was shutting down"]
    assert not h.stop.timed_out


def test_a_guest_that_cannot_hear_the_button_is_stopped_at_once():
    h = Harness(30, guest_hears=False)
    h.stop.on_sigterm()
    assert h.requests == 1 and h.stops == ["stopped by SIGTERM (the guest has no power button)"]
    assert h.stop.poll_timeout() is None
