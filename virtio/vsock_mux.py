"""The virtio-vsock connection table: guest packets in, host stream events in, packets for the guest out.

`VsockMuxer` runs on the device's one I/O thread and owns every connection (virtio/vsock_conn.py)
and host stream (virtio/backends/vsock_unix.py).  What it does:

  * `on_guest_packet(hdr, payload)`: a checked tx packet (virtio/vsock_packet.parse_tx).  REQUEST
    to the host connects to PATH_<port>; RW goes straight from guest RAM to the host stream, what
    the stream does not take now waiting in the connection (at most its credit); SHUTDOWN, RST,
    RESPONSE, CREDIT_UPDATE / CREDIT_REQUEST as 5.10.6 says.  A packet that fits no connection,
    of another type than STREAM, an unknown op, or one that breaks the credit: RST.
  * `on_accept()` / a host stream's events (`_on_stream`): a host program's `CONNECT <port>` makes
    a REQUEST to the guest; readable data, EOF and hang-ups are noted; writable space is filled
    with what waits.
  * `next_rx(views)`: writes the next packet for the guest into an rx buffer: first the control
    packets (RESPONSE, RST, SHUTDOWN, REQUEST, CREDIT_UPDATE, in order), then data of the
    connections with host data and credit, one packet each in turn, read from the host stream
    straight into guest RAM, never more than the guest's credit allows.

A stream is watched for input only while the guest has credit for it and it is not already in
the turn of connections with data, so a guest that never reads one connection costs nothing and
stalls no other.  The control backlog is bounded: `congested()` tells the device to leave tx
packets in their ring until the guest gives rx buffers.
"""

from __future__ import annotations

import logging
import select
from collections import deque
from typing import Callable

from .backends.vsock_unix import ConnectLineError, HostGone, HostStream
from .ratelimit import RateLimitedLog
from .vsock_conn import CLOSED, CONNECTING, ESTABLISHED, Connection, CreditError
from .vsock_packet import (HDR_SIZE, VIRTIO_VSOCK_OP_CREDIT_REQUEST, VIRTIO_VSOCK_OP_CREDIT_UPDATE,
                           VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE, VIRTIO_VSOCK_OP_RST,
                           VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_F_SEND,
                           VIRTIO_VSOCK_SHUTDOWN_MASK, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST, Header,
                           limit_views, scatter, split_views)

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 1024  # connections and host programs yet to send CONNECT, together
MAX_CONTROL = 1024  # control packets waiting for rx buffers before tx packets are left in their ring
FIRST_LOCAL_PORT = 1 << 30  # host ports of host-initiated connections count from here (as Firecracker's)
EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
HANGUP = select.EPOLLHUP | select.EPOLLERR


class Watcher:
    """What the muxer needs of an I/O thread: watch an fd, calling handler(revents); change; stop."""

    add: Callable[[int, Callable[[int], None], int], None]
    modify: Callable[[int, int], None]
    remove: Callable[[int], None]


