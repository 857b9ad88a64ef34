"""virtio-console's socket ports (virtio/backends/port.py) with the device's own I/O thread: a Unix
socket client's bytes reach the guest only when it has the port open and buffers (backpressure:
the rest waits in the socket), the guest's output reaches the client, and clients come and go
(one at a time; the next waits in the backlog) with PORT_OPEN telling the driver."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.support.consoledriver import ConsoleDriver
from virtio.backends.port import FilePort, PortError, SocketPort
from virtio.console import VirtioConsole, receiveq
from virtio.console_control import VIRTIO_CONSOLE_DEVICE_READY, VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_PORT_READY
from vmm.memory import MiB, GuestMemory

BAD_ID = 0xFFFFFFFF


def wait_for(predicate, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture
def setup(tmp_path):
    mem = GuestMemory(32 * MiB)
    path = str(tmp_path / "data.sock")
    port = SocketPort.listen(path)
    dev = VirtioConsole(mem, named=[("data", port)], queue_size=64)
    drv = ConsoleDriver(mem, dev).start()
    yield mem, dev, drv, path
    dev.close()
    mem.close()
    assert not os.path.exists(path)


def opens(drv, expected):
    """Wait for the PORT_OPEN messages `expected` (values) about port 1, in order."""
    got = []

    def seen():
        got.extend(m.value for m, _ in drv.received() if m.event == VIRTIO_CONSOLE_PORT_OPEN)
        return len(got) >= len(expected)

    wait_for(seen, f"PORT_OPEN {expected}")
    assert got == expected


def connect(path):
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    return client


def port_ready(dev, drv):
    """The driver's handshake up to port 1's PORT_READY, its control messages taken."""
    drv.control_buffers(32)
    drv.send(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)
    drv.send(1, VIRTIO_CONSOLE_PORT_READY, 1)
    wait_for(lambda: dev.ports[1].ready, "PORT_READY handled")
    drv.received()


def test_socket_port_backpressure_output_and_reconnects(setup):
    mem, dev, drv, path = setup
    port_ready(dev, drv)

    first = connect(path)
    opens(drv, [1])
    data = os.urandom(100_000)
    first.sendall(data)  # the guest has not opened the port: it waits in the socket
    drv.rx_buffers(1, 8)
    drv.kick(receiveq(1))
    time.sleep(0.2)
    assert drv.used(receiveq(1)) == []

    drv.send(1, VIRTIO_CONSOLE_PORT_OPEN, 1)  # opened: as much as its 8 buffers hold, no more
    wait_for(lambda: drv.mq[receiveq(1)].used_idx == 8, "8 buffers filled")
    time.sleep(0.1)
    got = drv.rx_data(1)
    assert got == data[:len(got)] and len(got) == 8 * 4096
    while len(got) < len(data):
        drv.rx_buffers(1, 8)
        drv.kick(receiveq(1))
        wait_for(lambda: drv.mq[receiveq(1)].used_idx != drv.mq[receiveq(1)].last_used, "more input")
        got += drv.rx_data(1)
    assert got == data

    out = os.urandom(50_000)
    drv.write(1, out[:30_000])
    drv.write(1, out[30_000:])
    drv.kick(receiveq(1) + 1)
    received = b""
    while len(received) < len(out):
        received += first.recv(65536)
    assert received == out

    second = connect(path)  # waits in the backlog while the first is connected
    first.close()
    opens(drv, [0, 1])  # the first left, the second was taken
    drv.write(1, b"to the second")
    drv.kick(receiveq(1) + 1)
    assert second.recv(100) == b"to the second"
    second.close()
    opens(drv, [0])


def test_guest_output_waits_for_a_client(setup):
    mem, dev, drv, path = setup
    drv.control_buffers(8)
    drv.send(BAD_ID, VIRTIO_CONSOLE_DEVICE_READY, 1)
    drv.send(1, VIRTIO_CONSOLE_PORT_READY, 1)
    drv.write(1, b"kept for the client")
    drv.kick(receiveq(1) + 1)
    time.sleep(0.2)
    assert drv.used(receiveq(1) + 1) == []  # held in the ring, nothing lost
    client = connect(path)
    assert client.recv(100) == b"kept for the client"
    client.close()


def test_listen_and_open_errors(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(PortError):
        SocketPort.listen(str(regular))  # not a socket: left alone
    assert regular.read_text() == "x"
    with pytest.raises(PortError):
        FilePort.open(str(tmp_path / "no" / "such"))
    live = SocketPort.listen(str(tmp_path / "s.sock"))
    with pytest.raises(PortError, match="in use"):
        SocketPort.listen(str(tmp_path / "s.sock"))  # another VM's: left alone
    live.listener.close()  # as a crashed run leaves it: replaced
    SocketPort.listen(str(tmp_path / "s.sock")).close()


def test_file_port_appends(tmp_path):
    path = tmp_path / "out.log"
    path.write_bytes(b"old\n")
    port = FilePort.open(str(path))
    assert port.write([memoryview(b"new "), memoryview(b"line\n")]) == 9
    port.close()
    assert path.read_bytes() == b"old\nnew line\n"


def test_a_client_that_hangs_up_is_let_go_and_its_unread_input_kept(setup):
    mem, dev, drv, path = setup
    port_ready(dev, drv)
    idle = connect(path)
    opens(drv, [1])
    idle.close()  # nothing unread, the guest not using the port: let go at once
    opens(drv, [0])
    leaving = connect(path)
    opens(drv, [1])
    leaving.sendall(b"last words")
    leaving.close()  # its input is kept until the guest opens the port
    time.sleep(0.2)
    assert dev.ports[1].backend.connected
    drv.rx_buffers(1, 2)
    drv.send(1, VIRTIO_CONSOLE_PORT_OPEN, 1)
    opens(drv, [0])
    assert drv.rx_data(1) == b"last words"
