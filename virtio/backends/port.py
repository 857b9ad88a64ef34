"""The host side of a virtio-console port: where its bytes go and come from.

    port = SocketPort.listen("/run/vm/agent.sock")   # one client at a time; reconnects allowed
    port = FilePort.open("/var/log/vm/port.log")     # the guest's output appended; no input
    port = ConsolePort(sink)                         # the VM's console; feed() gives it input

A port knows nothing of virtio: the device hands it memoryviews of guest buffers.  The device
runs it on its I/O thread (`attach(loop, events)`, `loop` an IoThread): the port watches its own
file descriptors there and tells the device, through `events`, when input may be there
(`port_readable`), when output can go on (`port_writable`) and when a peer comes or goes
(`port_connection`).  Backpressure is the device's: it says `want_input(False)` while the guest
has no buffers (or has not opened the port), and the port then reads nothing, so what a peer
sends waits in the socket; `read_into` and `write` never block.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import threading
from typing import Callable, Protocol, Sequence

from .errors import PortError

log = logging.getLogger(__name__)

MAX_CONSOLE_INPUT = 1 << 16  # typed input kept for a guest that reads none (the rest is dropped)


class PortEvents(Protocol):
    def port_readable(self) -> None: ...
    def port_writable(self) -> None: ...
    def port_connection(self, connected: bool) -> None: ...


class Loop(Protocol):  # virtio/worker.py's IoThread
    def add_fd(self, fd: int, handler: Callable[[], None], events: int = ...) -> None: ...
    def add_eventfd(self, fd: int, handler: Callable[[], None]) -> None: ...
    def modify_fd(self, fd: int, events: int) -> None: ...
    def remove_fd(self, fd: int) -> None: ...


class PortBackend:
    """What a port does by default: always connected, takes all output, has no input."""

    connected = True

    def __init__(self):
        self._loop: Loop | None = None
        self._events: PortEvents | None = None

    def attach(self, loop: Loop, events: PortEvents) -> None:
        self._loop, self._events = loop, events

    def detach(self) -> None:
        """The I/O thread has stopped (a device reset): forget it; connections are kept."""
        self._loop = self._events = None

    def read_into(self, views: Sequence[memoryview]) -> int:
        """Fill `views` in order with what input there is; the bytes stored (0: none now)."""
        return 0

    def write(self, views: Sequence[memoryview]) -> int:
        """Send `views` in order; the bytes taken (fewer: the rest later, after port_writable)."""
        return sum(len(v) for v in views)

    def want_input(self, on: bool) -> None:
        """Whether the device can take input now (guest buffers, port open)."""

    def want_output(self, on: bool) -> None:
        """Whether the device has output waiting for port_writable."""

    def close(self) -> None:
        pass


class FilePort(PortBackend):
    """The guest's output appended to a file (no input)."""

    def __init__(self, fd: int, path: str):
        super().__init__()
        self.fd, self.path = fd, path

    @classmethod
    def open(cls, path: str) -> "FilePort":
        try:
            return cls(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644), path)
        except OSError as e:
            raise PortError(e.errno, f"cannot open {path}: {e.strerror}") from None

    def write(self, views: Sequence[memoryview]) -> int:
        total = 0
        for view in views:
            while view:
                try:
                    n = os.write(self.fd, view)
                except OSError as e:  # a full disk: the output is dropped, the guest goes on
                    log.warning("port file %s: %s; output dropped", self.path, e.strerror)
                    return sum(len(v) for v in views)
                view = view[n:]
                total += n
        return total

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ConsolePort(PortBackend):
    """The VM's console: output to a sink (vmm/console.py's OutputSink: stdout, a file); input
    that another thread `feed`s (the terminal), kept until the guest takes it."""

    def __init__(self, sink: Callable[[bytes], None]):
        super().__init__()
        self.sink = sink
        self._input = bytearray()
        self._lock = threading.Lock()
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def attach(self, loop: Loop, events: PortEvents) -> None:
        super().attach(loop, events)
        loop.add_eventfd(self._wake, events.port_readable)

    def feed(self, data: bytes) -> int:
        """Input for the guest (any thread); the bytes taken (what does not fit is not)."""
        with self._lock:
            taken = min(len(data), max(MAX_CONSOLE_INPUT - len(self._input), 0))
            self._input += data[:taken]
        os.eventfd_write(self._wake, 1)
        return taken

    def read_into(self, views: Sequence[memoryview]) -> int:
        with self._lock:
            total = 0
            for view in views:
                n = min(len(view), len(self._input) - total)
                if n <= 0:
                    break
                view[:n] = self._input[total:total + n]
                total += n
            del self._input[:total]
            return total

    def write(self, views: Sequence[memoryview]) -> int:
        data = b"".join(views)
        self.sink(data)
        return len(data)

    def close(self) -> None:
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1


