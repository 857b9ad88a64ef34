"""The other end of the API: one request to a VM's socket, with short timeouts (never blocks
`pyvmm ls` on a VM that does not answer), and the VMs of this user found in the runtime directory."""

from __future__ import annotations

import glob
import http.client
import json
import os
import socket
import stat

from ..config.api import SOCKET_SUFFIX, runtime_dir, vm_name_of

TIMEOUT = 2.0       # seconds to connect and for each read of an answer
LS_TIMEOUT = 0.5    # for each VM `pyvmm ls` asks
MAX_ANSWER = 1 << 20


class VmNotRunning(Exception):
    """Nothing listens on the socket (the VM ended; its stale socket file, if any, was removed)."""


class VmNotAnswering(Exception):
    """Something listens but gave no (whole, valid) answer in time."""


class ApiError(Exception):
    """The VM answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("vm", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def call(path: str, method: str, target: str, body=None, *, timeout: float = TIMEOUT,
         remove_stale: bool = True) -> dict:
    """The JSON answer of `method target` at the socket `path`.  VmNotRunning (a stale socket is
    removed when remove_stale), VmNotAnswering, or ApiError for an error status."""
    conn = _UnixConnection(path, timeout)
    payload = None if body is None else json.dumps(body).encode()
    headers = {"Connection": "close"}
    if payload is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, target, body=payload, headers=headers)
        answer = conn.getresponse()
        data = answer.read(MAX_ANSWER + 1)
    except (ConnectionRefusedError, FileNotFoundError):
        if remove_stale:
            remove_stale_socket(path)
        raise VmNotRunning(f"no VM answers on {path}") from None
    except (socket.timeout, TimeoutError):
        raise VmNotAnswering(f"no answer on {path} within {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as e:
        raise VmNotAnswering(f"{path}: {e}") from None
    finally:
        conn.close()
    try:
        reply = json.loads(data) if data else {}
    except ValueError:
        raise VmNotAnswering(f"{path}: the answer is not JSON") from None
    if len(data) > MAX_ANSWER or not isinstance(reply, dict):
        raise VmNotAnswering(f"{path}: not an answer of the pyvmm API")
    if answer.status >= 400:
        raise ApiError(answer.status, str(reply.get("error", f"status {answer.status}")))
    return reply


def remove_stale_socket(path: str) -> bool:
    """Remove the socket file at `path` that nobody listens on; False if it is not one."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def socket_of(name: str, directory: str | None = None) -> str:
    """The socket of VM `name` (a path when it holds a '/')."""
    if "/" in name:
        return name
    return os.path.join(directory or runtime_dir(), name + SOCKET_SUFFIX)


def list_vms(directory: str | None = None, timeout: float = LS_TIMEOUT) -> list[dict]:
    """GET /vm of every VM with a socket in the runtime directory, by name; a VM that does not
    answer is listed with state "not answering"; stale sockets are removed and not listed."""
    directory = directory or runtime_dir()
    out = []
    for path in sorted(glob.glob(os.path.join(glob.escape(directory), "*" + SOCKET_SUFFIX))):
        try:
            out.append(call(path, "GET", "/vm", timeout=timeout))
        except VmNotRunning:
            continue
        except (VmNotAnswering, ApiError) as e:
            out.append({"name": vm_name_of(path), "state": "not answering", "error": str(e), "api_socket": path})
    return out
