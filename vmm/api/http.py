"""HTTP/1.1 requests read from bytes that may come in any pieces, and responses written as bytes.

Every byte comes from a client we do not trust: the request line, each header line, the number
of headers and the body have limits, and anything outside them or outside the grammar (RFC 9112:
`METHOD SP target SP HTTP/1.x CRLF`, `name: value CRLF` headers, an empty line, a body of exactly
Content-Length bytes) raises an HttpError that names the 4xx (or 505) status to answer with.  After
such an error the connection is closed: where the next request would start is not known.
Transfer-Encoding (chunked bodies) is not taken (501): our clients send Content-Length."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

MAX_REQUEST_LINE = 2048    # bytes, CRLF excluded
MAX_HEADER_LINE = 4096
MAX_HEADERS = 32
MAX_HEAD = 16384           # request line and headers together
MAX_BODY = 65536

METHOD = re.compile(rb"[A-Z]{1,16}")
TARGET = re.compile(rb"/[\x21-\x7e]*")  # origin-form: a path (and query) of visible ASCII
HEADER_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
HEADER_VALUE = re.compile(rb"[\t\x20-\x7e]*")
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")

REASONS = {200: "OK", 202: "Accepted", 204: "No Content", 400: "Bad Request", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict", 411: "Length Required",
           413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class HttpError(Exception):
    """A request we answer with `status` and a JSON error, then close the connection."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Request:
    method: str
    target: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)  # names lower-case
    body: bytes = b""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return connection == "keep-alive"
        return connection != "close"

    def json(self):
        """The body as JSON (None if empty); HttpError 400 if it is not JSON, 415 if it says it is not."""
        if not self.body:
            return None
        kind = self.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if kind not in ("application/json", "application/x-www-form-urlencoded"):  # (curl -d's default)
            raise HttpError(415, f"the body must be JSON, not {kind}")
        try:
            return json.loads(self.body)
        except (UnicodeDecodeError, ValueError) as e:
            raise HttpError(400, f"the body is not JSON: {e}") from None


class RequestReader:
    """Feed it bytes as they arrive; it returns the requests they complete."""

    def __init__(self):
        self._buf = bytearray()
        self._head: Request | None = None  # a request whose body is still coming
        self._body_left = 0

    @property
    def pending(self) -> int:
        """Bytes held for a request not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Request]:
        self._buf += data
        out = []
        while True:
            if self._head is None:
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    self._check_partial_head()
                    return out
                if end + 4 > MAX_HEAD:
                    raise HttpError(431, f"request head longer than {MAX_HEAD} bytes")
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                self._head, self._body_left = parse_head(head)
            if len(self._buf) < self._body_left:
                return out
            request, self._head = self._head, None
            request.body = bytes(self._buf[: self._body_left])
            del self._buf[: self._body_left]
            self._body_left = 0
            out.append(request)

    def _check_partial_head(self) -> None:
        """Refuse a head that is already too long before it ends, so nothing grows without bound."""
        buf = self._buf
        first = buf.find(b"\r\n")
        if first < 0:
            if len(buf) > MAX_REQUEST_LINE + 1:
                raise HttpError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
            return
        if len(buf) > MAX_HEAD:
            raise HttpError(431, f"request head longer than {MAX_HEAD} bytes")
        last = buf.rfind(b"\r\n")
        if len(buf) - last - 2 > MAX_HEADER_LINE + 1:
            raise HttpError(431, f"a header line longer than {MAX_HEADER_LINE} bytes")


def parse_head(head: bytes) -> tuple[Request, int]:
    """The request line and headers (without the final CRLF CRLF) -> (Request, body length)."""
    lines = head.split(b"\r\n")
    line = lines[0]
    if len(line) > MAX_REQUEST_LINE:
        raise HttpError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "the request line is not METHOD TARGET HTTP/1.1")
    method, target, version = parts
    if not METHOD.fullmatch(method):
        raise HttpError(400, "the method is not an upper-case token")
    if not TARGET.fullmatch(target):
        raise HttpError(400, "the target is not a path of visible ASCII starting with /")
    if version not in VERSIONS:
        if re.fullmatch(rb"HTTP/\d\.\d", version):
            raise HttpError(505, "only HTTP/1.1 and HTTP/1.0 are spoken here")
        raise HttpError(400, "the request line does not end with an HTTP version")
    headers = parse_headers(lines[1:])
    request = Request(method.decode(), target.decode(), version.decode(), headers)
    return request, body_length(headers)


def parse_headers(lines: list[bytes]) -> dict[str, str]:
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} headers")
    headers: dict[str, str] = {}
    for line in lines:
        if len(line) > MAX_HEADER_LINE:
            raise HttpError(431, f"a header line longer than {MAX_HEADER_LINE} bytes")
        name, colon, value = line.partition(b":")
        if not colon or not HEADER_NAME.fullmatch(name):  # (a line folded onto the last starts with a space)
            raise HttpError(400, "a header line is not NAME: VALUE")
        value = value.strip(b" \t")
        if not HEADER_VALUE.fullmatch(value):
            raise HttpError(400, "a header value holds a control or non-ASCII byte")
        key = name.decode().lower()
        if key in headers and key in ("content-length", "host", "content-type", "transfer-encoding"):
            raise HttpError(400, f"header {key} given twice")
        # a header given again adds to its list (RFC 9110 5.3); empty values add nothing
        headers[key] = ", ".join(v for v in (headers.get(key, ""), value.decode()) if v)
    return headers


def body_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported: send Content-Length")
    text = headers.get("content-length")
    if text is None:
        return 0
    if not text.isdigit() or len(text) > 12:
        raise HttpError(400, "Content-Length is not a number")
    length = int(text)
    if length > MAX_BODY:
        raise HttpError(413, f"a body of {length} bytes: at most {MAX_BODY}")
    return length


def response(status: int, body=None, *, keep_alive: bool = True) -> bytes:
    """A response with a JSON body (none for None); Connection: close unless keep_alive."""
    payload = b"" if body is None else (json.dumps(body, indent=1, default=str) + "\n").encode()
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}", f"Content-Length: {len(payload)}"]
    if payload:
        head.append("Content-Type: application/json")
    head.append("Connection: " + ("keep-alive" if keep_alive else "close"))
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def error_body(status: int, message: str) -> dict:
    return {"error": message, "status": status}
