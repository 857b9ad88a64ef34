"""Fuzz target: the management API's request parser (vmm/api/http.py) and routes (vmm/api/routes.py),
fed what a client may send over the API socket, in pieces of any size.

    python -m tests.fuzz.fuzz_api_http [libFuzzer flags] [tests/fuzz/corpus/fuzz_api_http]

Asserts:
  * the parser raises nothing but HttpError, with a 4xx status or 501/505;
  * every request it returns is in the grammar: an upper-case method, an origin-form target of
    visible ASCII, HTTP/1.1 or 1.0, at most MAX_HEADERS headers, a body of exactly its
    Content-Length and at most MAX_BODY bytes;
  * it never holds more than a head and a body's worth of bytes;
  * the same bytes in one piece or in the fuzzer's pieces give the same requests;
  * written out again, a request parses back to itself;
  * each request, routed to a fake VM, gets a status the server knows and a JSON body.
"""

from __future__ import annotations

import json

import atheris

from tests.fuzz import harness
from tests.fuzz.harness import check

with harness.instrumented():
    from vmm.api import http
    from vmm.api.http import HttpError, RequestReader
    from vmm.api.routes import Routes

# Requests a fuzzer mutates toward: the endpoints, their methods, a body.
FRAGMENTS = (b"GET /vm HTTP/1.1\r\n", b"PUT /vm/balloon HTTP/1.1\r\n", b"PUT /vm/pause HTTP/1.1\r\n",
             b"Content-Length: 16\r\n", b"Connection: close\r\n", b"\r\n", b'{"target": 4096}',
             b"Transfer-Encoding: chunked\r\n", b"Content-Type: application/json\r\n")


class _Vm:
    """What the routes use of a Machine, doing nothing."""

    def __init__(self):
        from vmm.config import VmConfig

        self.config = VmConfig(program="/guest", name="fuzz")
        self.state = "running"
        self.pci = type("Pci", (), {"devices": []})()
        self.threads = []
        self.balloon = object()

    def uptime(self):
        return 1.0

    def paused_time(self):
        return 0.0

    def pause(self):
        from vmm.machine import VmStateError

        if self.state != "running":
            raise VmStateError("not running")
        self.state = "paused"

    def resume(self):
        from vmm.machine import VmStateError

        if self.state != "paused":
            raise VmStateError("not paused")
        self.state = "running"

    def request_shutdown(self):
        pass

    def request_reboot(self):
        pass

    def kill(self):
        self.state = "stopping"

    def set_balloon_target(self, size):
        if size > self.config.mem_size:
            raise ValueError("too big")

    def balloon_info(self):
        return {"target": 0}


def _parse(pieces: list[bytes]):
    """(requests, HttpError or None, bytes held) for the pieces fed in order."""
    reader = RequestReader()
    requests = []
    biggest = max((len(p) for p in pieces), default=0)
    try:
        for piece in pieces:
            requests += reader.feed(piece)
            check(reader.pending <= http.MAX_HEAD + http.MAX_BODY + biggest, f"{reader.pending} bytes held")
    except HttpError as e:
        check(400 <= e.status < 500 or e.status in (501, 505), f"status {e.status}")
        return requests, e, reader.pending
    return requests, None, reader.pending


def _check_request(req) -> None:
    check(http.METHOD.fullmatch(req.method.encode()) is not None, f"method {req.method!r}")
    check(http.TARGET.fullmatch(req.target.encode()) is not None, f"target {req.target!r}")
    check(req.version in ("HTTP/1.1", "HTTP/1.0"), f"version {req.version!r}")
    check(len(req.headers) <= http.MAX_HEADERS, "too many headers")
    check(len(req.body) <= http.MAX_BODY, "body too long")
    check(len(req.body) == int(req.headers.get("content-length", "0")), "body is not Content-Length bytes")


def _write(req) -> bytes:
    head = [f"{req.method} {req.target} {req.version}"] + [f"{k}: {v}" for k, v in req.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + req.body


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    pieces: list[bytes] = []
    while fdp.remaining_bytes() and len(pieces) < 64:
        if fdp.ConsumeIntInRange(0, 3) == 0:
            pieces.append(FRAGMENTS[fdp.ConsumeIntInRange(0, len(FRAGMENTS) - 1)])
        else:
            pieces.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 256)))
    requests, error, pending = _parse(pieces)
    whole, whole_error, whole_pending = _parse([b"".join(pieces)])
    if error is None and whole_error is None:
        check([vars(r) for r in requests] == [vars(r) for r in whole] and pending == whole_pending,
              "pieces and the whole differ")
    vm = _Vm()
    routes = Routes(lambda: vm, name="fuzz")
    for req in requests:
        _check_request(req)
        [again] = RequestReader().feed(_write(req))
        check(vars(again) == vars(req), "a request written out does not parse back to itself")
        try:
            status, body = routes.handle(req)
        except HttpError as e:
            status, body = e.status, http.error_body(e.status, str(e))
        check(status in http.REASONS, f"status {status}")
        json.dumps(body)


if __name__ == "__main__":
    harness.main(one_input)
