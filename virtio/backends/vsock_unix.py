"""The host side of virtio-vsock: Unix stream sockets, as Firecracker's "hybrid vsock" has them.

    host -> guest:  a host program connects to the socket at PATH and writes `CONNECT <port>\\n`;
                    once the guest's listener on <port> accepts, it reads `OK <host_port>\\n`
                    and the stream is the connection's (the stream is closed if the guest refuses).
    guest -> host:  a guest connecting to CID 2 (the host), port P, reaches whatever listens on
                    the Unix socket `PATH_P` (PATH, '_', P in decimal).

Every socket here is non-blocking: the device's one I/O thread serves all of them and never
waits on one.  The device hands memoryviews of guest RAM to `HostStream.send` / `recv_into`;
this module never sees a descriptor.  `HostGone` says the host end went away.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

CONNECT_LINE_MAX = 32  # "CONNECT 4294967295\n" is 19 bytes
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


class HostGone(Exception):
    """The host end of a stream is closed (EPIPE, ECONNRESET)."""


class ConnectLineError(Exception):
    """A host program did not start with `CONNECT <port>\\n`."""


class HostStream:
    """One connected, non-blocking Unix stream socket."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._line = bytearray()  # the part of a CONNECT line read so far

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, views) -> int:
        """Send what the socket takes now of `views` (a list of buffers): the bytes sent, 0 if none."""
        try:
            return self.sock.sendmsg(views)
        except BlockingIOError:
            return 0
        except OSError as err:
            if err.errno in _GONE:
                raise HostGone(os.strerror(err.errno)) from None
            raise

    def recv_into(self, views) -> int | None:
        """Read into `views` (a list of writable buffers): the bytes read, 0 at EOF, None if none is ready."""
        try:
            return self.sock.recvmsg_into(views)[0]
        except BlockingIOError:
            return None
        except OSError as err:
            if err.errno in _GONE:
                raise HostGone(os.strerror(err.errno)) from None
            raise

    def read_connect_line(self) -> int | None:
        """The port of `CONNECT <port>\\n` once the whole line came, None before; nothing after the
        line is read (it is the connection's data).  ConnectLineError if it is not that line."""
        try:
            peek = self.sock.recv(CONNECT_LINE_MAX, socket.MSG_PEEK)
        except BlockingIOError:
            return None
        except OSError as err:
            raise ConnectLineError(os.strerror(err.errno)) from None
        if not peek:
            raise ConnectLineError("closed before a CONNECT line")
        end = peek.find(b"\n")
        self._line += self.sock.recv(end + 1 if end >= 0 else len(peek))
        if end < 0:
            if len(self._line) >= CONNECT_LINE_MAX:
                raise ConnectLineError(f"no end of line in the first {CONNECT_LINE_MAX} bytes")
            return None
        return parse_connect_line(bytes(self._line))

    def shutdown_write(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # already gone: the reader saw all there was

    def close(self) -> None:
        self.sock.close()


def parse_connect_line(line: bytes) -> int:
    """`CONNECT <port>\\n` -> port (decimal, 32 bits); ConnectLineError otherwise."""
    words = line.rstrip(b"\n").split(b" ")
    if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit() or int(words[1]) > 0xFFFFFFFF:
        raise ConnectLineError(f"{line[:CONNECT_LINE_MAX]!r} is not 'CONNECT <port>\\n'")
    return int(words[1])


class UnixVsockBackend:
    """The listening socket at `path` and connections to `path`_P."""

    def __init__(self, path: str, backlog: int = 128):
        self.path = path
        _remove_stale_socket(path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.listener.bind(path)
            self.listener.listen(backlog)
            self.listener.setblocking(False)
        except OSError:
            self.listener.close()
            raise

    def fileno(self) -> int:
        return self.listener.fileno()

    def accept(self) -> HostStream | None:
        """A host program that connected, or None when none waits."""
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return None
        return HostStream(sock)

    def connect(self, port: int) -> HostStream:
        """The host's listener for guest connections to `port` (OSError: none there, or it is full)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.connect(f"{self.path}_{port}")
        except OSError:
            sock.close()
            raise
        return HostStream(sock)

    def reply_ok(self, stream: HostStream, local_port: int) -> None:
        """`OK <port>\\n` to a host program whose CONNECT the guest accepted (a fresh socket's buffer
        takes it whole; HostGone if the program left)."""
        line = f"OK {local_port}\n".encode()
        if stream.send([line]) != len(line):
            raise HostGone("the OK line did not fit the socket")

    def close(self) -> None:
        self.listener.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def _remove_stale_socket(path: str) -> None:
    """A socket at `path` that nobody listens on (left by an earlier run) is removed; one somebody
    listens on is EADDRINUSE; anything else there is left for bind to refuse."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path}: another program listens there")
