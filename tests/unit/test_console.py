"""virtio-console (virtio/console.py): the control protocol, hostile control and data chains,
backpressure, emergency write; on mock rings, the device's handlers called as its I/O thread would."""

from __future__ import annotations

import pytest

from tests.support.consoledriver import ConsoleDriver
from tests.support.mockqueue import Buf
from virtio.backends.port import ConsolePort, PortBackend
from virtio.console import (CONTROL_RECEIVEQ, CONTROL_TRANSMITQ, EMERG_WR_OFFSET, VIRTIO_CONSOLE_CONFIG,
                            VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT, VIRTIO_CONSOLE_F_SIZE,
                            VirtioConsole, receiveq)
from virtio.console_control import (VIRTIO_CONSOLE_CONSOLE_PORT, VIRTIO_CONSOLE_DEVICE_ADD,
                                    VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_NAME, VIRTIO_CONSOLE_PORT_OPEN,
                                    VIRTIO_CONSOLE_PORT_READY, VIRTIO_CONSOLE_RESIZE, ControlError, pack_control,
                                    parse_control)
from virtio.device import VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_ID_CONSOLE
from vmm.memory import MiB, GuestMemory

BAD_ID = 0xFFFFFFFF


class FakePort(PortBackend):
    """A port's host side that keeps what it is sent, takes at most `room` bytes, and has `input`."""

    def __init__(self, *, connected=True, room=None):
        super().__init__()
        self.connected, self.room = connected, room
        self.sent = bytearray()
        self.input = bytearray()
        self.wants_input = self.wants_output = False
        self.most_views = 0

    def write(self, views):
        self.most_views = max(self.most_views, len(views))
        data = b"".join(views)
        n = len(data) if self.room is None else min(self.room, len(data))
        self.sent += data[:n]
        if self.room is not None:
            self.room -= n
        return n

    def read_into(self, views):
        total = 0
        for view in views:
            n = min(len(view), len(self.input) - total)
            view[:n] = self.input[total:total + n]
            total += n
        del self.input[:total]
        return total

    def want_input(self, on):
        self.wants_input = on

    def want_output(self, on):
        self.wants_output = on


@pytest.fixture
def mem():
    with GuestMemory(32 * MiB) as m:
        yield m


def make(mem, *, console=True, named=("data",)):
    sink = bytearray()
    cons = ConsolePort(sink.extend) if console else None
    ports = [(name, FakePort()) for name in named]
    dev = VirtioConsole(mem, console=cons, named=ports, queue_size=64, io_thread=False)
    return dev, sink, [p for _, p in ports]


def ready(mem, **kw):
    """A started device whose driver has said DEVICE_READY and PORT_READY for every port."""
    dev, sink, ports = make(mem, **kw)
    drv = ConsoleDriver(mem, dev).start()
    drv.control_buffers(16)
    drv.send(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)
    for port in dev.ports:
        if port is not None:
            drv.send(port.id, VIRTIO_CONSOLE_PORT_READY, 1)
    drv.received()
    return dev, drv, sink, ports


def test_control_wire_format():
    assert pack_control(3, VIRTIO_CONSOLE_PORT_NAME, 1, b"abc") == b"\x03\0\0\0\x07\0\x01\0abc"
    msg = parse_control(pack_control(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1))
    assert (msg.id, msg.event, msg.value) == (BAD_ID, 0, 1)
    for data in (b"", b"\0" * 7, b"\0" * 9):
        with pytest.raises(ControlError):
            parse_control(data)


def test_identity_features_and_config(mem):
    dev, _, _ = make(mem, named=("a", "b"))
    assert dev.device_id == VIRTIO_ID_CONSOLE == 3
    assert dev.device_features >> VIRTIO_CONSOLE_F_MULTIPORT & 1
    assert dev.device_features >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1
    assert not dev.device_features >> VIRTIO_CONSOLE_F_SIZE & 1
    assert len(dev.queues) == 2 * (3 + 1)  # ports 0..2, and the control pair
    assert VIRTIO_CONSOLE_CONFIG.unpack(dev.config_bytes()) == (0, 0, 3, 0)
    assert dev.read_config(4, 4) == 3
    assert [receiveq(p) for p in range(3)] == [0, 4, 6]


