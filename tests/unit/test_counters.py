"""Per-queue device counters (virtio/counters.py): requests, bytes and errors counted on the
request path, notifications from the queue eventfd's count, interrupts as they are sent."""

import os
import time

import pytest

from tests.support.mockqueue import Buf
from tests.unit.test_rng import buffer, started
from virtio.counters import QueueCounters, totals
from vmm.memory import GuestMemory, MiB


@pytest.fixture
def mem():
    with GuestMemory(8 * MiB) as m:
        yield m


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.005)
    return predicate()


def test_totals_add_the_queues_up():
    a, b = QueueCounters(1, 2, 3, 4, 5), QueueCounters(10, 20, 30, 40, 50)
    assert totals([a, b]) == {"requests": 11, "bytes": 22, "errors": 33, "notifications": 44, "interrupts": 55}
    assert a.as_dict() == {"requests": 1, "bytes": 2, "errors": 3, "notifications": 4, "interrupts": 5}


def test_requests_bytes_errors_and_interrupts_of_a_device(mem):
    dev, mq = started(mem)
    sent = []
    dev.set_interrupt(sent.append)
    mq.add_chain([Buf(buffer(mem, mq, 64), 64, write=True)])
    mq.add_chain([Buf(buffer(mem, mq, 16), 16)])  # readable only: fails alone
    mq.add_chain([Buf(buffer(mem, mq, 100), 100, write=True)])
    dev.process_queue()
    c = dev.counter_totals()
    assert (c["requests"], c["bytes"], c["errors"]) == (3, 164, 1)
    assert c["interrupts"] == len(sent) == 1
    dev.config_changed()  # a configuration-change interrupt counts too
    assert dev.counter_totals()["interrupts"] == 2 and sent == [0, -1]
    dev.close()


def test_notifications_are_the_kicks_the_io_thread_consumed(mem):
    dev, mq = started(mem)  # DRIVER_OK: the I/O thread watches the queue's eventfd
    mq.add_chain([Buf(buffer(mem, mq, 8), 8, write=True)])
    for _ in range(3):
        os.eventfd_write(dev.queue_events[0], 1)  # what KVM does for each ioeventfd write
    assert wait_for(lambda: dev.counters[0].notifications == 3)
    assert wait_for(lambda: dev.counters[0].requests == 1)
    time.sleep(0.05)
    assert dev.counter_totals()["notifications"] == 3  # each kick counted once
    dev.close()
