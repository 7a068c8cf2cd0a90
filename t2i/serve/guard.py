"""Connection-level defences of ``t2i serve``: slow clients, connection floods and log floods.

uvicorn times out idle keep-alive connections, but not a client that connects and then sends its headers or body a
byte at a time (slowloris). Twenty thousand such connections used to exhaust the process's file descriptors, after
which every client, keyed or not, timed out, and the accept loop logged "Too many open files" without end. Three
bounds fix that at the root:

- **a deadline per request**: headers and body must arrive within ``request_read_s`` of the connection opening
  (or of the previous response on a keep-alive connection), else the connection is closed. A real client sends a
  request in one write; only a slow or hostile one is ever cut;
- **a bounded number of connections**: at ``max_connections`` the oldest connection still *sending* its request is
  dropped to make room (never one whose request is being served), so a flood of slow connections cannot lock out a
  client that sends its request at once. The limit is kept below the process's file-descriptor limit;
- **bounded logging**: each distinct warning is logged at most ``burst`` times a minute; then one line says how many
  were suppressed.

``uvicorn_config`` builds the uvicorn configuration with all three; ``t2i serve`` and the tests' live server use it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("t2i.serve")
_FD_RESERVE = 64  # descriptors kept free for model files, logs and the listening socket


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 512
    request_read_s: float = 10.0  # headers + body of one request, from the connection's first byte opportunity
    keep_alive_s: float = 5.0  # idle time allowed between requests on one connection


def usable_connections(wanted: int) -> int:
    """``wanted``, lowered to fit the file-descriptor limit (raising the soft limit to the hard one when allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + _FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - _FD_RESERVE))


class _Guard:
    """Per-server bookkeeping shared by its connections: who is still sending a request, and since when."""

    GRACE_S = 1.0  # a connection that has sent nothing yet is spared this long: its request may be in flight

    def __init__(self, limits: ConnectionLimits):
        self.limits = limits
        self.reading: dict[GuardedH11Protocol, float] = {}  # insertion order = oldest first
        self.dropped_slow = 0
        self.dropped_full = 0

    def victim(self) -> GuardedH11Protocol | None:
        """The connection to drop for a newcomer: the oldest that sent part of a request and stalled (slowloris),
        else the oldest that has sent nothing for ``GRACE_S``; never one being served. None: drop the newcomer.

        A client that sends its whole request at once leaves ``reading`` as soon as it arrives, so a flood of
        connections that never finish their requests evicts itself, not the clients that do."""
        now, idle = time.monotonic(), None
        for conn, since in self.reading.items():
            if conn._got_data:
                return conn
            if idle is None and now - since >= self.GRACE_S:
                idle = conn
        return idle


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a per-request read deadline and a connection bound (see the module docstring)."""

    guard: _Guard  # set on the subclass ``uvicorn_config`` makes

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._got_data = False
        limit = self.guard.limits.max_connections
        if len(self.connections) > limit:
            self.guard.dropped_full += 1
            victim = self.guard.victim()
            if victim is None:  # every other connection is being served or has just arrived: the newcomer goes
                transport.abort()
                return
            victim._drop()
        self._start_reading()

    def data_received(self, data: bytes) -> None:
        self._got_data = True
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):  # part of a request has arrived, not all of it
            if self._deadline is None:
                self._start_reading()
        else:
            self._done_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._done_reading()
        super().connection_lost(exc)

    # -- the read deadline ---------------------------------------------------------------------------------------

    def _start_reading(self) -> None:
        self.guard.reading[self] = time.monotonic()
        self._deadline = self.loop.call_later(self.guard.limits.request_read_s, self._too_slow)

    def _done_reading(self) -> None:
        self.guard.reading.pop(self, None)
        deadline, self._deadline = getattr(self, "_deadline", None), None
        if deadline is not None:
            deadline.cancel()

    def _too_slow(self) -> None:
        self._deadline = None
        self.guard.dropped_slow += 1
        log.warning("closed a connection that did not send its request within %g s", self.guard.limits.request_read_s)
        self._drop()

    def _drop(self) -> None:
        self._done_reading()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True
        self.transport.abort()  # no lingering close: the descriptor is free at once


class RateLimitedLog(logging.Filter):
    """Let each distinct message template through at most ``burst`` times per ``window`` seconds; then report how
    many were dropped in one line when the window rolls over."""

    def __init__(self, burst: int = 20, window: float = 60.0):
        super().__init__()
        self.burst, self.window = burst, window
        self.start = time.monotonic()
        self.counts: dict[tuple[str, object], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self.start >= self.window:
            dropped = sum(max(0, c - self.burst) for c in self.counts.values())
            self.start, self.counts = now, {}
            if dropped:
                record.msg = (
                    f"{dropped} repeated log lines suppressed in the last {self.window:g} s; then: {record.msg}"
                )
        key = (record.name, record.msg)
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key] <= self.burst


def install_log_limits(burst: int = 20, window: float = 60.0) -> RateLimitedLog:
    """Rate-limit the loggers a flood can drive: uvicorn's errors, asyncio's (the accept loop) and t2i.serve's.
    Access lines are left alone: there is one per answered request, so the request rate already bounds them."""
    flt = RateLimitedLog(burst, window)
    for name in ("uvicorn", "uvicorn.error", "asyncio", "t2i.serve"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedLog) for f in logger.filters):
            logger.addFilter(flt)
    return flt


def uvicorn_config(app, *, host: str, port: int, limits: ConnectionLimits | None = None, log_level: str = "info"):
    """A uvicorn ``Config`` serving ``app`` with the connection guard; its ``guard`` attribute holds the counters."""
    import uvicorn

    limits = limits or ConnectionLimits()
    limits = ConnectionLimits(usable_connections(limits.max_connections), limits.request_read_s, limits.keep_alive_s)
    guard = _Guard(limits)
    protocol = type("GuardedH11", (GuardedH11Protocol,), {"guard": guard})
    # a modest backlog: the event loop accepts up to `backlog` sockets per turn, and a flood accepted all at once
    # would crowd out the turn in which a real client's request is read
    backlog = min(256, limits.max_connections)
    config = uvicorn.Config(app, host=host, port=port, http=protocol, log_level=log_level,
                            timeout_keep_alive=limits.keep_alive_s, backlog=backlog)  # fmt: skip
    config.guard = guard
    install_log_limits()
    return config