class VsockMuxer:
    def __init__(self, backend, guest_cid: int, watcher: Watcher):
        self.backend = backend
        self.guest_cid = guest_cid
        self.watcher = watcher
        self.conns: dict[tuple[int, int], Connection] = {}
        self.waiting: dict[int, HostStream] = {}  # host programs yet to send their CONNECT line, by fd
        self.control: deque[Header | Connection] = deque()  # a Connection: its CREDIT_UPDATE, made when sent
        self.reading: deque[Connection] = deque()  # connections with host data for the guest, in turn
        self._next_port = FIRST_LOCAL_PORT
        self._guest_error = RateLimitedLog(log)

    # -- what the device asks -------------------------------------------------------------
    def has_rx(self) -> bool:
        return bool(self.control or self.reading)

    def congested(self) -> bool:
        return len(self.control) >= MAX_CONTROL

    def start(self) -> None:
        self.watcher.add(self.backend.fileno(), lambda events: self.on_accept(), EPOLLIN)

    def close_all(self) -> None:
        """The device is reset, its I/O thread stopped: every connection ends (the host streams
        see EOF), no packet to the guest."""
        for conn in self.conns.values():
            conn.state = CLOSED
            conn.stream.close()
        for stream in self.waiting.values():
            stream.close()
        self.conns.clear()
        self.waiting.clear()
        self.control.clear()
        self.reading.clear()

    # -- host programs connecting ----------------------------------------------------------
    def on_accept(self) -> None:
        while (stream := self.backend.accept()) is not None:
            if len(self.conns) + len(self.waiting) >= MAX_CONNECTIONS:
                log.warning("virtio-vsock: %d connections already; a host program is turned away", MAX_CONNECTIONS)
                stream.close()
                continue
            fd = stream.fileno()
            self.waiting[fd] = stream
            self.watcher.add(fd, lambda events, s=stream: self._on_connect_line(s), EPOLLIN)

    def _on_connect_line(self, stream: HostStream) -> None:
        try:
            port = stream.read_connect_line()
        except ConnectLineError as err:
            log.info("virtio-vsock: a host program on %s: %s", self.backend.path, err)
            self._forget_waiting(stream.fileno(), stream)
            return
        if port is None:
            return
        fd = stream.fileno()
        del self.waiting[fd]
        self.watcher.remove(fd)
        conn = Connection(stream, self._local_port(), port, CONNECTING)
        self._add(conn, 0)
        self.control.append(self._header(conn, VIRTIO_VSOCK_OP_REQUEST))

    def _forget_waiting(self, fd: int, stream: HostStream) -> None:
        del self.waiting[fd]
        self.watcher.remove(fd)
        stream.close()

    def _local_port(self) -> int:
        in_use = {local for local, _ in self.conns}
        while self._next_port in in_use:
            self._next_port = (self._next_port + 1) & 0xFFFFFFFF or FIRST_LOCAL_PORT
        port = self._next_port
        self._next_port = (port + 1) & 0xFFFFFFFF or FIRST_LOCAL_PORT
        return port

    # -- the connection table ----------------------------------------------------------------
    def _add(self, conn: Connection, events: int) -> None:
        self.conns[conn.key] = conn
        conn.events = events
        self.watcher.add(conn.stream.fileno(), lambda revents: self._on_stream(conn, revents), events)

    def _drop(self, conn: Connection) -> None:
        """Forget the connection and close its host stream (no packet to the guest)."""
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        del self.conns[conn.key]
        if conn.events is not None:
            self.watcher.remove(conn.stream.fileno())
        conn.stream.close()

    def _reset(self, conn: Connection) -> None:
        """RST to the guest, and the connection is gone."""
        self.control.append(self._header(conn, VIRTIO_VSOCK_OP_RST))
        self._drop(conn)

    def _rearm(self, conn: Connection) -> None:
        """Watch the host stream for what the connection needs now."""
        if conn.state == CLOSED:
            return
        if conn.events is None:  # hung up: no event comes again; what it left goes when there is credit
            if conn.host_gone and conn.wants_host_data():
                self._start_reading(conn)
            return
        events = (EPOLLIN if conn.wants_host_data() and not conn.reading else 0) | (EPOLLOUT if conn.pending else 0)
        if events != conn.events:
            conn.events = events
            self.watcher.modify(conn.stream.fileno(), events)

    def _unwatch(self, conn: Connection) -> None:
        """A hung-up stream is reported whatever it is watched for: stop watching it at all."""
        if conn.events is not None:
            self.watcher.remove(conn.stream.fileno())
            conn.events = None

    # -- host stream events ---------------------------------------------------------------------
    def _on_stream(self, conn: Connection, revents: int) -> None:
        if conn.state == CLOSED:
            return
        if revents & HANGUP:
            self._host_hung_up(conn)
            return
        if revents & EPOLLOUT:
            self._flush(conn)
        if revents & EPOLLIN and conn.state == ESTABLISHED:
            self._start_reading(conn)
        self._rearm(conn)

    def _host_hung_up(self, conn: Connection) -> None:
        """The host end is closed: what it sent still goes to the guest, then RST (at once if it
        sent nothing more, or was already done sending)."""
        conn.host_gone = True
        conn.pending.clear()
        self._unwatch(conn)
        if conn.state == CONNECTING or conn.host_eof or conn.guest_stops_receiving():
            self._reset(conn)
        else:
            self._start_reading(conn)

    def _start_reading(self, conn: Connection) -> None:
        if not conn.reading:
            conn.reading = True
            self.reading.append(conn)

    def _flush(self, conn: Connection) -> None:
        """Send what waits for the host stream; once the guest is done sending and all went, SHUT_WR."""
        if conn.pending:
            try:
                n = conn.stream.send([conn.pending])
            except HostGone:
                self._host_hung_up(conn)
                return
            del conn.pending[:n]
            self._forwarded(conn, n)
        if not conn.pending:
            self._after_guest_shutdown(conn)

    def _forwarded(self, conn: Connection, n: int) -> None:
        conn.forwarded(n)
        if conn.credit_update_due() and not conn.credit_update_queued:
            conn.credit_update_queued = True
            self.control.append(conn)

    def _after_guest_shutdown(self, conn: Connection) -> None:
        if conn.guest_stops_sending() and not conn.host_write_shut and not conn.pending:
            conn.host_write_shut = True
            conn.stream.shutdown_write()
        if conn.done():
            self._reset(conn)  # both ways shut by the guest: the RST it waits for (5.10.6.6)

    # -- packets for the guest ---------------------------------------------------------------------
    def _header(self, conn: Connection, op: int, *, length: int = 0, flags: int = 0) -> Header:
        buf_alloc, fwd_cnt = conn.credit_fields()
        return Header(VMADDR_CID_HOST, self.guest_cid, conn.local_port, conn.peer_port, length,
                      VIRTIO_VSOCK_TYPE_STREAM, op, flags, buf_alloc, fwd_cnt)

    def _answer(self, hdr: Header, op: int) -> Header:
        """A packet back to whoever sent `hdr`, for no connection (RST to a stray packet)."""
        return Header(hdr.dst_cid, self.guest_cid, hdr.dst_port, hdr.src_port, 0, hdr.type, op, 0, 0, 0)

    def next_rx(self, views: list[memoryview], length: int) -> int | None:
        """Write the next packet for the guest into `views` (length bytes, at least HDR_SIZE): its
        size, or None when there is none to send now."""
        while self.control:
            item = self.control.popleft()
            if isinstance(item, Connection):
                item.credit_update_queued = False
                if item.state == CLOSED:
                    continue
                item = self._header(item, VIRTIO_VSOCK_OP_CREDIT_UPDATE)
            scatter(views, item.pack())
            return HDR_SIZE
        idle = []
        try:
            while self.reading:
                conn = self.reading.popleft()
                n = self._read_host(conn, views, length)
                if n is None:
                    conn.reading = False
                    idle.append(conn)
                    continue
                if conn.reading:
                    self.reading.append(conn)  # its turn again after the others'
                return n
            return None
        finally:
            for conn in idle:
                self._rearm(conn)

    def _read_host(self, conn: Connection, views: list[memoryview], length: int) -> int | None:
        """One packet of the host stream's data (or its EOF) for the guest, or None (nothing now)."""
        if conn.state != ESTABLISHED or conn.guest_stops_receiving():
            return None
        credit = conn.peer_credit()
        if credit == 0 or length <= HDR_SIZE:
            return None
        hdr_views, rest = split_views(views, HDR_SIZE)
        try:
            n = conn.stream.recv_into(limit_views(rest, min(credit, length - HDR_SIZE)))
        except HostGone:
            conn.host_gone, n = True, 0
        if n is None:
            return None
        if n == 0:  # EOF: the host sends no more; a hung-up host's connection ends
            conn.reading = False
            if conn.host_gone:
                hdr = self._header(conn, VIRTIO_VSOCK_OP_RST)
                self._drop(conn)
            else:
                conn.host_eof = True
                hdr = self._header(conn, VIRTIO_VSOCK_OP_SHUTDOWN, flags=VIRTIO_VSOCK_SHUTDOWN_F_SEND)
                self._rearm(conn)
            scatter(hdr_views, hdr.pack())
            return HDR_SIZE
        conn.sent_to_guest(n)
        scatter(hdr_views, self._header(conn, VIRTIO_VSOCK_OP_RW, length=n).pack())
        return HDR_SIZE + n

    # -- packets from the guest ----------------------------------------------------------------------
    def on_guest_packet(self, hdr: Header, payload: list[memoryview]) -> None:
        """A tx packet whose layout parse_tx checked: act on it (RST when it makes no sense)."""
        if hdr.src_cid != self.guest_cid:
            self._guest_error("virtio-vsock: a packet from CID %d, not the guest's %d: dropped", hdr.src_cid,
                              self.guest_cid)
            return
        conn = self.conns.get((hdr.dst_port, hdr.src_port))
        if hdr.dst_cid != VMADDR_CID_HOST or hdr.type != VIRTIO_VSOCK_TYPE_STREAM:
            self.refuse(hdr)
            return
        if conn is None:
            if hdr.op == VIRTIO_VSOCK_OP_REQUEST:
                self._guest_connects(hdr)
            else:
                self.refuse(hdr)
            return
        conn.update_peer(hdr)
        handler = self._OPS.get(hdr.op)
        if handler is None:
            self._guest_error("virtio-vsock: op %d on port %d: reset", hdr.op, hdr.dst_port)
            self._reset(conn)
            return
        handler(self, conn, hdr, payload)
        if conn.state != CLOSED:
            self._rearm(conn)

    def refuse(self, hdr: Header) -> None:
        """RST to a packet that fits no connection (never to an RST)."""
        if hdr.op != VIRTIO_VSOCK_OP_RST:
            self.control.append(self._answer(hdr, VIRTIO_VSOCK_OP_RST))

    def reset_for(self, hdr: Header) -> None:
        """A malformed packet (parse_tx's PacketError) from the guest: its connection, if any, is reset."""
        conn = self.conns.get((hdr.dst_port, hdr.src_port)) if hdr.src_cid == self.guest_cid else None
        if conn is not None:
            self._reset(conn)
        elif hdr.src_cid == self.guest_cid:
            self.refuse(hdr)

    def _guest_connects(self, hdr: Header) -> None:
        if len(self.conns) + len(self.waiting) >= MAX_CONNECTIONS:
            self.refuse(hdr)
            return
        try:
            stream = self.backend.connect(hdr.dst_port)
        except OSError as err:
            log.debug("virtio-vsock: guest port %d -> host port %d: %s", hdr.src_port, hdr.dst_port, err)
            self.refuse(hdr)
            return
        conn = Connection(stream, hdr.dst_port, hdr.src_port, ESTABLISHED)
        conn.update_peer(hdr)
        self._add(conn, 0)
        self.control.append(self._header(conn, VIRTIO_VSOCK_OP_RESPONSE))
        self._rearm(conn)

    def _on_request(self, conn: Connection, hdr: Header, payload) -> None:
        self._reset(conn)  # a second REQUEST for a connection that exists

    def _on_response(self, conn: Connection, hdr: Header, payload) -> None:
        if conn.state != CONNECTING:
            self._reset(conn)
            return
        try:
            self.backend.reply_ok(conn.stream, conn.local_port)
        except (HostGone, OSError):
            self._reset(conn)
            return
        conn.state = ESTABLISHED

    def _on_rst(self, conn: Connection, hdr: Header, payload) -> None:
        self._drop(conn)

    def _on_shutdown(self, conn: Connection, hdr: Header, payload) -> None:
        conn.peer_shutdown |= hdr.flags & VIRTIO_VSOCK_SHUTDOWN_MASK
        self._after_guest_shutdown(conn)

    def _on_rw(self, conn: Connection, hdr: Header, payload: list[memoryview]) -> None:
        if conn.state != ESTABLISHED or conn.guest_stops_sending():
            self._reset(conn)
            return
        try:
            conn.received(hdr.len)
        except CreditError as err:
            self._guest_error("virtio-vsock: port %d: the guest sent %s: reset", conn.local_port, err)
            self._reset(conn)
            return
        if conn.host_gone:
            self._forwarded(conn, hdr.len)  # nowhere to go: dropped, and the guest is reset soon
            return
        if not hdr.len:
            return
        sent = 0
        if not conn.pending:
            try:
                sent = conn.stream.send(payload)
            except HostGone:
                self._host_hung_up(conn)
                return
        if sent < hdr.len:
            _, rest = split_views(payload, sent)
            for view in rest:
                conn.pending += view
        self._forwarded(conn, sent)

    def _on_credit_update(self, conn: Connection, hdr: Header, payload) -> None:
        pass  # update_peer took the counters; _rearm watches the stream if there is credit now

    def _on_credit_request(self, conn: Connection, hdr: Header, payload) -> None:
        if not conn.credit_update_queued:
            conn.credit_update_queued = True
            self.control.append(conn)

    _OPS = {
        VIRTIO_VSOCK_OP_REQUEST: _on_request,
        VIRTIO_VSOCK_OP_RESPONSE: _on_response,
        VIRTIO_VSOCK_OP_RST: _on_rst,
        VIRTIO_VSOCK_OP_SHUTDOWN: _on_shutdown,
        VIRTIO_VSOCK_OP_RW: _on_rw,
        VIRTIO_VSOCK_OP_CREDIT_UPDATE: _on_credit_update,
        VIRTIO_VSOCK_OP_CREDIT_REQUEST: _on_credit_request,
    }