def test_handshake_adds_names_and_opens_ports(mem):
    dev, sink, ports = make(mem, named=("data", "log"))
    ports[1].connected = False  # a socket without a client
    drv = ConsoleDriver(mem, dev).start()
    drv.control_buffers(16)
    drv.send(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)
    assert [(m.id, m.event) for m, _ in drv.received()] == [(p, VIRTIO_CONSOLE_DEVICE_ADD) for p in (0, 1, 2)]
    drv.send(0, VIRTIO_CONSOLE_PORT_READY, 1)
    assert [(m.id, m.event, m.value) for m, _ in drv.received()] == [
        (0, VIRTIO_CONSOLE_CONSOLE_PORT, 1), (0, VIRTIO_CONSOLE_PORT_OPEN, 1)]
    drv.send(1, VIRTIO_CONSOLE_PORT_READY, 1)
    got = drv.received()
    assert [(m.id, m.event, payload) for m, payload in got] == [
        (1, VIRTIO_CONSOLE_PORT_NAME, b"data"), (1, VIRTIO_CONSOLE_PORT_OPEN, b"")]
    drv.send(2, VIRTIO_CONSOLE_PORT_READY, 1)
    assert [(m.id, m.event, payload) for m, payload in drv.received()] == [(2, VIRTIO_CONSOLE_PORT_NAME, b"log")]
    # the client comes and goes: the driver is told each time
    dev.host_connection(dev.ports[2], True)
    dev.host_connection(dev.ports[2], False)
    assert [(m.id, m.event, m.value) for m, _ in drv.received()] == [
        (2, VIRTIO_CONSOLE_PORT_OPEN, 1), (2, VIRTIO_CONSOLE_PORT_OPEN, 0)]
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_messages_wait_for_control_buffers(mem):
    dev, _, _ = make(mem)
    drv = ConsoleDriver(mem, dev).start()
    drv.send(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)
    assert drv.received() == []
    drv.control_buffers(1)
    assert [m.id for m, _ in drv.received()] == [0]
    drv.control_buffers(4)
    assert [m.id for m, _ in drv.received()] == [1]


def test_hostile_control_messages_change_nothing(mem):
    dev, drv, _, _ = ready(mem, console=False)
    before = [(p.added, p.ready, p.guest_open) for p in dev.ports if p is not None]
    tx = CONTROL_TRANSMITQ
    drv.send_raw([drv.buffer(b"\1\0\0\0", tx)])  # short
    drv.send_raw([drv.buffer(pack_control(1, VIRTIO_CONSOLE_PORT_OPEN, 1) + b"xxxx", tx)])  # long
    drv.send_raw([drv.buffer(b"\0" * 100, tx)])  # very long
    for port in (0, 2, 99, BAD_ID):  # port 0 not added (no console), the rest do not exist
        drv.send(port, VIRTIO_CONSOLE_PORT_OPEN, 1)
        drv.send(port, VIRTIO_CONSOLE_PORT_READY, 1)
    drv.send(1, VIRTIO_CONSOLE_DEVICE_ADD, 1)  # the device's message, from the driver
    drv.send(1, 77, 1)  # no such event
    drv.send(1, VIRTIO_CONSOLE_RESIZE, 0)  # ignored politely
    drv.send(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)  # again
    # a control message in a device-writable buffer (the wrong way)
    gpa = drv.mq[tx].alloc(8)
    mem.write(gpa, pack_control(1, VIRTIO_CONSOLE_PORT_OPEN, 1))
    drv.send_raw([Buf(gpa, 8, write=True)])
    # outside guest RAM
    drv.send_raw([Buf(64 * MiB, 8)])
    assert drv.received() == []
    assert [(p.added, p.ready, p.guest_open) for p in dev.ports if p is not None] == before
    assert all(length == 0 for _, length in drv.used(tx))
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_short_control_buffer_is_returned_and_the_message_kept(mem):
    dev, _, _ = make(mem, console=False)
    drv = ConsoleDriver(mem, dev).start()
    drv.control_buffers(1, length=4)
    drv.send(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)
    assert drv.used(CONTROL_RECEIVEQ)[0][1] == 0
    drv._control_bufs.clear()
    drv.control_buffers(1)
    assert [(m.id, m.event) for m, _ in drv.received()] == [(1, VIRTIO_CONSOLE_DEVICE_ADD)]


def test_broken_control_ring_needs_reset(mem):
    dev, drv, _, _ = ready(mem)
    drv.mq[CONTROL_TRANSMITQ].publish_avail(drv.mq[CONTROL_TRANSMITQ].avail_idx + 1000)
    dev.process_control()
    assert dev.status & VIRTIO_CONFIG_S_NEEDS_RESET
    dev.process_control()  # the queue is not served again until the reset