def _listened_on(path: str) -> bool:
    """Whether a process listens on the Unix socket `path` (a connection is tried, and closed)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except BlockingIOError:  # its backlog is full: it is there
        return True
    except OSError:  # ECONNREFUSED: a socket file nobody listens on
        return False
    finally:
        probe.close()
    return True


class SocketPort(PortBackend):
    """A Unix socket PATH that pyvmm listens on: one client at a time, who gets the guest's output
    and whose input goes to the guest.  Others wait in the listen backlog until the client leaves
    (the listener is not watched meanwhile).  The client's EOF, or an error, ends its connection;
    a client that hangs up while the device wants nothing is let go at once, unless it left input
    unread: that is read first, once the guest takes input again (nothing lost)."""

    def __init__(self, listener: socket.socket, path: str):
        super().__init__()
        self.listener, self.path = listener, path
        self.client: socket.socket | None = None
        self._wants = 0  # EPOLLIN / EPOLLOUT the device asked for
        self._watched = False  # the client's fd is in the loop's epoll
        self._parked = False  # the client hung up, leaving input: not watched until it is wanted

    @classmethod
    def listen(cls, path: str) -> "SocketPort":
        """Bind and listen on `path`; a socket left there by an earlier run (no one listening) is
        replaced, one in use is an error."""
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                if _listened_on(path):
                    raise PortError(errno.EADDRINUSE, f"socket {path} is in use: another process listens on it")
                os.unlink(path)
        except FileNotFoundError:
            pass
        except PortError:
            raise
        except OSError as e:
            raise PortError(e.errno, f"socket {path}: {e.strerror}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.bind(path)
            sock.listen(4)
        except OSError as e:
            sock.close()
            raise PortError(e.errno, f"cannot listen on {path}: {e.strerror}") from None
        return cls(sock, path)

    @property
    def connected(self) -> bool:
        return self.client is not None

    def attach(self, loop: Loop, events: PortEvents) -> None:
        super().attach(loop, events)
        loop.add_fd(self.listener.fileno(), self._accept, 0 if self.client else select.EPOLLIN)
        self._watched = False
        self._watch()

    def detach(self) -> None:
        self._wants, self._watched, self._parked = 0, False, False  # (the loop's epoll is gone with its thread)
        super().detach()

    def _watch(self) -> None:
        """Watch the client for what the device wants (for nothing but a hang-up when it wants
        nothing), unless it is parked and the device wants no input."""
        if self.client is None or self._loop is None:
            return
        fd = self.client.fileno()
        watch = not self._parked or bool(self._wants & select.EPOLLIN)
        if watch and not self._watched:
            self._loop.add_fd(fd, self._on_client, self._wants)
        elif watch:
            self._loop.modify_fd(fd, self._wants)
        elif self._watched:
            self._loop.remove_fd(fd)
        self._watched = watch

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        client.setblocking(False)
        self.client = client
        self._loop.modify_fd(self.listener.fileno(), 0)  # the next client waits for this one to leave
        self._watched = self._parked = False
        self._watch()
        self._events.port_connection(True)

    def _drop(self) -> None:
        client, self.client = self.client, None
        if self._loop is not None:
            if self._watched:
                self._loop.remove_fd(client.fileno())
            self._loop.modify_fd(self.listener.fileno(), select.EPOLLIN)
        self._watched = self._parked = False
        client.close()
        if self._events is not None:
            self._events.port_connection(False)

    def _on_client(self) -> None:
        if self._wants & select.EPOLLIN:
            self._events.port_readable()
        if self.client is not None and self._wants & select.EPOLLOUT:
            self._events.port_writable()
        if self.client is not None and not self._wants:
            self._hung_up()

    def _hung_up(self) -> None:
        """Woken while wanting nothing: the client hung up (or failed).  Let it go, unless it left
        input the guest has not taken: then park it (unwatched) until input is wanted."""
        try:
            unread = self.client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # a spurious wake-up
        except OSError:
            unread = b""
        if not unread:
            self._drop()
            return
        self._parked = True
        self._watch()

    def _want(self, bit: int, on: bool) -> None:
        wants = self._wants | bit if on else self._wants & ~bit
        if wants != self._wants:
            self._wants = wants
            self._watch()

    def want_input(self, on: bool) -> None:
        self._want(select.EPOLLIN, on)

    def want_output(self, on: bool) -> None:
        self._want(select.EPOLLOUT, on)

    def read_into(self, views: Sequence[memoryview]) -> int:
        if self.client is None or not views:
            return 0
        try:
            n = self.client.recvmsg_into(views)[0]
        except BlockingIOError:
            return 0
        except OSError as e:
            log.info("port socket %s: client lost: %s", self.path, e.strerror)
            n = 0
        if n == 0:  # EOF: the client is done
            self._drop()
        return n

    def write(self, views: Sequence[memoryview]) -> int:
        if self.client is None:
            return 0
        try:
            return self.client.sendmsg(views)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.info("port socket %s: %s", self.path, e.strerror)
            self._drop()
            return 0

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.listener.fileno() >= 0:
            self.listener.close()
            try:
                os.unlink(self.path)
            except OSError:
                pass
