"""virtio-console: a console and named ports (OASIS virtio 1.2, section 5.3), multiport.

Ports, each a pair of queues and a host side (virtio/backends/port.py):

    port 0      the VM's console (with --console-device virtio): the guest's hvc0
    port 1..N   named ports (--port name=NAME,...): the guest's /dev/vportNpM, named in
                /sys/class/virtio-ports/vportNpM/name

    queue 0, 1          port 0's receiveq and transmitq
    queue 2, 3          the control receiveq and transmitq (VIRTIO_CONSOLE_F_MULTIPORT)
    queue 2p+2, 2p+3    port p's (p >= 1)

The control protocol (5.3.6.2; virtio/console_control.py): the driver says DEVICE_READY; the
device adds its ports (DEVICE_ADD); for each the driver says PORT_READY, and the device answers
CONSOLE_PORT (port 0), PORT_NAME (named ports) and PORT_OPEN when the host side is connected (a
socket's client comes and goes: PORT_OPEN 1 / 0); the driver says PORT_OPEN when a program opens
or closes the port.  A port's input reaches the guest only while the guest has it open (Linux
drops what arrives on a closed port) and has buffers there: otherwise the port reads nothing
(backpressure).  Emergency write (VIRTIO_CONSOLE_F_EMERG_WRITE): a byte the driver writes to the
config field emerg_wr goes to the console.  VIRTIO_CONSOLE_F_SIZE is not offered; a RESIZE from
the driver is ignored.  Whatever the driver sends is checked: unknown or unadded port ids, short
or long messages, chains going the wrong way are logged (rate-limited) and returned unused; a ring
the queue cannot use sets NEEDS_RESET.

Threads: one IoThread for the device (its queues' ioeventfds and its ports' descriptors).
"""

from __future__ import annotations

import logging
import struct
from typing import Callable, Sequence

from vmm.memory import GuestMemory
from .backends.port import PortBackend
from .console_control import (VIRTIO_CONSOLE_CONSOLE_PORT, VIRTIO_CONSOLE_DEVICE_ADD, VIRTIO_CONSOLE_DEVICE_READY,
                              VIRTIO_CONSOLE_PORT_NAME, VIRTIO_CONSOLE_PORT_OPEN, VIRTIO_CONSOLE_PORT_READY,
                              VIRTIO_CONSOLE_RESIZE, ControlMessage, pack_control)
from .console_paths import ControlReceive, ControlTransmit, PortReceive, PortTransmit
from .device import VIRTIO_ID_CONSOLE, VirtioDevice
from .queue import Queue, QueueError
from .ratelimit import RateLimitedLog
from .worker import IoThread

log = logging.getLogger(__name__)

# Feature bits (5.3.3)
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# struct virtio_console_config: cols, rows, max_nr_ports, emerg_wr
VIRTIO_CONSOLE_CONFIG = struct.Struct("<HHII")
EMERG_WR_OFFSET = 8

CONTROL_RECEIVEQ, CONTROL_TRANSMITQ = 2, 3
MAX_PORTS = 31  # named ports, besides the console (Linux's default max_nr_ports is 31)


def receiveq(port: int) -> int:
    return 0 if port == 0 else 2 * port + 2


class Port:
    """One port: its host side, what the driver was told and said, and its two ring paths."""

    def __init__(self, port_id: int, backend: PortBackend, name: bytes | None, queues: Sequence[Queue],
                 on_chain_error):
        self.id, self.backend, self.name, self.console = port_id, backend, name, port_id == 0
        rx = receiveq(port_id)
        self.rx = PortReceive(queues[rx], on_chain_error, f"port {port_id} receiveq")
        self.tx = PortTransmit(queues[rx + 1], on_chain_error, f"port {port_id} transmitq")
        self.reset()

    def reset(self) -> None:
        self.added = self.ready = self.guest_open = False
        self.rx.forget()
        self.tx.forget()