def test_input_waits_until_the_guest_opens_the_port(mem):
    dev, drv, _, (port,) = ready(mem)
    port.input += b"x" * 10000
    drv.rx_buffers(1, 4)
    dev.fill(dev.ports[1])
    assert drv.used(receiveq(1)) == [] and len(port.input) == 10000 and not port.wants_input
    drv.send(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    assert drv.rx_data(1) == b"x" * 10000  # over three 4 KiB buffers, the third in part
    assert port.wants_input  # a buffer left: more input is welcome
    port.input += b"y" * 5000
    dev.fill(dev.ports[1])
    assert drv.rx_data(1) == b"y" * 4096 and port.input == b"y" * 904
    assert not port.wants_input  # no buffer left: the port reads nothing more (backpressure)
    drv.rx_buffers(1, 1)
    dev.fill(dev.ports[1])
    assert drv.rx_data(1) == b"y" * 904
    drv.send(1, VIRTIO_CONSOLE_PORT_OPEN, 0)
    port.input += b"z"
    dev.fill(dev.ports[1])
    assert drv.rx_data(1) == b"" and not port.wants_input


def test_output_to_the_port_resumes_where_it_stopped(mem):
    dev, drv, _, (port,) = ready(mem)
    port.room = 3000
    heads = [drv.write(1, bytes([65 + i]) * 2000) for i in range(3)]
    dev.drain(dev.ports[1])
    assert port.sent == b"A" * 2000 + b"B" * 1000 and port.wants_output
    assert drv.used(receiveq(1) + 1) == [(heads[0], 0)]
    port.room = None
    dev.drain(dev.ports[1])
    assert port.sent == b"A" * 2000 + b"B" * 2000 + b"C" * 2000 and not port.wants_output
    assert drv.used(receiveq(1) + 1) == [(heads[1], 0), (heads[2], 0)]


def test_data_chains_going_the_wrong_way_are_returned_unused(mem):
    dev, drv, _, (port,) = ready(mem)
    drv.send(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    rxq, txq = receiveq(1), receiveq(1) + 1
    # a receive chain the device may only read, one with no buffer at all, one outside RAM
    bad = [drv.mq[rxq].add_chain([drv.buffer(b"r" * 16, rxq)]),
           drv.mq[rxq].add_chain([Buf(drv.mq[rxq].alloc(8), 0, write=True)]),
           drv.mq[rxq].add_chain([Buf(1 << 40, 4096, write=True)])]
    port.input += b"hello"
    drv.rx_buffers(1, 1)
    dev.fill(dev.ports[1])
    entries = drv.mq[rxq].used_entries()
    assert entries[:3] == [(h, 0) for h in bad] and entries[3][1] == 5
    # a transmit chain with a device-writable buffer: not sent
    head = drv.mq[txq].add_chain([drv.buffer(b"secret", txq), Buf(drv.mq[txq].alloc(16), 16, write=True)])
    drv.write(1, b"ok")
    dev.drain(dev.ports[1])
    assert port.sent == b"ok" and drv.used(txq)[0] == (head, 0)
    assert not dev.status & VIRTIO_CONFIG_S_NEEDS_RESET


def test_console_port_output_input_and_emergency_write(mem):
    dev, drv, sink, _ = ready(mem)
    drv.write(0, b"login: ")
    dev.drain(dev.ports[0])
    assert bytes(sink) == b"login: "
    dev.write_config(EMERG_WR_OFFSET, 4, ord("!"))
    assert bytes(sink) == b"login: !"
    drv.send(0, VIRTIO_CONSOLE_PORT_OPEN, 1)
    dev.ports[0].backend.feed(b"ls\r")
    drv.rx_buffers(0, 2)
    dev.fill(dev.ports[0])
    assert drv.rx_data(0) == b"ls\r"


def test_without_multiport_port_0_is_the_console(mem):
    dev, sink, _ = make(mem)
    drv = ConsoleDriver(mem, dev).start(multiport=False)
    drv.write(0, b"early")
    dev.drain(dev.ports[0])
    assert bytes(sink) == b"early"


def test_reset_forgets_the_driver(mem):
    dev, drv, _, (port,) = ready(mem)
    drv.send(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    dev.set_status(0)
    assert not any(p.added or p.ready or p.guest_open for p in dev.ports if p is not None)
    assert dev.control_rx.pending == type(dev.control_rx.pending)()


def test_chains_of_more_buffers_than_one_system_call_takes(mem):
    dev, drv, _, (port,) = ready(mem)
    drv.send(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    rxq, txq = receiveq(1), receiveq(1) + 1
    many = drv.mq[rxq].add_indirect_chain([Buf(drv.mq[rxq].alloc(1), 1, write=True) for _ in range(1100)])
    port.input += b"abc"
    dev.fill(dev.ports[1])
    assert drv.used(rxq) == [(many, 0)] and port.input == b"abc"  # returned, nothing read into it
    out = bytes(i % 251 for i in range(1100))
    head = drv.mq[txq].add_indirect_chain([drv.buffer(out[i:i + 1], txq) for i in range(1100)])
    dev.drain(dev.ports[1])
    assert port.sent == out and drv.used(txq) == [(head, 0)]
    assert port.most_views == 1024  # what one sendmsg takes
