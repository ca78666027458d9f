"""Alembic migrations produce exactly the schema the models describe, on both databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from engine.store.database import Store
from engine.store.models import Base


def test_upgrade_head_on_an_empty_database_matches_the_models(db_url: str) -> None:
    store = Store(db_url)
    assert store.current_revision() is None
    assert store.migrate() is True
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert store.current_revision() == store.head_revision()
    store.close()


def test_migrating_twice_is_a_no_op(db_url: str) -> None:
    store = Store(db_url)
    store.migrate()
    tables = set(inspect(store.engine).get_table_names())
    assert store.migrate() is False
    assert set(inspect(store.engine).get_table_names()) == tables
    assert {"members", "events", "enrollments", "messages", "journey_versions", "suppressions"} <= tables
    store.close()


def test_a_new_sqlite_database_gets_16k_pages_and_an_existing_one_keeps_its_own(tmp_path: Path) -> None:
    fresh = Store(f"sqlite:///{tmp_path / 'fresh.db'}")
    fresh.migrate()
    with fresh.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 16384
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    fresh.close()

    old_path = tmp_path / "old.db"
    with sqlite3.connect(old_path) as old:  # made by an earlier version: SQLite's default pages
        old.execute("CREATE TABLE kept (x INTEGER)")
        old.execute("INSERT INTO kept VALUES (1)")
    old.close()
    store = Store(f"sqlite:///{old_path}")
    store.migrate()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA page_size").scalar() == 4096
        assert conn.exec_driver_sql("SELECT x FROM kept").scalar() == 1
        assert "messages" in inspect(conn).get_table_names()
    store.close()