class _PortEvents:
    """What a port's host side tells the device (virtio/backends/port.py's PortEvents)."""

    def __init__(self, device: "VirtioConsole", port: Port):
        self.device, self.port = device, port

    def port_readable(self) -> None:
        self.device.fill(self.port)

    def port_writable(self) -> None:
        self.device.drain(self.port)

    def port_connection(self, connected: bool) -> None:
        self.device.host_connection(self.port, connected)


class VirtioConsole(VirtioDevice):
    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(self, mem: GuestMemory, *, console: PortBackend | None = None,
                 named: Sequence[tuple[str, PortBackend]] = (), queue_size: int = 256, io_thread: bool = True):
        if len(named) > MAX_PORTS:
            raise ValueError(f"virtio-console: {len(named)} named ports, at most {MAX_PORTS}")
        self.max_nr_ports = len(named) + 1
        features = 1 << VIRTIO_CONSOLE_F_MULTIPORT | 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        super().__init__(mem, num_queues=2 * (self.max_nr_ports + 1), queue_size=queue_size, features=features)
        self.ports: list[Port | None] = [Port(0, console, None, self.queues, self._on_chain_error)
                                         if console is not None else None]
        self.ports += [Port(i, backend, name.encode(), self.queues, self._on_chain_error)
                       for i, (name, backend) in enumerate(named, 1)]
        self.control_rx = ControlReceive(self.queues[CONTROL_RECEIVEQ], self._on_chain_error)
        self.control_tx = ControlTransmit(self.queues[CONTROL_TRANSMITQ], self._on_chain_error)
        self.io_thread = io_thread
        self._thread: IoThread | None = None
        self._device_ready = False
        self._guest_error = RateLimitedLog(log)

    # -- configuration space ---------------------------------------------------------
    def config_bytes(self) -> bytes:
        return VIRTIO_CONSOLE_CONFIG.pack(0, 0, self.max_nr_ports, 0)

    def write_config(self, offset: int, size: int, value: int) -> None:
        """emerg_wr: one character for the console, whether or not the driver set anything up."""
        if offset == EMERG_WR_OFFSET and self.ports[0] is not None:
            self.ports[0].backend.write([memoryview(bytes([value & 0xFF]))])
        else:
            super().write_config(offset, size, value)

    # -- threads -----------------------------------------------------------------------
    def _live_ports(self) -> list[Port]:
        return [p for p in self.ports if p is not None]

    def activate(self) -> None:
        self._device_ready = False
        for port in self._live_ports():
            port.reset()
        if not self.has_feature(VIRTIO_CONSOLE_F_MULTIPORT) and self.ports[0] is not None:
            port = self.ports[0]  # one port, the console, with no control queue to say so
            port.added = port.ready = port.guest_open = True
        if self.io_thread:
            self._start_thread()

    def _start_thread(self) -> None:
        thread = IoThread(self.name)
        self.watch_queue(thread, CONTROL_RECEIVEQ, self.flush_control)
        self.watch_queue(thread, CONTROL_TRANSMITQ, self.process_control)
        for port in self._live_ports():
            self.watch_queue(thread, receiveq(port.id), lambda port=port: self.fill(port))
            self.watch_queue(thread, receiveq(port.id) + 1, lambda port=port: self.drain(port))
            port.backend.attach(thread, _PortEvents(self, port))
        self._thread = thread
        thread.start()

    def deactivate(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()  # joins: no port is being served after this
        for port in self._live_ports():
            port.backend.detach()
            port.reset()
        self.control_rx.forget()

    def close(self) -> None:
        super().close()
        for port in self._live_ports():
            port.backend.close()

    # -- serving a queue ------------------------------------------------------------------
    def _serve(self, index: int, work: Callable[[], object]) -> None:
        """Run `work` on queue `index`; publish what it used (bad chains returned on the way
        included) and notify."""
        queue = self.queues[index]
        if self._queue_failed[index] or not self.active:
            return
        try:
            before = queue.next_used
            work()
            if queue.next_used != before:
                self.counters[index].requests += (queue.next_used - before) & 0xFFFF
                self.publish_and_notify(index)
        except QueueError as err:
            self.fail_queue(index, err)

    def fill(self, port: Port) -> None:
        """Port input into the guest's buffers, while the guest has the port open."""
        backend = port.backend
        if not port.guest_open:
            backend.want_input(False)
            return
        starved = True

        counters = self.counters[receiveq(port.id)]

        def read_into(views) -> int:
            n = backend.read_into(views)
            counters.bytes += max(n, 0)
            return n

        def work() -> None:
            nonlocal starved
            starved = port.rx.fill(read_into)[1]

        self._serve(receiveq(port.id), work)
        backend.want_input(not starved and not self._queue_failed[receiveq(port.id)])

    def drain(self, port: Port) -> None:
        """The guest's output to the port, as far as the port takes it."""
        backend = port.backend
        blocked = False

        counters = self.counters[receiveq(port.id) + 1]

        def write(views) -> int:
            n = backend.write(views)
            counters.bytes += max(n, 0)
            return n

        def work() -> None:
            nonlocal blocked
            blocked = port.tx.drain(write)[1]

        self._serve(receiveq(port.id) + 1, work)
        backend.want_output(blocked)

    def host_connection(self, port: Port, connected: bool) -> None:
        """A socket's client came or went: tell the driver, and move what waited for it."""
        if port.ready:
            self.send_control(port.id, VIRTIO_CONSOLE_PORT_OPEN, int(connected))
        if connected:
            self.drain(port)
            self.fill(port)

    # -- the control queues -----------------------------------------------------------------
    def send_control(self, port_id: int, event: int, value: int = 0, payload: bytes = b"") -> None:
        self.control_rx.send(pack_control(port_id, event, value, payload))
        self.flush_control()

    def flush_control(self) -> None:
        self._serve(CONTROL_RECEIVEQ, self.control_rx.flush)

    def process_control(self) -> None:
        """The driver's control messages, each acted on once its chain is returned."""
        messages: list[ControlMessage] = []
        self._serve(CONTROL_TRANSMITQ, lambda: messages.extend(self.control_tx.messages()))
        for message in messages:
            self.on_control(message)

    def on_control(self, msg: ControlMessage) -> None:
        if msg.event == VIRTIO_CONSOLE_DEVICE_READY:
            self._on_device_ready(msg)
        elif msg.event == VIRTIO_CONSOLE_RESIZE:
            log.debug("%s: %s ignored (VIRTIO_CONSOLE_F_SIZE is not offered)", self.name, msg)
        elif msg.event in (VIRTIO_CONSOLE_PORT_READY, VIRTIO_CONSOLE_PORT_OPEN):
            port = self.ports[msg.id] if msg.id < len(self.ports) else None
            if port is None or not port.added:
                self._guest_error("%s: %s: no such port", self.name, msg)
            elif msg.event == VIRTIO_CONSOLE_PORT_READY:
                self._on_port_ready(port, msg)
            else:
                self._on_port_open(port, bool(msg.value))
        else:
            self._guest_error("%s: %s is not a message the driver sends; ignored", self.name, msg)

    def _on_device_ready(self, msg: ControlMessage) -> None:
        if msg.value != 1:
            log.warning("%s: the driver could not set the device up (DEVICE_READY 0)", self.name)
            return
        if self._device_ready:
            self._guest_error("%s: DEVICE_READY again; ignored", self.name)
            return
        self._device_ready = True
        for port in self._live_ports():
            port.added = True
            self.send_control(port.id, VIRTIO_CONSOLE_DEVICE_ADD, 1)

    def _on_port_ready(self, port: Port, msg: ControlMessage) -> None:
        if msg.value != 1:
            log.warning("%s: the driver could not set port %d up", self.name, port.id)
            return
        port.ready = True
        if port.console:
            self.send_control(port.id, VIRTIO_CONSOLE_CONSOLE_PORT, 1)
        if port.name:
            self.send_control(port.id, VIRTIO_CONSOLE_PORT_NAME, 1, port.name)
        if port.backend.connected:
            self.send_control(port.id, VIRTIO_CONSOLE_PORT_OPEN, 1)

    def _on_port_open(self, port: Port, is_open: bool) -> None:
        port.guest_open = is_open
        if is_open:
            self.fill(port)
            self.drain(port)
        else:
            port.backend.want_input(False)
