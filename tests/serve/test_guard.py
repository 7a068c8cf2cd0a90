"""Connection guard: slow clients are cut, a flood of them cannot lock out a real client, logs stay bounded."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time

import pytest
from live_server import LiveServer

from t2i.pipelines.folders import load_generator
from t2i.serve.app import ServeConfig, create_app
from t2i.serve.guard import ConnectionLimits, RateLimitedLog, usable_connections

PARTIAL = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"  # headers never end


def _slow_socket(port: int, payload: bytes = PARTIAL) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(payload)
    return s


def _closed_by_server(s: socket.socket, within: float) -> bool:
    """True when the server ends the connection within ``within`` s (after any response it chose to send first:
    a keyed route answers 401 from the headers alone)."""
    end = time.monotonic() + within
    try:
        while (left := end - time.monotonic()) > 0:
            s.settimeout(left)
            if s.recv(4096) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


def _generate(port: int, **body) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", "/v1/images/generations", json.dumps({"prompt": "x", "steps": 1, **body}),
                 {"content-type": "application/json", "authorization": "Bearer k"})  # fmt: skip
    r = conn.getresponse()
    return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def generator(sd3_folder):
    return load_generator(sd3_folder)


def test_a_client_that_never_finishes_its_request_is_cut(generator, tmp_path):
    app = create_app(ServeConfig(output_dir=tmp_path, api_keys=["k"]), generators={"m": generator})
    with LiveServer(app, ConnectionLimits(max_connections=50, request_read_s=0.5)) as srv:
        headers_only = _slow_socket(srv.port)
        half_body = _slow_socket(srv.port, PARTIAL + b"\r\n" + b'{"prompt": ')
        silent = _slow_socket(srv.port, b"")
        for s in (headers_only, half_body, silent):
            assert _closed_by_server(s, within=3.0)
        assert srv.config.guard.dropped_slow == 3


def test_a_flood_of_slow_connections_cannot_lock_out_a_keyed_client(generator, tmp_path):
    app = create_app(ServeConfig(output_dir=tmp_path, api_keys=["k"], batch_window_ms=0), generators={"m": generator})
    with LiveServer(app, ConnectionLimits(max_connections=16, request_read_s=30.0)) as srv:
        flood = [_slow_socket(srv.port) for _ in range(64)]  # 4x the bound, none ever finishing
        time.sleep(0.3)
        assert len(srv.server.server_state.connections) <= 16
        status, body = _generate(srv.port, seed=3)
        assert status == 200 and body["data"][0]["seed"] == 3
        assert srv.config.guard.dropped_full >= 64 - 16
        for s in flood:
            s.close()


def test_a_request_being_served_is_never_cut_by_the_read_deadline(generator, tmp_path):
    class Slow:  # sampling that takes longer than the read deadline
        def __getattr__(self, name):
            return getattr(generator, name)

        def generate(self, *args, **kwargs):
            time.sleep(1.2)
            return generator.generate(*args, **kwargs)

    app = create_app(ServeConfig(output_dir=tmp_path, api_keys=["k"], batch_window_ms=0), generators={"m": Slow()})
    with LiveServer(app, ConnectionLimits(max_connections=4, request_read_s=0.4)) as srv:
        status, _ = _generate(srv.port)
        assert status == 200 and srv.config.guard.dropped_slow == 0


def test_repeated_log_lines_are_bounded():
    flt = RateLimitedLog(burst=3, window=60.0)
    rec = lambda: logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Too many open files", None, None)  # noqa: E731
    passed = sum(flt.filter(rec()) for _ in range(10_000))
    assert passed == 3
    flt.start -= 61  # the window rolls over: one line reports the suppressed count
    line = rec()
    assert flt.filter(line) and "9997 repeated log lines suppressed" in line.getMessage()


def test_the_connection_bound_fits_the_descriptor_limit():
    assert 1 <= usable_connections(10**9) < 10**9
    assert usable_connections(8) == 8
