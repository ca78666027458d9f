"""The long-running processes: ``run.py serve`` (scheduler, plus the HTTP service in a thread) and ``run.py web``.

APScheduler is the clock, calling the same tick every scheduler.interval
seconds. It keeps no state of ours (its 3.x job stores must not be shared
between processes); all state lives in our tables, and each tick catches up
from the database. SIGTERM/SIGINT stop gracefully: the tick in progress stops
after the batch in hand, its claims are released, the HTTP service finishes
the requests in flight, then the process exits.

uvicorn is never allowed its own signal handlers: in ``serve`` the daemon owns
SIGTERM/SIGINT, and in ``web`` we install ours, so both stop the same way.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger

from engine.app import App
from engine.audit import anchors
from engine.config import listen_address as config_listen_address
from engine.exceptions import ConfigError, EngineError
from engine.http.server import Limits, QuietServer, bound_socket, make_server
from engine.store.quarantine import describe, quarantined_total
from engine.tick.health import TickHealth

log = logging.getLogger("engine.cli.daemon")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def listen_address(listen: str) -> tuple[str, int]:
    """web.listen as (host, port) (engine.config.listen_address), a bad one as a ConfigError naming the key."""
    try:
        return config_listen_address(listen)
    except ValueError as exc:
        raise ConfigError(f"web.listen {exc}") from None


def http_server(app: App, listen: str, health: TickHealth | None = None) -> tuple[QuietServer, socket.socket]:
    """The HTTP service for APP, and its socket, already bound (so a busy port is our clear error, not uvicorn's
    sys.exit from inside a thread). HEALTH: the daemon's tick record, when the service runs inside one."""
    from engine.http.app import create_app

    host, port = listen_address(listen)
    try:
        sock = bound_socket(host, port)
    except OSError as exc:
        raise EngineError(f"cannot listen on {listen} (web.listen): {exc.strerror or exc}") from None
    web = app.config.web
    limits = Limits(web.read_timeout, web.keepalive_timeout, web.max_connections)
    return make_server(create_app(app, health=health), limits), sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve_http(app: App, listen: str) -> None:
    """``run.py web``: serve HTTP in this thread until SIGTERM/SIGINT (a second SIGINT stops at once)."""
    server, sock = http_server(app, listen)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the requests in flight, then stopping", signal.Signals(signum).name)
        server.force_exit = server.should_exit and signum == signal.SIGINT
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    log.info("HTTP service listening on %s (public URL %s)", _url(sock), app.config.web.public_url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("HTTP service stopped")


class WebThread:
    """The HTTP service inside ``run.py serve``, in a background thread that the daemon starts and stops."""

    def __init__(self, app: App, listen: str, health: TickHealth | None = None) -> None:
        self.app, self.listen, self.health = app, listen, health
        self.server: QuietServer | None = None
        self.socket: socket.socket | None = None
        self.thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> None:
        self.server, self.socket = http_server(self.app, self.listen, self.health)
        self.url = _url(self.socket)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, name="web",
                                       daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.server.started:
            self.stop()
            raise EngineError(f"the HTTP service did not start on {self.url}; see the log above")
        log.info("HTTP service listening on %s (public URL %s)", self.url, self.app.config.web.public_url)

    def stop(self, timeout: float = 15.0) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout)
        if self.socket is not None:
            self.socket.close()


class Daemon:
    def __init__(self, app: App, web: WebThread | None = None, health: TickHealth | None = None, *,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.app = app
        self.web = web
        self.clock = clock  # the wall clock; tests pass their own
        self.health = health or TickHealth(app.config.scheduler.interval, clock(), app.reconciled)
        if web is not None:
            web.health = self.health
        self.stopping = threading.Event()
        self.ticks = 0

    def tick(self) -> None:
        now = self.clock()
        started = time.monotonic()
        try:
            report = self.app.tick(now, stop=self.stopping.is_set)
        except Exception as exc:
            log.exception("tick at %s failed; the next tick will retry", now.isoformat(timespec="seconds"))
            self.health.record(now, time.monotonic() - started, None, describe(exc), self._quarantined())
            return
        self.ticks += 1
        self.health.record(now, report.seconds, report, None, self._quarantined())
        log.info("tick %s: %s (%.2fs)", now.isoformat(timespec="seconds"), report.summary(), report.seconds)
        for problem in report.problems:
            log.warning("set aside: %s", problem)
        for error in report.errors:
            log.error("phase failed: %s", error)

    def anchor(self) -> None:
        """Append the chain's head to audit.anchor_file (see engine.audit.anchors)."""
        path = self.app.config.path(str(self.app.config.audit.anchor_file))
        try:
            with self.app.store.connect() as conn:
                anchor = anchors.take(conn, self.clock())
            anchors.append(path, anchor)
        except Exception:
            log.exception("could not append an audit anchor to %s; trying again at the next interval", path)
            return
        log.info("audit anchor: %d rows, head %s…, appended to %s", anchor.rows, anchor.hash[:12], path)

    def _quarantined(self) -> int | None:
        try:
            with self.app.store.connect() as conn:
                return quarantined_total(conn)
        except Exception:
            log.warning("could not count quarantined work", exc_info=True)
            return None

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing the batch in hand, then stopping", signal.Signals(signum).name)
        self.stopping.set()

    def run(self) -> None:
        self.app.store.acquire_process_lock("serve")
        if self.web is not None:
            self.web.start()  # first: a busy port stops us before anything is claimed
        try:
            self._schedule()
        finally:
            # After the scheduler: webhooks and STOP keywords keep flowing until the last tick has finished.
            if self.web is not None:
                self.web.stop()

    def _schedule(self) -> None:
        interval = self.app.config.scheduler.interval
        scheduler = BackgroundScheduler(timezone=UTC, job_defaults={
            "coalesce": True, "max_instances": 1,
            # APScheduler's default grace is 1 s: a late tick would be dropped. Ours must always run.
            "misfire_grace_time": None,
        })
        scheduler.add_job(self.tick, IntervalTrigger(seconds=interval, timezone=UTC), id="tick",
                          next_run_time=datetime.now(UTC))
        audit = self.app.config.audit
        if audit.anchor_file:
            scheduler.add_job(self.anchor, IntervalTrigger(seconds=audit.anchor_every, timezone=UTC), id="anchor",
                              next_run_time=datetime.now(UTC))
        previous = {sig: signal.signal(sig, self._signal) for sig in STOP_SIGNALS}
        book = self.app.rules()
        log.info("serving %d journeys from %s every %ss on %s (worker %s)", len(book.journeys),
                 self.app.config.rules_path, interval, self.app.store.dialect, self.app.worker)
        scheduler.start()
        try:
            self.stopping.wait()
        finally:
            scheduler.shutdown(wait=True)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            log.info("stopped after %d ticks", self.ticks)
