"""The node's ops HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, `/status`.

Plain HTTP/1.1 on purpose: its clients are the kubelet's probes and Prometheus
on the pod network, neither of which holds a gcks certificate, and nothing it
serves is secret (ids, indexes, counters; never keys, not even fingerprints
unless the node puts them in its status). Bind it to a pod or loopback
address, not to a public interface. Everything that changes the cluster is on
the mTLS admin API, never here.

Two layers, as in h11: a sans-IO core (`RequestParser` turns bytes into a
`Request` or raises `HttpError`; `OpsApplication` turns a `Request` into a
`Response`; `render_metrics` writes the Prometheus text exposition format
0.0.4) and a thin trio driver (`serve_ops`) with one task per connection, a
read deadline (a slow client cannot hold a connection open: slowloris), a
write deadline, `Connection: close` after each response and a bounded number
of concurrent connections (the accept loop waits for a free slot, so excess
clients queue in the kernel's backlog instead of in memory). Only GET and HEAD
exist; a request with a body is refused. Bad requests get 400, 404, 405, 414,
431 or 505 and a log line, never a crash.

The node supplies an `OpsSource` (`ready()`, `metrics()`, `status()`); a
source that raises gives a 500 and a logged traceback, never a dead server.
May import trio and the standard library; must never import the node's
internals (it sees only `OpsSource`), never log request bodies or headers
beyond the request line.
"""

from __future__ import annotations

import enum
import errno
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Final, NoReturn, Protocol

import trio

__all__ = [
    "HttpError",
    "MetricFamily",
    "MetricType",
    "OpsApplication",
    "OpsServerConfig",
    "OpsSource",
    "Request",
    "RequestParser",
    "Response",
    "Sample",
    "error_response",
    "readiness",
    "render_metrics",
    "serve_ops",
]

log = logging.getLogger(__name__)

MAX_REQUEST_LINE: Final = 2048
MAX_HEADER_BYTES: Final = 8192  # the header section after the request line
MAX_HEADERS: Final = 32
METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_RECEIVE_CHUNK: Final = 4096
_DRAIN_BYTES: Final = 64 * 1024  # read at most this much after answering, to close cleanly
_METHODS: Final = frozenset({"GET", "HEAD"})
_TOKEN_RE: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET_RE: Final = re.compile(rb"/[\x21-\x7e]*")
_VERSION_RE: Final = re.compile(rb"HTTP/(\d)\.(\d)")
# Field values: visible ASCII, obs-text, space and tab; never CR, LF or NUL.
_FIELD_VALUE_RE: Final = re.compile(rb"[\x20-\x7e\x80-\xff\t]*")
_METRIC_NAME_RE: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME_RE: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_REASONS: Final[Mapping[int, str]] = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


# -- sans-IO: requests -----------------------------------------------------------


class HttpError(Exception):
    """The client sent a request this server refuses; `status` is the answer to give."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed request head. `path` excludes the query; header names are lower case."""

    method: str
    path: str
    query: str
    version: tuple[int, int]
    headers: tuple[tuple[str, str], ...]


