"""A virtio-console driver's side, for tests: the device's queues on mock rings, control messages
in and out, buffers on ports' queues.

    drv = ConsoleDriver(mem, dev).start()                 # multiport negotiated, DRIVER_OK
    drv.control_buffers(8); drv.send(0xFFFFFFFF, DEVICE_READY, 1)
    drv.received()                                         # [ControlMessage, payload] from the device
"""

from __future__ import annotations

import os

from tests.support.mockqueue import Buf, MockSplitQueue
from virtio.console import (CONTROL_RECEIVEQ, CONTROL_TRANSMITQ, VIRTIO_CONSOLE_F_MULTIPORT, VirtioConsole,
                            receiveq)
from virtio.console_control import VIRTIO_CONSOLE_CONTROL, ControlMessage, pack_control
from virtio.device import (VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
                           VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1)
from virtio.queue import VIRTIO_F_INDIRECT_DESC

STARTED = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK
QUEUE_SIZE = 64
QUEUE_SPAN = 0x100000  # each queue's rings and data buffers (1 MiB)


class ConsoleDriver:
    def __init__(self, mem, dev: VirtioConsole, *, size: int = QUEUE_SIZE):
        self.mem, self.dev = mem, dev
        self.mq: list[MockSplitQueue] = []
        for i, q in enumerate(dev.queues):
            mq = MockSplitQueue(mem, size, base=i * QUEUE_SPAN, data_base=i * QUEUE_SPAN + 0x2000)
            q.size, q.desc_table, q.avail_ring, q.used_ring = size, mq.desc_table, mq.avail_ring, mq.used_ring
            self.mq.append(mq)
        self.threaded = dev.io_thread  # kick the device's I/O thread, else call its handlers here
        self._control_bufs: dict[int, int] = {}  # head -> gpa, of the control receiveq
        self._rx_bufs: dict[tuple[int, int], int] = {}  # (queue, head) -> gpa

    def start(self, *, multiport: bool = True) -> "ConsoleDriver":
        for q in self.dev.queues:
            q.ready = True
        self.dev.driver_features = (1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_INDIRECT_DESC
                                    | int(multiport) << VIRTIO_CONSOLE_F_MULTIPORT)
        self.dev.set_status(STARTED)
        assert self.dev.status == STARTED
        return self

    # -- control ------------------------------------------------------------------------
    def control_buffers(self, count: int, length: int = 4096) -> None:
        mq = self.mq[CONTROL_RECEIVEQ]
        for _ in range(count):
            gpa = mq.alloc(length)
            self._control_bufs[mq.add_chain([Buf(gpa, length, write=True)])] = gpa
        self.kick(CONTROL_RECEIVEQ)

    def send_raw(self, bufs: list[Buf]) -> int:
        head = self.mq[CONTROL_TRANSMITQ].add_chain(bufs)
        self.kick(CONTROL_TRANSMITQ)
        return head

    def kick(self, queue: int) -> None:
        """The driver's notification of `queue`: to the I/O thread, or the handler called here."""
        if self.threaded:
            os.eventfd_write(self.dev.queue_events[queue], 1)
        elif queue == CONTROL_RECEIVEQ:
            self.dev.flush_control()
        elif queue == CONTROL_TRANSMITQ:
            self.dev.process_control()
        else:
            port = self.dev.ports[0 if queue < 2 else queue // 2 - 1]
            (self.dev.fill if queue % 2 == 0 else self.dev.drain)(port)

    def send(self, port: int, event: int, value: int = 0) -> None:
        self.send_raw([self.buffer(pack_control(port, event, value), CONTROL_TRANSMITQ)])

    def received(self) -> list[tuple[ControlMessage, bytes]]:
        out = []
        for head, length in self.mq[CONTROL_RECEIVEQ].used_entries():
            data = self.mem.read(self._control_bufs.pop(head), length)
            out.append((ControlMessage(*VIRTIO_CONSOLE_CONTROL.unpack_from(data)), data[8:]))
        return out

    def used(self, queue: int) -> list[tuple[int, int]]:
        return self.mq[queue].used_entries()

    # -- data ---------------------------------------------------------------------------
    def buffer(self, data: bytes, queue: int) -> Buf:
        gpa = self.mq[queue].alloc(len(data))
        self.mem.write(gpa, data)
        return Buf(gpa, len(data))

    def rx_buffers(self, port: int, count: int, length: int = 4096) -> None:
        """`count` empty receive buffers on the port's receiveq (not kicked)."""
        mq = self.mq[receiveq(port)]
        for _ in range(count):
            gpa = mq.alloc(length)
            self._rx_bufs[(receiveq(port), mq.add_chain([Buf(gpa, length, write=True)]))] = gpa

    def rx_data(self, port: int) -> bytes:
        """What the device put in the port's receive buffers since the last call, in order."""
        q = receiveq(port)
        return b"".join(self.mem.read(self._rx_bufs.pop((q, head)), n) for head, n in self.used(q))

    def write(self, port: int, data: bytes) -> int:
        """The guest writes `data` on the port (one chain, not kicked); its head."""
        return self.mq[receiveq(port) + 1].add_chain([self.buffer(data, receiveq(port) + 1)])
