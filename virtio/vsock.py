"""virtio-vsock: sockets between the guest and host programs (OASIS virtio 1.2, section 5.10), in user space.

Three queues: rx (0, packets for the guest, in buffers it gives), tx (1, packets from the guest)
and event (2, where VIRTIO_VSOCK_EVENT_TRANSPORT_RESET goes).  The configuration space is the
guest's CID (le64 guest_cid).  No feature bit is offered: stream sockets only (SEQPACKET is
VIRTIO_VSOCK_F_SEQPACKET's, and is refused with RST).

The host side is Firecracker's hybrid vsock (virtio/backends/vsock_unix.py): Unix sockets at
PATH and PATH_<port>.  The connections are virtio/vsock_mux.py's; this module is the device:
it walks the rings and checks the guest's buffers (virtio/vsock_packet.py parses the packets).

Threads: one IoThread serves the three queues' eventfds, the listening socket and every host
stream (epoll, all non-blocking), so no connection waits on another.  Each wake-up: tx packets
are taken (unless the packets for the guest are backed up, when they wait in their ring), then
the rx buffers filled while there is something to send, then both used rings published.

On each activation but the first (the driver reset the device and started it again) the
driver gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in its next event buffer: whatever it had
connected is gone (5.10.6.7).  A device reset ends every connection (the host streams close).

Bad guest input: a tx chain with device-writable buffers, too short for the header, or whose
payload does not match its len, is dropped (and its connection reset when one is named); an rx
or event buffer that is device-readable or too small is returned unused; a ring that cannot be
walked sets NEEDS_RESET.
"""

from __future__ import annotations

import logging
import os
import struct
from functools import partial

from vmm.memory import GuestMemory
from .device import VIRTIO_ID_VSOCK, VirtioDevice
from .queue import ChainError, QueueError
from .vsock_mux import VsockMuxer, Watcher
from .vsock_packet import HDR_SIZE, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VSOCK_EVENT, PacketError, parse_tx, scatter
from .worker import IoThread

log = logging.getLogger(__name__)

RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE = 256
VIRTIO_VSOCK_CONFIG = struct.Struct("<Q")  # struct virtio_vsock_config { le64 guest_cid; }


class _ThreadWatcher(Watcher):
    """The muxer's fds on the device's IoThread (a handler gets the epoll events)."""

    def __init__(self, thread: IoThread):
        self.thread = thread

    def add(self, fd, handler, events) -> None:
        self.thread.add_fd(fd, lambda: handler(self.thread.revents), events)

    def modify(self, fd, events) -> None:
        self.thread.modify_fd(fd, events)

    def remove(self, fd) -> None:
        self.thread.remove_fd(fd)


