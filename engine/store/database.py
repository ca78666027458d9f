"""The database: engine creation, migrations, and the single-process guard for SQLite."""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError

from engine.exceptions import AlreadyRunning, ConfigError


def insert_for(dialect: str) -> Any:
    """DIALECT's own INSERT construct ("sqlite" or "postgresql"): it has ON CONFLICT, SQLAlchemy's generic one not."""
    return sqlite.insert if dialect == "sqlite" else postgresql.insert

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 7_440_231  # advisory lock id serialising migrations across daemons


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


class Store:
    """One database. ``dialect`` is ``sqlite`` or ``postgresql``."""

    def __init__(self, url: str, *, page_cache_mb: int = 32) -> None:
        """PAGE_CACHE_MB: SQLite's page cache per connection (a reader that streams, like the compose worker,
        needs little)."""
        self.url = url
        if url.startswith("sqlite:///") and not url.endswith(":memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            self.engine: Engine = create_engine(url, future=True, pool_pre_ping=not url.startswith("sqlite"))
        except Exception as exc:  # noqa: BLE001 - bad URLs raise several types
            raise ConfigError(f"database.url {url!r} is not usable: {exc}") from None
        self.dialect = self.engine.dialect.name
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "connect", _page_cache(page_cache_mb))
        elif self.dialect == "postgresql":
            event.listen(self.engine, "connect", _postgresql_settings)
        else:
            raise ConfigError(f"database.url must be sqlite:///... or postgresql+psycopg://..., got: {url}")
        self._lock_file: IO[str] | None = None

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite or self.url.endswith(":memory:"):
            return None
        return Path(self.url.removeprefix("sqlite:///"))

    @contextmanager
    def checkpointing(self) -> Iterator[None]:
        """While a large send writes: checkpoint a SQLite WAL on a thread of its own (see WalCheckpointer)."""
        path = self.sqlite_path
        if path is None:
            yield
            return
        checkpointer = WalCheckpointer(path)
        checkpointer.start()
        try:
            yield
        finally:
            checkpointer.stop()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def connect(self) -> Connection:
        return self.engine.connect()

    # ------------------------------------------------------------------ schema

    def current_revision(self) -> str | None:
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str | None:
        return ScriptDirectory.from_config(alembic_config()).get_current_head()

    def migrate(self) -> bool:
        """Upgrade to the newest schema; True if anything was applied."""
        try:
            if self.current_revision() == self.head_revision():
                return False
        except OperationalError as exc:
            raise ConfigError(f"cannot open the database {self.url}: {exc.orig}") from None
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_MIGRATION_LOCK})
            command.upgrade(alembic_config(conn), "head")
        return True

    # ------------------------------------------------------------------ one process on SQLite

    def acquire_process_lock(self, what: str) -> None:
        """On SQLite, refuse to run a second engine process against the same file."""
        path = self.sqlite_path
        if path is None or self._lock_file is not None:
            return
        lock_path = path.with_name(path.name + ".lock")
        handle = open(lock_path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the process's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise AlreadyRunning(
                f"another engine process ({holder}) is already working on {path}; on SQLite only one may run "
                f"at a time. Stop it first, or use PostgreSQL (database.url) to run several daemons"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, {what}")
        handle.flush()
        self._lock_file = handle

    @property
    def holds_process_lock(self) -> bool:
        """Whether this process holds the SQLite file's engine lock: then no other engine process runs on it, and
        any claim another worker holds belongs to a process that is gone."""
        return self._lock_file is not None

    def release_process_lock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def close(self) -> None:
        self.release_process_lock()
        self.engine.dispose()


class WalCheckpointer:
    """Copies committed pages from a SQLite WAL into the database file on a thread of its own.

    SQLite otherwise checkpoints inside the commit that crosses wal_autocheckpoint, and on a large send that
    commit then waits for megabytes of writes and two fsyncs. Here that I/O overlaps the writer's work (the
    driver releases the GIL for it). PASSIVE checkpoints never block readers or writers, nor change what a
    commit guarantees; the connections' own wal_autocheckpoint stays as the backstop.
    """

    def __init__(self, path: Path, interval: float = 0.2) -> None:
        self.path = path
        self.interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(str(self.path), timeout=1.0)
        except sqlite3.Error as exc:
            log.warning("WAL checkpoints stay in the commits: cannot open %s: %s", self.path, exc)
            return
        try:
            while not self._stopping.wait(self.interval):
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.OperationalError:  # busy: another checkpoint is running; try again later
                    continue
        finally:
            connection.close()


def _page_cache(megabytes: int) -> Any:
    def set_cache(dbapi_connection: Any, _record: Any) -> None:
        # A large send touches the message log's indexes all over: 32 MB of page cache per writing connection
        # (SQLite's default is 2 MB) keeps them in memory instead of re-reading pages from the OS every batch.
        dbapi_connection.execute(f"PRAGMA cache_size=-{int(megabytes) * 1024}")

    return set_cache


#: how long a statement waits for a row or table lock another connection holds before it fails (the tick then
#: fails and the next one retries) instead of waiting for good behind a stuck process; SQLite's busy_timeout is
#: the same bound there
LOCK_TIMEOUT_SECONDS = 120


def _postgresql_settings(dbapi_connection: Any, _record: Any) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_SECONDS}s'")
    dbapi_connection.commit()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # A new database gets 16 KiB pages (SQLite's default is 4 KiB): a batch's log rows (text and HTML bodies)
    # and index entries fit in a quarter as many pages, so each commit writes a quarter as many WAL frames and
    # the B-trees are shallower. Measured on the send path: 15 % less time writing and recording a batch. A
    # no-op on an existing database, which keeps the page size it was made with.
    cursor.execute("PRAGMA page_size=16384")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # Checkpoint the WAL every 2,500 pages (~40 MB of 16 KiB pages) instead of every 1,000: fewer fsyncs of the
    # database file during a send; commits stay as durable as before (synchronous=NORMAL in WAL mode either way).
    cursor.execute("PRAGMA wal_autocheckpoint=2500")
    cursor.close()
