"""Fixtures: every database test runs on SQLite and on a real PostgreSQL.

PostgreSQL: ENGINE_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test). Each test gets
its own schema, dropped afterwards. Without a reachable server the PostgreSQL cases are skipped with the
reason shown — except under CI=true, where they fail: CI must test PostgreSQL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from engine.store.database import Store
from engine.testing import Harness

PG_URL = os.environ.get("ENGINE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_pg_error: str | None = None


def _pg_available() -> str | None:
    global _pg_error
    if _pg_error is None:
        try:
            engine = create_engine(PG_URL)
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _pg_error = ""
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            _pg_error = f"PostgreSQL not reachable at {PG_URL}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return _pg_error or None


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    problem = _pg_available()
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{problem} (CI must run the PostgreSQL tests)")
        pytest.skip(problem)
    return PG_URL


def _pg_schema_url(base: str) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(base)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'engine.db'}"
    else:
        base = request.getfixturevalue("pg_base_url")
        yield from _pg_schema_url(base)


@pytest.fixture
def pg_url(pg_base_url: str) -> Iterator[str]:
    yield from _pg_schema_url(pg_base_url)


@pytest.fixture(scope="session", autouse=True)
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty SQLite database at the newest migration, made once: every Harness on a new SQLite file starts from
    a copy (Harness.template). Tests of the migrations themselves use a Store on db_url, which starts empty."""
    path = tmp_path_factory.mktemp("template") / "engine.db"
    store = Store(f"sqlite:///{path}")
    store.migrate()
    store.close()
    Harness.template = path
    yield path
    Harness.template = None


@pytest.fixture
def harness(tmp_path: Path, db_url: str) -> Iterator[Harness]:
    h = Harness(tmp_path, db_url)
    yield h
    h.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tier (``-m slow``; ``-m "not slow"`` is the fast one, under a minute): every PostgreSQL case (a
    server round trip per statement, a schema per test) and the modules that mark themselves slow (processes,
    sockets, large populations). The full suite, which CI runs, is both."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        on_postgresql = callspec is not None and callspec.params.get("db_url") == "postgresql"
        if on_postgresql or "pg_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
