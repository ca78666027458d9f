"""Alembic migrations produce exactly the schema the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from engine.models import Base
from engine.store import Store


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