class VirtioVsock(VirtioDevice):
    device_id = VIRTIO_ID_VSOCK
    name = "virtio-vsock"
    request_name = "packet"

    def __init__(self, mem: GuestMemory, backend, *, guest_cid: int, queue_size: int = QUEUE_SIZE):
        super().__init__(mem, num_queues=3, queue_size=queue_size, features=0)
        self.backend = backend
        self.guest_cid = guest_cid
        self.mux: VsockMuxer | None = None
        self._thread: IoThread | None = None
        self._activations = 0
        self._event_due = False

    def config_bytes(self) -> bytes:
        return VIRTIO_VSOCK_CONFIG.pack(self.guest_cid)

    # -- life cycle ------------------------------------------------------------------------
    def activate(self) -> None:
        self._event_due = self._activations > 0
        self._activations += 1
        thread = IoThread(f"vsock-{self.guest_cid}")
        self.mux = VsockMuxer(self.backend, self.guest_cid, _ThreadWatcher(thread))
        for index in range(len(self.queue_events)):  # a kick is consumed; service() then looks at every queue
            self.watch_queue(thread, index, lambda: None)
        thread.after_events = self.service  # once per wake-up, whatever woke it: one pass, one interrupt
        self.mux.start()
        self._thread = thread
        thread.start()
        for fd in self.queue_events:  # buffers the driver gave before DRIVER_OK: look at them now
            os.eventfd_write(fd, 1)

    def deactivate(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        if self.mux is not None:
            self.mux.close_all()

    def close(self) -> None:
        super().close()
        self.backend.close()

    # -- the I/O thread ------------------------------------------------------------------------
    def service(self) -> None:
        """One pass over the queues after a wake-up (queue kicks, host stream events, or both)."""
        if self._event_due:
            self._send_event()
        left = self._take_tx()
        self._fill_rx()
        if left and not self.mux.congested():  # tx packets left for want of rx buffers can go now
            self._take_tx()
            self._fill_rx()

    def _serve(self, index: int) -> bool:
        return self.queues[index].ready and not self._queue_failed[index]

    def _take_tx(self) -> bool:
        """Act on the guest's tx packets; True if some were left in the ring (the packets for the
        guest are backed up)."""
        if not self._serve(TX):
            return False
        q = self.queues[TX]
        counters = self.counters[TX]
        left = False
        try:
            for chain in q.drain(partial(self._on_chain_error, q)):
                counters.requests += 1
                try:
                    hdr, payload = parse_tx(chain.readable_views(), chain.readable_len, chain.writable_len)
                except PacketError as err:
                    self._guest_error("%s: tx packet dropped: %s", self.name, err)
                    counters.errors += 1
                    if err.hdr is not None:
                        self.mux.reset_for(err.hdr)
                else:
                    counters.bytes += hdr.len
                    self.mux.on_guest_packet(hdr, payload)
                q.add_used(chain.head, 0)  # the payload has gone or been copied: the buffers are the driver's
                if self.mux.congested():
                    left = True
                    break
        except QueueError as err:
            self.fail_queue(TX, err)
            return False
        if q.ready:
            self.publish_and_notify(TX)
        return left

    def _fill_rx(self) -> None:
        if not self._serve(RX) or not self.mux.has_rx():
            return
        q = self.queues[RX]
        counters = self.counters[RX]
        try:
            while self.mux.has_rx():
                popped = self._pop_checked(q)
                if popped is None:
                    break
                head, views, length, writable, _ = popped
                if not writable or length < HDR_SIZE:
                    self._guest_error("%s: rx buffer %d: %d %s bytes, not room for a %d-byte header", self.name,
                                      head, length, "writable" if writable else "readable", HDR_SIZE)
                    counters.errors += 1
                    q.add_used(head, 0)
                    continue
                written = self.mux.next_rx(views, length)
                if written is None:
                    q.undo_pop()
                    break
                counters.requests += 1
                counters.bytes += written - HDR_SIZE
                q.add_used(head, written)
        except QueueError as err:
            self.fail_queue(RX, err)
            return
        if q.ready:
            self.publish_and_notify(RX)

    def _send_event(self) -> None:
        """VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, when due, into the next event buffer."""
        if not self._event_due or not self._serve(EVENT):
            return
        q = self.queues[EVENT]
        try:
            while (popped := self._pop_checked(q)) is not None:
                head, views, length, writable, _ = popped
                if writable and length >= VSOCK_EVENT.size:
                    scatter(views, VSOCK_EVENT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))
                    q.add_used(head, VSOCK_EVENT.size)
                    self._event_due = False
                    break
                self._guest_error("%s: event buffer %d: %d bytes, not a writable event", self.name, head, length)
                q.add_used(head, 0)
            self.publish_and_notify(EVENT)
        except QueueError as err:
            self.fail_queue(EVENT, err)

    def _pop_checked(self, q):
        """pop_buffers(), a chain it cannot walk returned to the driver with 0 (QueueError if it cannot be)."""
        while True:
            try:
                return q.pop_buffers()
            except ChainError as err:
                self._on_chain_error(q, err)
