"""Ops HTTP endpoint: strict request parsing, Prometheus exposition, and the trio
server over real loopback sockets (deadlines under MockClock)."""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from gcks.cluster.ops import (
    MAX_HEADER_BYTES,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    HttpError,
    MetricFamily,
    MetricType,
    OpsServerConfig,
    RequestParser,
    Sample,
    readiness,
    render_metrics,
    serve_ops,
)

# -- request parser ----------------------------------------------------------------


def _parse(data: bytes) -> object:
    return RequestParser().feed(data)


def _status_of(data: bytes) -> int:
    with pytest.raises(HttpError) as caught:
        RequestParser().feed(data)
    return caught.value.status


def test_get_request_parsed_with_query_split_off_and_lowercase_headers() -> None:
    request = RequestParser().feed(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n")
    assert request is not None
    assert (request.method, request.path, request.query) == ("GET", "/metrics", "x=1")
    assert request.version == (1, 1)
    assert request.headers == (("host", "a"), ("accept", "*/*"))


def test_request_fed_byte_by_byte_completes_only_at_blank_line() -> None:
    data = b"HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n"
    parser = RequestParser()
    results = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(result is None for result in results[:-1])
    assert results[-1] is not None


def test_bare_lf_line_ends_accepted() -> None:
    assert _parse(b"GET / HTTP/1.1\nHost: a\n\n") is not None


def test_http10_request_needs_no_host_header() -> None:
    assert _parse(b"GET / HTTP/1.0\r\n\r\n") is not None


def test_http11_request_without_host_is_400() -> None:
    assert _status_of(b"GET / HTTP/1.1\r\n\r\n") == 400


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"])
def test_methods_other_than_get_and_head_are_405_at_the_request_line(method: bytes) -> None:
    # Refused as soon as the request line is complete, before any header arrives.
    assert _status_of(method + b" /status HTTP/1.1\r\n") == 405


def test_request_line_longer_than_limit_is_414_before_its_end_arrives() -> None:
    assert _status_of(b"GET /" + b"a" * MAX_REQUEST_LINE) == 414


def test_header_section_larger_than_limit_is_431() -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * MAX_HEADER_BYTES
    assert _status_of(data) == 431


def test_more_headers_than_limit_is_431() -> None:
    headers = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1))
    assert _status_of(b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n") == 431


@pytest.mark.parametrize(
    "header", [b"Content-Length: 5", b"Transfer-Encoding: chunked", b"content-length: 1"]
)
def test_request_with_a_body_is_refused(header: bytes) -> None:
    assert _status_of(b"GET / HTTP/1.1\r\nHost: a\r\n" + header + b"\r\n\r\n") == 400


def test_content_length_zero_is_not_a_body() -> None:
    assert _parse(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n") is not None


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", 400),  # a TLS ClientHello
        (b"GET /\r\n", 400),
        (b"GET  / HTTP/1.1\r\n", 400),
        (b"GET http://x/ HTTP/1.1\r\n", 400),
        (b"GET / HTTP/2.0\r\n", 505),
        (b"GET / FTP/1.1\r\n", 400),
        (b"G\x00T / HTTP/1.1\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_typed_errors(data: bytes, status: int) -> None:
    assert _status_of(data) == status


@given(st.lists(st.binary(max_size=600), max_size=8))
def test_arbitrary_bytes_give_a_request_none_or_http_error(chunks: list[bytes]) -> None:
    parser = RequestParser()
    status = 0
    try:
        for chunk in chunks:
            if parser.feed(chunk) is not None:
                break
    except HttpError as exc:
        status = exc.status
    assert status in {0, 400, 405, 414, 431, 505}


# -- Prometheus exposition -----------------------------------------------------------


def test_exposition_writes_help_type_and_samples_in_text_format_004() -> None:
    text = render_metrics(
        [
            MetricFamily("gcks_raft_term", MetricType.GAUGE, "Current term.", (Sample(7),)),
            MetricFamily(
                "gcks_rekeys_sent_total",
                MetricType.COUNTER,
                "Rekey messages sent.",
                (Sample(3, {"group": "demo"}), Sample(0.5, {"group": "b", "a": "x"})),
            ),
        ]
    )
    assert text == (
        "# HELP gcks_raft_term Current term.\n"
        "# TYPE gcks_raft_term gauge\n"
        "gcks_raft_term 7\n"
        "# HELP gcks_rekeys_sent_total Rekey messages sent.\n"
        "# TYPE gcks_rekeys_sent_total counter\n"
        'gcks_rekeys_sent_total{group="demo"} 3\n'
        'gcks_rekeys_sent_total{a="x",group="b"} 0.5\n'
    )


def test_exposition_escapes_label_values_backslash_quote_newline() -> None:
    family = MetricFamily("m", MetricType.GAUGE, "h", (Sample(1, {"peer": 'a\\b"c\nd'}),))
    assert 'm{peer="a\\\\b\\"c\\nd"} 1\n' in render_metrics([family])


def test_exposition_escapes_help_backslash_and_newline_but_not_quotes() -> None:
    family = MetricFamily("m", MetricType.UNTYPED, 'line1\nsaid "x" \\ y', ())
    assert render_metrics([family]).splitlines()[0] == '# HELP m line1\\nsaid "x" \\\\ y'


@pytest.mark.parametrize(
    ("value", "text"),
    [(math.nan, "NaN"), (math.inf, "+Inf"), (-math.inf, "-Inf"), (12, "12"), (1.25, "1.25")],
)
def test_exposition_value_formats(value: float, text: str) -> None:
    family = MetricFamily("m", MetricType.GAUGE, "h", (Sample(value),))
    assert render_metrics([family]).endswith(f"m {text}\n")


@pytest.mark.parametrize(
    "families",
    [
        [MetricFamily("bad-name", MetricType.GAUGE, "h", ())],
        [MetricFamily("m", MetricType.GAUGE, "h", (Sample(1, {"__x": "v"}),))],
        [MetricFamily("m", MetricType.GAUGE, "h", (Sample(1, {"0x": "v"}),))],
        [
            MetricFamily("m", MetricType.GAUGE, "h", ()),
            MetricFamily("m", MetricType.GAUGE, "h", ()),
        ],
        [MetricFamily("m", MetricType.GAUGE, "h", (Sample(1, {"a": "1"}), Sample(2, {"a": "1"})))],
        [MetricFamily("m", MetricType.GAUGE, "h", (Sample(True),))],
    ],
)
def test_exposition_rejects_invalid_names_duplicates_and_non_numbers(
    families: list[MetricFamily],
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        render_metrics(families)


# -- readiness rule ------------------------------------------------------------------


def test_readiness_requires_membership_a_leader_and_applied_caught_up() -> None:
    common = {"commit_index": 10, "applied_index": 10}
    assert readiness(in_cluster=False, leader="n1", **common)[0] is False
    assert readiness(in_cluster=True, leader=None, **common)[0] is False
    lagging = readiness(in_cluster=True, leader="n1", commit_index=10, applied_index=9)
    assert lagging == (False, "applying the log: applied 9 of committed 10")
    assert readiness(in_cluster=True, leader="n1", **common)[0] is True


# -- the server over loopback ------------------------------------------------------


@dataclass
class FakeSource:
    is_ready: tuple[bool, str] = (True, "leader n1, applied index 4")
    families: list[MetricFamily] = field(default_factory=list)
    status_value: Mapping[str, object] = field(
        default_factory=lambda: {"id": "n1", "role": "leader", "term": 3}
    )
    fail: bool = False

    def ready(self) -> tuple[bool, str]:
        return self.is_ready

    def metrics(self) -> Iterable[MetricFamily]:
        if self.fail:
            raise RuntimeError("reporting bug")
        return self.families

    def status(self) -> Mapping[str, object]:
        return self.status_value


@dataclass
class Server:
    source: FakeSource
    port: int


async def _start(
    nursery: trio.Nursery, source: FakeSource, config: OpsServerConfig | None = None
) -> Server:
    listeners = await nursery.start(partial(serve_ops, config=config), source, "127.0.0.1", 0)
    return Server(source, listeners[0].socket.getsockname()[1])


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        yield await _start(nursery, FakeSource())
        nursery.cancel_scope.cancel()


async def _exchange(port: int, data: bytes) -> bytes:
    """Send `data`, then read the whole answer until the server closes."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(data)
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def _split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body


async def _get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    return _split(await _exchange(port, request))


async def test_healthz_answers_200_ok_and_closes(server: Server) -> None:
    status, headers, body = await _get(server.port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    assert headers["connection"] == "close"
    assert headers["content-length"] == "3"


async def test_readyz_is_200_when_ready_and_503_with_reason_otherwise(server: Server) -> None:
    status, _, body = await _get(server.port, "/readyz")
    assert status == 200
    assert body == b"ready: leader n1, applied index 4\n"
    server.source.is_ready = (False, "no known leader")
    status, _, body = await _get(server.port, "/readyz")
    assert (status, body) == (503, b"not ready: no known leader\n")


async def test_metrics_served_as_prometheus_text(server: Server) -> None:
    server.source.families = [
        MetricFamily("gcks_raft_term", MetricType.GAUGE, "Current term.", (Sample(3),))
    ]
    status, headers, body = await _get(server.port, "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert body.decode().endswith("gcks_raft_term 3\n")


async def test_status_served_as_json(server: Server) -> None:
    status, headers, body = await _get(server.port, "/status")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {"id": "n1", "role": "leader", "term": 3}


async def test_head_gives_headers_without_body(server: Server) -> None:
    status, headers, body = await _get(server.port, "/status", method="HEAD")
    assert status == 200
    assert int(headers["content-length"]) > 0
    assert body == b""


async def test_unknown_path_is_404(server: Server) -> None:
    status, _, _ = await _get(server.port, "/admin")
    assert status == 404


async def test_post_is_405_with_allow_header(server: Server) -> None:
    status, headers, _ = await _get(server.port, "/status", method="POST")
    assert status == 405
    assert headers["allow"] == "GET, HEAD"


async def test_oversized_headers_are_431_and_logged(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gcks.cluster.ops")
    request = b"GET / HTTP/1.1\r\nHost: a\r\nCookie: " + b"c" * (MAX_HEADER_BYTES + 10)
    status, _, _ = _split(await _exchange(server.port, request + b"\r\n\r\n"))
    assert status == 431
    assert any("refused request: 431" in record.getMessage() for record in caplog.records)


async def test_garbage_bytes_get_400_and_the_server_keeps_serving(server: Server) -> None:
    status, _, _ = _split(await _exchange(server.port, b"\x00\xff\x16\x03garbage\r\n\r\n"))
    assert status == 400
    status, _, _ = await _get(server.port, "/healthz")
    assert status == 200


async def test_failing_source_gives_500_and_the_server_keeps_serving(server: Server) -> None:
    server.source.fail = True
    status, _, _ = await _get(server.port, "/metrics")
    assert status == 500
    status, _, _ = await _get(server.port, "/healthz")
    assert status == 200


async def test_status_that_is_not_json_gives_500(server: Server) -> None:
    server.source.status_value = {"bad": math.nan}
    status, _, _ = await _get(server.port, "/status")
    assert status == 500


def _urlopen(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def test_standard_http_client_reads_every_endpoint(server: Server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    server.source.is_ready = (False, "no known leader")
    results = {
        path: await trio.to_thread.run_sync(_urlopen, base + path)
        for path in ("/healthz", "/readyz", "/metrics", "/status", "/nope")
    }
    assert [results[path][0] for path in results] == [200, 503, 200, 200, 404]
    assert json.loads(results["/status"][2])["role"] == "leader"


# -- deadlines and bounds, under a mock clock --------------------------------------


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_slow_client_is_cut_by_the_read_deadline_with_408(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = OpsServerConfig(read_timeout_s=5.0)
    async with trio.open_nursery() as nursery:
        served = await _start(nursery, FakeSource(), config)
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        start = trio.current_time()
        # A slowloris: one byte a second; the deadline covers the whole request head.
        received = bytearray()

        async def dribble() -> None:
            for byte in b"GET /healthz HTTP/1.1\r\nHost: a\r\n":
                try:
                    await stream.send_all(bytes([byte]))
                except trio.BrokenResourceError:
                    return
                await trio.sleep(1)

        async with trio.open_nursery() as client:
            client.start_soon(dribble)
            with trio.fail_after(60):
                while chunk := await stream.receive_some(4096):
                    received += chunk
            elapsed = trio.current_time() - start
            client.cancel_scope.cancel()
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert _split(bytes(received))[0] == 408
    assert 5.0 <= elapsed < 7.0


async def test_idle_connection_closed_silently_at_the_read_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        served = await _start(nursery, FakeSource(), OpsServerConfig(read_timeout_s=3.0))
        stream = await trio.open_tcp_stream("127.0.0.1", served.port)
        with trio.fail_after(60):
            assert await stream.receive_some(4096) == b""
        assert trio.current_time() >= 3.0
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_bound_wait_for_a_free_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = OpsServerConfig(read_timeout_s=5.0, max_connections=1)
    async with trio.open_nursery() as nursery:
        served = await _start(nursery, FakeSource(), config)
        hog = await trio.open_tcp_stream("127.0.0.1", served.port)
        await hog.send_all(b"GET /")  # holds the only slot until its deadline
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        status, _, _ = _split(
            await _exchange(served.port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        )
        assert status == 200
        assert trio.current_time() - start >= 5.0
        await hog.aclose()
        nursery.cancel_scope.cancel()


def test_server_config_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="read_timeout_s"):
        OpsServerConfig(read_timeout_s=0)
    with pytest.raises(ValueError, match="max_connections"):
        OpsServerConfig(max_connections=0)