class RequestParser:
    """Feed bytes as they arrive; `feed` returns the `Request` once its head is
    complete (None before), or raises `HttpError`. One request per parser: the
    server closes the connection after answering, so pipelining does not exist."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._line_checked = False

    @property
    def received(self) -> int:
        """Bytes fed so far (to tell an idle connection from a stalled request)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Request | None:
        self._buffer += data
        buffer = self._buffer
        line_end = buffer.find(b"\n")
        if line_end < 0:
            if len(buffer) > MAX_REQUEST_LINE:
                raise HttpError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
            return None
        if line_end > MAX_REQUEST_LINE:
            raise HttpError(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
        request_line = _strip_cr(bytes(buffer[:line_end]))
        if not self._line_checked:
            # Check the request line as soon as it is complete, so garbage and
            # wrong methods are answered at once rather than after a deadline.
            _parse_request_line(request_line)
            self._line_checked = True
        head_end = _find_blank_line(buffer, line_end)
        if head_end < 0:
            if len(buffer) - line_end - 1 > MAX_HEADER_BYTES:
                raise HttpError(431, f"header section longer than {MAX_HEADER_BYTES} bytes")
            return None
        header_block = bytes(buffer[line_end + 1 : head_end])
        if len(header_block) > MAX_HEADER_BYTES:
            raise HttpError(431, f"header section longer than {MAX_HEADER_BYTES} bytes")
        method, path, query, version = _parse_request_line(request_line)
        headers = _parse_headers(header_block)
        _check_no_body(headers)
        if version >= (1, 1) and not any(name == "host" for name, _ in headers):
            raise HttpError(400, "HTTP/1.1 request without a Host header")
        return Request(method, path, query, version, headers)


def _strip_cr(line: bytes) -> bytes:
    return line[:-1] if line.endswith(b"\r") else line


def _find_blank_line(buffer: bytearray, line_end: int) -> int:
    """Index where the header section ends (the start of its terminating blank
    line's LF run), or -1. Accepts CRLF and bare LF line ends (RFC 9112 §2.2)."""
    candidates = [
        index + 1 for index in (buffer.find(b"\n\r\n", line_end), buffer.find(b"\n\n", line_end))
    ]
    found = [index for index in candidates if index > 0]
    return min(found) if found else -1


def _parse_request_line(line: bytes) -> tuple[str, str, str, tuple[int, int]]:
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version_text = parts
    if not _TOKEN_RE.fullmatch(method):
        raise HttpError(400, "malformed method")
    version_match = _VERSION_RE.fullmatch(version_text)
    if version_match is None:
        raise HttpError(400, "malformed HTTP version")
    version = (int(version_match[1]), int(version_match[2]))
    if version[0] != 1:
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    if not _TARGET_RE.fullmatch(target):
        raise HttpError(400, "request target must be an absolute path")
    if method.decode("ascii") not in _METHODS:
        raise HttpError(405, "only GET and HEAD are allowed")
    path, _, query = target.decode("ascii").partition("?")
    return method.decode("ascii"), path, query, version


def _parse_headers(block: bytes) -> tuple[tuple[str, str], ...]:
    lines = [_strip_cr(line) for line in block.split(b"\n")]
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    headers: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete header line folding")
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise HttpError(400, "malformed header field")
        value = value.strip(b" \t")
        if not _FIELD_VALUE_RE.fullmatch(value):
            raise HttpError(400, "control character in a header value")
        headers.append((name.decode("ascii").lower(), value.decode("latin-1")))
    return tuple(headers)


def _check_no_body(headers: tuple[tuple[str, str], ...]) -> None:
    for name, value in headers:
        if name == "transfer-encoding" or (name == "content-length" and value != "0"):
            raise HttpError(400, "request bodies are not accepted")


# -- sans-IO: responses and routes -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Response:
    """A complete response; `render` makes its bytes (`head_only` for HEAD)."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, (text + "\n").encode("utf-8"), headers=headers)

    def render(self, *, head_only: bool = False, date: str | None = None) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_REASONS.get(self.status, 'Unknown')}"]
        if date is not None:
            lines.append(f"Date: {date}")
        lines += [
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "X-Content-Type-Options: nosniff",
            "Connection: close",
        ]
        lines += [f"{name}: {value}" for name, value in self.headers]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


class MetricType(enum.StrEnum):
    """Metric types this exposition writes (histograms and summaries are not used)."""

    COUNTER = "counter"
    GAUGE = "gauge"
    UNTYPED = "untyped"


@dataclass(frozen=True, slots=True)
class Sample:
    """One value of a metric family, with its labels (`{"peer": "n2"}`)."""

    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """A metric: `name` (`gcks_raft_term`; counters end in `_total`), type, help text, samples."""

    name: str
    type: MetricType
    help: str
    samples: tuple[Sample, ...]


def render_metrics(families: Iterable[MetricFamily]) -> str:
    """The Prometheus text exposition format 0.0.4 of `families`.

    Raises `ValueError` for an invalid metric or label name, a repeated family
    name or a repeated label set: a bug in the caller, answered with a 500."""
    out: list[str] = []
    names: set[str] = set()
    for family in families:
        if not _METRIC_NAME_RE.fullmatch(family.name):
            raise ValueError(f"invalid metric name {family.name[:80]!r}")
        if family.name in names:
            raise ValueError(f"metric family {family.name!r} appears twice")
        names.add(family.name)
        out.append(f"# HELP {family.name} {_escape_help(family.help)}")
        out.append(f"# TYPE {family.name} {MetricType(family.type).value}")
        label_sets: set[tuple[tuple[str, str], ...]] = set()
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            if labels in label_sets:
                raise ValueError(f"{family.name}: label set {dict(labels)} appears twice")
            label_sets.add(labels)
            out.append(f"{family.name}{_render_labels(labels)} {_render_value(sample.value)}")
    return "".join(line + "\n" for line in out)


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _render_labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    parts: list[str] = []
    for name, value in labels:
        if not _LABEL_NAME_RE.fullmatch(name) or name.startswith("__"):
            raise ValueError(f"invalid label name {name[:80]!r}")
        if not isinstance(value, str):
            raise ValueError(f"label {name!r}: value must be a string")
        parts.append(f'{name}="{_escape_label_value(value)}"')
    return "{" + ",".join(parts) + "}"


def _render_value(value: float) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"sample value must be a number, got {type(value).__name__}")
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class OpsSource(Protocol):
    """What the node provides to the ops endpoint."""

    def ready(self) -> tuple[bool, str]:
        """(ready, reason): ready means in a cluster with a known leader, log applied."""

    def metrics(self) -> Iterable[MetricFamily]:
        """The metric families to expose now."""

    def status(self) -> Mapping[str, object]:
        """JSON-ready status (str keys; str, int, float, bool, None, lists, dicts)."""


def readiness(
    *, in_cluster: bool, leader: str | None, commit_index: int, applied_index: int
) -> tuple[bool, str]:
    """The `/readyz` rule from Raft facts, for an `OpsSource.ready` to return."""
    if not in_cluster:
        return False, "not a member of the cluster configuration"
    if leader is None:
        return False, "no known leader"
    if applied_index < commit_index:
        return False, f"applying the log: applied {applied_index} of committed {commit_index}"
    return True, f"leader {leader}, applied index {applied_index}"


class OpsApplication:
    """Routes a `Request` to the `OpsSource`; never raises for a source failure."""

    def __init__(self, source: OpsSource) -> None:
        self._source = source

    def respond(self, request: Request) -> Response:
        try:
            return self._route(request)
        except Exception:
            # A bug in the node's reporting must not take the ops endpoint down:
            # the traceback is logged and the probe sees a 500.
            log.exception("ops: %s %s failed", request.method, request.path)
            return Response.text(500, "internal error (see the node log)")

    def _route(self, request: Request) -> Response:
        if request.path == "/healthz":
            return Response.text(200, "ok")
        if request.path == "/readyz":
            ready, reason = self._source.ready()
            return Response.text(
                200 if ready else 503, ("ready: " if ready else "not ready: ") + reason
            )
        if request.path == "/metrics":
            text = render_metrics(self._source.metrics())
            return Response(200, text.encode("utf-8"), METRICS_CONTENT_TYPE)
        if request.path == "/status":
            body = json.dumps(dict(self._source.status()), allow_nan=False, indent=None)
            return Response(200, (body + "\n").encode("utf-8"), "application/json")
        return Response.text(404, "not found: try /healthz, /readyz, /metrics or /status")


def error_response(error: HttpError) -> Response:
    """The answer to a refused request."""
    headers = (("Allow", "GET, HEAD"),) if error.status == 405 else ()
    return Response.text(error.status, error.message, headers)


# -- trio driver -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpsServerConfig:
    """Deadlines and bounds of the ops listener (seconds, connections)."""

    read_timeout_s: float = 5.0  # a complete request head must arrive within this
    write_timeout_s: float = 5.0
    linger_s: float = 1.0  # after answering, wait this long for the client to close
    max_connections: int = 64
    accept_retry_s: float = 0.1  # pause after a resource error from accept (EMFILE)

    def __post_init__(self) -> None:
        for name in ("read_timeout_s", "write_timeout_s", "linger_s", "accept_retry_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0")
        if not 1 <= self.max_connections <= 100_000:
            raise ValueError("max_connections must be in [1, 100000]")


_ACCEPT_RESOURCE_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)


async def serve_ops(
    source: OpsSource,
    host: str,
    port: int,
    *,
    config: OpsServerConfig | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the ops endpoint on `host:port` until cancelled. `task_status.started`
    reports the listeners (their bound addresses, for port 0 in tests)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = _OpsServer(OpsApplication(source), config or OpsServerConfig())
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(server.accept_loop, listener, nursery)
        task_status.started(listeners)
        await trio.sleep_forever()
    raise AssertionError("unreachable: the nursery only ends by cancellation")


class _OpsServer:
    def __init__(self, application: OpsApplication, config: OpsServerConfig) -> None:
        self._application = application
        self._config = config
        self._slots = trio.Semaphore(config.max_connections)

    async def accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        async with listener:
            while True:
                # Take a slot before accepting: at the bound, clients wait in
                # the kernel's backlog, not in this process's memory.
                await self._slots.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    self._slots.release()
                    if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                        raise
                    log.warning("ops: accept failed (%s); retrying", exc.strerror)
                    await trio.sleep(self._config.accept_retry_s)
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        try:
            await self._serve_one(stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("ops: %s: connection lost (%s)", peer, exc)
        except Exception:
            # One connection's bug must not end the listener (and the node with it).
            log.exception("ops: %s: unexpected error", peer)
        finally:
            self._slots.release()
            await trio.aclose_forcefully(stream)

    async def _serve_one(self, stream: trio.SocketStream, peer: str) -> None:
        parser = RequestParser()
        request: Request | None = None
        response: Response | None = None
        with trio.move_on_after(self._config.read_timeout_s) as read_scope:
            try:
                while request is None:
                    data = await stream.receive_some(_RECEIVE_CHUNK)
                    if not data:
                        if parser.received:
                            log.info("ops: %s: closed in the middle of a request", peer)
                        return
                    request = parser.feed(data)
            except HttpError as exc:
                log.info("ops: %s: refused request: %s", peer, exc)
                response = error_response(exc)
        if read_scope.cancelled_caught:
            if not parser.received:
                return  # an idle connection (a TCP probe): nothing to say
            log.info(
                "ops: %s: no complete request within %.1f s; closing",
                peer,
                self._config.read_timeout_s,
            )
            response = Response.text(408, "request not received in time")
        head_only = False
        if request is not None:
            response = self._application.respond(request)
            head_only = request.method == "HEAD"
            if response.status >= 400:
                log.info(
                    "ops: %s: %s %s -> %d", peer, request.method, request.path, response.status
                )
            else:
                log.debug(
                    "ops: %s: %s %s -> %d", peer, request.method, request.path, response.status
                )
        assert response is not None
        payload = response.render(head_only=head_only, date=formatdate(usegmt=True))
        with trio.move_on_after(self._config.write_timeout_s) as write_scope:
            await stream.send_all(payload)
            await stream.send_eof()
        if write_scope.cancelled_caught:
            log.info(
                "ops: %s: response not taken within %.1f s", peer, self._config.write_timeout_s
            )
            return
        # Let the client read the answer and close first: closing with unread
        # input makes the kernel send RST, which can destroy the response in flight.
        with trio.move_on_after(self._config.linger_s):
            drained = 0
            while drained < _DRAIN_BYTES:
                data = await stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    break
                drained += len(data)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
