"""The API's Unix socket and the one thread that serves it (never a vCPU thread).

The socket is made (mode 0600) before the seccomp filter is installed; the thread accepts
clients (accept4, which the filter allows), reads requests with vmm/api/http.py, answers them
through vmm/api/routes.py, one request at a time, and closes a connection after an error in the
request, after `Connection: close`, when it stays idle IDLE_TIMEOUT seconds, or when a request
takes longer than REQUEST_TIMEOUT to arrive whole.  A client that will not read its answer holds
the thread SEND_TIMEOUT seconds at most.  Whatever a client sends, the VM goes on.

A socket file left by a VM that died is replaced; one a live VM answers on is an error."""

from __future__ import annotations

import logging
import os
import selectors
import socket
import stat
import threading
import time

from ..threadname import set_os_thread_name
from .http import HttpError, RequestReader, error_body, response

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
IDLE_TIMEOUT = 60.0     # seconds a connection may wait between requests
REQUEST_TIMEOUT = 10.0  # seconds a request may take to arrive whole, once begun
SEND_TIMEOUT = 5.0
RECV_SIZE = 65536


class ApiSocketBusy(Exception):
    """Another live process listens on the socket path."""


def socket_is_live(path: str, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on the Unix socket `path` (a refused or missing one: no)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except socket.timeout:
        return True  # its backlog is full: alive but busy
    finally:
        probe.close()
    return True


def listen(path: str) -> socket.socket:
    """A listening socket at `path` (mode 0600), replacing a stale socket file there."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ApiSocketBusy(f"{path} exists and is not a socket")
        if socket_is_live(path):
            raise ApiSocketBusy(f"a VM already listens on {path} (another --name, or --api-socket)")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(MAX_CLIENTS)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _Client:
    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.reader = RequestReader()
        self.last = time.monotonic()   # last request completed (or the connection made)
        self.begun: float | None = None  # when the request now arriving began


class ApiServer:
    def __init__(self, path: str, routes):
        self.path = path
        self.routes = routes
        self._sock = listen(path)
        self._inode = os.stat(path).st_ino
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._clients: dict[int, _Client] = {}
        self._thread: threading.Thread | None = None
        self.requests = 0  # answered, errors included

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="api", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, close every connection, remove the socket file (if still ours)."""
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(timeout=SEND_TIMEOUT + 1)
            self._thread = None
        for client in list(self._clients.values()):
            client.conn.close()
        self._clients.clear()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- the thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        set_os_thread_name("api")
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "stop")
        try:
            while True:
                for key, _ in sel.select(timeout=1.0):
                    if key.data == "stop":
                        return
                    if key.data is None:
                        self._accept(sel)
                        continue
                    try:
                        self._on_readable(sel, key.data)
                    except Exception:  # our bug with this client: drop it, serve the others
                        log.exception("api: a client's connection failed")
                        self._drop(sel, key.data)
                self._expire(sel)
        except Exception:  # a bug here must not take the VM down: the API stops, the VM goes on
            log.exception("api: the server thread failed; the API is off")
        finally:
            sel.close()

    def _accept(self, sel) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        conn.settimeout(SEND_TIMEOUT)
        if len(self._clients) >= MAX_CLIENTS:
            self._send(conn, response(503, error_body(503, "too many API clients"), keep_alive=False))
            conn.close()
            return
        client = _Client(conn)
        self._clients[conn.fileno()] = client
        sel.register(conn, selectors.EVENT_READ, client)

    def _drop(self, sel, client: _Client) -> None:
        sel.unregister(client.conn)
        self._clients.pop(client.conn.fileno(), None)
        client.conn.close()

    def _on_readable(self, sel, client: _Client) -> None:
        try:
            data = client.conn.recv(RECV_SIZE)
        except (OSError, socket.timeout):
            data = b""
        if not data:
            self._drop(sel, client)
            return
        try:
            requests = client.reader.feed(data)
        except HttpError as e:
            self._send(client.conn, response(e.status, error_body(e.status, str(e)), keep_alive=False))
            self.requests += 1
            self._drop(sel, client)
            return
        for request in requests:
            status, body = self._answer(request)
            keep = request.keep_alive and status < 400
            self.requests += 1
            if not self._send(client.conn, response(status, body, keep_alive=keep)) or not keep:
                self._drop(sel, client)
                return
        now = time.monotonic()
        if requests:
            client.last = now
            client.begun = None  # a request that is still arriving began with this read
        client.begun = (client.begun or now) if client.reader.pending else None

    def _answer(self, request) -> tuple[int, dict]:
        try:
            return self.routes.handle(request)
        except HttpError as e:
            return e.status, error_body(e.status, str(e))
        except Exception as e:  # our own bug: a 500 for this request, and the VM goes on
            log.exception("api: %s %s failed", request.method, request.path)
            return 500, error_body(500, f"internal error: {e}")

    @staticmethod
    def _send(conn: socket.socket, data: bytes) -> bool:
        try:
            conn.sendall(data)
            return True
        except (OSError, socket.timeout):
            return False

    def _expire(self, sel) -> None:
        """Close connections idle too long, and requests that take too long to arrive (408)."""
        now = time.monotonic()
        for client in list(self._clients.values()):
            if client.begun is not None and now - client.begun > REQUEST_TIMEOUT:
                self._send(client.conn, response(408, error_body(408, "the request took too long to arrive"),
                                                 keep_alive=False))
                self._drop(sel, client)
            elif client.begun is None and now - client.last > IDLE_TIMEOUT:
                self._drop(sel, client)
